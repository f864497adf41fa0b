"""RegDB: the authors' per-trial index files ``idx/{train,test}_{visible,thermal}_<t>.txt``.

Each line is ``relative/path.bmp label``; trials are numbered 1..10.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial

import numpy as np

from data.dataset import DataSet, ImageList, ListedImage, Protocol, ProtocolSettings, TrainFiles
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


def check_trial(trial: int) -> int:
    """Return ``trial`` if it is an integer in 1..10, else raise UserError."""
    try:
        value = int(trial)
    except (TypeError, ValueError):
        value = None
    if value is None or value != trial or not 1 <= value <= NUM_TRIALS:
        raise UserError(f"--trial {trial!r}: RegDB trials are numbered 1..{NUM_TRIALS}")
    return value


def regdb_root_check(root: str | os.PathLike) -> None:
    """Raise UserError unless ``root`` exists and holds the ``idx/`` folder."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise UserError(f"--data_root {root}: folder does not exist")
    if not os.path.isdir(os.path.join(root, "idx")):
        raise UserError(f"--data_root {root}: not a RegDB folder: missing idx/")


def index_file(root: str | os.PathLike, trial: int, split: str, modality: Modality | str) -> str:
    """Return the path of the index file for (trial, split, modality)."""
    if split not in SPLITS:
        raise UserError(f"split {split!r}: expected 'train' or 'test'")
    try:
        modality = Modality.parse(modality)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    name = f"{split}_{_FILE_MODALITY[modality]}_{check_trial(trial)}.txt"
    return os.path.join(os.fspath(root), "idx", name)


def read_index(path: str) -> tuple[list[str], list[int]]:
    """Parse an index file into (relative paths, labels); blank lines are skipped."""
    entries = read_index_lines(path)
    return [rel for _, rel, _ in entries], [label for _, _, label in entries]


def read_index_lines(path: str) -> list[tuple[int, str, int]]:
    """Parse an index file into (line number, relative path, label) of its non-blank lines."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise UserError(f"{path}: cannot read RegDB index file ({exc.strerror})") from None
    entries = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        # rsplit keeps a path with spaces intact; the label is always the last token.
        parts = line.strip().rsplit(None, 1)
        try:
            if len(parts) != 2:
                raise ValueError
            label = int(parts[1])
        except ValueError:
            raise UserError(
                f"{path}:{line_no}: expected 'relative/path.bmp label', found {line.strip()!r}"
            ) from None
        entries.append((line_no, parts[0], label))
    return entries


def regdb_split(
    root: str | os.PathLike, trial: int, split: str, modality: Modality | str
) -> tuple[list[str], np.ndarray]:
    """Return (paths joined with ``root``, labels as in the file) of one index file."""
    regdb_root_check(root)
    path = index_file(root, trial, split, modality)
    if not os.path.isfile(path):
        rel = os.path.relpath(path, os.fspath(root))
        raise UserError(f"--data_root {os.fspath(root)}: not a RegDB folder: missing {rel}")
    rel_paths, labels = read_index(path)
    paths = [os.path.join(os.fspath(root), p) for p in rel_paths]
    return paths, np.asarray(labels, dtype=np.int64)


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

    def expected_files(self, split: int, parts: Sequence[str]) -> list[str]:
        """The index files of ``parts`` for ``split``."""
        return [
            f"idx/{part}_{_FILE_MODALITY[modality]}_{split}.txt"
            for part in parts
            for modality in (Modality.VISIBLE, Modality.INFRARED)
        ]

    def check_lists(self, root: str, split: int, parts: Sequence[str]) -> None:
        """Parse every index file of ``parts``."""
        for name in self.expected_files(split, parts):
            read_index(os.path.join(root, name))

    def train_files(self, root: str, split: int) -> TrainFiles:
        """The training index files of ``split`` (1..10)."""
        split = check_trial(split)
        visible_paths, visible_pids = regdb_split(root, split, "train", Modality.VISIBLE)
        infrared_paths, infrared_pids = regdb_split(root, split, "train", Modality.INFRARED)
        return TrainFiles(
            visible_paths, visible_pids.tolist(), infrared_paths, infrared_pids.tolist()
        )

    def protocols(self, settings: ProtocolSettings) -> tuple[Protocol, ...]:
        """Visible-to-infrared and/or infrared-to-visible (``settings.direction``)."""
        if settings.direction not in (*DIRECTIONS, "both"):
            raise UserError(f"--direction {settings.direction!r}: expected v2i, i2v or both")
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
        images = []
        for modality in (Modality.VISIBLE, Modality.INFRARED):
            path = index_file(root, split, "test", modality)
            for line_no, rel, _ in read_index_lines(path):
                images.append(ListedImage(os.path.join(root, rel), f"{path}:{line_no}"))
        return images
