"""Feature extraction and the SYSU-MM01 / RegDB protocols, shared by training and test.py.

Features are extracted once per image set (queries once for all trials), on the GPU in half
precision when there is one, L2-normalised and ranked with one matrix product per protocol.
"""

from __future__ import annotations

import logging
import statistics
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data import load_images, normalize, regdb_test, sysu_gallery, sysu_query
from utils.base.modality import Modality
from utils.evaluation.metrics import eval_regdb, eval_sysu, pairwise_distance, summarize

log = logging.getLogger(__name__)
FEATURES = ("pool", "bnneck")
METRIC_KEYS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")


@dataclass
class Features:
    """L2-normalised pool and BNNeck features of an image set, with its labels."""

    pool: torch.Tensor
    bnneck: torch.Tensor
    pids: np.ndarray
    camids: np.ndarray | None = None
    paths: list[str] = field(default_factory=list)

    def get(self, kind: str) -> torch.Tensor:
        """The features of ``kind`` ("pool" or "bnneck")."""
        return self.pool if kind == "pool" else self.bnneck


def _interactive() -> bool:
    """Progress bars only on a terminal: in a log file they are noise."""
    return sys.stderr.isatty()


def autocast(device: torch.device, amp: str) -> Any:
    """The autocast context for ``amp`` ("bf16", "fp16", "none"); a no-op on the CPU."""
    if device.type != "cuda" or amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: np.ndarray,
    modality: Modality,
    device: torch.device,
    batch_size: int = 64,
    amp: str = "bf16",
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over uint8 NHWC ``images``; return L2-normalised features."""
    model.eval()
    pools, feats = [], []
    steps = range(0, len(images), batch_size)
    bars = len(steps) > 1 and _interactive()
    for start in tqdm(steps, desc=desc, leave=False, disable=not bars):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        batch = normalize(batch.to(device, non_blocking=True))
        with autocast(device, amp):
            pool, feat = model(batch, modality)[:2]
        pools.append(pool.float())
        feats.append(feat.float())
    pool = torch.nn.functional.normalize(torch.cat(pools), dim=1)
    feat = torch.nn.functional.normalize(torch.cat(feats), dim=1)
    return pool, feat


def features_of(
    model: nn.Module,
    paths: Sequence[str],
    pids: np.ndarray,
    camids: np.ndarray | None,
    modality: Modality,
    device: torch.device,
    img_size: tuple[int, int],
    batch_size: int,
    amp: str,
    desc: str,
) -> Features:
    """Load ``paths``, extract their features and bundle them with their labels."""
    images = load_images(list(paths), img_size, progress=_interactive(), desc=f"loading {desc}")
    pool, feat = extract_features(model, images, modality, device, batch_size, amp, desc)
    return Features(pool, feat, np.asarray(pids), camids, list(paths))


def score(query: Features, gallery: Features, protocol: str) -> dict[str, dict[str, float]]:
    """Rank-k / mAP / mINP (percent) of ``query`` against ``gallery`` for pool and BNNeck."""
    results = {}
    for kind in FEATURES:
        distmat = pairwise_distance(query.get(kind), gallery.get(kind))
        if protocol == "sysu":
            cmc, m_ap, m_inp = eval_sysu(
                distmat, query.pids, gallery.pids, query.camids, gallery.camids
            )
        else:
            cmc, m_ap, m_inp = eval_regdb(distmat, query.pids, gallery.pids)
        results[kind] = summarize(cmc, m_ap, m_inp)
    return results


def mean_std(runs: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Average per-trial results; adds ``<metric>_std`` (population std over trials)."""
    out: dict[str, dict[str, float]] = {}
    for kind in runs[0]:
        out[kind] = {}
        for key in METRIC_KEYS:
            values = [run[kind][key] for run in runs]
            out[kind][key] = float(np.mean(values))
            out[kind][f"{key}_std"] = float(statistics.pstdev(values)) if len(values) > 1 else 0.0
    return out


