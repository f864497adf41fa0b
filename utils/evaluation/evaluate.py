"""Feature extraction and the one evaluation routine, shared by training, test.py and the search.

:func:`evaluate_protocols` runs any data set's protocols (``data.Protocol``): every image is
extracted once per call (in half precision on a GPU), optionally averaged with its mirror image,
L2-normalised and ranked per protocol and draw by one matrix product or by k-reciprocal
re-ranking of the queries and that draw's gallery.
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

from data import load_images, normalize
from data.dataset import NO_EXCLUSION, DataSet, ExclusionRule, ImageList, Protocol
from utils.base.errors import UserError
from utils.base.modality import Modality
from utils.evaluation.metrics import eval_ranking, pairwise_distance, summarize
from utils.evaluation.rerank import RerankSettings, rerank_features

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
    modality: Modality | None = None

    def get(self, kind: str) -> torch.Tensor:
        """The features of ``kind`` ("pool" or "bnneck")."""
        return self.pool if kind == "pool" else self.bnneck

    def take(self, index: np.ndarray) -> Features:
        """The images at positions ``index``, in that order."""
        rows = torch.as_tensor(index, dtype=torch.long, device=self.pool.device)
        return Features(
            self.pool[rows],
            self.bnneck[rows],
            self.pids[index],
            None if self.camids is None else self.camids[index],
            [self.paths[i] for i in index] if self.paths else [],
            self.modality,
        )


@dataclass
class ProtocolFeatures:
    """A protocol's query features and the union of its draws' galleries, for export and pictures.

    ``members[i]`` lists the gallery rows of draw ``draws[i]`` in the order the draw gave them.
    """

    protocol: Protocol
    query: Features
    gallery: Features
    draws: list[int]
    members: list[np.ndarray]

    def gallery_of(self, position: int) -> Features:
        """The gallery of the ``position``-th draw, in its own order."""
        return self.gallery.take(self.members[position])

    def membership(self) -> np.ndarray:
        """(draws, gallery images) boolean mask: which union images each draw holds."""
        mask = np.zeros((len(self.members), len(self.gallery.pids)), dtype=bool)
        for row, index in enumerate(self.members):
            mask[row, index] = True
        return mask


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
    flip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over uint8 NHWC ``images``; return L2-normalised features.

    With ``flip`` the features of each image and of its horizontal mirror are summed before the
    normalisation (test-time flip averaging).
    """
    model.eval()
    pools, feats = [], []
    steps = range(0, len(images), batch_size)
    bars = len(steps) > 1 and _interactive()
    for start in tqdm(steps, desc=desc, leave=False, disable=not bars):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        batch = normalize(batch.to(device, non_blocking=True))
        with autocast(device, amp):
            pool, feat = model(batch, modality)[:2]
            if flip:
                mirror_pool, mirror_feat = model(batch.flip(3), modality)[:2]
        pool, feat = pool.float(), feat.float()
        if flip:
            pool, feat = pool + mirror_pool.float(), feat + mirror_feat.float()
        pools.append(pool)
        feats.append(feat)
    pool = torch.nn.functional.normalize(torch.cat(pools), dim=1)
    feat = torch.nn.functional.normalize(torch.cat(feats), dim=1)
    return pool, feat


def features_of(
    model: nn.Module,
    images: ImageList,
    device: torch.device,
    img_size: tuple[int, int],
    batch_size: int,
    amp: str,
    flip: bool = False,
) -> Features:
    """Load the images of ``images``, extract their features and bundle them with their labels."""
    desc = f"{images.modality.name.lower()} images"
    pixels = load_images(images.paths, img_size, progress=_interactive(), desc=f"loading {desc}")
    features = extract_features(model, pixels, images.modality, device, batch_size, amp, desc, flip)
    labels = np.asarray(images.pids), np.asarray(images.cams)
    return Features(*features, *labels, images.paths, images.modality)


def score(
    query: Features,
    gallery: Features,
    exclusion: ExclusionRule = NO_EXCLUSION,
    dedup_cmc: bool = False,
    rerank: RerankSettings | None = None,
) -> dict[str, dict[str, float]]:
    """Rank-k / mAP / mINP (percent) of ``query`` against ``gallery`` for pool and BNNeck,
    ranked by k-reciprocal re-ranked distances (on the features' device) with ``rerank``."""
    if rerank is not None and rerank.k1 > len(gallery.pids):
        raise UserError(
            f"--k1 {rerank.k1}: larger than the gallery ({len(gallery.pids)} images); expected "
            f"at most {len(gallery.pids)}"
        )
    results = {}
    for kind in FEATURES:
        if rerank is None:
            distmat = pairwise_distance(query.get(kind), gallery.get(kind))
        else:
            device = query.get(kind).device
            distmat = rerank_features(query.get(kind), gallery.get(kind), rerank, device)
        cmc, m_ap, m_inp = eval_ranking(
            distmat, query.pids, gallery.pids, query.camids, gallery.camids, exclusion, dedup_cmc
        )
        results[kind] = summarize(cmc, m_ap, m_inp)
    return results


