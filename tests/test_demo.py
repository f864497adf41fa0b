"""Tests of the demo's own pieces (utils/demo.py): its table, README and data reuse.

The pipeline itself is ``make demo``; these tests cover what the demo adds on top of the tools it
runs, without running them.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from utils import demo
from utils.base.cli import run_cli

METRICS = {"rank1": 25.5, "rank1_std": 1.25, "mAP": 33.0, "mAP_std": 0.5, "mINP": 27.0}


def test_table_shows_the_spread_over_trials() -> None:
    """Each metric with a spread reads `mean ± std`; one without reads the mean alone."""
    text = demo.table([("searched (seed 0)", "all single-shot", METRICS)])
    assert text.splitlines() == [
        "| architecture | protocol | Rank-1 | mAP | mINP |",
        "|---|---|---|---|---|",
        "| searched (seed 0) | all single-shot | 25.50 ± 1.25 | 33.00 ± 0.50 | 27.00 |",
    ]


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG")
    return path


def test_readme_links_every_picture_relatively(tmp_path: Path) -> None:
    """The README embeds each existing picture by a link relative to it, and the table."""
    out = tmp_path / "demo"
    runs = out / "runs"
    _touch(runs / "search_seed0" / "search_heatmap.png")
    _touch(runs / "searched_seed0" / "curves.png")
    for name in ("query00000_id3.png", "query00040_id9.png"):
        _touch(runs / "searched_seed0" / "rank_lists" / "sysu" / name)
    pictures = demo.pictures_of(out, [0], ["searched_seed0"])
    # The search run has no curves.png here: missing pictures are left out.
    assert [title.split(":")[0] for title, _ in pictures] == [
        "Search heat map (seed 0)",
        "Training curves",
        "Rank list",
        "Rank list",
    ]
    text = demo.readme("| a table |", pictures, out, "What ran.")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == [
        "runs/search_seed0/search_heatmap.png",
        "runs/searched_seed0/curves.png",
        "runs/searched_seed0/rank_lists/sysu/query00000_id3.png",
        "runs/searched_seed0/rank_lists/sysu/query00040_id9.png",
    ]
    assert all((out / link).is_file() for link in links)
    assert "| a table |" in text and "What ran." in text
    # Each kind of picture is explained once, however many there are.
    assert text.count("An infrared query (left)") == 1
    assert text.count("blue shared, white undecided, red split") == 1


def test_data_is_reused_only_with_the_asked_test_identities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """make_data regenerates when the folder's test split has another size than --test_ids."""
    calls: list[list[str]] = []
    monkeypatch.setattr(demo, "run_step", lambda name, command, stdout=None: calls.append(command))
    data = tmp_path / "data_seed0"
    (data / "exp").mkdir(parents=True)
    (data / "exp" / "test_id.txt").write_text("1,2,3\n")
    settings = demo.DemoSettings(out=str(tmp_path), test_ids=3)
    assert demo.make_data(settings, 0) == data
    assert calls == []
    demo.make_data(replace(settings, test_ids=5), 0)
    assert len(calls) == 1
    command = calls[0]
    assert command[command.index("--test_ids") + 1] == "5"
    assert command[command.index("--train_ids") + 1] == str(demo.TRAIN_IDS)
    assert demo.chance_level(data) == pytest.approx(100 / 3)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--test_ids", "1"], "error: --test_ids 1: expected at least 2\n"),
        (["--rank_lists", "-1"], "error: --rank_lists -1: expected a number >= 0\n"),
    ],
)
def test_bad_flags_are_one_line_errors(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad counts are refused before any step runs, with one error line."""
    assert run_cli(demo.main, ["--out", str(tmp_path / "demo"), *flags]) == 2
    assert capsys.readouterr().err == message
    assert list(tmp_path.iterdir()) == []


def test_crops_are_labelled_folders_of_test_identities(toy_sysu: Path, tmp_path: Path) -> None:
    crops = demo.make_crops(toy_sysu, tmp_path, ids=2)
    ids = [f"{int(pid):04d}" for pid in demo.test_ids_of(toy_sysu)[:2]]
    for modality, count, cams in (("infrared", 1, ("cam3", "cam6")), ("visible", 2, None)):
        assert sorted(p.name for p in (crops / modality).iterdir()) == sorted(ids)
        for identity in ids:
            files = sorted((crops / modality / identity).iterdir())
            assert len(files) == count
            camera = files[0].name.split("_")[0]
            assert (camera in cams) if cams else camera in ("cam1", "cam2", "cam4", "cam5")
    (tmp_path / "matches").mkdir()
    (tmp_path / "matches" / "metrics.json").write_text(
        '{"rank1": 50.0, "rank5": 100.0, "mAP": 75.0}'
    )
    text = "\n".join(demo.matches_section(tmp_path))
    assert "ranked 4 visible crops for each of 2 infrared crops" in text
    assert "Rank-1 50.00" in text and "[matches/index.html](matches/index.html)" in text
