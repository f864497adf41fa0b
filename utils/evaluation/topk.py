"""Exact top-k ranking of a gallery for every query, a block of query rows at a time.

Distances are the Euclidean distances of L2-normalised features, ``sqrt(max(0, 2 - 2 q.g))``,
computed for ``rows`` queries against the whole gallery at once, where ``rows`` is the largest
number with ``rows x gallery <= pairs`` (at least 1). Each block keeps its queries' ``k`` nearest
gallery images in the order of a stable sort (equal distances by gallery index) and, with
identities, their ranking statistics (``eval_ranking``'s, without an exclusion rule). Memory is the
features plus one block (4 bytes per pair of the block and about as much again for the selection),
whatever the number of queries; the whole (query x gallery) matrix is never formed.

The same features and ``pairs`` give the same blocks, hence the same floating-point results:
matrix products round differently for different block shapes, so every caller that must agree
with another (``utils.match`` and ``utils.gallery search``) goes through :func:`rank_features`.

Re-ranking needs whole query-gallery, query-query and gallery-gallery matrices;
:func:`rerank_bytes` estimates its memory and :func:`check_memory` refuses what will not fit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.dataset import NO_EXCLUSION
from utils.base.errors import UserError
from utils.evaluation.metrics import average_queries, rank_rows
from utils.evaluation.rerank import RerankSettings, rerank_features

log = logging.getLogger(__name__)
# Distances per block: 2**25 float32 values are 128 MiB.
PAIRS = 2**25
# Ranks the metrics report (Rank-1 ... Rank-20), as eval_ranking's default.
MAX_RANK = 20
# Distances scored per chunk of rows, as eval_ranking chunks them (its work stays in cache).
SCORE_ELEMENTS = 1 << 18
# Re-ranking's memory, measured on this project's rerank with float32 features: about 12 bytes
# per entry of the three matrices (including their float32 copies and the result), plus chunk
# temporaries of a few hundred MiB.
RERANK_BYTES_PER_PAIR = 12
RERANK_FIXED_BYTES = 256 * 2**20
GIB = 2**30


@dataclass
class Ranking:
    """Each query's ``k`` nearest gallery positions with their distances; metrics when scored."""

    indices: np.ndarray  # (queries, k) int64 gallery positions, nearest first
    distances: np.ndarray  # (queries, k) float32
    metrics: tuple[np.ndarray, float, float] | None = None  # (cmc, mAP, mINP) as eval_ranking's


