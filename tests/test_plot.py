"""Training curves: log parsing, the line-chart geometry, the PNG and the one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.plot import (
    BACKGROUND,
    FIGURE_SIZE,
    PALETTE,
    collect_series,
    draw_line_chart,
    format_tick,
    main,
    nice_ticks,
    plot_run,
    read_log,
    scale,
)


def _records(epochs: int = 12) -> list[dict]:
    """Engine-like records: falling losses, warm-up lr, an evaluation every 4 epochs."""
    records = []
    for epoch in range(1, epochs + 1):
        record = {
            "epoch": epoch,
            "step": epoch * 50,
            "lr": 3.5e-4 * min(1.0, epoch / 4),
            "time_s": 12.5,
            "loss": 6 * math.exp(-epoch / 5) + 1,
            "ce": 5 * math.exp(-epoch / 5) + 0.5,
            "triplet": 0.5,
            "sp": 0.3,
            "split_probability": {"layer1.0.bn1": 0.5},
        }
        if epoch % 4 == 0:
            record["sysu_all_bnneck_rank1"] = 20.0 + 3 * epoch
            record["sysu_all_bnneck_mAP"] = 15.0 + 2 * epoch
            record["regdb_v2i_pool_rank1"] = 30.0 + epoch
        records.append(record)
    return records


def _write_log(run_dir: Path, lines: list[str]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "log.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _run_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI expecting a user error; return its one stderr line."""
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_curves_png_has_every_panel_drawn(tmp_path: Path) -> None:
    _write_log(tmp_path, [json.dumps(r) for r in _records()])
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png"
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == FIGURE_SIZE
        pixels = np.asarray(image.convert("RGB"))
    # The four panels fill the quadrants below the heading; each must hold its first curve.
    height, width = pixels.shape[:2]
    body = pixels[60:]
    half_h, half_w = body.shape[0] // 2, width // 2
    for row in range(2):
        for col in range(2):
            panel = body[row * half_h : (row + 1) * half_h, col * half_w : (col + 1) * half_w]
            assert (panel != BACKGROUND).any(axis=-1).mean() > 0.01
            assert np.all(panel == PALETTE[0], axis=-1).sum() > 20, (row, col)


def test_cli_out_option(tmp_path: Path) -> None:
    _write_log(tmp_path / "run", [json.dumps(r) for r in _records(3)])
    out = tmp_path / "figures" / "c.png"
    assert run_cli(main, [str(tmp_path / "run"), "--out", str(out)]) == 0
    assert out.is_file() and not (tmp_path / "run" / "curves.png").exists()


def test_rising_series_goes_up_and_is_drawn_where_mapped() -> None:
    image = Image.new("RGB", (500, 300), BACKGROUND)
    points = [(1.0, 1.0), (2.0, 2.5), (3.0, 4.0)]
    frame = draw_line_chart(ImageDraw.Draw(image), (0, 0, 499, 299), {"up": points}, "t", "y")
    assert frame is not None
    pixel = [frame.to_pixel(x, y) for x, y in points]
    assert pixel[0][0] < pixel[1][0] < pixel[2][0]
    assert pixel[0][1] > pixel[1][1] > pixel[2][1]  # rows count downwards
    left, top, right, bottom = frame.plot_box
    for x, y in pixel + [((pixel[0][0] + pixel[1][0]) / 2, (pixel[0][1] + pixel[1][1]) / 2)]:
        assert left < x < right and top < y < bottom
        assert image.getpixel((round(x), round(y))) == PALETTE[0]


def test_empty_chart_says_so() -> None:
    image = Image.new("RGB", (300, 200), BACKGROUND)
    nan_only = {"x": [(1.0, float("nan"))]}
    assert draw_line_chart(ImageDraw.Draw(image), (0, 0, 299, 199), nan_only, "t", "y") is None
    assert np.asarray(image)[80:120].min() < 200  # the "nothing logged" note


