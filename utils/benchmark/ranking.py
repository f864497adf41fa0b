"""Sections ``metrics``, ``rerank`` and ``llcm``: ranking and re-ranking at the test sizes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from utils.benchmark.measure import best_of, timed
from utils.benchmark.references import (
    Protocol,
    eval_sysu_loop,
    feature_distances,
    ranking_problem,
    rerank_reference,
)
from utils.benchmark.section import Bench, Row, Section, figure
from utils.evaluation.metrics import eval_llcm, eval_sysu
from utils.evaluation.rerank import rerank

log = logging.getLogger("benchmark")

# Identities, query cameras and gallery cameras of the two test problems.
SYSU: Protocol = (96, (3, 6), (1, 2, 4, 5))
LLCM: Protocol = (351, (1, 2, 4, 5, 6, 7, 8, 9), tuple(range(1, 10)))
FEATURE_DIM = 2048  # a ResNet-50's pool features, the usual input of re-ranking


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
