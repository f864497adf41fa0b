"""SYSU-MM01: file lists for training and the authors' query/gallery protocol.

Raw layout: ``cam1..cam6/<pid:04d>/<n:04d>.jpg`` and ``exp/{train,val,test}_id.txt`` (one line of
comma-separated ids). Visible cameras 1, 2, 4, 5; infrared 3, 6; indoor cameras 1, 2, 3.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from functools import partial

import numpy as np

from data.dataset import (
    DataSet,
    ExclusionRule,
    ImageList,
    ListedImage,
    Protocol,
    ProtocolSettings,
    TrainFiles,
)
from utils.base.errors import UserError
from utils.base.modality import Modality

logger = logging.getLogger(__name__)

VISIBLE_CAMS = (1, 2, 4, 5)
INFRARED_CAMS = (3, 6)
# Gallery cameras per search mode, in the order the authors drew from them.
GALLERY_CAMS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}
ID_FILES = ("exp/train_id.txt", "exp/val_id.txt", "exp/test_id.txt")
# The id files each part of a run reads.
PART_ID_FILES = {"train": ID_FILES[:2], "test": ID_FILES[2:]}
CAMERAS = tuple(range(1, 7))
# Cameras 2 (visible) and 3 (infrared) watch the same place: a camera-3 query does not rank
# camera-2 images, which would make the task easy.
SAME_LOCATION = ExclusionRule(ignored_camera_pairs=((3, 2),))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def sysu_root_check(root: str | os.PathLike) -> None:
    """Raise UserError naming every missing entry unless ``root`` looks like SYSU-MM01."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise UserError(f"--data_root {root}: folder does not exist")
    missing = [name for name in ID_FILES if not os.path.isfile(os.path.join(root, name))]
    missing += [f"cam{c}/" for c in range(1, 7) if not os.path.isdir(os.path.join(root, f"cam{c}"))]
    if missing:
        raise UserError(f"--data_root {root}: not a SYSU-MM01 folder: missing {', '.join(missing)}")


def read_ids(path: str | os.PathLike) -> list[int]:
    """Read a SYSU id file (comma-separated integers, any number of lines) in file order."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise UserError(f"{path}: cannot read id file ({exc.strerror})") from None
    ids = []
    for line_no, line in enumerate(lines, start=1):
        for token in line.split(","):
            token = token.strip()
            if not token:
                continue
            try:
                ids.append(int(token))
            except ValueError:
                raise UserError(
                    f"{path}:{line_no}: expected comma-separated integer ids, found {token!r}"
                ) from None
    return ids


def check_ids_have_images(root: str | os.PathLike, name: str, ids: Sequence[int]) -> None:
    """Raise UserError naming the ids of id file ``name`` that have no image in any camera.

    Such an id would silently drop out of training or of the test protocol (a partly extracted
    data set); an id with images in one modality only is reported later, by the training set.
    """
    absent = sorted({pid for pid in ids if not any(image_files(root, c, pid) for c in CAMERAS)})
    if absent:
        shown = ", ".join(str(pid) for pid in absent[:10]) + (", ..." if len(absent) > 10 else "")
        raise UserError(
            f"{os.path.join(os.fspath(root), name)}: {len(absent)} id(s) without any image in "
            f"cam1..cam6 (partly extracted data set?): {shown}"
        )


def read_checked_ids(root: str | os.PathLike, name: str) -> list[int]:
    """Read the id file ``name`` (relative to ``root``); every id must have images."""
    ids = read_ids(os.path.join(os.fspath(root), name))
    check_ids_have_images(root, name, ids)
    return ids


def image_files(root: str | os.PathLike, cam: int, pid: int) -> list[str]:
    """Return the sorted full paths of the images in ``cam<cam>/<pid:04d>`` ([] if no folder).

    Sorting full paths is what the authors did; within one folder it equals sorting file names.
    Only image files count, so a stray ``Thumbs.db`` cannot end up in a gallery.
    """
    folder = os.path.join(os.fspath(root), f"cam{cam}", f"{pid:04d}")
    if not os.path.isdir(folder):
        return []
    names = (n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    return sorted(folder + "/" + name for name in names)


def _check_mode(mode: str) -> str:
    if mode not in GALLERY_CAMS:
        raise UserError(f"--mode {mode!r}: expected 'all' or 'indoor'")
    return mode


def _test_ids(root: str | os.PathLike) -> list[int]:
    sysu_root_check(root)
    return sorted(set(read_checked_ids(root, "exp/test_id.txt")))


def sysu_train_files(
    root: str | os.PathLike,
) -> tuple[list[str], list[int], list[str], list[int]]:
    """Return (visible paths, their ids, infrared paths, their ids) of the train + val ids.

    Ids ascending, then cameras in order, then file names: the authors' order.
    """
    sysu_root_check(root)
    root = os.fspath(root)
    ids = set(read_checked_ids(root, "exp/train_id.txt"))
    ids |= set(read_checked_ids(root, "exp/val_id.txt"))
    visible_paths, visible_pids, infrared_paths, infrared_pids = [], [], [], []
    for pid in sorted(ids):
        for cam in VISIBLE_CAMS:
            files = image_files(root, cam, pid)
            visible_paths += files
            visible_pids += [pid] * len(files)
        for cam in INFRARED_CAMS:
            files = image_files(root, cam, pid)
            infrared_paths += files
            infrared_pids += [pid] * len(files)
    return visible_paths, visible_pids, infrared_paths, infrared_pids


def sysu_query(root: str | os.PathLike, mode: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return (paths, pids, camids) of every infrared image (cams 3, 6) of the test ids.

    The query is the same for both modes; ``mode`` is only checked.
    """
    _check_mode(mode)
    paths, pids, camids = [], [], []
    for pid in _test_ids(root):
        for cam in INFRARED_CAMS:
            files = image_files(root, cam, pid)
            paths += files
            pids += [pid] * len(files)
            camids += [cam] * len(files)
    return paths, np.asarray(pids, dtype=np.int64), np.asarray(camids, dtype=np.int64)