def test_scale_and_ticks() -> None:
    assert scale(5.0, 0.0, 10.0, 100.0, 0.0) == 50.0
    assert scale(3.0, 3.0, 3.0, 0.0, 10.0) == 5.0
    assert nice_ticks(0.3, 9.2) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert nice_ticks(1, 3, count=6, integer=True) == [1.0, 2.0, 3.0]
    ticks = nice_ticks(0.0, 3.5e-4)
    assert ticks[0] == 0.0 and ticks[-1] >= 3.5e-4
    assert format_tick(2e-4, 1e-4) == "2e-4"
    assert format_tick(3.5e-4, 5e-5) == "3.5e-4"
    assert format_tick(0.5, 0.1) == "0.5"
    assert format_tick(40.0, 10.0) == "40"
    assert format_tick(1e-17, 0.2) == "0"


def test_series_split_into_panels(tmp_path: Path) -> None:
    records = _records(8)
    resumed = dict(records[1], loss=99.0)  # a resumed run logs epoch 2 again
    _write_log(tmp_path, [json.dumps(r) for r in [*records, resumed]])
    panels = collect_series(read_log(tmp_path))
    assert list(panels["loss"]) == ["total", "ce", "triplet", "sp"]
    assert [x for x, _ in panels["loss"]["total"]] == [float(e) for e in range(1, 9)]
    assert panels["loss"]["total"][1] == (2.0, 99.0)
    assert list(panels["rank1"]) == ["regdb_v2i_pool", "sysu_all_bnneck"]
    assert panels["mAP"] == {"sysu_all_bnneck": [(4.0, 23.0), (8.0, 31.0)]}
    assert len(panels["lr"]["lr"]) == 8


def test_error_missing_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert _run_error(capsys, [str(missing)]) == f"error: {missing}: run directory not found"


def test_error_missing_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = _run_error(capsys, [str(tmp_path)])
    assert message.startswith(f"error: {tmp_path / 'log.jsonl'}: no log.jsonl")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [("{not json", "not valid JSON"), ("", "empty line"), ("[1, 2]", "expected a JSON object")],
)
def test_error_malformed_line_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str, reason: str
) -> None:
    good = [json.dumps(r) for r in _records(3)]
    log_path = _write_log(tmp_path, [good[0], bad, good[2]])
    message = _run_error(capsys, [str(tmp_path)])
    assert message.startswith(f"error: {log_path}:2: {reason}")


def test_error_record_without_epoch(tmp_path: Path) -> None:
    log_path = _write_log(tmp_path, [json.dumps({"loss": 1.0})])
    with pytest.raises(UserError, match=f"{log_path}:1: record has no numeric 'epoch'"):
        read_log(tmp_path)


def test_error_nothing_to_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_log(tmp_path, [json.dumps({"epoch": 1, "step": 5, "time_s": 1.0})])
    assert "nothing to plot" in _run_error(capsys, [str(tmp_path)])
    _write_log(tmp_path, [])
    assert "nothing to plot" in _run_error(capsys, [str(tmp_path)])
    assert not (tmp_path / "curves.png").exists()


def test_fixed_x_range_lines_up_sparse_series() -> None:
    image = Image.new("RGB", (500, 300), BACKGROUND)
    draw = ImageDraw.Draw(image)
    dense = draw_line_chart(draw, (0, 0, 499, 299), {"a": [(1.0, 0.0), (20.0, 1.0)]}, "t", "y")
    sparse = draw_line_chart(
        draw, (0, 0, 499, 299), {"b": [(10.0, 5.0), (20.0, 9.0)]}, "t", "y", x_range=(1.0, 20.0)
    )
    assert dense is not None and sparse is not None
    assert sparse.x_range == (1.0, 20.0)
    assert sparse.to_pixel(1.0, 5.0)[0] < sparse.to_pixel(10.0, 5.0)[0]
