"""LLCM: training index files and the authors' per-trial query/gallery protocol.

Layout: ``idx/train_{vis,nir}.txt`` (lines ``relative/path label``), ``idx/test_id.txt``
(comma-separated ids), ``test_vis/cam1..cam9/<pid:04d>/`` and ``test_nir/{cam1,cam2,cam4..cam9}/
<pid:04d>/``; camera and identity come from these folder names, never from searching a path for
"cam". Per direction and gallery draw, every test image of one modality is a query and the gallery
is one image per (identity, camera) folder of the other; a query ignores its own identity under its
own camera number (shared across modalities), and the CMC counts distinct identities.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from data.blocks import CameraFolders, read_ids, read_index
from data.dataset import DIRECTIONS, V2I_ROLES, DataSet, ExclusionRule, Protocol, TrainFiles
from utils.base.errors import UserError
from utils.base.modality import Modality

if TYPE_CHECKING:
    from data.dataset import ProtocolSettings
    from data.images import ListedImage

VISIBLE_CAMS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
# The infrared test images have no camera 3.
INFRARED_CAMS = (1, 2, 4, 5, 6, 7, 8, 9)
NUM_TRIALS = 10
TRAIN_FILES = {Modality.VISIBLE: "idx/train_vis.txt", Modality.INFRARED: "idx/train_nir.txt"}
TEST_ID_FILE = "idx/test_id.txt"
TEST_FOLDERS = {Modality.VISIBLE: "test_vis", Modality.INFRARED: "test_nir"}
TEST_CAMS = {Modality.VISIBLE: VISIBLE_CAMS, Modality.INFRARED: INFRARED_CAMS}
# The test images of each modality, identity by identity, then camera by camera.
FOLDERS = {
    modality: CameraFolders(
        f"{folder}/cam{{cam}}/{{pid:04d}}", TEST_CAMS[modality], modality, "LLCM"
    )
    for modality, folder in TEST_FOLDERS.items()
}
# Ids are written as 4-digit folder names; in this range ascending numbers sort like the names.
MAX_ID = 9999
# Camera numbers are shared across modalities: a query ignores its own identity seen by its own
# camera number.
SAME_IDENTITY_AND_CAMERA = ExclusionRule(same_identity_same_camera=True)
_EXAMPLE = "relative/path.jpg label"


def parse_modality(modality: Modality | str) -> Modality:
    """Return the Modality named by ``modality`` ("visible", "infrared" or a member)."""
    try:
        return Modality.parse(modality)
    except (TypeError, ValueError):
        raise UserError(f"modality {modality!r}: expected 'visible' or 'infrared'") from None


def llcm_train_files(root: str | os.PathLike) -> TrainFiles:
    """The images (joined with ``root``, each must exist) and labels of the training index files."""
    LLCM().check_layout(root)
    visible, infrared = (
        read_index(root, TRAIN_FILES[modality], _EXAMPLE, check_images=True)
        for modality in (Modality.VISIBLE, Modality.INFRARED)
    )
    return TrainFiles(visible.paths, visible.labels, infrared.paths, infrared.labels)


def llcm_test_ids(root: str | os.PathLike) -> list[int]:
    """Return the test ids ascending; UserError if one repeats, is out of range or lacks images."""
    LLCM().check_layout(root)
    path = os.path.join(os.fspath(root), TEST_ID_FILE)
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
    absent = sorted(set.intersection(*(set(f.empty_ids(root, ids)) for f in FOLDERS.values())))
    if absent:
        folders = " or ".join(f"{name}/" for name in TEST_FOLDERS.values())
        raise UserError(
            f"{path}: test ids without images in {folders}: {', '.join(map(str, absent))}"
        )
    return ids


def llcm_query(
    root: str | os.PathLike, modality: Modality | str
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return (paths, pids, cams) of every test image of ``modality``: ids ascending, then
    cameras, then file names."""
    query = FOLDERS[parse_modality(modality)].images(root, llcm_test_ids(root))
    return query.paths, query.pids, query.cams


def llcm_gallery(
    root: str | os.PathLike, modality: Modality | str, trial: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return (paths, pids, cams): one image of ``modality`` per (id, camera) folder, drawn as
    the authors did for ``trial`` (:meth:`CameraFolders.draw`)."""
    modality, draw = parse_modality(modality), LLCM().check_draw(trial)
    gallery = FOLDERS[modality].draw(root, llcm_test_ids(root), draw)
    return gallery.paths, gallery.pids, gallery.cams


def _direction(name: str, suffix: str = "", swap_roles: bool = False) -> Protocol:
    """The protocol of direction ``name`` ("v2i" or "i2v"); LLCM has one split."""
    query, gallery = (FOLDERS[modality] for modality in DIRECTIONS[name])
    return Protocol(
        name=name + (f" {suffix}" if suffix else ""),
        key=name + (f"_{suffix.replace('-', '_')}" if suffix else ""),
        query=lambda root, split: query.images(root, llcm_test_ids(root)),
        gallery=lambda root, split, draw: gallery.draw(root, llcm_test_ids(root), draw),
        exclusion=SAME_IDENTITY_AND_CAMERA,
        dedup_cmc=True,
        swap_roles=swap_roles,
    )


class LLCM(DataSet):
    """LLCM (Zhang and Wang, CVPR 2023): both directions, galleries drawn 10 times.

    The authors train at 384x144 and published no EMA recipe: the EMA settings follow SYSU-MM01's.
    ``--v2i_roles swapped`` adds a widely copied test script's v2i variant, which scores gallery x
    query (each drawn infrared image ranks the visible set), reported as its own protocol.
    """

    name = "llcm"
    title = "LLCM"
    short_title = "LLCM"
    ema_decay = 0.997
    ema_overwrite_every = 2
    gallery_draws = NUM_TRIALS
    test_options = MappingProxyType({"direction": (*DIRECTIONS, "both"), "v2i_roles": V2I_ROLES})

    def expected_files(self, split: int, parts: Sequence[str]) -> list[str]:
        """The three index files, both test folders and each of their camera folders (whatever
        the parts, as the readers): a missing camera would silently change the protocol."""
        folders = [f"{folder}/" for folder in TEST_FOLDERS.values()]
        cameras = [f"{TEST_FOLDERS[m]}/cam{cam}/" for m, cams in TEST_CAMS.items() for cam in cams]
        return [*TRAIN_FILES.values(), TEST_ID_FILE, *folders, *cameras]

    def check_lists(self, root: str, split: int, parts: Sequence[str]) -> None:
        """Parse the index files of ``parts`` (each training image must exist) and the test ids."""
        if "train" in parts:
            llcm_train_files(root)
        if "test" in parts:
            llcm_test_ids(root)

    def train_files(self, root: str, split: int) -> TrainFiles:
        """The images and labels of the two training index files."""
        return llcm_train_files(root)

    def make_protocols(self, settings: ProtocolSettings) -> tuple[Protocol, ...]:
        """Visible-to-infrared and/or infrared-to-visible, and the swapped-roles variant."""
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
        ids = llcm_test_ids(root)
        return [image for folders in FOLDERS.values() for image in folders.listed(root, ids)]