def evaluate_sysu(
    model: nn.Module,
    root: str,
    mode: str,
    shot: int,
    trials: Sequence[int],
    device: torch.device,
    img_size: tuple[int, int],
    batch_size: int = 64,
    amp: str = "bf16",
    query: Features | None = None,
    keep: dict[str, Features] | None = None,
) -> tuple[dict[str, Any], Features]:
    """The SYSU-MM01 protocol over ``trials``; returns the mean result and the query features.

    Query features are extracted once and reused for every trial (and may be passed in to be
    reused across modes); the union of all trials' gallery images is extracted once. ``keep``,
    when given, receives the query and the first trial's gallery features (for rank lists).
    """
    if query is None:
        paths, pids, camids = sysu_query(root, mode)
        query = features_of(
            model,
            paths,
            pids,
            camids,
            Modality.INFRARED,
            device,
            img_size,
            batch_size,
            amp,
            "query",
        )
    draws = [sysu_gallery(root, mode, shot, trial) for trial in trials]
    union = sorted({path for paths, _, _ in draws for path in paths})
    position = {path: i for i, path in enumerate(union)}
    label = {}
    for paths, pids, camids in draws:
        for path, pid, camid in zip(paths, pids, camids, strict=True):
            label[path] = (pid, camid)
    everything = features_of(
        model,
        union,
        np.array([label[p][0] for p in union]),
        np.array([label[p][1] for p in union]),
        Modality.VISIBLE,
        device,
        img_size,
        batch_size,
        amp,
        "gallery",
    )
    per_trial = []
    bar = tqdm(trials, desc="trials", leave=False, disable=not _interactive())
    for trial, (paths, _, _) in zip(bar, draws, strict=True):
        index = torch.tensor([position[p] for p in paths], device=everything.pool.device)
        picked = index.cpu().numpy()
        gallery = Features(
            everything.pool[index],
            everything.bnneck[index],
            everything.pids[picked],
            everything.camids[picked],
            list(paths),
        )
        result = score(query, gallery, "sysu")
        log.debug("trial %d: %s", trial, result)
        per_trial.append(result)
        if keep is not None and "gallery" not in keep:
            keep.update(query=query, gallery=gallery)
    summary: dict[str, Any] = mean_std(per_trial)
    summary["trials"] = list(trials)
    summary["per_trial"] = per_trial
    return summary, query


def evaluate_regdb(
    model: nn.Module,
    root: str,
    trial: int,
    direction: str,
    device: torch.device,
    img_size: tuple[int, int],
    batch_size: int = 64,
    amp: str = "bf16",
    keep: dict[str, Features] | None = None,
) -> dict[str, Any]:
    """RegDB test split of ``trial``: ``direction`` is "v2i", "i2v" or "both".

    ``keep``, when given, receives the "visible" and "infrared" features.
    """
    sets = {}
    for modality in (Modality.VISIBLE, Modality.INFRARED):
        paths, pids = regdb_test(root, trial, modality)
        sets[modality] = features_of(
            model,
            paths,
            pids,
            None,
            modality,
            device,
            img_size,
            batch_size,
            amp,
            modality.name.lower(),
        )
    if keep is not None:
        keep.update(visible=sets[Modality.VISIBLE], infrared=sets[Modality.INFRARED])
    results: dict[str, Any] = {}
    if direction in ("v2i", "both"):
        results["v2i"] = score(sets[Modality.VISIBLE], sets[Modality.INFRARED], "regdb")
    if direction in ("i2v", "both"):
        results["i2v"] = score(sets[Modality.INFRARED], sets[Modality.VISIBLE], "regdb")
    return results


def format_table(rows: Sequence[tuple[str, dict[str, float]]], title: str = "") -> str:
    """A Markdown table of results: one row per (name, metrics) pair, percent values."""
    header = "| protocol | R1 | R5 | R10 | R20 | mAP | mINP |"
    lines = [title] if title else []
    lines += [header, "|---|---|---|---|---|---|---|"]
    for name, metrics in rows:
        cells = []
        for key in METRIC_KEYS:
            value = f"{metrics[key]:.2f}"
            if f"{key}_std" in metrics and metrics[f"{key}_std"] > 0:
                value += f" ± {metrics[f'{key}_std']:.2f}"
            cells.append(value)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
