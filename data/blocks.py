"""Building blocks of a data-set module: image listing, id lists, index files and trees of
``<identity, camera>`` folders. Text files may start with a UTF-8 byte-order mark."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from data.dataset import ImageList
from data.images import ListedImage, file_problem
from utils.base.errors import UserError
from utils.base.modality import Modality

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def image_files(folder: str | os.PathLike) -> list[str]:
    """The sorted full paths (``folder + "/" + name``) of the regular image files in ``folder``
    ([] if none): a stray ``Thumbs.db`` or a FIFO cannot end up in a list."""
    folder = os.fspath(folder)
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = [
        entry.name
        for entry in entries
        if entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file()
    ]
    return sorted(folder + "/" + name for name in names)


def read_text_lines(path: str | os.PathLike, what: str) -> list[str]:
    """The lines of the UTF-8 text file ``path``; ``what`` ("id file") names it in errors."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return handle.read().splitlines()
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: {what} is not UTF-8 text") from None


def read_ids(path: str | os.PathLike, what: str = "") -> list[int]:
    """Read an id list (comma-separated integers, any number of lines) in file order; with
    ``what`` ("test ids"), a list without ids is an error."""
    path = os.fspath(path)
    ids = []
    for line_no, line in enumerate(read_text_lines(path, "id file"), start=1):
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
    if what and not ids:
        raise UserError(f"{path}: lists no {what}")
    return ids


@dataclass(frozen=True)
class IndexList:
    """The images an index file lists: full paths, labels and the ``file:line`` naming each."""

    paths: list[str]
    labels: list[int]
    lines: list[str]

    def listed(self) -> list[ListedImage]:
        """The images with the line that lists each (for the up-front image check)."""
        return [ListedImage(p, line) for p, line in zip(self.paths, self.lines, strict=True)]


def read_index(
    root: str | os.PathLike,
    name: str,
    example: str = "relative/path.jpg label",
    check_images: bool = False,
) -> IndexList:
    """Parse the index file ``root/name`` of ``relative/path label`` lines (paths returned joined
    with ``root``; a path may hold spaces). A malformed line (``example`` shows the expected one),
    with ``check_images`` a line naming no image file, or an empty index raises UserError."""
    root = os.fspath(root)
    path = os.path.join(root, name)
    paths, labels, lines = [], [], []
    for line_no, line in enumerate(read_text_lines(path, "index file"), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(None, 1)
        try:
            if len(parts) != 2 or os.path.isabs(parts[0]):
                raise ValueError
            label = int(parts[1])
        except ValueError:
            raise UserError(
                f"{path}:{line_no}: expected {example!r} with the path relative to the data "
                f"root, found {line.strip()!r}"
            ) from None
        image = os.path.join(root, parts[0])
        problem = file_problem(image) if check_images else ""
        if problem == "not found":
            raise UserError(f"{path}:{line_no}: image {parts[0]} does not exist under {root}")
        if problem:
            raise UserError(f"{path}:{line_no}: image {parts[0]} {problem}")
        paths.append(image)
        labels.append(label)
        lines.append(f"{path}:{line_no}")
    if not paths:
        raise UserError(f"{path}: lists no images")
    return IndexList(paths, labels, lines)


@dataclass(frozen=True)
class CameraFolders:
    """The ``<identity, camera>`` folders of one modality, e.g. ``test_nir/cam{cam}/{pid:04d}``
    (relative to the data root); lists go identity by identity in the order given, then camera by
    camera in ``cams`` order, then file name by file name."""

    pattern: str
    cams: tuple[int, ...]
    modality: Modality
    title: str = ""  # the data set, in warnings

    def files(self, root: str | os.PathLike, pid: int, cam: int) -> list[str]:
        """The sorted images of one folder ([] if it has none)."""
        return image_files(os.path.join(os.fspath(root), self.pattern.format(pid=pid, cam=cam)))

    def images(self, root: str | os.PathLike, ids: Iterable[int]) -> ImageList:
        """Every image of identities ``ids`` (in that order), with identity and camera."""
        return self._collect(root, ids, lambda files, pid, cam: files)

    def draw(
        self, root: str | os.PathLike, ids: Iterable[int], seed: int, shot: int = 1
    ) -> ImageList:
        """A gallery: ``random.Random(seed)``, then ``sample(sorted full paths, shot)`` per folder
        of ``ids`` in list order (for ``shot`` 1 the authors' ``choice``). A folder with fewer
        than ``shot`` images gives all of them with a warning and no draw; empty ones are skipped.
        """
        if int(shot) < 1:
            raise UserError(f"--shot {shot}: expected a positive integer")
        rng = random.Random(seed)

        def pick(files: list[str], pid: int, cam: int) -> list[str]:
            if files and len(files) < shot:
                logger.warning(
                    "%s gallery: %s has %d images, fewer than shot=%d; taking all",
                    self.title,
                    self.pattern.format(pid=pid, cam=cam),
                    len(files),
                    shot,
                )
            return rng.sample(files, shot) if len(files) >= shot else files

        return self._collect(root, ids, pick)

    def _collect(
        self,
        root: str | os.PathLike,
        ids: Iterable[int],
        pick: Callable[[list[str], int, int], list[str]],
    ) -> ImageList:
        """The images ``pick(files, pid, cam)`` keeps of each folder, identity by identity."""
        paths, pids, cams = [], [], []
        for pid in ids:
            for cam in self.cams:
                chosen = pick(self.files(root, pid, cam), pid, cam)
                paths += chosen
                pids += [pid] * len(chosen)
                cams += [cam] * len(chosen)
        pid_array, cam_array = (np.asarray(v, dtype=np.int64) for v in (pids, cams))
        return ImageList(paths, pid_array, cam_array, self.modality)

    def listed(self, root: str | os.PathLike, ids: Iterable[int]) -> list[ListedImage]:
        """Every image of identities ``ids``, for the up-front image check."""
        return [ListedImage(path) for path in self.images(root, ids).paths]

    def empty_ids(self, root: str | os.PathLike, ids: Iterable[int]) -> list[int]:
        """The identities of ``ids`` without an image in any of these folders."""
        return [pid for pid in ids if not any(self.files(root, pid, cam) for cam in self.cams)]
