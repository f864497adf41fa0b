"""RegDB: the authors' per-trial index files ``idx/{train,test}_{visible,thermal}_<t>.txt``.

Each line is ``relative/path.bmp label``; trials are numbered 1..10.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from types import MappingProxyType

import numpy as np

from data.blocks import IndexList, read_index
from data.dataset import DataSet, ImageList, Protocol, ProtocolSettings, TrainFiles
from data.images import ListedImage
from utils.base.errors import UserError
from utils.base.modality import Modality

NUM_TRIALS = 10
SPLITS = ("train", "test")
# RegDB's index files call the infrared modality "thermal".
_FILE_MODALITY = {Modality.VISIBLE: "visible", Modality.INFRARED: "thermal"}
# RegDB is one dual-camera system: camera 1 is the visible camera, camera 2 the thermal one.
CAMERA = {Modality.VISIBLE: 1, Modality.INFRARED: 2}
# Test directions: (query modality, gallery modality).
DIRECTIONS = {
    "v2i": (Modality.VISIBLE, Modality.INFRARED),
    "i2v": (Modality.INFRARED, Modality.VISIBLE),
}
_EXAMPLE = "relative/path.bmp label"


def index_name(trial: int, split: str, modality: Modality | str) -> str:
    """The index file of (trial, split, modality), relative to the root."""
    if split not in SPLITS:
        raise UserError(f"split {split!r}: expected 'train' or 'test'")
    try:
        modality = Modality.parse(modality)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return f"idx/{split}_{_FILE_MODALITY[modality]}_{RegDB().check_split(trial)}.txt"


def read_split(
    root: str | os.PathLike, trial: int, split: str, modality: Modality | str
) -> IndexList:
    """The images one index file lists, after checking that the root holds it."""
    name = index_name(trial, split, modality)
    RegDB().check_layout(root, trial, (split,))
    return read_index(root, name, _EXAMPLE)


def regdb_split(
    root: str | os.PathLike, trial: int, split: str, modality: Modality | str
) -> tuple[list[str], np.ndarray]:
    """Return (paths joined with ``root``, labels as in the file) of one index file."""
    listed = read_split(root, trial, split, modality)
    return listed.paths, np.asarray(listed.labels, dtype=np.int64)


def regdb_test(
    root: str | os.PathLike, trial: int, modality: Modality | str
) -> tuple[list[str], np.ndarray]:
    """Return (paths, pids) of the test images of ``modality`` for ``trial``."""
    return regdb_split(root, trial, "test", modality)


def _test_list(
    root: str, split: int, draw: int = 0, modality: Modality = Modality.VISIBLE
) -> ImageList:
    """The test images of ``modality`` for ``split`` (RegDB has no random draws)."""
    paths, pids = regdb_test(root, split, modality)
    cams = np.full(len(paths), CAMERA[modality], dtype=np.int64)
    return ImageList(paths, pids, cams, modality)


class RegDB(DataSet):
    """RegDB: ten train/test splits; each direction ranks one modality's test set on the other's."""

    name = "regdb"
    title = "RegDB"
    short_title = "RegDB"
    ema_decay = 0.968
    ema_overwrite_every = 10
    num_splits = NUM_TRIALS
    test_options = MappingProxyType({"direction": (*DIRECTIONS, "both")})

    def expected_files(self, split: int, parts: Sequence[str]) -> list[str]:
        """The ``idx/`` folder and the index files of ``parts`` for ``split``."""
        return ["idx/"] + [
            index_name(split, part, modality)
            for part in parts
            for modality in (Modality.VISIBLE, Modality.INFRARED)
        ]

    def check_lists(self, root: str, split: int, parts: Sequence[str]) -> None:
        """Parse every index file of ``parts`` (none may be empty)."""
        for name in self.expected_files(split, parts)[1:]:
            read_index(root, name, _EXAMPLE)

    def train_files(self, root: str, split: int) -> TrainFiles:
        """The training index files of ``split`` (1..10)."""
        visible = read_split(root, split, "train", Modality.VISIBLE)
        infrared = read_split(root, split, "train", Modality.INFRARED)
        return TrainFiles(visible.paths, visible.labels, infrared.paths, infrared.labels)

    def make_protocols(self, settings: ProtocolSettings) -> tuple[Protocol, ...]:
        """Visible-to-infrared and/or infrared-to-visible (``settings.direction``)."""
        chosen = DIRECTIONS if settings.direction == "both" else [settings.direction]
        protocols = []
        for direction in chosen:
            query, gallery = DIRECTIONS[direction]
            protocols.append(
                Protocol(
                    name=direction,
                    key=direction,
                    query=partial(_test_list, modality=query),
                    gallery=partial(_test_list, modality=gallery),
                )
            )
        return tuple(protocols)

    def test_images(self, root: str, split: int) -> list[ListedImage]:
        """The images of both test index files of ``split``, with the line naming each."""
        return [
            image
            for modality in (Modality.VISIBLE, Modality.INFRARED)
            for image in read_index(root, index_name(split, "test", modality), _EXAMPLE).listed()
        ]
