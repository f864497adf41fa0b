"""RegDB: the authors' per-trial index files ``idx/{train,test}_{visible,thermal}_<t>.txt``.

Each line is ``relative/path.bmp label``; trials are numbered 1..10.
"""

from __future__ import annotations

import os

import numpy as np

from utils.base.errors import UserError
from utils.base.modality import Modality

NUM_TRIALS = 10
SPLITS = ("train", "test")
# RegDB's index files call the infrared modality "thermal".
_FILE_MODALITY = {Modality.VISIBLE: "visible", Modality.INFRARED: "thermal"}


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
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise UserError(f"{path}: cannot read RegDB index file ({exc.strerror})") from None
    paths, labels = [], []
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
        paths.append(parts[0])
        labels.append(label)
    return paths, labels


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
