"""``python -m utils.match``: ranked matches, their features, metrics, pages and errors."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_extract import save_checkpoint

from utils.base.cli import run_cli
from utils.evaluation.metrics import eval_ranking, summarize
from utils.evaluation.rerank import RerankSettings, rerank_features
from utils.evaluation.visualize import MATCH_COLOUR, MISMATCH_COLOUR, RankListLayout
from utils.match import main


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """Tiny convolutions run faster on one thread of the shared CPU."""


def labelled_crops(folder: Path, ids: list[str], per_id: int, grey: bool, seed: int) -> None:
    """``folder/<id>/<n>.png``: random crops, each identity with its own mean brightness."""
    rng = np.random.default_rng(seed)
    for number, identity in enumerate(ids):
        (folder / identity).mkdir(parents=True)
        for n in range(per_id):
            base = 40 + 50 * number
            shape = (64, 32) if grey else (64, 32, 3)
            pixels = np.clip(base + rng.integers(-30, 30, shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / identity / f"{n}.png")


def crop_set(root: Path) -> dict[str, Path]:
    """Labelled infrared and visible crops (one visible file broken) and a checkpoint."""
    labelled_crops(root / "infrared", ["0001", "0002", "0003"], 2, grey=True, seed=1)
    labelled_crops(root / "visible", ["0001", "0002", "0003", "0004"], 2, grey=False, seed=2)
    (root / "visible" / "0004" / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    weights = save_checkpoint(root / "checkpoint.pth", "sysu")
    return {"infrared": root / "infrared", "visible": root / "visible", "weights": weights}


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return crop_set(tmp_path_factory.mktemp("crops"))


def match_argv(crops: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--weights", str(crops["weights"]), "--query", str(crops["infrared"]),
        "--query_modality", "infrared", "--gallery", str(crops["visible"]),
        "--gallery_modality", "visible", "--out", str(out), *extra,
    ]  # fmt: skip


def euclidean(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    return np.linalg.norm(query[:, None, :] - gallery[None, :, :], axis=2)


def test_matches_metrics_pages_and_skipped(tmp_path, crops, capsys) -> None:
    out = tmp_path / "matches"
    extra = ("--labels_from_folders", "--topk", "3", "--pictures", "4", "--per_page", "3")
    code = run_cli(main, match_argv(crops, out, *extra))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    with np.load(out / "features.npz", allow_pickle=False) as data:
        saved = dict(data)
    query, gallery = saved["query_features"], saved["gallery_features"]
    assert query.shape == (6, 512) and gallery.shape == (8, 512)  # the broken image is left out
    assert list(saved["gallery_modality"]) == ["visible"] * 8
    assert list(saved["query_identity"]) == ["0001", "0001", "0002", "0002", "0003", "0003"]
    dist = euclidean(query.astype(np.float64), gallery.astype(np.float64))
    with (out / "matches.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 * 3
    gallery_paths = list(saved["gallery_paths"])
    for q, path in enumerate(saved["query_paths"]):
        mine = [r for r in rows if r["query"] == path]
        assert [int(r["rank"]) for r in mine] == [1, 2, 3]
        ranked = [gallery_paths.index(r["gallery"]) for r in mine]
        assert ranked == list(np.argsort(dist[q], kind="stable")[:3])
        for r, g in zip(mine, ranked, strict=True):
            assert abs(float(r["distance"]) - dist[q, g]) <= 1e-5
    # The printed metrics are eval_ranking's on the same features and folder identities.
    numbers = {"0001": 1, "0002": 2, "0003": 3, "0004": 4}
    q_pids = [numbers[i] for i in saved["query_identity"]]
    g_pids = [numbers[i] for i in saved["gallery_identity"]]
    expected = summarize(*eval_ranking(dist, np.array(q_pids), np.array(g_pids)))
    table = captured.out.strip().splitlines()[-1]
    printed = [float(cell) for cell in table.strip("| ").split(" | ")]
    keys = ("rank1", "rank5", "rank10", "mAP", "mINP")
    assert printed == pytest.approx([expected[key] for key in keys], abs=0.006)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mAP"] == pytest.approx(expected["mAP"])
    listed = json.loads((out / "matches.json").read_text())["queries"]
    assert [m["rank"] for m in listed[0]["matches"]] == [1, 2, 3]
    # Unreadable images: listed, warned about, left out.
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and "broken.jpg" in skipped[0]
    assert "1 unreadable image(s) skipped" in captured.err
    # Two pages of static HTML whose pictures exist; nothing fetched from elsewhere.
    pages = [out / "index.html", out / "page2.html"]
    pictures = []
    for page in pages:
        text = page.read_text()
        assert "<script" not in text and "http" not in text
        pictures += re.findall(r'src="([^"]+)"', text)
    assert len(pictures) == 4 and all((out / p).is_file() for p in pictures)
    first = out / pictures[0]
    top = [r for r in rows if r["query"] == saved["query_paths"][0]][0]
    same = Path(top["gallery"]).parent.name == "0001"
    left, top_y, right, bottom = RankListLayout().frame_box(1)
    with Image.open(first) as image:
        frame = image.convert("RGB").getpixel((left + 1, (top_y + bottom) // 2))
    assert frame == (MATCH_COLOUR if same else MISMATCH_COLOUR)


def test_rerank_distances(tmp_path, crops, capsys) -> None:
    out = tmp_path / "reranked"
    code = run_cli(main, match_argv(crops, out, "--rerank", "--k1", "4", "--k2", "2"))
    assert code == 0, capsys.readouterr().err
    with np.load(out / "features.npz", allow_pickle=False) as data:
        query, gallery = data["query_features"], data["gallery_features"]
    expected = rerank_features(query, gallery, RerankSettings(4, 2, 0.3))
    with (out / "matches.csv").open() as handle:
        first = next(csv.DictReader(handle))
    assert float(first["distance"]) == pytest.approx(float(expected[0].min()), abs=1e-6)
    settings = json.loads((out / "matches.json").read_text())
    assert settings["rerank"] == {"k1": 4, "k2": 2, "lambda_value": 0.3}
    assert settings["metrics"] is None and not (out / "metrics.json").exists()


def test_errors(tmp_path, crops, capsys, read_only_folder, expect_error: Callable) -> None:
    def refused(argv: list[str], *fragments: str) -> str:
        code = run_cli(main, argv)
        return expect_error(code, capsys.readouterr().err, *fragments)

    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = match_argv(crops, out)
    refused([*argv, "--topk", "0"], "--topk 0: expected at least 1")
    for flag, value, expected in (
        ("--per_page", "0", "expected at least 1"),
        ("--k1", "0", "expected an integer >= 1"),
        ("--pictures", "-1", "expected a number >= 0"),
        ("--lambda_value", "1.5", "expected a value in [0, 1]"),
        ("--batch_size", "0", "expected at least 1"),
    ):
        refused([*argv, flag, value], f"{flag} {value}: {expected}")
    at = argv.index("--gallery") + 1
    refused([*argv[:at], str(empty), *argv[at + 1 :]], f"--gallery {empty}: no image files")
    locked = read_only_folder / "x"
    at = argv.index("--out") + 1
    refused([*argv[:at], str(locked)], f"--out {locked}: not writable")
    others = tmp_path / "others"
    labelled_crops(others, ["0099"], 1, grey=False, seed=3)
    at = argv.index("--gallery") + 1
    line = refused([*argv[:at], str(others), *argv[at + 1 :], "--labels_from_folders"])
    assert line.startswith("error: --labels_from_folders: no query identity")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"no image")
    at = argv.index("--query") + 1
    refused([*argv[:at], str(broken), *argv[at + 1 :]], "--query: none of the 1 images")
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    refused([*argv[:1], str(garbage), *argv[2:]], "not a PyTorch checkpoint")
    assert not out.exists()