def sysu_gallery(
    root: str | os.PathLike, mode: str, shot: int = 1, trial: int = 0
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return (paths, pids, camids) of the visible gallery of ``trial``, drawn as the authors did.

    ``random.Random(trial)``; ids ascending; cameras 1, 2, 4, 5 (all) or 1, 2 (indoor); for each
    (id, camera) folder with images, ``rng.sample(sorted full paths, shot)``. For ``shot=1`` this
    consumes the generator exactly as the authors' ``random.choice`` did, so trial t reproduces
    their gallery t. A folder with fewer than ``shot`` images (the authors' code would crash)
    gives all its images, in sorted order, with a warning, and consumes no random draw.
    """
    _check_mode(mode)
    if int(shot) < 1:
        raise UserError(f"--shot {shot}: expected a positive integer")
    shot = int(shot)
    rng = random.Random(trial)
    paths, pids, camids = [], [], []
    for pid in _test_ids(root):
        for cam in GALLERY_CAMS[mode]:
            files = image_files(root, cam, pid)
            if not files:
                continue
            if len(files) < shot:
                logger.warning(
                    "SYSU-MM01 gallery: cam%d/%04d has %d images, fewer than shot=%d; taking all",
                    cam,
                    pid,
                    len(files),
                    shot,
                )
                chosen = files
            else:
                chosen = rng.sample(files, shot)
            paths += chosen
            pids += [pid] * len(chosen)
            camids += [cam] * len(chosen)
    return paths, np.asarray(pids, dtype=np.int64), np.asarray(camids, dtype=np.int64)


def _query_list(root: str, split: int, mode: str) -> ImageList:
    paths, pids, cams = sysu_query(root, mode)
    return ImageList(paths, pids, cams, Modality.INFRARED)


def _gallery_list(root: str, split: int, draw: int, mode: str, shot: int) -> ImageList:
    paths, pids, cams = sysu_gallery(root, mode, shot, draw)
    return ImageList(paths, pids, cams, Modality.VISIBLE)


class SYSU(DataSet):
    """SYSU-MM01: infrared queries, visible galleries drawn 10 times (all or indoor search)."""

    name = "sysu"
    title = "SYSU-MM01"
    short_title = "SYSU"
    ema_decay = 0.997
    ema_overwrite_every = 2
    gallery_draws = 10

    def expected_files(self, split: int, parts: Sequence[str]) -> list[str]:
        """The six camera folders and the three id files (whatever the parts)."""
        return [f"cam{c}/" for c in CAMERAS] + list(ID_FILES)

    def check_lists(self, root: str, split: int, parts: Sequence[str]) -> None:
        """Parse all three id files, then check that the ids of ``parts`` have images."""
        ids = {name: read_ids(os.path.join(root, name)) for name in ID_FILES}
        for part in parts:
            for name in PART_ID_FILES[part]:
                check_ids_have_images(root, name, ids[name])

    def train_files(self, root: str, split: int) -> TrainFiles:
        """The train + val ids' images (``split`` is ignored: SYSU-MM01 has one split)."""
        return TrainFiles(*sysu_train_files(root))

    def protocols(self, settings: ProtocolSettings) -> tuple[Protocol, ...]:
        """The one protocol of ``settings.mode`` and ``settings.shot`` (direction ignored)."""
        mode, shot = _check_mode(settings.mode), int(settings.shot)
        kind = "single" if shot == 1 else "multi"
        return (
            Protocol(
                name=f"{mode} {kind}-shot",
                key=mode,
                query=partial(_query_list, mode=mode),
                gallery=partial(_gallery_list, mode=mode, shot=shot),
                exclusion=SAME_LOCATION,
                dedup_cmc=True,
            ),
        )

    def test_images(self, root: str, split: int) -> list[ListedImage]:
        """Every image of the test ids, in every camera (any mode, shot or draw may read it)."""
        return [
            ListedImage(path)
            for pid in _test_ids(root)
            for cam in CAMERAS
            for path in image_files(root, cam, pid)
        ]

    def rank_list_folder(self, protocol: Protocol) -> str:
        """One folder whatever the mode: both modes share their queries."""
        return self.name
