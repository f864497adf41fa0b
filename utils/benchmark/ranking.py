"""Sections ``metrics``, ``rerank`` and ``llcm``, and the per-query references they time.

The references follow the definitions literally, one query (or image) at a time: the tests check
the vectorised ``eval_ranking`` and ``rerank`` against them, and the sections time both at the
test sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from data.dataset import NO_EXCLUSION, ExclusionRule
from data.sysu import SAME_LOCATION
from utils.benchmark.measure import best_of, timed
from utils.benchmark.section import Bench, Row, Section, figure
from utils.evaluation.metrics import average_queries, check_ranking_inputs, eval_llcm, eval_sysu
from utils.evaluation.rerank import check_distances, euclidean_distances, half_width, rerank

log = logging.getLogger("benchmark")

# Identities, query cameras and gallery cameras of a random ranking problem; the two test ones.
Protocol = tuple[int, tuple[int, ...], tuple[int, ...]]
SYSU: Protocol = (96, (3, 6), (1, 2, 4, 5))
LLCM: Protocol = (351, (1, 2, 4, 5, 6, 7, 8, 9), tuple(range(1, 10)))
FEATURE_DIM = 2048  # a ResNet-50's pool features, the usual input of re-ranking


def eval_ranking_loop(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any = None,
    g_camids: Any = None,
    exclusion: ExclusionRule = NO_EXCLUSION,
    dedup_cmc: bool = False,
    max_rank: int = 20,
) -> tuple[np.ndarray, float, float]:
    """(cmc, mAP, mINP) computed one query at a time; the reference for eval_ranking."""
    dist, q_pids, g_pids, q_cams, g_cams = check_ranking_inputs(
        distmat, q_pids, g_pids, q_camids, g_camids, exclusion
    )
    ranks, aps, inps = [], [], []
    for i in range(dist.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        ignored = exclusion.ignored(q_pids[i], q_cams[i], g_pids[order], g_cams[order])
        ranked_pids = g_pids[order[~ignored]]
        matches = ranked_pids == q_pids[i]
        if not matches.any():
            continue
        if dedup_cmc:
            # np.unique gives each identity's first index; sorting those restores the order.
            _, first_index = np.unique(ranked_pids, return_index=True)
            distinct_pids = ranked_pids[np.sort(first_index)]
            ranks.append(int(np.flatnonzero(distinct_pids == q_pids[i])[0]))
        else:
            ranks.append(int(np.flatnonzero(matches)[0]))
        # Average precision and inverse negative penalty of the ranked match list.
        hits, positions = np.cumsum(matches), np.flatnonzero(matches) + 1
        aps.append(float(np.mean(hits[positions - 1] / positions)))
        inps.append(float(hits[-1] / positions[-1]))
    return average_queries(
        np.asarray(ranks, dtype=np.int64), np.asarray(aps), np.asarray(inps), max_rank
    )


# SYSU-MM01 (cmc, mAP, mINP) one query at a time, the reference for eval_sysu: the loop under
# the SYSU rule (cam3 queries ignore cam2) with the identity-deduplicated CMC.
eval_sysu_loop = partial(eval_ranking_loop, exclusion=SAME_LOCATION, dedup_cmc=True)


def rerank_reference(
    q_g_dist: Any,
    q_q_dist: Any,
    g_g_dist: Any,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """Re-ranked (query x gallery) distances computed one image at a time; rerank's reference."""
    q_g, q_q, g_g = check_distances(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)
    num_query = q_g.shape[0]
    full = np.block([[q_q, q_g], [q_g.T, g_g]])
    squared = np.square(full).astype(np.float32)
    original = (squared / squared.max(axis=0)).T
    count = original.shape[0]
    order = np.argsort(original, axis=1, kind="stable")

    def reciprocal(i: int, width: int) -> np.ndarray:
        """Those of i's first ``width`` neighbours that have i among their own first ``width``."""
        ahead = order[i, :width]
        return ahead[(order[ahead, :width] == i).any(axis=1)]

    half = half_width(k1)
    weights = np.zeros((count, count), dtype=np.float32)
    for i in range(count):
        core = reciprocal(i, k1 + 1)
        members = set(core.tolist())
        for candidate in core:
            near = reciprocal(int(candidate), half)
            if len(np.intersect1d(near, core)) > 2.0 / 3.0 * len(near):
                members.update(near.tolist())
        columns = np.asarray(sorted(members), dtype=np.int64)
        closeness = np.exp(-original[i, columns])
        weights[i, columns] = closeness / closeness.sum()
    if k2 != 1:
        expanded = np.empty_like(weights)
        for i in range(count):
            expanded[i] = weights[order[i, :k2]].mean(axis=0)
        weights = expanded
    # For each column, the images whose weight there is non-zero (an inverted index).
    holders = [np.flatnonzero(weights[:, k]) for k in range(count)]
    jaccard = np.empty((num_query, count), dtype=np.float32)
    for i in range(num_query):
        overlap = np.zeros(count, dtype=np.float32)
        for k in np.flatnonzero(weights[i]):
            rows = holders[k]
            overlap[rows] += np.minimum(weights[i, k], weights[rows, k])
        jaccard[i] = 1.0 - overlap / (2.0 - overlap)
    final = jaccard * (1.0 - lambda_value) + original[:num_query] * lambda_value
    return final[:, num_query:]


