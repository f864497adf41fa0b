"""Public import path of the re-identification metrics (``from utils.metrics import eval_sysu``)."""

from utils.evaluation.metrics import (
    eval_llcm,
    eval_ranking,
    eval_regdb,
    eval_sysu,
    pairwise_distance,
    summarize,
)
from utils.evaluation.rerank import rerank

__all__ = [
    "eval_llcm",
    "eval_ranking",
    "eval_regdb",
    "eval_sysu",
    "pairwise_distance",
    "rerank",
    "summarize",
]
