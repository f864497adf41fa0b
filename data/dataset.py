"""The data-set interface: what training, evaluation and the command-line tools ask of a data set.

A data set is a subclass of :class:`DataSet` registered with ``data.register_dataset`` (from a
module of ``data/`` named in ``DATASET_MODULES`` of ``data/registry.py``, or from your own code);
``--dataset <name>`` then trains, searches and tests on it. The building blocks in
:mod:`data.blocks` do the file work.

Class attributes: ``name`` (the ``--dataset`` value), ``title`` and ``short_title`` (in messages),
``ema_decay`` and ``ema_overwrite_every`` (the EMA defaults), ``num_splits`` > 1 (train/test
splits 1..n that ``--trial`` picks, RegDB), ``gallery_draws`` > 1 (random galleries averaged over
n draws, test.py's ``--trial`` picking one draw 0..n-1, SYSU-MM01) and ``test_options``: the
:class:`ProtocolSettings` fields honoured, with their values; any other option given a value
other than its default is refused in one line naming what the data set offers. The five methods
without a body are the ones to implement; every list they return must be deterministic.

A minimal module, the one docs/extending.md's "Adding a data set" runs (a test executes that copy)::

    import os

    from data import CameraFolders, DataSet, ExclusionRule, Protocol, TrainFiles, register_dataset
    from data import read_ids, read_index
    from utils.base.modality import Modality

    CAMS = (1, 2, 3)
    TRAIN_LISTS = ("idx/train_vis.txt", "idx/train_ir.txt")  # lines: relative/path label
    VISIBLE = CameraFolders("test_vis/cam{cam}/{pid:04d}", CAMS, Modality.VISIBLE, "NightVI")
    INFRARED = CameraFolders("test_ir/cam{cam}/{pid:04d}", CAMS, Modality.INFRARED, "NightVI")


    def test_ids(root):
        return sorted(read_ids(os.path.join(root, "idx/test_id.txt"), "test ids"))


    @register_dataset
    class NightVI(DataSet):
        name, title, short_title = "nightvi", "NightVI", "NightVI"
        ema_decay, ema_overwrite_every, gallery_draws = 0.997, 2, 10
        test_options = {}  # one protocol: --mode, --shot, --direction are refused

        def expected_files(self, split, parts):
            return [*TRAIN_LISTS, "idx/test_id.txt", "test_vis/", "test_ir/"]

        def check_lists(self, root, split, parts):
            if "train" in parts:
                self.train_files(root, split)  # UserError naming file:line
            if "test" in parts:
                test_ids(root)

        def train_files(self, root, split):
            visible, infrared = (read_index(root, name, check_images=True) for name in TRAIN_LISTS)
            return TrainFiles(visible.paths, visible.labels, infrared.paths, infrared.labels)

        def make_protocols(self, settings):
            i2v = Protocol(
                name="i2v",
                key="i2v",
                query=lambda root, split: INFRARED.images(root, test_ids(root)),
                gallery=lambda root, split, draw: VISIBLE.draw(root, test_ids(root), draw),
                exclusion=ExclusionRule(same_identity_same_camera=True),
                dedup_cmc=True,
            )
            return (i2v,)

        def test_images(self, root, split):
            ids = test_ids(root)
            return VISIBLE.listed(root, ids) + INFRARED.listed(root, ids)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import numpy as np

from data.images import ListedImage, check_images_decode
from utils.base.errors import UserError
from utils.base.modality import Modality

# Subfolders looked into for the expected files when a data root lacks them.
_MAX_SUBFOLDERS = 100


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
    """Which gallery images a query does not rank against: every image of the second camera of
    an ``ignored_camera_pairs`` pair for a query of the first (SYSU-MM01: (3, 2)), and with
    ``same_identity_same_camera`` its own identity under its own camera number (LLCM)."""

    ignored_camera_pairs: tuple[tuple[int, int], ...] = ()
    same_identity_same_camera: bool = False

    @property
    def needs_cameras(self) -> bool:
        """Whether the rule reads camera numbers at all."""
        return bool(self.ignored_camera_pairs) or self.same_identity_same_camera

    def ignored(self, q_pids: Any, q_cams: Any, g_pids: Any, g_cams: Any) -> np.ndarray:
        """Boolean mask of the gallery images a query ignores; query and gallery values broadcast
        (one query against a gallery, or a column of queries against a gallery row)."""
        q_pids, q_cams, g_pids, g_cams = (np.asarray(a) for a in (q_pids, q_cams, g_pids, g_cams))
        mask = np.zeros(np.broadcast_shapes(q_cams.shape, g_cams.shape), dtype=bool)
        for query_cam, gallery_cam in self.ignored_camera_pairs:
            mask |= (q_cams == query_cam) & (g_cams == gallery_cam)
        if self.same_identity_same_camera:
            mask |= (g_pids == q_pids) & (g_cams == q_cams)
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
    """One test protocol: ``query(root, split)`` lists the queries, ``gallery(root, split, draw)``
    the gallery of one random draw; the rest says how a ranking is scored."""

    name: str  # in tables and test.py's results, e.g. "all single-shot", "v2i"
    key: str  # in training-time record keys (``<data set>_<key>_bnneck_rank1``), e.g. "all"
    query: Callable[[str, int], ImageList]
    gallery: Callable[[str, int, int], ImageList]
    exclusion: ExclusionRule = NO_EXCLUSION
    dedup_cmc: bool = False  # CMC over distinct identities (the SYSU-MM01 authors' rule)
    # Score with the roles swapped: each image of a drawn gallery ranks the query list. Only to
    # reproduce numbers of test code that did so; such a protocol must carry its own name.
    swap_roles: bool = False


# Test directions of the two-way protocols (RegDB, LLCM): (query modality, gallery modality).
DIRECTIONS = {
    "v2i": (Modality.VISIBLE, Modality.INFRARED),
    "i2v": (Modality.INFRARED, Modality.VISIBLE),
}
# ProtocolSettings.v2i_roles: the visible-to-infrared protocol as defined, its swapped-roles
# variant (where a data set has one), or both.
V2I_ROLES = ("defined", "swapped", "both")


@dataclass(frozen=True)
class ProtocolSettings:
    """The test options that select a data set's protocols (``DataSet.test_options`` says which
    ones a data set honours; the others must keep their defaults)."""

    mode: str = "all"  # SYSU-MM01 search mode: "all" or "indoor"
    shot: int = 1  # gallery images per (identity, camera) folder
    direction: str = "both"  # "v2i", "i2v" or "both"
    v2i_roles: str = "defined"  # one of V2I_ROLES


# What each test option chooses, for the message refusing it on a data set without the choice.
_OPTION_CHOICE = {
    "mode": "search modes",
    "shot": "choice of gallery images per folder",
    "direction": "choice of direction",
    "v2i_roles": "swapped-roles protocol",
}
_SETTING_DEFAULTS = MappingProxyType({f.name: f.default for f in fields(ProtocolSettings)})


def _alternatives(values: Sequence[object]) -> str:
    """``a, b or c``."""
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else f"{', '.join(text[:-1])} or {text[-1]}"


class DataSet:
    """Base class of the data sets; see the module docstring for the contract."""

    name: ClassVar[str]  # the --dataset value
    title: ClassVar[str]  # "SYSU-MM01"
    short_title: ClassVar[str]  # "SYSU", for short messages
    ema_decay: ClassVar[float]  # the authors' EMA decay
    ema_overwrite_every: ClassVar[int]  # epochs between copies of the EMA into the live model
    num_splits: ClassVar[int] = 1
    gallery_draws: ClassVar[int] = 1
    # The ProtocolSettings fields this data set honours, each with the values it offers.
    test_options: ClassVar[Mapping[str, tuple[Any, ...]]] = MappingProxyType({})

    def expected_files(self, split: int, parts: Sequence[str]) -> list[str]:
        """Entries (relative to the root; folders end in "/") that ``parts`` ("train", "test") of
        ``split`` need; the root check names every missing one in one line."""
        raise NotImplementedError

    def check_lists(self, root: str, split: int, parts: Sequence[str]) -> None:
        """Parse the list files of ``parts``; raise UserError naming file and line if malformed."""
        raise NotImplementedError

    def train_files(self, root: str, split: int) -> TrainFiles:
        """The training images of ``split`` and their original identity numbers (any integers:
        labels 0..n-1 are assigned in ascending identity order)."""
        raise NotImplementedError

    def make_protocols(self, settings: ProtocolSettings) -> tuple[Protocol, ...]:
        """The test protocols ``settings`` select (checked against ``test_options``)."""
        raise NotImplementedError

    def test_images(self, root: str, split: int) -> list[ListedImage]:
        """Every image a test protocol of ``split`` may read (with the index line naming it,
        where there is one); each is decoded before training starts."""
        raise NotImplementedError

    def protocols(self, settings: ProtocolSettings) -> tuple[Protocol, ...]:
        """The test protocols ``settings`` select; an option this data set lacks is an error."""
        self.check_settings(settings)
        return self.make_protocols(settings)

    def check_settings(self, settings: ProtocolSettings) -> None:
        """Raise UserError, naming what this data set offers, for an option it cannot honour."""
        for option, default in _SETTING_DEFAULTS.items():
            value = getattr(settings, option)
            offered = self.test_options.get(option)
            if offered is None and value != default:
                raise UserError(
                    f"--{option} {value}: {self.title} has no {_OPTION_CHOICE[option]} "
                    f"({self.describe_test_options()})"
                )
            if offered is not None and value not in offered:
                raise UserError(f"--{option} {value!r}: expected {_alternatives(offered)}")

    def describe_test_options(self) -> str:
        """What the test options of this data set offer, e.g. "it offers --mode all or indoor"."""
        if not self.test_options:
            return "it has no test options"
        return "it offers " + "; ".join(
            f"--{option} {_alternatives(values)}" for option, values in self.test_options.items()
        )

    def check_declaration(self) -> None:
        """Raise ValueError if a class attribute of the contract is missing or out of range."""
        name = getattr(self, "name", "")
        if not isinstance(name, str) or not name or name != name.strip().lower() or " " in name:
            raise ValueError(f"{type(self).__qualname__}.name {name!r}: expected a lowercase word")
        for attribute in ("title", "short_title", "ema_decay", "ema_overwrite_every"):
            if getattr(self, attribute, None) in (None, ""):
                raise ValueError(f"data set {name!r}: {attribute} is not set")
        if not (0 <= self.ema_decay < 1 and self.ema_overwrite_every >= 0):
            raise ValueError(f"data set {name!r}: ema_decay in [0, 1), ema_overwrite_every >= 0")
        if self.num_splits < 1 or self.gallery_draws < 1:
            raise ValueError(f"data set {name!r}: num_splits and gallery_draws must be >= 1")
        for option, values in self.test_options.items():
            if option not in _SETTING_DEFAULTS or _SETTING_DEFAULTS[option] not in values:
                raise ValueError(
                    f"data set {name!r}: test_options[{option!r}] must be a ProtocolSettings "
                    "field whose values include its default"
                )

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

    def check_split(self, split: object) -> int:
        """Return ``split`` if it is one of the train/test splits 1..num_splits, else UserError."""
        value = _whole_number(split)
        if value is None or not 1 <= value <= self.num_splits:
            raise UserError(f"--trial {split!r}: {self.short_title} trials are 1-{self.num_splits}")
        return value

    def check_draw(self, draw: object) -> int:
        """Return ``draw`` if it is one of the gallery draws 0..gallery_draws-1, else UserError."""
        value = _whole_number(draw)
        if value is None or not 0 <= value < self.gallery_draws:
            raise UserError(
                f"--trial {draw!r}: {self.short_title} gallery trials are "
                f"0-{self.gallery_draws - 1} (default: all {self.gallery_draws})"
            )
        return value

    def check_trial(self, trial: int | None, testing: bool) -> None:
        """Raise UserError unless ``--trial`` is a split (or, in test.py, a gallery draw)."""
        if trial is None:
            return
        if self.num_splits > 1:
            self.check_split(trial)
        elif testing and self.gallery_draws > 1:
            self.check_draw(trial)

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

    def check_layout(
        self, root: str | os.PathLike, split: int = 1, parts: Sequence[str] = ("train", "test")
    ) -> None:
        """Fail with one line naming every entry of ``expected_files`` that ``root`` lacks (and a
        subfolder holding them all, for a root one level too high)."""
        root = os.fspath(root)
        expected = self.expected_files(split, parts)
        if not os.path.isdir(root):
            what = "is a file, not a folder" if os.path.exists(root) else "folder not found"
            raise UserError(
                f"--data_root {root}: {what} (expected the {self.title} root holding "
                f"{', '.join(expected[:3])}{', ...' if len(expected) > 3 else ''})"
            )
        missing = _missing_entries(root, expected)
        if missing:
            inside = _subfolder_holding(root, expected)
            hint = f"; {inside} holds them (--data_root {inside}?)" if inside else ""
            raise UserError(
                f"--data_root {root}: not a {self.title} folder (--dataset {self.name}): "
                f"missing {', '.join(missing)}{hint}"
            )

    def check_root(
        self, root: str | os.PathLike, split: int = 1, parts: Sequence[str] = ("train", "test")
    ) -> None:
        """Fail with one line unless ``root`` has this layout and readable list files."""
        self.check_layout(root, split, parts)
        self.check_lists(os.fspath(root), split, parts)

    def check_test_images(self, root: str | os.PathLike, split: int = 1) -> int:
        """Check that every test image exists and decodes (a truncated file is found here, not
        at the final evaluation); return the count."""
        return check_images_decode(self.test_images(os.fspath(root), split))


def _whole_number(value: object) -> int | None:
    """``value`` as an int if it is an integer (not a bool, a float or a string), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


def _missing_entries(root: str, expected: Sequence[str]) -> list[str]:
    """The entries of ``expected`` (folders end in "/") that ``root`` lacks; an entry inside a
    missing folder is not named again."""
    missing: list[str] = []
    for name in expected:
        if any(name.startswith(folder) for folder in missing if folder.endswith("/")):
            continue
        exists = os.path.isdir if name.endswith("/") else os.path.isfile
        if not exists(os.path.join(root, name)):
            missing.append(name)
    return missing


def _subfolder_holding(root: str, expected: Sequence[str]) -> str:
    """The first subfolder of ``root`` (by name) holding every ``expected`` entry, or ""."""
    try:
        folders = sorted(entry.path for entry in os.scandir(root) if entry.is_dir())
    except OSError:
        return ""
    return next((f for f in folders[:_MAX_SUBFOLDERS] if not _missing_entries(f, expected)), "")
