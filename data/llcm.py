"""LLCM: training index files and the authors' per-trial query/gallery protocol.

Layout: ``idx/train_vis.txt`` and ``idx/train_nir.txt`` (lines ``relative/path label``, paths
relative to the root), ``idx/test_id.txt`` (comma-separated ids), ``test_vis/cam1..cam9/<pid:04d>/``
and ``test_nir/{cam1,cam2,cam4..cam9}/<pid:04d>/``. Camera and identity are always taken from
these folder names, never found by searching a path for "cam", so a root whose own path contains
"cam" reads correctly.

Test protocol, per direction and for each of 10 gallery draws: every test image of the query
modality is a query; the gallery is one image drawn per (identity, camera) folder of the other
modality. Camera numbers are shared across the modalities, so a query ignores the gallery images
of its own identity taken by its own camera number; the CMC counts distinct identities.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Sequence
from functools import partial

import numpy as np

from data.dataset import (
    V2I_ROLES,
    DataSet,
    ExclusionRule,
    ImageList,
    ListedImage,
    Protocol,
    ProtocolSettings,
    TrainFiles,
)
from data.sysu import image_files, read_ids
from utils.base.errors import UserError
from utils.base.modality import Modality

VISIBLE_CAMS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
# The infrared test images have no camera 3.
INFRARED_CAMS = (1, 2, 4, 5, 6, 7, 8, 9)
NUM_TRIALS = 10
TRAIN_FILES = {Modality.VISIBLE: "idx/train_vis.txt", Modality.INFRARED: "idx/train_nir.txt"}
TEST_ID_FILE = "idx/test_id.txt"
TEST_FOLDERS = {Modality.VISIBLE: "test_vis", Modality.INFRARED: "test_nir"}
TEST_CAMS = {Modality.VISIBLE: VISIBLE_CAMS, Modality.INFRARED: INFRARED_CAMS}
# Ids are written as 4-digit folder names; in this range ascending numbers sort like the names.
MAX_ID = 9999
# Camera numbers are shared across modalities: a query ignores its own identity seen by its own
# camera number.
SAME_IDENTITY_AND_CAMERA = ExclusionRule(same_identity_same_camera=True)
# Test directions: (query modality, gallery modality).
DIRECTIONS = {
    "v2i": (Modality.VISIBLE, Modality.INFRARED),
    "i2v": (Modality.INFRARED, Modality.VISIBLE),
}


def llcm_root_check(root: str | os.PathLike) -> None:
    """Raise UserError naming every missing entry unless ``root`` looks like LLCM."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise UserError(f"--data_root {root}: folder does not exist")
    files = (*TRAIN_FILES.values(), TEST_ID_FILE)
    missing = [name for name in files if not os.path.isfile(os.path.join(root, name))]
    folders = TEST_FOLDERS.values()
    missing += [f"{name}/" for name in folders if not os.path.isdir(os.path.join(root, name))]
    if missing:
        raise UserError(f"--data_root {root}: not an LLCM folder: missing {', '.join(missing)}")


def check_trial(trial: int) -> int:
    """Return ``trial`` if it is an integer in 0..9, else raise UserError."""
    try:
        value = int(trial)
    except (TypeError, ValueError):
        value = None
    if value is None or value != trial or not 0 <= value < NUM_TRIALS:
        raise UserError(f"--trial {trial!r}: LLCM trials are numbered 0..{NUM_TRIALS - 1}")
    return value


def parse_modality(modality: Modality | str) -> Modality:
    """Return the Modality named by ``modality`` ("visible", "infrared" or a member)."""
    try:
        return Modality.parse(modality)
    except (TypeError, ValueError):
        raise UserError(f"modality {modality!r}: expected 'visible' or 'infrared'") from None