def mean_std(
    runs: Sequence[dict[str, dict[str, float]]], sample: bool = False
) -> dict[str, dict[str, float]]:
    """Average results; adds ``<metric>_std`` (0 for one run): the population std over trials,
    or with ``sample`` the sample std over runs (n - 1 in the denominator)."""
    out: dict[str, dict[str, float]] = {}
    for kind in runs[0]:
        out[kind] = {}
        for key in METRIC_KEYS:
            values = [float(run[kind][key]) for run in runs]
            out[kind][key] = statistics.fmean(values) if sample else float(np.mean(values))
            spread = statistics.stdev if sample else statistics.pstdev
            out[kind][f"{key}_std"] = float(spread(values)) if len(values) > 1 else 0.0
    return out


Labels = dict[Modality, dict[str, tuple[int, int]]]


def _add_images(labels: Labels, lists: Sequence[ImageList], sort: bool) -> None:
    """Add the (identity, camera) of each image of ``lists`` not yet in ``labels`` under its
    modality and path, the new ones sorted by path if ``sort``."""
    new: Labels = {}
    for images in lists:
        known, added = labels.setdefault(images.modality, {}), new.setdefault(images.modality, {})
        for path, pid, cam in zip(images.paths, images.pids, images.cams, strict=True):
            if path not in known:
                added.setdefault(path, (int(pid), int(cam)))
    for modality, added in new.items():
        labels[modality].update(sorted(added.items()) if sort else added)


def evaluate_protocols(
    model: nn.Module,
    dataset: DataSet,
    root: str,
    protocols: Sequence[Protocol],
    split: int,
    draws: Sequence[int],
    device: torch.device,
    img_size: tuple[int, int],
    batch_size: int = 64,
    amp: str = "bf16",
    flip: bool = False,
    keep: list[ProtocolFeatures] | None = None,
    rerank: RerankSettings | None = None,
) -> list[tuple[Protocol, dict[str, Any]]]:
    """Score ``model`` on ``protocols`` of ``split``, each gallery drawn as ``draws`` say.

    Returns (protocol, result) pairs: over random draws the mean and std with ``trials`` and
    ``per_trial``, else the one gallery's numbers; each says ``flip`` and ``rerank`` (its
    parameters or False). Swapped roles score each gallery image as a query against the query
    list. ``keep``, when given, receives each protocol's features.
    """
    draws = list(draws)
    lists = []
    for protocol in protocols:
        query = protocol.query(root, split)
        lists.append((protocol, query, [protocol.gallery(root, split, draw) for draw in draws]))
    # Each modality's distinct images, extracted once: queries in list order, then the gallery
    # images sorted by path, so that a gallery drawn ten times is one deterministic pass.
    labels: Labels = {}
    _add_images(labels, [query for _, query, _ in lists], sort=False)
    _add_images(labels, [gallery for *_, galleries in lists for gallery in galleries], sort=True)
    extracted: dict[Modality, Features] = {}
    row_of: dict[Modality, dict[str, int]] = {}
    for modality, images in labels.items():
        pids, cams = np.asarray(list(images.values()), dtype=np.int64).reshape(-1, 2).T
        union = ImageList(list(images), pids, cams, modality)
        extracted[modality] = features_of(model, union, device, img_size, batch_size, amp, flip)
        row_of[modality] = {path: row for row, path in enumerate(images)}

    def union_rows_of(images: ImageList) -> np.ndarray:
        return np.asarray([row_of[images.modality][path] for path in images.paths], np.int64)

    results = []
    for protocol, query_list, galleries in lists:
        query = extracted[query_list.modality].take(union_rows_of(query_list))
        rows = [union_rows_of(gallery) for gallery in galleries]
        # The protocol's own gallery union, in extraction order.
        union_rows = np.unique(np.concatenate(rows))
        gallery = extracted[galleries[0].modality].take(union_rows)
        members = [np.searchsorted(union_rows, index) for index in rows]
        features = ProtocolFeatures(protocol, query, gallery, draws, members)
        per_draw = []
        bar = tqdm(draws, desc="trials", leave=False, disable=not _interactive())
        for position, draw in enumerate(bar):
            ranking, ranked = query, features.gallery_of(position)
            if protocol.swap_roles:
                ranking, ranked = ranked, ranking
            result = score(ranking, ranked, protocol.exclusion, protocol.dedup_cmc, rerank)
            log.debug("%s %s draw %d: %s", dataset.name, protocol.name, draw, result)
            per_draw.append(result)
        summary: dict[str, Any]
        if dataset.gallery_draws > 1:
            summary = mean_std(per_draw)
            summary["trials"] = draws
            summary["per_trial"] = per_draw
        else:
            summary = dict(per_draw[0])
        summary["flip"] = flip
        summary["rerank"] = rerank.as_dict() if rerank is not None else False
        results.append((protocol, summary))
        if keep is not None:
            keep.append(features)
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
