"""SYSU-MM01: file lists for training and the authors' query/gallery protocol.

Raw layout: ``cam1..cam6/<pid:04d>/<n:04d>.jpg`` and ``exp/{train,val,test}_id.txt`` (one line of
comma-separated ids). Visible cameras 1, 2, 4, 5; infrared 3, 6; indoor cameras 1, 2, 3.
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np

from utils.base.errors import UserError

logger = logging.getLogger(__name__)

VISIBLE_CAMS = (1, 2, 4, 5)
INFRARED_CAMS = (3, 6)
# Gallery cameras per search mode, in the order the authors drew from them.
GALLERY_CAMS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}
ID_FILES = ("exp/train_id.txt", "exp/val_id.txt", "exp/test_id.txt")
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
    return sorted(set(read_ids(os.path.join(os.fspath(root), "exp/test_id.txt"))))


def sysu_train_files(
    root: str | os.PathLike,
) -> tuple[list[str], list[int], list[str], list[int]]:
    """Return (visible paths, their ids, infrared paths, their ids) of the train + val ids.

    Ids ascending, then cameras in order, then file names: the authors' order.
    """
    sysu_root_check(root)
    root = os.fspath(root)
    ids = set(read_ids(os.path.join(root, "exp/train_id.txt")))
    ids |= set(read_ids(os.path.join(root, "exp/val_id.txt")))
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
