"""``python -m utils.gallery``: a persistent index that adds, survives kills, and searches as
``utils.match`` does; and the benchmark section that measures it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import mixed_arch, random_network
from test_extract import save_checkpoint
from test_match import labelled_crops

from model.checkpoint import checkpoint_header
from utils import benchmark, demo
from utils.base.cli import run_cli
from utils.evaluation import topk
from utils.extract import FeatureExtractor
from utils.gallery import approximate
from utils.gallery.cli import main
from utils.gallery.store import GalleryIndex, Record
from utils.match import main as match_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """Tiny convolutions run faster on one thread of the shared CPU."""


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gallery")
    labelled_crops(root / "infrared", ["0001", "0002", "0003"], 2, grey=True, seed=1)
    labelled_crops(root / "visible", ["0001", "0002", "0003", "0004"], 3, grey=False, seed=2)
    (root / "visible" / "0004" / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    return {
        "infrared": root / "infrared",
        "visible": root / "visible",
        "weights": save_checkpoint(root / "checkpoint.pth", "sysu"),
        # Another file (other training arguments) with the same weights, and other weights.
        "copy": save_checkpoint(root / "copy.pth", "regdb"),
        "other": other_weights(root / "other.pth"),
    }


def other_weights(path: Path) -> Path:
    """A checkpoint like ``save_checkpoint``'s with other random weights."""
    header = checkpoint_header(mixed_arch(18), 7, 1, {"dataset": "sysu", "img_h": 64, "img_w": 32})
    model, ema = random_network(18, seed=21), random_network(18, seed=22)
    torch.save({**header, "epoch": 2, "model": model.state_dict(), "ema": ema.state_dict()}, path)
    return path


def add_argv(
    crops: dict[str, Path], index: Path, *extra: str, images: Path | None = None
) -> list[str]:
    return [
        "add", "--index", str(index), "--images", str(images or crops["visible"]),
        "--modality", "visible", "--weights", str(crops["weights"]), "--ema",
        "--batch_size", "4", *extra,
    ]  # fmt: skip


def search_argv(crops: dict[str, Path], index: Path, out: Path, *extra: str) -> list[str]:
    return [
        "search", "--index", str(index), "--images", str(crops["infrared"]),
        "--modality", "infrared", "--out", str(out), "--batch_size", "4", *extra,
    ]  # fmt: skip


