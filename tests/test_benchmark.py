"""The benchmark command and the authors'-style loader it measures against.

Only the shape and sanity of the output are tested: speed is checked by running
``python -m utils.benchmark``, never by timing assertions in unit tests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from data.sampler import CrossModalitySampler
from data.trainset import TrainSet
from utils import benchmark
from utils.base.errors import UserError

H, W = 64, 32
TINY = [
    "--device", "cpu", "--threads", "1", "--depth", "18", "--img_h", str(H), "--img_w", str(W),
    "--batch_size", "8", "--num_pos", "4", "--steps", "2", "--rounds", "1", "--warmup", "1",
    "--workers", "1",
    "--feature_images", "24", "--test_batch", "16", "--metrics_query", "200",
    "--metrics_gallery", "150", "--llcm_query", "120", "--llcm_gallery", "90",
    "--search_steps", "4", "--search_rounds", "1", "--extractor_images", "6",
    "--extractor_batch", "4", "--extractor_rounds", "1",
    "--gallery_size", "600", "--gallery_queries", "12", "--gallery_dim", "32",
    "--gallery_dense_pairs", "3600",
]  # fmt: skip


@pytest.fixture(autouse=True)
def keep_threads() -> Iterator[None]:
    """``--threads`` changes the process's torch threads: restore them afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_benchmark_writes_every_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny run prints one JSON document with every section, positive figures, and --out
    (the gallery and precision sections have tests of their own, at their own sizes)."""
    out, table = tmp_path / "bench.json", tmp_path / "bench.md"
    own_tests = ["--skip", "gallery", "precision"]
    assert benchmark.main([*TINY, "--out", str(out), "--markdown", str(table), *own_tests]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == doc
    sections = ("machine", "settings", "fast", "plain", "speedup", "features", "metrics")
    for section in (*sections, "rerank", "llcm", "search"):
        assert section in doc, section
    assert doc["machine"]["device_type"] == "cpu" and doc["machine"]["cpu_count"] >= 1
    assert doc["settings"]["images_per_step"] == 16
    for path in ("fast", "plain"):
        figures = doc[path]
        for key in ("images_per_s", "step_s", "peak_memory_mb"):
            assert _positive(figures[key]), (path, key, figures[key])
    assert doc["fast"]["settings"]["step"] == "utils.engine.trainer.Trainer.training_step"
    assert doc["plain"]["settings"]["amp"] == "none" and not doc["plain"]["settings"]["compile"]
    assert _positive(doc["plain"]["workers_peak_rss_mb"])
    assert _positive(doc["speedup"])
    assert _positive(doc["features"]["images_per_s"]) and doc["features"]["feature_dim"] == 512
    metrics = doc["metrics"]
    assert _positive(metrics["vectorised_s"]) and _positive(metrics["loop_s"])
    # Same numbers from both implementations: the comparison is between equals.
    assert metrics["max_abs_diff"] == 0.0
    assert metrics["speedup"] == pytest.approx(metrics["loop_s"] / metrics["vectorised_s"], 0.01)
    rerank = doc["rerank"]
    assert _positive(rerank["vectorised_s"]) and _positive(rerank["reference_s"])
    assert rerank["max_abs_diff"] < 1e-5 and rerank["threads"] == 1
    assert (rerank["num_query"], rerank["num_gallery"]) == (200, 150)
    llcm = doc["llcm"]
    assert _positive(llcm["eval_s"]) and _positive(llcm["rerank_s"])
    assert (llcm["num_query"], llcm["num_gallery"]) == (120, 90)
    search = doc["search"]
    assert search["status"] == "measured", search
    assert _positive(search["ratio"]) and _positive(search["train_step_s"])
    for size, shape in (("demo", [64, 32]), ("paper", [256, 128])):
        extractor = doc["extractor"][size]
        assert extractor["img_size"] == shape and extractor["images"] == 6
        for key in ("decode", "network", "folded", "onnx"):
            assert _positive(extractor[f"{key}_images_per_s"]), (size, key)
        assert extractor["folded_max_abs_diff"] < 1e-4 and extractor["onnx_max_abs_diff"] < 1e-4
    text = table.read_text()
    assert "| extractor 256x128 images/s: network / BN folded |" in text
    assert "| training images/s |" in text
    assert "| re-ranking 200 x 150, 1 thread (s): vectorised / reference |" in text
    assert "| LLCM 120 x 90 (s): eval_llcm / re-ranking |" in text


def test_skipped_sections_are_marked(capsys: pytest.CaptureFixture[str]) -> None:
    """``--skip`` leaves sections out explicitly; no speed-up without both training paths."""
    skipped = ("fast", "plain", "features", "search", "rerank", "llcm", "extractor", "gallery")
    skipped += ("precision",)
    assert benchmark.main([*TINY, "--skip", *skipped]) == 0
    doc = json.loads(capsys.readouterr().out)
    for section in skipped:
        assert doc[section] == {"skipped": True}
    assert doc["speedup"] is None
    assert doc["metrics"]["num_query"] == 200


def test_bad_sizes_are_user_errors() -> None:
    """A batch that is not identities x num_pos is refused with one line."""
    with pytest.raises(UserError, match="--batch_size 6"):
        _resolved("--batch_size", "6")
    # Left out, a size takes the device's preset, which passes the same checks.
    assert _resolved("--batch_size", "16").batch_size == 16
    cpu = benchmark.read_options(["--device", "cpu"])
    assert benchmark.resolve_options(cpu, torch.device("cpu")).batch_size == 16
    assert benchmark.resolve_options(cpu, torch.device("cuda")).depth == 50


def _resolved(*extra: str) -> benchmark.BenchSettings:
    """The tiny command line with ``extra``, read and resolved for the CPU."""
    options = benchmark.read_options([*TINY, *extra])
    return benchmark.resolve_options(options, torch.device("cpu"))


def _tiny_set(visible: np.ndarray, infrared: np.ndarray, labels_v, labels_i) -> TrainSet:
    paths_v, paths_i = [str(k) for k in range(len(visible))], [str(k) for k in range(len(infrared))]
    pids = list(range(int(max(labels_v)) + 1))
    return TrainSet(
        visible, np.asarray(labels_v), infrared, np.asarray(labels_i), pids, paths_v, paths_i
    )


def _tiny_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, H, W, 3), dtype=np.uint8)


def test_plain_loader_pairs_the_sampler_batches() -> None:
    """Item k of a batch is the sampler's visible and infrared image k, augmented, as NCHW."""
    labels_v = np.repeat(np.arange(6), 3)
    labels_i = np.repeat(np.arange(6), 2)
    data = _tiny_set(_tiny_images(18, 0), _tiny_images(12, 1), labels_v, labels_i)
    sampler = CrossModalitySampler(labels_v, labels_i, batch_size=4, num_pos=2, seed=5)
    loader = benchmark.plain_loader(data, sampler, workers=0, batches=len(sampler) + 2, seed=3)
    batches = list(loader)
    assert len(batches) == len(sampler) + 2
    for position, (visible, infrared, v_labels, i_labels) in enumerate(batches):
        epoch, step = divmod(position, len(sampler))
        v_idx, i_idx = sampler.batch(epoch, step)
        assert visible.shape == infrared.shape == (4, 3, H, W)
        assert visible.dtype == torch.float32 and visible.is_contiguous()
        np.testing.assert_array_equal(v_labels.numpy(), labels_v[v_idx])
        np.testing.assert_array_equal(i_labels.numpy(), labels_i[i_idx])
        np.testing.assert_array_equal(v_labels.numpy(), i_labels.numpy())
    # Normalised ImageNet-style values, not raw bytes.
    assert float(batches[0][0].abs().max()) < 3.0


def test_plain_loader_workers_draw_their_own_augmentations() -> None:
    """Each worker seeds its own generator: two workers never repeat each other's draws."""
    same = _tiny_images(1, 0).repeat(8, axis=0)
    labels = np.repeat(np.arange(4), 2)
    sampler = CrossModalitySampler(labels, labels, batch_size=4, num_pos=2, seed=0)
    loader = benchmark.plain_loader(_tiny_set(same, same, labels, labels), sampler, 2, 2)
    # Batches alternate between the two workers; the first draw of each must differ.
    first, second = (batch[0][0] for batch in loader)
    assert not torch.equal(first, second)


def test_non_positive_sizes_are_user_errors() -> None:
    """A size below its minimum is refused with one line naming the flag."""
    with pytest.raises(UserError, match=r"^--steps 0: expected an integer >= 1$"):
        _resolved("--steps", "0")
    with pytest.raises(UserError, match=r"^--workers -1: expected an integer >= 0$"):
        _resolved("--workers", "-1")
