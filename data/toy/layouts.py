"""The three synthetic layouts and what they share: seeded random streams, identity splits, size
checks and staged output.

A layout writes into a folder set aside beside ``--out`` that replaces ``--out`` only when the
whole data set is written, so an interrupted run leaves nothing behind. Every file is a pure
function of the seed and the arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from data.toy.describe import Camera, draw_camera, draw_person, draw_pose
from data.toy.render import render
from utils.base.errors import UserError
from utils.base.io import folder_aside

logger = logging.getLogger(__name__)

JPEG_QUALITY = 90
MIN_HEIGHT, MIN_WIDTH = 32, 16

# Tags that keep the random streams of data sets, splits, identities, cameras and images apart.
DATASET_TAG = {"sysu": 1, "regdb": 2, "llcm": 3}
TAG_SPLIT, TAG_IDENTITY, TAG_PRESENCE, TAG_CAMERA, TAG_POSE, TAG_IMAGE = range(1, 7)

SYSU_VISIBLE_CAMERAS = (1, 2, 4, 5)
SYSU_INFRARED_CAMERAS = (3, 6)
SYSU_OUTDOOR_CAMERAS = (4, 5, 6)
# A camera keeps an identity with this probability (SYSU ids are missing from some cameras).
_CAMERA_PRESENCE = 0.8

REGDB_TRIALS = 10
# RegDB's two sensors, as camera numbers of the random streams.
_REGDB_VISIBLE, _REGDB_THERMAL = 1, 2

LLCM_VISIBLE_CAMERAS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
LLCM_INFRARED_CAMERAS = (1, 2, 4, 5, 6, 7, 8, 9)
# (file and folder suffix, infrared) for the two modalities, in the order of the random streams.
_MODALITIES = (("vis", False), ("nir", True))
# An identity has a folder for a given (camera, modality) with this probability; with 9 and 8
# cameras that is about three folders per modality.
_FOLDER_PRESENCE = 0.35


def stream(seed: int, dataset: str, tag: int, *keys: int) -> np.random.Generator:
    """Return an independent generator for one (seed, data set, stream, keys) combination."""
    return np.random.default_rng([seed, DATASET_TAG[dataset], tag, *keys])


def split_ids(seed: int, dataset: str, sizes: Sequence[int], *keys: int) -> list[list[int]]:
    """Shuffle the identities 1..sum(sizes) and cut them into groups of ``sizes``, each sorted."""
    order = stream(seed, dataset, TAG_SPLIT, *keys).permutation(np.arange(1, sum(sizes) + 1))
    bounds = np.cumsum([0, *sizes])
    return [
        sorted(int(i) for i in order[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def image_count(rng: np.random.Generator, images_per_camera: int, infrared: bool) -> int:
    """Images in one folder: ``images_per_camera`` give or take a fifth (no more in infrared)."""
    spread = images_per_camera // 5
    low = images_per_camera if not infrared else images_per_camera - spread
    return int(rng.integers(max(1, low), images_per_camera + spread + 1))


def check_sizes(height: int, width: int, seed: int, **counts: int) -> None:
    """Raise UserError for an image size, seed or count a data set cannot be built with."""
    if height < MIN_HEIGHT or width < MIN_WIDTH:
        raise UserError(
            f"--height/--width {height}x{width}: expected at least {MIN_HEIGHT}x{MIN_WIDTH}"
        )
    if seed < 0:
        raise UserError(f"--seed {seed}: expected a non-negative integer")
    for name, count in counts.items():
        if count < 1:
            raise UserError(f"--{name} {count}: expected a positive integer")


@contextlib.contextmanager
def staged(out: str | os.PathLike[str], overwrite: bool) -> Iterator[Path]:
    """Yield a folder set aside beside ``out`` that replaces ``out`` only if the block succeeds."""
    # abspath, so that "." or "x/.." name a real folder with a parent to stage the data in.
    target = Path(os.path.abspath(out))
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty (pass --overwrite)")
    with contextlib.suppress(OSError):
        # Swapping out the folder we stand in would strand the shell in a deleted folder.
        if Path.cwd().is_relative_to(target):
            raise UserError(f"--out {out} holds the current folder; name another folder")
    stage = None
    try:
        with folder_aside(target) as stage:
            yield stage
    except OSError as exc:
        if stage is not None or isinstance(exc, UserError):
            raise
        # Failing before the folder aside existed (no stage yet): the parent of --out is at fault.
        reason = exc.strerror or str(exc)
        raise UserError(f"--out {out}: cannot write to its parent folder ({reason})") from None


def summary(
    dataset: str,
    out: str | os.PathLike[str],
    seed: int,
    size: tuple[int, int],
    ids: dict[str, int],
    images: tuple[int, int],
    start: float,
) -> dict:
    """Log what a layout wrote and return it: identities per split, images per modality (visible,
    infrared) and the seconds taken; ``size`` is (height, width)."""
    result = {
        "dataset": dataset,
        "identities": sum(ids.values()),
        **ids,
        "visible_images": images[0],
        "infrared_images": images[1],
        "seconds": time.perf_counter() - start,
    }
    splits = ", ".join(f"{count} {name.removesuffix('_ids')}" for name, count in ids.items())
    logger.info(
        "%s: %d identities (%s), %d visible + %d infrared images of %dx%d, seed %d -> %s in %.1f s",
        dataset,
        result["identities"],
        splits,
        *images,
        *size,
        seed,
        out,
        result["seconds"],
    )
    return result


def save(image: np.ndarray, path: Path) -> None:
    """Write one image; JPEG for SYSU and LLCM, BMP for RegDB, chosen by the extension."""
    if path.suffix == ".jpg":
        Image.fromarray(image).save(path, quality=JPEG_QUALITY)
    else:
        Image.fromarray(image).save(path)


def _sysu_cameras(seed: int, ids: Sequence[int], test: set[int]) -> dict[int, list[int]]:
    """Pick the cameras each identity appears in, keeping the protocols answerable."""
    cameras: dict[int, list[int]] = {}
    for pid in ids:
        rng = stream(seed, "sysu", TAG_PRESENCE, pid)
        present = {cam for cam in range(1, 7) if rng.random() < _CAMERA_PRESENCE}
        if not present & set(SYSU_INFRARED_CAMERAS):
            present.add(int(rng.choice(SYSU_INFRARED_CAMERAS)))
        if pid in test:
            # Indoor search: a cam3 query ignores cam2, so it needs cam1; cam6 needs cam1 or 2.
            if 3 in present:
                present.add(1)
            if not present & {1, 2}:
                present.add(int(rng.choice((1, 2))))
        elif not present & set(SYSU_VISIBLE_CAMERAS):
            present.add(int(rng.choice(SYSU_VISIBLE_CAMERAS)))
        cameras[pid] = sorted(present)
    return cameras


def make_sysu(
    out: str | os.PathLike[str],
    seed: int = 0,
    *,
    train_ids: int = 24,
    val_ids: int = 8,
    test_ids: int = 16,
    images_per_camera: int = 10,
    height: int = 128,
    width: int = 64,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic SYSU-MM01 (cam1..cam6/<pid>/<n>.jpg, exp/*_id.txt); return counts.

    Cameras 1, 2, 4 and 5 are visible, 3 and 6 infrared; 4, 5 and 6 are outdoors. Identities are
    missing from some cameras, as in the real set, but every test identity can answer every
    protocol.
    """
    ids = {"train_ids": train_ids, "val_ids": val_ids, "test_ids": test_ids}
    check_sizes(height, width, seed, images_per_camera=images_per_camera, **ids)
    start = time.perf_counter()
    total = sum(ids.values())
    groups = split_ids(seed, "sysu", list(ids.values()))
    splits = dict(zip(("train", "val", "test"), groups, strict=True))
    presence = _sysu_cameras(seed, range(1, total + 1), set(splits["test"]))
    cameras = {
        cam: draw_camera(
            stream(seed, "sysu", TAG_CAMERA, cam),
            infrared=cam in SYSU_INFRARED_CAMERAS,
            outdoor=cam in SYSU_OUTDOOR_CAMERAS,
            height=height,
            width=width,
        )
        for cam in range(1, 7)
    }
    counts = [0, 0]  # visible, infrared
    with staged(out, overwrite) as stage:
        for cam in range(1, 7):
            (stage / f"cam{cam}").mkdir()
        for pid in range(1, total + 1):
            person = draw_person(stream(seed, "sysu", TAG_IDENTITY, pid))
            for cam in presence[pid]:
                camera = cameras[cam]
                count_rng = stream(seed, "sysu", TAG_PRESENCE, pid, cam)
                n_images = image_count(count_rng, images_per_camera, camera.infrared)
                folder = stage / f"cam{cam}" / f"{pid:04d}"
                folder.mkdir()
                for index in range(1, n_images + 1):
                    rng = stream(seed, "sysu", TAG_IMAGE, pid, cam, index)
                    image = render(person, camera, draw_pose(rng), rng, height, width)
                    save(image, folder / f"{index:04d}.jpg")
                counts[camera.infrared] += n_images
        (stage / "exp").mkdir()
        for name, members in splits.items():
            (stage / "exp" / f"{name}_id.txt").write_text(",".join(str(i) for i in members) + "\n")
    return summary("sysu", out, seed, (height, width), ids, tuple(counts), start)