def run(argv: list[str], capsys: pytest.CaptureFixture[str], command=main) -> str:
    code = run_cli(command, argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.fixture(scope="module")
def built(crops, tmp_path_factory) -> Path:
    """An index of the visible crops, made by one ``add``."""
    index = tmp_path_factory.mktemp("built") / "index"
    # Features depend (to round-off) on the threads: build on one, as the tests then search.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_cli(main, add_argv(crops, index)) == 0
    finally:
        torch.set_num_threads(threads)
    return index


def npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return dict(data)


def test_search_writes_what_match_writes(crops, built, tmp_path, capsys) -> None:
    """Same images, same batches: the same rankings, distances, metrics and query features."""
    extra = ("--labels_from_folders", "--topk", "5", "--pictures", "3")
    searched, matched = tmp_path / "searched", tmp_path / "matched"
    printed = run(search_argv(crops, built, searched, *extra), capsys)
    match_argv = [
        "--weights", str(crops["weights"]), "--ema", "--query", str(crops["infrared"]),
        "--query_modality", "infrared", "--gallery", str(crops["visible"]),
        "--gallery_modality", "visible", "--out", str(matched), "--batch_size", "4", *extra,
    ]  # fmt: skip
    match_printed = run(match_argv, capsys, match_main)
    for name in ("matches.csv", "metrics.json"):
        assert (searched / name).read_text() == (matched / name).read_text(), name
    ours, theirs = (json.loads((d / "matches.json").read_text()) for d in (searched, matched))
    assert ours["queries"] == theirs["queries"] and ours["metrics"] == theirs["metrics"]
    assert ours["search"] == "exact" and ours["index"] == str(built)
    assert printed.splitlines()[-1] == match_printed.splitlines()[-1]  # the metrics row
    features, reference = npz(searched / "features.npz"), npz(matched / "features.npz")
    np.testing.assert_array_equal(features["query_features"], reference["query_features"])
    assert not any(key.startswith("gallery_") for key in features)
    pictures = sorted(p.name for p in (searched / "rank_lists").iterdir())
    assert pictures == sorted(p.name for p in (matched / "rank_lists").iterdir()) and pictures
    assert (searched / "index.html").is_file()


def test_add_skips_what_it_holds_and_re_extracts_changed_images(crops, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    labelled_crops(images, ["0001", "0002"], 3, grey=False, seed=5)
    index = tmp_path / "index"
    run(add_argv(crops, index, images=images), capsys)
    first = GalleryIndex.open(index)
    records, features = first.load()
    assert len(records) == 6 and len(first.shards()) == 1  # two batches, merged into one shard
    before = sorted(p.name for p in (index / "shards").iterdir())
    run(add_argv(crops, index, images=images), capsys)
    assert sorted(p.name for p in (index / "shards").iterdir()) == before
    changed = images / "0001" / "1.png"
    Image.fromarray(np.full((64, 32, 3), 200, np.uint8)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    labelled_crops(images / "more", ["0003"], 1, grey=False, seed=6)
    run(add_argv(crops, index, images=images), capsys)
    again, features_after = GalleryIndex.open(index).load()
    assert len(again) == 7
    # The changed image was extracted again and moved to the end; the others kept their rows.
    assert [r.resolved for r in again[-2:]] == [
        str(changed.resolve()),
        str((images / "more/0003/0.png").resolve()),
    ]
    alone = FeatureExtractor(crops["weights"], ema=True, batch_size=4)([changed], "visible")
    np.testing.assert_allclose(features_after[-2], alone[0].numpy(), atol=1e-5)
    unchanged = [i for i, r in enumerate(records) if r.resolved != str(changed.resolve())]
    np.testing.assert_array_equal(features_after[:5], features[unchanged])


def test_index_refuses_other_settings_and_reports_unreadable(
    crops, built, tmp_path, capsys, expect_error: Callable[..., str]
) -> None:
    def refused(argv: list[str], *fragments: str) -> None:
        expect_error(run_cli(main, argv), capsys.readouterr().err, *fragments)

    argv = add_argv(crops, built)
    refused([a for a in argv if a != "--ema"], "holds features made with weights 'ema'", "'live'")
    refused([*argv, "--feature", "pool"], "feature 'bnneck', this run makes feature 'pool'")
    refused([*argv, "--flip"], "flip False, this run makes flip True")
    at = argv.index("--weights") + 1
    refused([*argv[:at], str(crops["other"]), *argv[at + 1 :]], "holds features of other weights")
    # The same weights in another file give the same features: accepted, nothing to extract.
    assert run_cli(main, [*argv[:at], str(crops["copy"]), *argv[at + 1 :]]) == 0
    assert "1 of 13 images to extract" in capsys.readouterr().err  # the unreadable one again
    at = argv.index("--modality") + 1
    refused(
        [*argv[:at], "infrared", *argv[at + 1 :]], "holds visible images; --modality is infrared"
    )
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    refused(add_argv(crops, stray), f"--index {stray}: not a gallery index")
    assert (stray / "notes.txt").read_text() == "mine"
    skipped = (built / "skipped.txt").read_text()
    assert "broken.jpg" in skipped and len(GalleryIndex.open(built).records()) == 12


def test_info_and_remove(crops, tmp_path, capsys, expect_error: Callable[..., str]) -> None:
    index = tmp_path / "index"
    run(add_argv(crops, index), capsys)
    shown = run(["info", "--index", str(index)], capsys)
    assert "images: 12 visible" in shown and "ema weights" in shown and "bnneck" in shown
    assert f"checkpoint: {crops['weights']}" in shown and "bytes per image" in shown
    visible = crops["visible"]
    listed = tmp_path / "drop.txt"
    listed.write_text(f"{visible / '0002' / '0.png'}\n")
    run(["remove", "--index", str(index), "--images", str(visible / "0001"), str(listed)], capsys)
    left = [Path(r.resolved) for r in GalleryIndex.open(index).records()]
    assert len(left) == 8 and all(p.parent.name != "0001" for p in left)
    assert visible.resolve() / "0002" / "0.png" not in left
    code = run_cli(main, ["remove", "--index", str(index), "--images", str(visible / "0001")])
    expect_error(code, capsys.readouterr().err, "none of the 1 paths is in --index")
    code = run_cli(main, ["info", "--index", str(tmp_path / "none")])
    expect_error(code, capsys.readouterr().err, "no gallery index here (no index.json)")


def test_store_keeps_the_latest_record_and_tidies_leftovers(tmp_path) -> None:
    index = GalleryIndex.create(tmp_path / "index", {"modality": "visible", "dim": 2})

    def records(*names: str) -> list[Record]:
        return [Record(n, f"/x/{n}", 1, 1) for n in names]

    index.append(records("a", "b"), np.array([[1, 0], [0, 1]], np.float32))
    index.append(records("b", "c"), np.array([[2, 2], [3, 3]], np.float32))
    # A kill can leave a features file no shard names, and a temporary file.
    (index.shard_folder / "00000009-deadbeef.npy").write_bytes(b"partial")
    (index.shard_folder / ".00000003.json.x.tmp").write_text("{")
    found, features = index.load()
    assert [r.path for r in found] == ["a", "b", "c"]
    np.testing.assert_array_equal(features, [[1, 0], [2, 2], [3, 3]])
    index.tidy()
    assert sorted(p.name for p in index.shard_folder.iterdir() if p.suffix == ".json") == [
        "00000001.json", "00000002.json",
    ]  # fmt: skip
    assert len(list(index.shard_folder.glob("*.npy"))) == 2
    assert [r.path for r in index.shards()[0].records] == ["a"]
    assert index.load()[0] == found


def test_a_killed_add_leaves_a_whole_index_that_the_next_add_completes(crops, tmp_path) -> None:
    images = tmp_path / "images"
    labelled_crops(images, [f"{n:04d}" for n in range(20)], 2, grey=False, seed=7)
    index = tmp_path / "index"
    argv = [sys.executable, "-m", "utils.gallery", *add_argv(crops, index, images=images)]
    argv[argv.index("--batch_size") + 1] = "1"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    shards = index / "shards"
    while process.poll() is None and len(list(shards.glob("*.json"))) < 3:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    held, features = GalleryIndex.open(index).load()
    assert 3 <= len(held) < 40, "the kill came after the add had finished"
    assert np.isfinite(features).all() and len(features) == len(held)
    assert subprocess.run(argv, cwd=ROOT, env=env, capture_output=True).returncode == 0
    records, features = GalleryIndex.open(index).load()
    assert sorted(r.resolved for r in records) == sorted(
        str(p.resolve()) for p in images.rglob("*.png")
    )
    assert not list(shards.glob(".*")) and len(list(shards.glob("*.npy"))) == len(
        list(shards.glob("*.json"))
    )
    extractor = FeatureExtractor(crops["weights"], ema=True, batch_size=1)
    expected = extractor([r.resolved for r in records], "visible")
    np.testing.assert_allclose(features, expected.numpy(), atol=1e-5)


def test_approximate_search_and_its_errors(
    crops, built, tmp_path, capsys, monkeypatch, expect_error: Callable[..., str]
) -> None:
    def refused(argv: list[str], *fragments: str) -> None:
        expect_error(run_cli(main, argv), capsys.readouterr().err, *fragments)

    exact, approx = tmp_path / "exact", tmp_path / "approx"
    run(search_argv(crops, built, exact, "--topk", "4"), capsys)
    run(search_argv(crops, built, approx, "--topk", "4", "--approximate"), capsys)
    ours, truth = (json.loads((d / "matches.json").read_text()) for d in (approx, exact))
    assert ours["search"].startswith("approximate (faiss IVF-Flat, 1 lists")
    # One list holds the whole gallery: the approximate search is exhaustive here.
    for mine, theirs in zip(ours["queries"], truth["queries"], strict=True):
        assert [m["gallery"] for m in mine["matches"]] == [m["gallery"] for m in theirs["matches"]]
        for a, b in zip(mine["matches"], theirs["matches"], strict=True):
            assert a["distance"] == pytest.approx(b["distance"], abs=1e-5)
    kept = (built / approximate.FAISS_FILE).stat().st_mtime_ns
    run(search_argv(crops, built, approx, "--approximate"), capsys)
    assert (built / approximate.FAISS_FILE).stat().st_mtime_ns == kept  # reused, not rebuilt
    argv = search_argv(crops, built, tmp_path / "no")
    refused(
        [*argv, "--approximate", "--labels_from_folders"], "--approximate: --labels_from_folders"
    )
    refused([*argv, "--probes", "0"], "--probes 0: expected at least 1")
    monkeypatch.setitem(sys.modules, "faiss", None)
    refused([*argv, "--approximate"], "--approximate needs faiss: pip install faiss-cpu")
    assert not (tmp_path / "no").exists()


def test_search_errors(crops, built, tmp_path, capsys, monkeypatch, expect_error) -> None:
    def refused(argv: list[str], *fragments: str, command=main) -> None:
        expect_error(run_cli(command, argv), capsys.readouterr().err, *fragments)

    out = tmp_path / "out"
    argv = search_argv(crops, built, out)
    refused([*argv, "--weights", str(crops["other"])], "holds features of other weights")
    refused([*argv, "--weights", str(tmp_path / "moved.pth")], "moved.pth: no such file")
    refused([*argv, "--topk", "0"], "--topk 0: expected at least 1")
    at = argv.index("--out") + 1
    refused([*argv[:at], str(built / "results"), *argv[at + 1 :]], "inside the --index folder")
    refused(search_argv(crops, tmp_path / "none", out), "no gallery index here")
    monkeypatch.setattr(topk, "available_memory", lambda: 2**20)
    refused([*argv, "--rerank"], "--k1 20: larger than the gallery (12 images)")
    refused([*argv, "--rerank", "--k1", "4"], "--rerank: re-ranking 6 x 12 images needs about 0.3")
    match_argv = [
        "--weights", str(crops["weights"]), "--query", str(crops["infrared"]),
        "--query_modality", "infrared", "--gallery", str(crops["visible"]),
        "--gallery_modality", "visible", "--out", str(out), "--rerank", "--k1", "4",
    ]  # fmt: skip
    refused(
        match_argv, "--rerank: re-ranking 6 x 12 images", "0.0 GiB available", command=match_main
    )
    assert not out.exists()


def test_benchmark_section_at_a_small_size(capsys) -> None:
    others = ("fast", "plain", "features", "metrics", "rerank", "llcm", "search", "extractor")
    others += ("precision",)  # measured by its own test
    sizes = ("--gallery_size", "1500", "--gallery_queries", "30", "--gallery_dim", "64")
    argv = ["--device", "cpu", "--threads", "1", *sizes, "--gallery_dense_pairs", "15000"]
    assert benchmark.main([*argv, "--skip", *others]) == 0
    doc = json.loads(capsys.readouterr().out)["gallery"]
    assert (doc["size"], doc["dim"], doc["queries"], doc["k"]) == (1500, 64, 30, 10)
    # Each image: its 64 float32 values plus its record (paths, size, time) and file headers.
    assert 64 * 4 < doc["bytes_per_image"] < 64 * 4 + 200
    assert doc["add_images_per_s"] > 0 and doc["exact"]["queries_per_s"] > 0
    approx = doc["approximate"]
    assert approx["status"] == "measured" and approx["lists"] == 38 and approx["probes"] == 32
    assert 0.5 <= approx["recall_at_10"] <= 1.0 and approx["disk_mb"] > 0
    today = doc["match_today"]
    assert today["gallery"] == 500 and today["full_size"] == "extrapolated"
    assert today["full_size_peak_mb"] > 0


def test_demo_indexes_and_searches_its_crops(tmp_path, monkeypatch) -> None:
    """The demo's gallery step: a fresh index of the visible crops, searched with the infrared."""
    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(
        demo, "run_step", lambda name, command, stdout=None: calls.append((name, command))
    )
    stale = tmp_path / "gallery_index"
    stale.mkdir()
    (stale / "index.json").write_text("{}")
    demo.search_gallery(tmp_path / "crops", tmp_path / "model.pth", tmp_path)
    assert not stale.exists()  # a new model's features never meet the old index
    (add_name, add), (search_name, search) = calls
    assert (add_name, search_name) == ("gallery add", "gallery search")
    assert add[1:4] == ["-m", "utils.gallery", "add"] and search[3] == "search"
    assert add[add.index("--images") + 1] == str(tmp_path / "crops" / "visible")
    assert search[search.index("--images") + 1] == str(tmp_path / "crops" / "infrared")
    assert "--labels_from_folders" in search and "--ema" in add
    assert demo.gallery_section(tmp_path) == []
    (tmp_path / "gallery_matches").mkdir()
    (tmp_path / "gallery_matches" / "metrics.json").write_text('{"rank1": 50.0, "mAP": 62.5}')
    text = "\n".join(demo.gallery_section(tmp_path))
    assert "[gallery_matches/index.html](gallery_matches/index.html)" in text
    assert "Rank-1 50.00, mAP 62.50" in text


def test_the_manual_reads_an_index_as_written(built, tmp_path) -> None:
    """docs/gallery.md's example reads an index's shards with NumPy alone."""
    text = (ROOT / "docs/gallery.md").read_text()
    block = text.split("<!-- run by tests/test_gallery.py -->\n```python\n")[1].split("```")[0]
    shutil.copytree(built, tmp_path / "gallery")
    done = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    (shard,) = GalleryIndex.open(built).shards()
    assert done.stdout == f"{shard.number:08d}.json (12, 512) {shard.records[0].path}\n"
