"""Re-identification metrics: CMC, mAP and mINP under a protocol's exclusion rule.

Every protocol ranks the gallery by ascending distance with ties broken by gallery index (a
stable sort), after removing the gallery images its exclusion rule (``data.ExclusionRule``) makes
a query ignore: SYSU-MM01 removes camera-2 images from camera-3 queries (same location), LLCM the
images of the query's identity taken by the query's camera. SYSU-MM01 and LLCM use the
identity-deduplicated CMC (only the first image of each identity in the ranked gallery counts),
RegDB the standard CMC (position of the first correct match). In all, mAP is the usual mean
average precision over every kept gallery image, mINP the mean of (number of positives) /
(position of the last positive), and queries whose identity has no kept gallery image are skipped.

``eval_ranking`` is vectorised over queries and takes the rule as data; ``eval_sysu``,
``eval_regdb`` and ``eval_llcm`` fix the rule of their data set. A per-query reference of the same
definitions, which the tests compare against and the benchmark times, lives in
``utils.benchmark.references``; it shares the input checks and the averaging below.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data.dataset import NO_EXCLUSION, ExclusionRule
from data.llcm import SAME_IDENTITY_AND_CAMERA
from data.sysu import SAME_LOCATION
from utils.evaluation.ranking import rank_queries


def _as_numpy(array: Any) -> np.ndarray:
    """Return ``array`` as a NumPy array, moving a torch tensor to the CPU first."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def check_ranking_inputs(
    distmat: Any, q_pids: Any, g_pids: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convert the common inputs to NumPy and check that their shapes agree."""
    dist = _as_numpy(distmat)
    q = _as_numpy(q_pids).reshape(-1)
    g = _as_numpy(g_pids).reshape(-1)
    if dist.ndim != 2 or dist.shape != (q.size, g.size):
        raise ValueError(
            f"distmat has shape {dist.shape}, expected ({q.size}, {g.size}) from the query and "
            "gallery identities"
        )
    if dist.dtype not in (np.float32, np.float64):
        dist = dist.astype(np.float64)
    if dist.shape[1] == 0:
        raise ValueError("the gallery is empty; nothing to evaluate")
    return dist, q, g


def check_cameras(
    exclusion: ExclusionRule, q_camids: Any, g_camids: Any, num_query: int, num_gallery: int
) -> tuple[np.ndarray, np.ndarray]:
    """Camera numbers as int64 arrays (zeros when the rule needs none and none are given)."""
    if q_camids is None or g_camids is None:
        if exclusion.needs_cameras:
            raise ValueError("this exclusion rule needs query and gallery camera ids")
        return np.zeros(num_query, dtype=np.int64), np.zeros(num_gallery, dtype=np.int64)
    q_cams = _as_numpy(q_camids).reshape(-1).astype(np.int64)
    g_cams = _as_numpy(g_camids).reshape(-1).astype(np.int64)
    if q_cams.size != num_query or g_cams.size != num_gallery:
        raise ValueError("camera ids must match the query and gallery identities in length")
    return q_cams, g_cams


def average_queries(
    ranks: np.ndarray, aps: np.ndarray, inps: np.ndarray, max_rank: int
) -> tuple[np.ndarray, float, float]:
    """Average per-query results of the valid queries into (cmc, mAP, mINP)."""
    if ranks.size == 0:
        raise ValueError("no query identity appears in the (kept) gallery; nothing to evaluate")
    # cmc[r] counts queries matched within the first r+1 entries; a query whose ranked list is
    # shorter than max_rank stays matched, which is the "pad with the last value" rule.
    cmc = (ranks[:, None] <= np.arange(max_rank)[None, :]).mean(axis=0)
    return cmc.astype(np.float64), float(np.mean(aps)), float(np.mean(inps))


def eval_ranking(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any = None,
    g_camids: Any = None,
    exclusion: ExclusionRule = NO_EXCLUSION,
    dedup_cmc: bool = False,
    max_rank: int = 20,
) -> tuple[np.ndarray, float, float]:
    """(cmc, mAP, mINP) with ``exclusion``'s ignored images removed from each query's ranking.

    ``dedup_cmc``: the CMC counts distinct identities (the SYSU-MM01 authors' rule); otherwise it
    is the position of the first correct match. Camera ids are needed when the rule reads them.
    """
    dist, q_pids, g_pids = check_ranking_inputs(distmat, q_pids, g_pids)
    q_cams, g_cams = check_cameras(exclusion, q_camids, g_camids, q_pids.size, g_pids.size)
    result = rank_queries(dist, q_pids, g_pids, q_cams, g_cams, exclusion, dedup_cmc)
    valid = result.valid
    ranks = result.dedup_rank if dedup_cmc else result.first_rank
    return average_queries(ranks[valid], result.ap[valid], result.inp[valid], max_rank)


def eval_sysu(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 20,
) -> tuple[np.ndarray, float, float]:
    """SYSU-MM01 (cmc, mAP, mINP): cam3 queries ignore cam2, identity-deduplicated CMC."""
    return eval_ranking(distmat, q_pids, g_pids, q_camids, g_camids, SAME_LOCATION, True, max_rank)


def eval_llcm(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 20,
) -> tuple[np.ndarray, float, float]:
    """LLCM (cmc, mAP, mINP): a query ignores its identity in its camera; deduplicated CMC."""
    return eval_ranking(
        distmat, q_pids, g_pids, q_camids, g_camids, SAME_IDENTITY_AND_CAMERA, True, max_rank
    )


def eval_regdb(
    distmat: Any, q_pids: Any, g_pids: Any, max_rank: int = 20
) -> tuple[np.ndarray, float, float]:
    """RegDB (cmc, mAP, mINP) with the standard CMC (position of the first correct match)."""
    return eval_ranking(distmat, q_pids, g_pids, max_rank=max_rank)


def pairwise_distance(query_feats: Any, gallery_feats: Any, normalize: bool = True) -> np.ndarray:
    """Distance = minus the dot product of L2-normalised features, as a float32 NumPy array.

    Torch inputs are multiplied on their own device. Features are L2-normalised here unless
    ``normalize`` is False (normalising already-normalised features changes nothing).
    """
    if isinstance(query_feats, torch.Tensor) or isinstance(gallery_feats, torch.Tensor):
        q = torch.as_tensor(query_feats).detach().float()
        g = torch.as_tensor(gallery_feats).detach().float().to(q.device)
        if normalize:
            q = torch.nn.functional.normalize(q, dim=1)
            g = torch.nn.functional.normalize(g, dim=1)
        return (-(q @ g.T)).cpu().numpy().astype(np.float32, copy=False)
    q = np.asarray(query_feats, dtype=np.float32)
    g = np.asarray(gallery_feats, dtype=np.float32)
    if normalize:
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return (-(q @ g.T)).astype(np.float32, copy=False)


def summarize(cmc: np.ndarray, mAP: float, mINP: float) -> dict[str, float]:  # noqa: N803
    """Rank-1/5/10/20, mAP and mINP as percentages; ranks beyond len(cmc) are left out."""
    cmc = np.asarray(cmc)
    out = {f"rank{k}": 100.0 * float(cmc[k - 1]) for k in (1, 5, 10, 20) if k <= cmc.size}
    out["mAP"] = 100.0 * float(mAP)
    out["mINP"] = 100.0 * float(mINP)
    return out
