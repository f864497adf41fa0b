"""The data-set interface: what training, evaluation and the command-line tools ask of a data set.

Adding a data set
-----------------
Write one module ``data/<name>.py`` with a subclass of :class:`DataSet`, and add one instance of
it to ``REGISTERED`` in ``data/registry.py``; ``--dataset <name>`` then trains, searches and
tests on it, and nothing outside ``data/`` needs to know its name.

Class attributes: ``name`` (the ``--dataset`` value), ``title`` ("SYSU-MM01", in messages and
logs), ``short_title`` (in short messages), ``ema_decay`` (the default ``--ema_decay``),
``ema_overwrite_every`` (epochs between copies of the EMA weights into the live model),
``num_splits`` and ``gallery_draws`` (below). Methods to implement:

``expected_files(split, parts)``
    Entries (relative to the root; folders end in ``/``) that must exist for ``parts`` ("train",
    "test") of ``split``. The root check names every missing one in a single error line.
``check_lists(root, split, parts)``
    Parse the small list files of ``parts`` (id lists, index files) and raise :class:`UserError`
    naming file and line on a malformed one, so that bad input stops a run before any work.
``train_files(root, split)``
    The training images as :class:`TrainFiles`: visible and infrared paths with their original
    identity numbers (any integers; labels 0..n-1 are assigned in ascending identity order).
``protocols(settings)``
    The test protocols that :class:`ProtocolSettings` select (options a data set does not have are
    ignored), as :class:`Protocol` values: a name, a short key, ``query(root, split)`` and
    ``gallery(root, split, draw)`` returning :class:`ImageList` (paths, int64 identities and
    cameras, one modality), the :class:`ExclusionRule`, the kind of CMC and whether the roles are
    swapped in scoring (each drawn gallery image ranking the queries). Lists must be
    deterministic: the same (split, draw) always gives the same images in the same order.
``test_images(root, split)``
    Every image any protocol of ``split`` may read, as :class:`ListedImage` values (with the index
    file line that names it, where there is one); they are checked before training starts.

Two numbers say what ``--trial`` means. ``num_splits`` > 1: the data set comes in train/test
splits 1..num_splits (RegDB) and ``--trial`` picks one in training and in testing.
``gallery_draws`` > 1: each protocol's gallery is drawn at random ``gallery_draws`` times and the
results are averaged (SYSU-MM01); test.py's ``--trial`` then picks a single draw 0..n-1.
``cache_name``, ``result_name``, ``record_key`` and ``rank_list_folder`` name outputs and have
defaults that rarely need overriding.

A minimal module (a data set with one test direction and index files)::

    class NightVI(DataSet):
        name, title, short_title = "nightvi", "NightVI", "NightVI"
        ema_decay, ema_overwrite_every, gallery_draws = 0.997, 2, 10

        def expected_files(self, split, parts):
            return ["idx/train.txt", "idx/query.txt", "idx/gallery.txt"]

        def check_lists(self, root, split, parts):
            for name in self.expected_files(split, parts):
                read_index(os.path.join(root, name))  # raises UserError naming file:line

        def train_files(self, root, split):
            return TrainFiles(*train_lists(root))  # visible/infrared paths and ids

        def protocols(self, settings):
            rule = ExclusionRule(same_identity_same_camera=True)
            return (Protocol("i2v", "i2v", infrared_queries, drawn_gallery, rule, True),)

        def test_images(self, root, split):
            return listed_images(root, ["idx/query.txt", "idx/gallery.txt"])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
from PIL import Image

from utils.base.errors import UserError
from utils.base.modality import Modality

# Header reads are I/O bound; a few threads hide the latency of network file systems.
_CHECK_WORKERS = 8


@dataclass(frozen=True)
class ImageList:
    """Images of one modality with their identity and camera numbers, in protocol order."""

    paths: list[str]
    pids: np.ndarray  # (N,) int64
    cams: np.ndarray  # (N,) int64
    modality: Modality

    def __post_init__(self) -> None:
        if not len(self.paths) == len(self.pids) == len(self.cams):
            raise ValueError(
                f"{len(self.paths)} paths, {len(self.pids)} identities, {len(self.cams)} cameras"
            )

    def __len__(self) -> int:
        return len(self.paths)


class TrainFiles(NamedTuple):
    """Training images of both modalities with their original identity numbers."""

    visible_paths: list[str]
    visible_pids: list[int]
    infrared_paths: list[str]
    infrared_pids: list[int]


@dataclass(frozen=True)
class ExclusionRule:
    """Which gallery images a query does not rank against (they are removed from its list).

    ``ignored_camera_pairs`` holds (query camera, gallery camera) pairs: a query from the first
    camera ignores every gallery image from the second (SYSU-MM01: (3, 2), two cameras at one
    place). ``same_identity_same_camera``: a query ignores gallery images of its own identity
    taken by its own camera number (LLCM, whose camera numbers are shared across modalities).
    """

    ignored_camera_pairs: tuple[tuple[int, int], ...] = ()
    same_identity_same_camera: bool = False

    @property
    def needs_cameras(self) -> bool:
        """Whether the rule reads camera numbers at all."""
        return bool(self.ignored_camera_pairs) or self.same_identity_same_camera

    def ignored(self, q_pid: int, q_cam: int, g_pids: np.ndarray, g_cams: np.ndarray) -> np.ndarray:
        """Boolean mask of the gallery images one query ignores."""
        g_pids, g_cams = np.asarray(g_pids), np.asarray(g_cams)
        mask = np.zeros(g_cams.shape, dtype=bool)
        for query_cam, gallery_cam in self.ignored_camera_pairs:
            if int(q_cam) == query_cam:
                mask |= g_cams == gallery_cam
        if self.same_identity_same_camera:
            mask |= (g_pids == q_pid) & (g_cams == q_cam)
        return mask

    def describe(self) -> str:
        """A short phrase for titles ("" when nothing is ignored)."""
        parts = [
            f"camera {gallery} ignored for camera-{query} queries"
            for query, gallery in self.ignored_camera_pairs
        ]
        if self.same_identity_same_camera:
            parts.append("same identity and camera ignored")
        return ", ".join(parts)


NO_EXCLUSION = ExclusionRule()


@dataclass(frozen=True)
class Protocol:
    """One test protocol: where its queries and galleries come from and how a ranking is scored.

    ``query(root, split)`` lists the queries; ``gallery(root, split, draw)`` the gallery of one
    random draw (a data set without random galleries ignores ``draw``).
    """

    name: str  # in tables and test.py's results, e.g. "all single-shot", "v2i"
    key: str  # in training-time record keys (``<data set>_<key>_bnneck_rank1``), e.g. "all"
    query: Callable[[str, int], ImageList]
    gallery: Callable[[str, int, int], ImageList]
    exclusion: ExclusionRule = NO_EXCLUSION
    dedup_cmc: bool = False  # CMC over distinct identities (the SYSU-MM01 authors' rule)
    # Score with the roles swapped: each image of a drawn gallery ranks the query list. Only to
    # reproduce numbers of test code that did so; such a protocol must carry its own name.
    swap_roles: bool = False


# ProtocolSettings.v2i_roles: the visible-to-infrared protocol as defined, its swapped-roles
# variant (where a data set has one), or both.
V2I_ROLES = ("defined", "swapped", "both")


@dataclass(frozen=True)
class ProtocolSettings:
    """The test options a data set may read to select its protocols (others are ignored)."""

    mode: str = "all"  # SYSU-MM01 search mode: "all" or "indoor"
    shot: int = 1  # gallery images per (identity, camera) folder
    direction: str = "both"  # "v2i", "i2v" or "both"
    v2i_roles: str = "defined"  # one of V2I_ROLES


class ListedImage(NamedTuple):
    """A test image and where it is listed ("" when found by walking folders)."""

    path: str
    listed_in: str = ""


class DataSet:
    """Base class of the data sets; see the module docstring for the contract of each method."""

    name: ClassVar[str]  # the --dataset value
    title: ClassVar[str]  # "SYSU-MM01"
    short_title: ClassVar[str]  # "SYSU", for short messages
    ema_decay: ClassVar[float]  # the authors' EMA decay
    ema_overwrite_every: ClassVar[int]  # epochs between copies of the EMA into the live model
    num_splits: ClassVar[int] = 1
    gallery_draws: ClassVar[int] = 1

    # ----- implemented by each data set ------------------------------------------------------
    def expected_files(self, split: int, parts: Sequence[str]) -> list[str]:
        """Entries (relative to the root; folders end in "/") that ``parts`` of ``split`` need."""
        raise NotImplementedError

    def check_lists(self, root: str, split: int, parts: Sequence[str]) -> None:
        """Parse the list files of ``parts``; raise UserError naming file and line if malformed."""
        raise NotImplementedError

    def train_files(self, root: str, split: int) -> TrainFiles:
        """The training images of ``split`` and their original identity numbers."""
        raise NotImplementedError

    def protocols(self, settings: ProtocolSettings) -> tuple[Protocol, ...]:
        """The test protocols ``settings`` select."""
        raise NotImplementedError

    def test_images(self, root: str, split: int) -> list[ListedImage]:
        """Every image a test protocol of ``split`` may read."""
        raise NotImplementedError

    # ----- shared by every data set ---------------------------------------------------------
    def split_of(self, trial: int | None) -> int:
        """The train/test split ``--trial`` names (default 1); 1 where there are no splits."""
        if self.num_splits == 1 or trial is None:
            return 1
        return int(trial)

    def draws_of(self, trial: int | None) -> list[int]:
        """The gallery draws test.py scores: the one ``--trial`` names where it names a draw."""
        if self.num_splits == 1 and self.gallery_draws > 1 and trial is not None:
            return [int(trial)]
        return list(range(self.gallery_draws))

    def check_trial(self, trial: int | None, testing: bool) -> None:
        """Raise UserError unless ``--trial`` is a split (or, in test.py, a gallery draw)."""
        if trial is None:
            return
        if self.num_splits > 1:
            if not 1 <= trial <= self.num_splits:
                raise UserError(
                    f"--trial {trial}: {self.short_title} trials are 1-{self.num_splits}"
                )
        elif testing and self.gallery_draws > 1 and not 0 <= trial < self.gallery_draws:
            raise UserError(
                f"--trial {trial}: {self.short_title} gallery trials are "
                f"0-{self.gallery_draws - 1} (default: all {self.gallery_draws})"
            )

    def cache_name(self, split: int) -> str:
        """Prefix of the training-image cache folder (the image size is appended)."""
        return f"{self.name}_trial{split}" if self.num_splits > 1 else self.name

    def result_name(self, protocol: Protocol, split: int) -> str:
        """The name of a protocol's results in test.py's table and JSON."""
        trial = f" trial {split}" if self.num_splits > 1 else ""
        return f"{self.name}{trial} {protocol.name}"

    def record_key(self, protocol: Protocol) -> str:
        """The name of a protocol's results in training-time records (log.jsonl, results.json)."""
        return f"{self.name}_{protocol.key}"

    def rank_list_folder(self, protocol: Protocol) -> str:
        """The folder (under ``rank_lists/``) of a protocol's rank-list pictures."""
        return f"{self.name}_{protocol.key}"

    def check_root(
        self, root: str | os.PathLike, split: int = 1, parts: Sequence[str] = ("train", "test")
    ) -> None:
        """Fail with one line naming what is absent unless ``root`` has this data set's layout."""
        root = os.fspath(root)
        expected = self.expected_files(split, parts)
        if not os.path.isdir(root):
            what = "is a file, not a folder" if os.path.exists(root) else "folder not found"
            raise UserError(
                f"--data_root {root}: {what} (expected the {self.title} root holding "
                f"{', '.join(expected[:3])}{', ...' if len(expected) > 3 else ''})"
            )
        missing = [
            name
            for name in expected
            if not (os.path.isdir if name.endswith("/") else os.path.isfile)(
                os.path.join(root, name)
            )
        ]
        if missing:
            raise UserError(
                f"--data_root {root}: not a {self.title} folder (--dataset {self.name}): "
                f"missing {', '.join(missing)}"
            )
        self.check_lists(root, split, parts)

    def check_test_images(self, root: str | os.PathLike, split: int = 1) -> int:
        """Check that every test image exists and has a readable image header; return the count.

        Only headers are read (seconds for a whole test set); the first bad image, in list
        order, is named with the index line that lists it.
        """
        images = self.test_images(os.fspath(root), split)
        return check_image_headers(images)


def _header_problem(path: str) -> str:
    """Why ``path`` is not a readable image ("" when its header reads)."""
    if not os.path.isfile(path):
        return "not found"
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"is not a readable image ({err})"
    if width < 1 or height < 1:
        return f"is an empty image ({width}x{height})"
    return ""


def check_image_headers(images: Sequence[ListedImage]) -> int:
    """Raise UserError naming the first image that is missing or unreadable; return the count."""
    paths = [image.path for image in images]
    with ThreadPoolExecutor(max_workers=_CHECK_WORKERS) as pool:
        problems = list(pool.map(_header_problem, paths, chunksize=64))
    for image, problem in zip(images, problems, strict=True):
        if problem:
            where = f"{image.listed_in}: " if image.listed_in else ""
            raise UserError(f"{where}test image {image.path} {problem}")
    return len(images)