def read_train_index(path: str, root: str) -> tuple[list[str], list[int]]:
    """Parse a training index file into (paths joined with ``root``, labels), checking each image.

    Blank lines are skipped; a malformed line or one naming a missing image raises UserError
    naming the file and line.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise UserError(f"{path}: cannot read LLCM index file ({exc.strerror})") from None
    paths, labels = [], []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        # rsplit keeps a path with spaces intact; the label is always the last token.
        parts = line.strip().rsplit(None, 1)
        try:
            if len(parts) != 2 or os.path.isabs(parts[0]):
                raise ValueError
            label = int(parts[1])
        except ValueError:
            raise UserError(
                f"{path}:{line_no}: expected 'relative/path.jpg label' with the path relative to "
                f"the data root, found {line.strip()!r}"
            ) from None
        image = os.path.join(root, parts[0])
        if not os.path.isfile(image):
            raise UserError(f"{path}:{line_no}: image {parts[0]} does not exist under {root}")
        paths.append(image)
        labels.append(label)
    if not paths:
        raise UserError(f"{path}: lists no images")
    return paths, labels


def llcm_train_files(
    root: str | os.PathLike,
) -> tuple[list[str], list[int], list[str], list[int]]:
    """Return (visible paths, their labels, infrared paths, their labels) from the index files.

    Paths are joined with ``root``; labels and order are those of the files.
    """
    llcm_root_check(root)
    root = os.fspath(root)
    visible_paths, visible_pids = read_train_index(
        os.path.join(root, TRAIN_FILES[Modality.VISIBLE]), root
    )
    infrared_paths, infrared_pids = read_train_index(
        os.path.join(root, TRAIN_FILES[Modality.INFRARED]), root
    )
    return visible_paths, visible_pids, infrared_paths, infrared_pids


def _folder_files(root: str, modality: Modality, cam: int, pid: int) -> list[str]:
    """Sorted full paths of the images in ``<test folder>/cam<cam>/<pid:04d>`` ([] if none)."""
    return image_files(os.path.join(root, TEST_FOLDERS[modality]), cam, pid)


def llcm_test_ids(root: str | os.PathLike) -> list[int]:
    """Return the test ids ascending; UserError if one repeats, is out of range or lacks images."""
    llcm_root_check(root)
    root = os.fspath(root)
    path = os.path.join(root, TEST_ID_FILE)
    ids = read_ids(path)
    repeated = sorted(pid for pid, count in Counter(ids).items() if count > 1)
    if repeated:
        raise UserError(f"{path}: ids listed more than once: {', '.join(map(str, repeated))}")
    out_of_range = [pid for pid in ids if not 0 <= pid <= MAX_ID]
    if out_of_range:
        raise UserError(f"{path}: ids outside 0..{MAX_ID}: {', '.join(map(str, out_of_range))}")
    if not ids:
        raise UserError(f"{path}: lists no test ids")
    ids.sort()
    absent = [
        pid
        for pid in ids
        if not any(
            _folder_files(root, modality, cam, pid)
            for modality in TEST_FOLDERS
            for cam in TEST_CAMS[modality]
        )
    ]
    if absent:
        folders = " or ".join(f"{name}/" for name in TEST_FOLDERS.values())
        raise UserError(
            f"{path}: test ids without images in {folders}: {', '.join(map(str, absent))}"
        )
    return ids


def llcm_query(
    root: str | os.PathLike, modality: Modality | str
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return (paths, pids, cams) of every test image of ``modality``.

    Ids ascending, then cameras in order, then file names.
    """
    modality = parse_modality(modality)
    ids = llcm_test_ids(root)
    root = os.fspath(root)
    paths, pids, cams = [], [], []
    for pid in ids:
        for cam in TEST_CAMS[modality]:
            files = _folder_files(root, modality, cam, pid)
            paths += files
            pids += [pid] * len(files)
            cams += [cam] * len(files)
    return paths, np.asarray(pids, dtype=np.int64), np.asarray(cams, dtype=np.int64)