def make_regdb(
    out: str | os.PathLike[str],
    seed: int = 0,
    *,
    ids: int = 40,
    images_per_id: int = 10,
    height: int = 128,
    width: int = 64,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic RegDB (Visible/, Thermal/, idx/*_<trial>.txt); return counts.

    Each of the ten trials splits the identities in half, training and test.
    """
    check_sizes(height, width, seed, images_per_id=images_per_id)
    if ids < 2:
        raise UserError(f"--ids {ids}: expected at least 2 (half train, half test)")
    start = time.perf_counter()
    halves = {"train_ids": ids // 2, "test_ids": ids - ids // 2}
    cameras = {
        cam: draw_camera(
            stream(seed, "regdb", TAG_CAMERA, cam),
            infrared=cam == _REGDB_THERMAL,
            outdoor=False,
            height=height,
            width=width,
        )
        for cam in (_REGDB_VISIBLE, _REGDB_THERMAL)
    }
    folders = {_REGDB_VISIBLE: ("Visible", "v"), _REGDB_THERMAL: ("Thermal", "t")}
    files: dict[int, dict[int, list[str]]] = {cam: {} for cam in folders}
    with staged(out, overwrite) as stage:
        for pid in range(1, ids + 1):
            person = draw_person(stream(seed, "regdb", TAG_IDENTITY, pid))
            for index in range(1, images_per_id + 1):
                # The two sensors of RegDB fire together: both images share one pose.
                pose = draw_pose(stream(seed, "regdb", TAG_POSE, pid, index))
                for cam, (folder, letter) in folders.items():
                    rng = stream(seed, "regdb", TAG_IMAGE, pid, cam, index)
                    image = render(person, cameras[cam], pose, rng, height, width)
                    relative = f"{folder}/{pid}/{letter}_{pid:04d}_{index:02d}.bmp"
                    (stage / folder / str(pid)).mkdir(parents=True, exist_ok=True)
                    save(image, stage / relative)
                    files[cam].setdefault(pid, []).append(relative)
        (stage / "idx").mkdir()
        for trial in range(1, REGDB_TRIALS + 1):
            groups = split_ids(seed, "regdb", list(halves.values()), trial)
            for split, members in zip(("train", "test"), groups, strict=True):
                for cam, (folder, _) in folders.items():
                    lines = [
                        f"{path} {label}"
                        for label, pid in enumerate(members)
                        for path in files[cam][pid]
                    ]
                    name = f"{split}_{folder.lower()}_{trial}.txt"
                    (stage / "idx" / name).write_text("\n".join(lines) + "\n")
    images = (ids * images_per_id, ids * images_per_id)
    result = summary("regdb", out, seed, (height, width), halves, images, start)
    return result | {"trials": REGDB_TRIALS}


def _llcm_folders(seed: int, pid: int, test: bool) -> dict[bool, list[int]]:
    """Cameras of one identity per modality (key: infrared); a test identity gets two or more."""
    rng = stream(seed, "llcm", TAG_PRESENCE, pid)
    # Two cameras per modality give every query a gallery image under another camera number.
    need = 2 if test else 1
    folders = {}
    for _, infrared in _MODALITIES:
        cameras = LLCM_INFRARED_CAMERAS if infrared else LLCM_VISIBLE_CAMERAS
        present = [cam for cam in cameras if rng.random() < _FOLDER_PRESENCE]
        while len(present) < need:
            present.append(int(rng.choice([cam for cam in cameras if cam not in present])))
        folders[infrared] = sorted(present)
    return folders


def _llcm_camera(seed: int, cam: int, modality: int, height: int, width: int) -> Camera:
    """One camera in one modality; visible cameras are dimmed and noisier (low light)."""
    rng = stream(seed, "llcm", TAG_CAMERA, cam, modality)
    infrared = _MODALITIES[modality][1]
    camera = draw_camera(rng, infrared=infrared, outdoor=cam > 4, height=height, width=width)
    if infrared:
        return camera
    return dataclasses.replace(
        camera, gain=camera.gain * float(rng.uniform(0.35, 0.65)), noise=camera.noise * 2.5
    )


def _file_names(rng: np.random.Generator, pid: int, cam: int, suffix: str, n: int) -> list[str]:
    """``n`` real-style names for one folder: one clip (time of day), increasing frame numbers."""
    clock = f"{int(rng.integers(17, 24)):02d}{int(rng.integers(60)):02d}{int(rng.integers(60)):02d}"
    frames = np.cumsum(rng.integers(10, 200, size=n)) + int(rng.integers(100, 9000))
    return [f"{pid:04d}_c{cam:02d}_s{clock}_f{frame}_{suffix}.jpg" for frame in frames]


def make_llcm(
    out: str | os.PathLike[str],
    seed: int = 0,
    *,
    train_ids: int = 24,
    test_ids: int = 16,
    images_per_camera: int = 10,
    height: int = 128,
    width: int = 64,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic LLCM (idx/, vis/, nir/, test_vis/, test_nir/); return counts.

    Training labels are 0..n-1 in ascending identity order (the authors' code needs contiguous
    labels). A camera number films in colour by day and in near infrared by night, so an identity
    can have both modalities under one camera number (what the same-camera exclusion is about).
    Visible images are dim and noisy, as in the low-light scenes of the real set.
    """
    ids = {"train_ids": train_ids, "test_ids": test_ids}
    check_sizes(height, width, seed, images_per_camera=images_per_camera, **ids)
    start = time.perf_counter()
    total = sum(ids.values())
    train, test = split_ids(seed, "llcm", list(ids.values()))
    cameras = {
        (cam, infrared): _llcm_camera(seed, cam, modality, height, width)
        for modality, (_, infrared) in enumerate(_MODALITIES)
        for cam in (LLCM_INFRARED_CAMERAS if infrared else LLCM_VISIBLE_CAMERAS)
    }
    index: dict[bool, list[str]] = {False: [], True: []}
    counts = [0, 0]  # visible, infrared
    with staged(out, overwrite) as stage:
        for suffix, infrared in _MODALITIES:
            (stage / suffix).mkdir()
            for cam in LLCM_INFRARED_CAMERAS if infrared else LLCM_VISIBLE_CAMERAS:
                (stage / f"test_{suffix}" / f"cam{cam}").mkdir(parents=True)
        labels = {pid: label for label, pid in enumerate(train)}
        for pid in range(1, total + 1):
            person = draw_person(stream(seed, "llcm", TAG_IDENTITY, pid))
            folders = _llcm_folders(seed, pid, test=pid not in labels)
            for modality, (suffix, infrared) in enumerate(_MODALITIES):
                for cam in folders[infrared]:
                    count_rng = stream(seed, "llcm", TAG_PRESENCE, pid, cam, modality)
                    n_images = image_count(count_rng, images_per_camera, infrared)
                    if pid in labels:
                        folder = Path(suffix) / f"{pid:04d}"
                    else:
                        folder = Path(f"test_{suffix}") / f"cam{cam}" / f"{pid:04d}"
                    (stage / folder).mkdir(parents=True, exist_ok=True)
                    names = _file_names(count_rng, pid, cam, suffix, n_images)
                    for number, name in enumerate(names, start=1):
                        rng = stream(seed, "llcm", TAG_IMAGE, pid, cam, modality, number)
                        pose = draw_pose(rng)
                        image = render(person, cameras[cam, infrared], pose, rng, height, width)
                        save(image, stage / folder / name)
                    counts[infrared] += n_images
                    if pid in labels:
                        index[infrared] += [f"{folder.as_posix()}/{n} {labels[pid]}" for n in names]
        (stage / "idx").mkdir()
        for suffix, infrared in _MODALITIES:
            (stage / "idx" / f"train_{suffix}.txt").write_text("\n".join(index[infrared]) + "\n")
        (stage / "idx" / "test_id.txt").write_text(",".join(str(i) for i in test) + "\n")
    return summary("llcm", out, seed, (height, width), ids, tuple(counts), start)
