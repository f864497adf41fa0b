"""Section ``gallery``: a gallery index of synthetic features: add, exact and approximate search.

No images and no network: ``--gallery_size`` feature vectors of ``--gallery_dim`` dimensions
(512: ResNet-18's, the demo's; 2048: ResNet-50's), 20 images per identity drawn around its centre
with noise as large as the centre (two images of one identity have a cosine of about 0.5), and
``--gallery_queries`` queries drawn around the same centres with a shift (as another modality's
features would be), all L2-normalised. Approximate search's recall depends on such structure:
these figures describe this distribution, not every gallery.
``add`` is the index's own part of ``python -m utils.gallery add``: batches of 64 committed one
by one, then merged (images/s without extraction; the extractor section gives the network's).
Exact search is ``utils.match``'s ranking (load the index, normalise, blockwise top-10);
approximate search is faiss's inverted lists with ``--gallery_probes``, its recall@10 against
exact search's top 10. ``match_today`` is the whole distance matrix and its stable argsort,
as ``utils.match`` ranked before blockwise search, on the largest gallery within
``--gallery_dense_pairs`` pairs, with its peak extrapolated to the full size where smaller.
Peak memory: the process's maximum resident set during the step, and what the step added to
what was resident when it started.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.base.errors import UserError
from utils.benchmark.measure import peak_memory, reset_peak_memory
from utils.benchmark.section import Bench, Row, Section
from utils.evaluation.metrics import pairwise_distance
from utils.evaluation.topk import rank_features, unit_rows
from utils.gallery import approximate
from utils.gallery.store import GalleryIndex, Record

log = logging.getLogger("benchmark")
K, BATCH = 10, 64
# Synthetic identities: 20 images each, noise of the centre's size per dimension (cosine of two
# images of one identity about 0.5).
IMAGES_PER_IDENTITY, NOISE = 20, 1.0
MB = 2**20


def resident_mb() -> float:
    """The process's resident set now, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def release_free_memory() -> None:
    """Collect garbage and hand the allocator's free memory back to the system, so that a
    step's added memory is not hidden by what earlier steps freed but kept resident."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measured(function: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """``function()`` with its seconds, peak memory and the memory it added (MiB)."""
    release_free_memory()
    cpu = torch.device("cpu")
    windowed = reset_peak_memory(cpu)
    start = resident_mb()
    began = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - began
    peak = peak_memory(cpu, windowed)["peak_memory_mb"]
    return result, {
        "s": max(round(seconds, 6), 1e-6),
        "peak_mb": peak,
        "added_mb": round(peak - start, 1),
    }


def synthetic(centres: np.ndarray, first: int, count: int, seed: int, shift: float) -> np.ndarray:
    """Unit features of images ``first``..: identity ``i // 20``'s centre plus noise."""
    rng = np.random.default_rng([seed, first])
    ids = (np.arange(first, first + count) // IMAGES_PER_IDENTITY) % len(centres)
    noise = rng.standard_normal((count, centres.shape[1]), dtype=np.float32)
    features = centres[ids] + shift + NOISE * noise
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def fill(index: GalleryIndex, centres: np.ndarray, size: int, seed: int) -> None:
    """Add ``size`` synthetic images a batch at a time, as ``add`` commits them, then merge."""
    shards = []
    for first in range(0, size, BATCH):
        count = min(BATCH, size - first)
        paths = [f"/cameras/cam01/{i:08d}.jpg" for i in range(first, first + count)]
        records = [Record(path, path, 4096, i) for i, path in enumerate(paths, start=first)]
        shards.append(index.append(records, synthetic(centres, first, count, seed, 0.0)))
    index.merge(shards)


def match_today(query: torch.Tensor, gallery: torch.Tensor) -> np.ndarray:
    """How ``utils.match`` ranked before: the whole distance matrix and its stable argsort."""
    dist = np.sqrt(np.clip(2.0 + 2.0 * pairwise_distance(query, gallery), 0.0, None))
    return np.argsort(dist, axis=1, kind="stable")[:, :K]


def run_exact(index: GalleryIndex, query: torch.Tensor) -> tuple[np.ndarray, dict[str, Any]]:
    """``utils.gallery search``'s exact path: load, then normalise in place and rank in blocks."""
    (_, features), load = measured(index.load)
    gallery = torch.from_numpy(features)
    ranking, search = measured(lambda: rank_features(unit_rows(query), unit_rows(gallery, True), K))
    qps = round(len(query) / search["s"], 1)
    return ranking.indices, {"load": load, "search": search, "queries_per_s": qps}


def run_approximate(
    index: GalleryIndex, query: torch.Tensor, probes: int, truth: np.ndarray
) -> dict[str, Any]:
    """Build (timed) and search the faiss index; recall@10 against exact search's top 10."""
    try:
        approximate.faiss_module()
    except UserError as err:
        return {"status": str(err)}

    def normalise(features: np.ndarray) -> np.ndarray:
        return unit_rows(torch.from_numpy(features), True).numpy()

    found, build = measured(lambda: approximate.load_or_build(index, normalise))
    unit = unit_rows(query).numpy()
    ranking, search = measured(lambda: approximate.search(found, unit, K, probes))
    faiss_bytes = (index.folder / approximate.FAISS_FILE).stat().st_size
    # Recall and speed at a quarter and four times as many probes, for the trade-off.
    others = {}
    for more in sorted({max(1, probes // 4), min(4 * probes, found.lists)} - {probes}):
        other, step = measured(lambda more=more: approximate.search(found, unit, K, more))
        others[more] = {"recall_at_10": recall(other.indices, truth), "search_s": step["s"]}
    return {
        "status": "measured",
        "lists": found.lists,
        "probes": min(probes, found.lists),
        "build": build,
        "search": search,
        "queries_per_s": round(len(query) / search["s"], 1),
        "recall_at_10": recall(ranking.indices, truth),
        "disk_mb": round(faiss_bytes / MB, 1),
        "other_probes": others,
    }


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top 10 found."""
    pairs = zip(found.tolist(), truth.tolist(), strict=True)
    return round(float(np.mean([len(set(a) & set(b)) for a, b in pairs])) / K, 4)


def run_match_today(args: Any, centres: np.ndarray, query: torch.Tensor) -> dict[str, Any]:
    """Peak memory of the whole-matrix ranking on the largest gallery within the pair budget,
    extrapolated (bytes per pair, features) to ``--gallery_size`` when that is larger."""
    size = max(1, min(args.gallery_size, args.gallery_dense_pairs // len(query)))
    gallery = torch.from_numpy(synthetic(centres, 0, size, args.seed, 0.0))
    _, step = measured(lambda: match_today(query, gallery))
    per_pair = step["added_mb"] * MB / (len(query) * size)
    resident = step["peak_mb"] - step["added_mb"] - gallery.numel() * 4 / MB
    full = resident + (len(query) * per_pair + args.gallery_dim * 4) * args.gallery_size / MB
    return {
        "gallery": size,
        **step,
        "bytes_per_pair": round(per_pair, 2),
        "full_size_peak_mb": round(full, 1),
        "full_size": "measured" if size == args.gallery_size else "extrapolated",
    }


def run_gallery(bench: Bench) -> dict[str, Any]:
    """Fill an index with synthetic features, then search it exactly and approximately."""
    args = bench.args
    size, dim = args.gallery_size, args.gallery_dim
    log.info("gallery: %d x %d synthetic features", size, dim)
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((max(1, size // IMAGES_PER_IDENTITY), dim), dtype=np.float32)
    shift = 0.3 * rng.standard_normal(dim, dtype=np.float32)
    picks = rng.integers(0, size, args.gallery_queries).tolist()
    query = torch.from_numpy(
        np.concatenate([synthetic(centres, i, 1, args.seed + 1, shift) for i in picks])
    )
    with tempfile.TemporaryDirectory(prefix="cmnas_gallery_") as tmp:
        header = {"modality": "visible", "dim": dim, "settings": {}, "checkpoint": {}}
        index = GalleryIndex.create(Path(tmp) / "index", header)
        _, add = measured(lambda: fill(index, centres, size, args.seed))
        disk = index.disk_bytes()
        truth, exact = run_exact(index, query)
        approx = run_approximate(index, query, args.gallery_probes, truth)
    return {
        "size": size,
        "dim": dim,
        "queries": len(query),
        "k": K,
        "disk_mb": round(disk / MB, 1),
        "bytes_per_image": round(disk / size, 1),
        "add": add,
        "add_images_per_s": round(size / add["s"], 1),
        "exact": exact,
        "approximate": approx,
        "match_today": run_match_today(args, centres, query),
    }


def gallery_rows(doc: dict[str, Any]) -> list[Row]:
    """Exact against approximate search, and add, at the section's size."""
    section = doc.get("gallery", {})
    if "size" not in section:
        return []
    size = f"{section['size']:,} x {section['dim']}"
    exact, approx = section["exact"], section["approximate"]
    recall = approx.get("recall_at_10")
    return [
        (f"gallery {size}: add images/s (no network)", section["add_images_per_s"], "", ""),
        (
            f"gallery {size}: search queries/s: exact / approximate (recall@10 {recall})",
            exact["queries_per_s"],
            approx.get("queries_per_s"),
            "",
        ),
        (
            f"gallery {size}: peak MiB: exact search / utils.match before",
            exact["search"]["peak_mb"],
            section["match_today"]["full_size_peak_mb"],
            "",
        ),
    ]


GALLERY = Section("gallery", run_gallery, gallery_rows)