def llcm_gallery(
    root: str | os.PathLike, modality: Modality | str, trial: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return (paths, pids, cams): one image of ``modality`` per (id, camera) folder for ``trial``.

    The authors' draw: a generator seeded with ``trial`` (``random.Random(trial)`` yields what
    ``random.seed(trial)`` gives the global one), ids ascending, cameras in order, and
    ``choice`` over the sorted full paths of each folder with images; other folders are skipped
    without a draw.
    """
    modality = parse_modality(modality)
    rng = random.Random(check_trial(trial))
    ids = llcm_test_ids(root)
    root = os.fspath(root)
    paths, pids, cams = [], [], []
    for pid in ids:
        for cam in TEST_CAMS[modality]:
            files = _folder_files(root, modality, cam, pid)
            if files:
                paths.append(rng.choice(files))
                pids.append(pid)
                cams.append(cam)
    return paths, np.asarray(pids, dtype=np.int64), np.asarray(cams, dtype=np.int64)


def _query_list(root: str, split: int, modality: Modality) -> ImageList:
    """Every test image of ``modality`` (LLCM has one split)."""
    return ImageList(*llcm_query(root, modality), modality)


def _gallery_list(root: str, split: int, draw: int, modality: Modality) -> ImageList:
    """One test image of ``modality`` per (identity, camera) folder, drawn as draw ``draw``."""
    return ImageList(*llcm_gallery(root, modality, draw), modality)


def _direction(name: str, suffix: str = "", swap_roles: bool = False) -> Protocol:
    """The protocol of direction ``name`` ("v2i" or "i2v")."""
    query, gallery = DIRECTIONS[name]
    return Protocol(
        name=name + (f" {suffix}" if suffix else ""),
        key=name + (f"_{suffix.replace('-', '_')}" if suffix else ""),
        query=partial(_query_list, modality=query),
        gallery=partial(_gallery_list, modality=gallery),
        exclusion=SAME_IDENTITY_AND_CAMERA,
        dedup_cmc=True,
        swap_roles=swap_roles,
    )


class LLCM(DataSet):
    """LLCM (Zhang and Wang, CVPR 2023): both directions, galleries drawn 10 times.

    The authors train at 384x144 (``--img_h 384 --img_w 144``). They published no EMA recipe:
    the EMA decay (0.997) and the copy into the live model every 2 epochs follow SYSU-MM01's,
    the other data set of many identities and cameras.

    ``--v2i_roles swapped`` adds the visible-to-infrared variant of a widely copied test script,
    which builds the v2i lists (visible queries, drawn infrared gallery) but scores gallery x
    query: each drawn infrared image then ranks the full visible set. It is reported as its own
    protocol ("v2i roles-swapped") so that its numbers are never taken for v2i's.
    """

    name = "llcm"
    title = "LLCM"
    short_title = "LLCM"
    ema_decay = 0.997
    ema_overwrite_every = 2
    gallery_draws = NUM_TRIALS

    def expected_files(self, split: int, parts: Sequence[str]) -> list[str]:
        """The three index files and both test folders (whatever the parts, as the readers)."""
        return [*TRAIN_FILES.values(), TEST_ID_FILE, *(f"{f}/" for f in TEST_FOLDERS.values())]

    def check_lists(self, root: str, split: int, parts: Sequence[str]) -> None:
        """Parse the index files of ``parts`` (each training image must exist) and the test ids."""
        if "train" in parts:
            for name in TRAIN_FILES.values():
                read_train_index(os.path.join(root, name), root)
        if "test" in parts:
            llcm_test_ids(root)

    def train_files(self, root: str, split: int) -> TrainFiles:
        """The images and labels of the two training index files."""
        return TrainFiles(*llcm_train_files(root))

    def protocols(self, settings: ProtocolSettings) -> tuple[Protocol, ...]:
        """Visible-to-infrared and/or infrared-to-visible, and the swapped-roles variant."""
        if settings.direction not in (*DIRECTIONS, "both"):
            raise UserError(f"--direction {settings.direction!r}: expected v2i, i2v or both")
        if settings.v2i_roles not in V2I_ROLES:
            raise UserError(f"--v2i_roles {settings.v2i_roles!r}: expected {', '.join(V2I_ROLES)}")
        if settings.v2i_roles != "defined" and settings.direction == "i2v":
            raise UserError(
                f"--v2i_roles {settings.v2i_roles}: a visible-to-infrared variant, but "
                "--direction i2v leaves that direction out"
            )
        protocols = []
        if settings.direction != "i2v":
            if settings.v2i_roles != "swapped":
                protocols.append(_direction("v2i"))
            if settings.v2i_roles != "defined":
                protocols.append(_direction("v2i", "roles-swapped", swap_roles=True))
        if settings.direction != "v2i":
            protocols.append(_direction("i2v"))
        return tuple(protocols)

    def test_images(self, root: str, split: int) -> list[ListedImage]:
        """Every image of the test ids in both test folders."""
        return [
            ListedImage(path)
            for modality in (Modality.VISIBLE, Modality.INFRARED)
            for path in llcm_query(root, modality)[0]
        ]