def ranking_problem(
    protocol: Protocol, num_query: int, num_gallery: int, seed: int
) -> tuple[np.ndarray, ...]:
    """Random (distmat, q_pids, g_pids, q_cams, g_cams); same identities closer on average."""
    rng = np.random.default_rng(seed)
    ids, query_cams, gallery_cams = protocol
    q_pids, g_pids = rng.integers(ids, size=num_query), rng.integers(ids, size=num_gallery)
    distmat = rng.standard_normal((num_query, num_gallery), dtype=np.float32)
    distmat -= 1.5 * (q_pids[:, None] == g_pids[None, :])
    cams = rng.choice(query_cams, num_query), rng.choice(gallery_cams, num_gallery)
    return distmat, q_pids, g_pids, *cams


def feature_distances(
    num_query: int, num_gallery: int, dim: int, seed: int = 0
) -> tuple[np.ndarray, ...]:
    """(q_g, q_q, g_g) Euclidean distances of random L2-normalised features (ties unlikely)."""
    rng = np.random.default_rng(seed)
    query = rng.standard_normal((num_query, dim), dtype=np.float32)
    gallery = rng.standard_normal((num_gallery, dim), dtype=np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    pairs = ((query, gallery), (query, query), (gallery, gallery))
    return tuple(euclidean_distances(a, b) for a, b in pairs)


def _against(fast: Callable[[], Any], slow: Callable[[], Any], slow_name: str) -> dict[str, Any]:
    """``fast`` (best of 3 after a warm-up) against one run of ``slow``: their seconds, the
    speed-up and the largest difference of their results."""
    fast()  # warm-up
    fast_result, fast_s = best_of(3, fast)
    slow_result, slow_s = timed(slow)
    pairs = zip(fast_result, slow_result, strict=True)
    diff = max(float(np.abs(np.subtract(a, b)).max()) for a, b in pairs)
    speedup = round(slow_s / fast_s, 2)
    return {
        "vectorised_s": fast_s,
        f"{slow_name}_s": slow_s,
        "speedup": speedup,
        "max_abs_diff": diff,
    }


def run_metrics(bench: Bench) -> dict[str, Any]:
    """``eval_sysu`` against ``eval_sysu_loop`` on a random SYSU multi-shot-sized problem."""
    args = bench.args
    log.info("metrics")
    sizes = dict(num_query=args.metrics_query, num_gallery=args.metrics_gallery)
    problem = ranking_problem(SYSU, *sizes.values(), args.seed)
    return _against(lambda: eval_sysu(*problem), lambda: eval_sysu_loop(*problem), "loop") | sizes


def run_rerank(bench: Bench) -> dict[str, Any]:
    """``rerank`` (on the run's torch threads) against ``rerank_reference`` (NumPy, one core
    whatever the threads) on random features."""
    args = bench.args
    log.info("rerank")
    sizes = dict(num_query=args.metrics_query, num_gallery=args.metrics_gallery)
    distances = feature_distances(*sizes.values(), FEATURE_DIM, args.seed)
    figures = _against(
        lambda: rerank(*distances), lambda: rerank_reference(*distances), "reference"
    )
    return figures | dict(threads=torch.get_num_threads(), **sizes)


def run_llcm(bench: Bench) -> dict[str, Any]:
    """``eval_llcm``, and ``rerank`` of random features, at the LLCM size."""
    args = bench.args
    log.info(LLCM_SECTION.name)
    sizes = dict(num_query=args.llcm_query, num_gallery=args.llcm_gallery)
    _, eval_s = timed(lambda: eval_llcm(*ranking_problem(LLCM, *sizes.values(), args.seed)))
    distances = feature_distances(*sizes.values(), FEATURE_DIM, args.seed)
    _, rerank_s = timed(lambda: rerank(*distances))
    return dict(eval_s=eval_s, rerank_s=rerank_s, **sizes)


def _sysu_size(doc: dict[str, Any]) -> str:
    settings = doc["settings"]
    return f"{settings['metrics_query']:,} x {settings['metrics_gallery']:,}"


def metrics_rows(doc: dict[str, Any]) -> list[Row]:
    """The vectorised metrics against the per-query loop."""
    times = (figure(doc, "metrics", k) for k in ("vectorised_s", "loop_s", "speedup"))
    return [(f"SYSU metrics {_sysu_size(doc)} (s): vectorised / per-query loop", *times)]


def rerank_rows(doc: dict[str, Any]) -> list[Row]:
    """The vectorised re-ranking against the reference, with the threads it ran on."""
    count = doc.get("rerank", {}).get("threads", doc["settings"]["threads"])
    threads = f"{count} thread{'' if count == 1 else 's'}"
    times = (figure(doc, "rerank", k) for k in ("vectorised_s", "reference_s", "speedup"))
    return [(f"re-ranking {_sysu_size(doc)}, {threads} (s): vectorised / reference", *times)]


def llcm_rows(doc: dict[str, Any]) -> list[Row]:
    """Evaluation and re-ranking at the LLCM size."""
    settings = doc["settings"]
    llcm = f"{settings['llcm_query']:,} x {settings['llcm_gallery']:,}"
    times = (figure(doc, LLCM_SECTION.name, k) for k in ("eval_s", "rerank_s"))
    return [(f"LLCM {llcm} (s): eval_llcm / re-ranking", *times, "")]


METRICS = Section("metrics", run_metrics, metrics_rows)
RERANK = Section("rerank", run_rerank, rerank_rows)
LLCM_SECTION = Section("llcm", run_llcm, llcm_rows)
