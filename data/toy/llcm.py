"""Synthetic LLCM in its real layout.

    idx/train_vis.txt, idx/train_nir.txt    lines "vis/<pid>/<name>_vis.jpg <label>" (and nir)
    idx/test_id.txt                          one line of comma-separated test identities
    vis/<pid:04d>/, nir/<pid:04d>/           training images
    test_vis/cam1..cam9/<pid:04d>/           visible test images
    test_nir/cam{1,2,4..9}/<pid:04d>/        infrared test images (no infrared camera 3)

File names follow the real ``<pid:04d>_c<cam:02d>_s<hhmmss>_f<frame>_<vis|nir>.jpg``. Camera
numbers are shared by the two modalities (a camera films in colour by day and in near infrared by
night), so one identity can have a visible and an infrared folder under the same camera number:
the case that the same-camera exclusion of the test protocol is about. Visible images are dim and
noisy, as in the low-light scenes the data set was built from.

The labels of the training index files are 0..n-1 over the training identities in ascending
order, shared by both files: the authors' training code sizes its classifier by the number of
distinct labels and feeds the labels to cross-entropy as they are, which only works for
contiguous labels. The identity itself is the ``<pid>`` folder of each path.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from data.toy.common import (
    TAG_CAMERA,
    TAG_IDENTITY,
    TAG_IMAGE,
    TAG_PRESENCE,
    check_sizes,
    image_count,
    save,
    split_ids,
    staged,
    stream,
    summary,
)
from data.toy.describe import Camera, draw_camera, draw_person, draw_pose
from data.toy.render import render

LLCM_VISIBLE_CAMERAS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
LLCM_INFRARED_CAMERAS = (1, 2, 4, 5, 6, 7, 8, 9)
# (file and folder suffix, infrared) for the two modalities, in the order of the random streams.
_MODALITIES = (("vis", False), ("nir", True))
# An identity has a folder for a given (camera, modality) with this probability; with 9 and 8
# cameras that is about three folders per modality.
_FOLDER_PRESENCE = 0.35


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


def _write_identity(
    stage: Path,
    seed: int,
    pid: int,
    train: bool,
    cameras: dict[tuple[int, bool], Camera],
    images_per_camera: int,
    size: tuple[int, int],
) -> dict[bool, list[Path]]:
    """Write every image of one identity; return their paths below ``stage`` per modality."""
    person = draw_person(stream(seed, "llcm", TAG_IDENTITY, pid))
    folders = _llcm_folders(seed, pid, test=not train)
    written: dict[bool, list[Path]] = {False: [], True: []}
    for modality, (suffix, infrared) in enumerate(_MODALITIES):
        for cam in folders[infrared]:
            count_rng = stream(seed, "llcm", TAG_PRESENCE, pid, cam, modality)
            n_images = image_count(count_rng, images_per_camera, infrared)
            if train:
                folder = Path(suffix) / f"{pid:04d}"
            else:
                folder = Path(f"test_{suffix}") / f"cam{cam}" / f"{pid:04d}"
            (stage / folder).mkdir(parents=True, exist_ok=True)
            for number, name in enumerate(
                _file_names(count_rng, pid, cam, suffix, n_images), start=1
            ):
                rng = stream(seed, "llcm", TAG_IMAGE, pid, cam, modality, number)
                image = render(person, cameras[cam, infrared], draw_pose(rng), rng, *size)
                save(image, stage / folder / name)
                written[infrared].append(folder / name)
    return written


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
    """Write a synthetic LLCM (idx/, vis/, nir/, test_vis/, test_nir/); return counts."""
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
    counts = {False: 0, True: 0}
    with staged(out, overwrite) as stage:
        for suffix, infrared in _MODALITIES:
            (stage / suffix).mkdir()
            for cam in LLCM_INFRARED_CAMERAS if infrared else LLCM_VISIBLE_CAMERAS:
                (stage / f"test_{suffix}" / f"cam{cam}").mkdir(parents=True)
        labels = {pid: label for label, pid in enumerate(train)}
        for pid in range(1, total + 1):
            written = _write_identity(
                stage, seed, pid, pid in labels, cameras, images_per_camera, (height, width)
            )
            for infrared, paths in written.items():
                counts[infrared] += len(paths)
                if pid in labels:
                    index[infrared] += [f"{path.as_posix()} {labels[pid]}" for path in paths]
        (stage / "idx").mkdir()
        for suffix, infrared in _MODALITIES:
            (stage / "idx" / f"train_{suffix}.txt").write_text("\n".join(index[infrared]) + "\n")
        (stage / "idx" / "test_id.txt").write_text(",".join(str(i) for i in test) + "\n")
    return summary("llcm", out, seed, (height, width), ids, (counts[False], counts[True]), start)
