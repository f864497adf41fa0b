"""SYSU-MM01: file lists for training and the authors' query/gallery protocol.

Raw layout: ``cam1..cam6/<pid:04d>/<n:04d>.jpg`` and ``exp/{train,val,test}_id.txt`` (one line of
comma-separated ids). Visible cameras 1, 2, 4, 5; infrared 3, 6; indoor cameras 1, 2, 3.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from data.blocks import CameraFolders, read_ids
from data.dataset import DataSet, ExclusionRule, Protocol, TrainFiles
from utils.base.errors import UserError
from utils.base.modality import Modality

if TYPE_CHECKING:
    from data.dataset import ProtocolSettings
    from data.images import ListedImage

logger = logging.getLogger(__name__)

VISIBLE_CAMS = (1, 2, 4, 5)
INFRARED_CAMS = (3, 6)
# Gallery cameras per search mode, in the order the authors drew from them.
GALLERY_CAMS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}
ID_FILES = ("exp/train_id.txt", "exp/val_id.txt", "exp/test_id.txt")
TEST_ID_FILE = ID_FILES[2]
# The id files each part of a run reads.
PART_ID_FILES = {"train": ID_FILES[:2], "test": ID_FILES[2:]}
CAMERAS = tuple(range(1, 7))
# Cameras 2 (visible) and 3 (infrared) watch the same place: a camera-3 query does not rank
# camera-2 images, which would make the task easy.
SAME_LOCATION = ExclusionRule(ignored_camera_pairs=((3, 2),))
_FOLDER = "cam{cam}/{pid:04d}"
VISIBLE_FOLDERS = CameraFolders(_FOLDER, VISIBLE_CAMS, Modality.VISIBLE, "SYSU-MM01")
INFRARED_FOLDERS = CameraFolders(_FOLDER, INFRARED_CAMS, Modality.INFRARED, "SYSU-MM01")
ALL_FOLDERS = CameraFolders(_FOLDER, CAMERAS, Modality.VISIBLE, "SYSU-MM01")
GALLERY_FOLDERS = {
    mode: CameraFolders(_FOLDER, cams, Modality.VISIBLE, "SYSU-MM01")
    for mode, cams in GALLERY_CAMS.items()
}


def check_ids_have_images(root: str | os.PathLike, name: str, ids: Sequence[int]) -> None:
    """Raise UserError naming the ids of id file ``name`` without an image in any camera, which
    would silently drop out (a partly extracted data set)."""
    absent = sorted(set(ALL_FOLDERS.empty_ids(root, set(ids))))
    if absent:
        shown = ", ".join(str(pid) for pid in absent[:10]) + (", ..." if len(absent) > 10 else "")
        raise UserError(
            f"{os.path.join(os.fspath(root), name)}: {len(absent)} id(s) without any image in "
            f"cam1..cam6 (partly extracted data set?): {shown}"
        )


def read_checked_ids(root: str | os.PathLike, name: str, what: str = "") -> list[int]:
    """Read the id file ``name`` (relative to ``root``; with ``what``, an empty one is an error);
    every id must have images."""
    ids = read_ids(os.path.join(os.fspath(root), name), what)
    check_ids_have_images(root, name, ids)
    return ids


def _check_mode(mode: str) -> str:
    if mode not in GALLERY_CAMS:
        raise UserError(f"--mode {mode!r}: expected 'all' or 'indoor'")
    return mode


def _test_ids(root: str | os.PathLike) -> list[int]:
    SYSU().check_layout(root)
    return sorted(set(read_checked_ids(root, TEST_ID_FILE, "test ids")))


def sysu_train_files(root: str | os.PathLike) -> TrainFiles:
    """The images of the train + val ids, ids ascending, then cameras, then file names (the
    authors' order)."""
    SYSU().check_layout(root)
    ids = sorted(
        set(read_checked_ids(root, ID_FILES[0])) | set(read_checked_ids(root, ID_FILES[1]))
    )
    visible = VISIBLE_FOLDERS.images(root, ids)
    infrared = INFRARED_FOLDERS.images(root, ids)
    return TrainFiles(visible.paths, visible.pids.tolist(), infrared.paths, infrared.pids.tolist())


def sysu_query(root: str | os.PathLike, mode: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return (paths, pids, camids) of every infrared image (cams 3, 6) of the test ids (the same
    for both modes; ``mode`` is only checked)."""
    _check_mode(mode)
    query = INFRARED_FOLDERS.images(root, _test_ids(root))
    return query.paths, query.pids, query.cams


def sysu_gallery(
    root: str | os.PathLike, mode: str, shot: int = 1, trial: int = 0
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return (paths, pids, camids) of the visible gallery of ``trial``, drawn as the authors did
    (:meth:`CameraFolders.draw` seeded with ``trial``: trial t reproduces their gallery t)."""
    gallery = GALLERY_FOLDERS[_check_mode(mode)].draw(root, _test_ids(root), trial, int(shot))
    return gallery.paths, gallery.pids, gallery.cams


class SYSU(DataSet):
    """SYSU-MM01: infrared queries, visible galleries drawn 10 times (all or indoor search)."""

    name = "sysu"
    title = "SYSU-MM01"
    short_title = "SYSU"
    ema_decay = 0.997
    ema_overwrite_every = 2
    gallery_draws = 10
    test_options = MappingProxyType({"mode": tuple(GALLERY_CAMS), "shot": (1, 10)})

    def expected_files(self, split: int, parts: Sequence[str]) -> list[str]:
        """The six camera folders and the three id files (whatever the parts)."""
        return [f"cam{c}/" for c in CAMERAS] + list(ID_FILES)

    def check_lists(self, root: str, split: int, parts: Sequence[str]) -> None:
        """Parse all three id files, check that the ids of ``parts`` have images and that there
        are test ids; warn about a test id that is also a training id."""
        ids = {name: read_ids(os.path.join(root, name)) for name in ID_FILES}
        for part in parts:
            for name in PART_ID_FILES[part]:
                check_ids_have_images(root, name, ids[name])
        if "test" in parts and not ids[TEST_ID_FILE]:
            raise UserError(f"{os.path.join(root, TEST_ID_FILE)}: lists no test ids")
        if "train" in parts and "test" in parts:
            both = sorted(set(ids[TEST_ID_FILE]) & set(ids[ID_FILES[0]] + ids[ID_FILES[1]]))
            if both:
                logger.warning(
                    "%s: %d test id(s) also listed for training in %s or %s (their scores are "
                    "not a test on unseen people): %s",
                    os.path.join(root, TEST_ID_FILE),
                    len(both),
                    ID_FILES[0],
                    ID_FILES[1],
                    ", ".join(str(pid) for pid in both[:10]) + (", ..." if len(both) > 10 else ""),
                )

    def train_files(self, root: str, split: int) -> TrainFiles:
        """The train + val ids' images (``split`` is ignored: SYSU-MM01 has one split)."""
        return sysu_train_files(root)

    def make_protocols(self, settings: ProtocolSettings) -> tuple[Protocol, ...]:
        """The one protocol of ``settings.mode`` and ``settings.shot`` (one split: ``split`` is
        ignored)."""
        mode, shot = _check_mode(settings.mode), int(settings.shot)
        kind = "single" if shot == 1 else "multi"
        return (
            Protocol(
                name=f"{mode} {kind}-shot",
                key=mode,
                query=lambda root, split: INFRARED_FOLDERS.images(root, _test_ids(root)),
                gallery=lambda root, split, draw: GALLERY_FOLDERS[mode].draw(
                    root, _test_ids(root), draw, shot
                ),
                exclusion=SAME_LOCATION,
                dedup_cmc=True,
            ),
        )

    def test_images(self, root: str, split: int) -> list[ListedImage]:
        """Every image of the test ids, in every camera (any mode, shot or draw may read it)."""
        return ALL_FOLDERS.listed(root, _test_ids(root))

    def rank_list_folder(self, protocol: Protocol) -> str:
        """One folder whatever the mode: both modes share their queries."""
        return self.name