def block_rows(num_query: int, num_gallery: int, pairs: int = PAIRS) -> int:
    """Queries per block: as many as keep a block within ``pairs`` distances (at least one)."""
    return max(1, min(num_query, pairs // max(num_gallery, 1)))


def unit_rows(features: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """L2-normalised rows (float32), a block of rows at a time; ``inplace`` reuses ``features``."""
    features = features.detach().float()
    out = features if inplace else torch.empty_like(features)
    rows = block_rows(len(features), features.shape[1] if features.ndim == 2 else 1)
    for start in range(0, len(features), rows):
        chunk = features[start : start + rows]
        out[start : start + rows] = torch.nn.functional.normalize(chunk, dim=1)
    return out


def feature_blocks(
    query: torch.Tensor, gallery: torch.Tensor, pairs: int = PAIRS
) -> Iterator[tuple[int, np.ndarray]]:
    """(first query, distances of a block of queries to the whole gallery) of unit features."""
    rows = block_rows(len(query), len(gallery), pairs)
    for start in range(0, len(query), rows):
        block = (query[start : start + rows] @ gallery.T).cpu().numpy()
        # 2 - 2 q.g in place, rounded exactly as 2 + 2 * (-(q.g)); then clipped and rooted.
        block *= -2.0
        block += 2.0
        np.clip(block, 0.0, None, out=block)
        np.sqrt(block, out=block)
        yield start, block


def matrix_blocks(dist: np.ndarray, pairs: int = PAIRS) -> Iterator[tuple[int, np.ndarray]]:
    """(first query, rows) blocks of a distance matrix that is already whole (re-ranked)."""
    rows = block_rows(*dist.shape, pairs)
    for start in range(0, len(dist), rows):
        yield start, dist[start : start + rows]


def smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Column positions of each row's ``k`` smallest values, as ``argsort(kind="stable")[:, :k]``.

    A partition finds each row's k-th value; only the values up to it are sorted, by (value,
    column), so equal values keep their column order and NaNs come last, as in a stable sort.
    """
    count = values.shape[1]
    if k >= count:
        return np.argsort(values, axis=1, kind="stable")
    kth = np.partition(values, k - 1, axis=1)[:, k - 1 : k]
    candidates = values <= kth
    # A row with fewer than k numbers has a NaN k-th value: all its columns are candidates.
    candidates[np.isnan(kth[:, 0])] = True
    flat = np.flatnonzero(candidates)
    rows, cols = np.divmod(flat, count)
    order = np.lexsort((cols, values.reshape(-1)[flat], rows))
    starts = np.searchsorted(rows, np.arange(len(values)))
    return cols[order][starts[:, None] + np.arange(k)]


def rank_blocks(
    blocks: Iterable[tuple[int, np.ndarray]],
    shape: tuple[int, int],
    k: int,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
) -> Ranking:
    """The top ``k`` of every block's rows and, with (query, gallery) ``labels``, the metrics.

    ``shape`` is (queries, gallery images); a ``k`` beyond the gallery lists the whole gallery.
    """
    width = min(k, shape[1])
    indices = np.empty((shape[0], width), dtype=np.int64)
    distances = np.empty((shape[0], width), dtype=np.float32)
    scored: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start, block in blocks:
        stop = start + len(block)
        indices[start:stop] = smallest(block, width)
        distances[start:stop] = np.take_along_axis(block, indices[start:stop], axis=1)
        if labels is not None:
            scored += score_block(block, labels[0][start:stop], labels[1])
    metrics = None
    if labels is not None:
        per_query = (np.concatenate(parts) for parts in zip(*scored, strict=True))
        metrics = average_queries(*per_query, MAX_RANK)
    return Ranking(indices, distances, metrics)


def score_block(
    block: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``eval_ranking``'s per-query (CMC rank, AP, INP) of a block's queries whose identity is
    in the gallery (no exclusion rule, standard CMC), computed by its own per-chunk function in
    chunks of rows as it computes them, to be averaged once over all blocks as it does."""
    if block.size and not block.min() > -np.inf:
        raise ValueError("distmat holds NaN or -inf distances")
    zeros = np.zeros(len(q_pids), dtype=np.int64)
    gallery = (g_pids, np.zeros(len(g_pids), np.int64), np.unique(g_pids, return_inverse=True)[1])
    step = max(1, SCORE_ELEMENTS // block.shape[1])
    return [
        rank_rows(
            block[s : s + step],
            q_pids[s : s + step],
            zeros[s : s + step],
            gallery,
            NO_EXCLUSION,
            False,
        )
        for s in range(0, len(block), step)
    ]


def rank_features(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
    pairs: int = PAIRS,
) -> Ranking:
    """Exact top-``k`` (and metrics with ``labels``) of L2-normalised query and gallery rows."""
    shape = (len(query), len(gallery))
    return rank_blocks(feature_blocks(query, gallery, pairs), shape, k, labels)


def rank_features_or_rerank(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    rerank: RerankSettings | None,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
    inplace: bool = False,
) -> Ranking:
    """The ranking of ``utils.match`` and ``utils.gallery search``: exact top-``k`` of the
    features (``inplace``: the gallery's normalised where it is), or of the re-ranked distances
    after checking that they fit in memory; scored with ``labels``. Errors are one line."""
    if rerank is not None:
        if rerank.k1 > len(gallery):
            raise UserError(
                f"--k1 {rerank.k1}: larger than the gallery ({len(gallery)} images); expected "
                f"at most {len(gallery)}"
            )
        what = f"re-ranking {len(query):,} x {len(gallery):,} images"
        check_memory(rerank_bytes(len(query), len(gallery)), what, "--rerank")
        dist = rerank_features(query, gallery, rerank).astype(np.float32)
    try:
        if rerank is None:
            return rank_features(unit_rows(query), unit_rows(gallery, inplace), k, labels)
        return rank_blocks(matrix_blocks(dist), dist.shape, k, labels)
    except ValueError as err:
        raise UserError(f"--labels_from_folders: cannot score the ranking ({err})") from None


def rerank_bytes(num_query: int, num_gallery: int) -> int:
    """About the memory re-ranking ``num_query`` queries against ``num_gallery`` images needs."""
    entries = num_query * num_query + num_query * num_gallery + num_gallery * num_gallery
    return RERANK_BYTES_PER_PAIR * entries + RERANK_FIXED_BYTES


def available_memory() -> int | None:
    """Bytes this process can still allocate: the system's available memory, or less under a
    cgroup (container) limit; None where neither can be read."""
    found = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        lines = Path("/proc/meminfo").read_text().splitlines()
        found += [int(x.split()[1]) * 1024 for x in lines if x.startswith("MemAvailable:")]
    group = Path("/sys/fs/cgroup")
    with contextlib.suppress(OSError, ValueError):
        limit = (group / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((group / "memory.current").read_text()))
    return min(found) if found else None


def check_memory(need: int, what: str, flag: str) -> None:
    """Log what ``what`` needs and refuse it (naming ``flag``) when more than is available."""
    free = available_memory()
    shown = f"{need / GIB:,.1f} GiB"
    log.info("%s needs about %s of memory (%s available)", what, shown, _gib(free))
    if free is not None and need > free:
        raise UserError(
            f"{flag}: {what} needs about {shown} of memory, {_gib(free)} available "
            f"(search fewer images, or drop {flag})"
        )


def _gib(size: int | None) -> str:
    return "unknown" if size is None else f"{size / GIB:,.1f} GiB"
