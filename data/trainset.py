"""The training set of a registered data set as decoded uint8 arrays, cached on disk."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.cache import CACHE_VERSION, cached_training_images, default_cache_dir, image_signature
from data.dataset import TrainFiles
from data.images import check_img_size
from data.registry import get_dataset
from utils.base.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class TrainSet:
    """Training images of both modalities; label i is original identity ``pids[i]``."""

    visible_images: np.ndarray  # (N_v, H, W, 3) uint8
    visible_labels: np.ndarray  # (N_v,) int64 in 0..num_classes-1
    infrared_images: np.ndarray
    infrared_labels: np.ndarray
    pids: list[int]
    visible_paths: list[str]
    infrared_paths: list[str]

    def __post_init__(self) -> None:
        for name in ("visible", "infrared"):
            images = getattr(self, f"{name}_images")
            labels = getattr(self, f"{name}_labels")
            paths = getattr(self, f"{name}_paths")
            if not len(images) == len(labels) == len(paths):
                raise ValueError(
                    f"{name}: {len(images)} images, {len(labels)} labels, {len(paths)} paths"
                )

    @property
    def num_classes(self) -> int:
        """Number of training identities (labels run 0..num_classes-1)."""
        return len(self.pids)

    def subset(self, pids: Sequence[int]) -> TrainSet:
        """Keep the original identities ``pids``, relabelled 0..n-1 in ascending pid order."""
        keep = sorted({int(p) for p in pids})
        position = {pid: label for label, pid in enumerate(self.pids)}
        unknown = [p for p in keep if p not in position]
        if unknown:
            raise ValueError(f"identities {unknown} are not in this training set")
        # Old label -> new label; -1 marks identities that are dropped.
        relabel = np.full(max(len(self.pids), 1), -1, dtype=np.int64)
        for new, pid in enumerate(keep):
            relabel[position[pid]] = new
        parts = {}
        for name in ("visible", "infrared"):
            new_labels = relabel[getattr(self, f"{name}_labels")]
            rows = np.flatnonzero(new_labels >= 0)
            paths = getattr(self, f"{name}_paths")
            parts[f"{name}_images"] = np.asarray(getattr(self, f"{name}_images")[rows])
            parts[f"{name}_labels"] = new_labels[rows]
            parts[f"{name}_paths"] = [paths[i] for i in rows]
        return TrainSet(pids=keep, **parts)


def _paired_files(files: TrainFiles, root: str, title: str) -> dict:
    """Keep the identities with images of both modalities (warning about the others), labelled
    0..n-1 in ascending order: the paths, labels and ``pids`` fields of a TrainSet."""
    visible_paths, visible_pids, infrared_paths, infrared_pids = files
    visible, infrared = set(visible_pids), set(infrared_pids)
    for pid in sorted(visible ^ infrared):
        missing = "infrared" if pid in visible else "visible"
        logger.warning("%s: identity %d has no %s training images; skipped", title, pid, missing)
    pids = sorted(visible & infrared)
    if not pids:
        raise UserError(f"--data_root {root}: no {title} identity has images of both modalities")
    kept, pid_array = set(pids), np.asarray(pids, dtype=np.int64)
    fields: dict = {"pids": pids}
    for name, paths, ids in (
        ("visible", visible_paths, visible_pids),
        ("infrared", infrared_paths, infrared_pids),
    ):
        rows = [i for i, p in enumerate(ids) if p in kept]
        labels = np.searchsorted(pid_array, np.asarray(ids, np.int64)[rows])
        fields[f"{name}_paths"] = [paths[i] for i in rows]
        fields[f"{name}_labels"] = labels.astype(np.int64)
    return fields


def load_train_set(
    dataset: str,
    root: str | os.PathLike,
    img_size: Sequence[int] = (256, 128),
    trial: int = 1,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    mmap: bool = False,
) -> TrainSet:
    """Load the training set of ``dataset`` (``trial``: its split, where it has splits), resized
    to ``img_size`` and cached under ``cache_dir`` (default :func:`default_cache_dir`); with
    ``mmap`` the image arrays are read-only memory maps of the cache."""
    height, width = check_img_size(img_size)
    plugin = get_dataset(dataset)
    root = os.fspath(root)
    split = plugin.split_of(trial)
    files = _paired_files(plugin.train_files(root, split), root, plugin.title)
    visible_paths, infrared_paths = files["visible_paths"], files["infrared_paths"]
    meta = {
        "version": CACHE_VERSION,
        "dataset": plugin.name,
        "img_size": [height, width],
        "num_visible": len(visible_paths),
        "num_infrared": len(infrared_paths),
        "images": image_signature(root, {"visible": visible_paths, "infrared": infrared_paths}),
    }
    if plugin.num_splits > 1:
        meta["trial"] = split
    cache_path = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
    cache_path = cache_path / f"{plugin.cache_name(split)}_{height}x{width}"
    visible, infrared = cached_training_images(
        cache_path, meta, visible_paths, infrared_paths, plugin.title, progress, mmap
    )
    logger.info(
        "%s training set: %d identities, %d visible and %d infrared images",
        plugin.title,
        len(files["pids"]),
        len(visible_paths),
        len(infrared_paths),
    )
    return TrainSet(visible_images=visible, infrared_images=infrared, **files)
