"""Synthetic RegDB in its real layout: ``Visible/``, ``Thermal/`` and ``idx/*_<trial>.txt``.

Both sensors of RegDB fire together, so the visible and thermal image of one index share a pose;
each of the ten trials splits the identities in half, training and test.
"""

from __future__ import annotations

import os
import time

from data.toy.common import (
    TAG_CAMERA,
    TAG_IDENTITY,
    TAG_IMAGE,
    TAG_POSE,
    check_sizes,
    save,
    split_ids,
    staged,
    stream,
    summary,
)
from data.toy.describe import draw_camera, draw_person, draw_pose
from data.toy.render import render
from utils.base.errors import UserError

REGDB_TRIALS = 10
# RegDB's two sensors, as camera numbers of the random streams.
_REGDB_VISIBLE, _REGDB_THERMAL = 1, 2


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
    """Write a synthetic RegDB (Visible/, Thermal/, idx/*_<trial>.txt); return counts."""
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
