"""Synthetic SYSU-MM01 in its real layout: ``cam1..cam6/<pid:04d>/<n:04d>.jpg``, ``exp/*_id.txt``.

Cameras 1, 2, 4 and 5 are visible, 3 and 6 infrared; 4, 5 and 6 are outdoors. Identities are
missing from some cameras, as in the real set, but every test identity can answer every protocol.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

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
from data.toy.describe import draw_camera, draw_person, draw_pose
from data.toy.render import render

SYSU_VISIBLE_CAMERAS = (1, 2, 4, 5)
SYSU_INFRARED_CAMERAS = (3, 6)
SYSU_OUTDOOR_CAMERAS = (4, 5, 6)
# A camera keeps an identity with this probability (SYSU ids are missing from some cameras).
_CAMERA_PRESENCE = 0.8


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
    """Write a synthetic SYSU-MM01 (cam1..cam6/<pid>/<n>.jpg, exp/*_id.txt); return counts."""
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
    counts = {"visible": 0, "infrared": 0}
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
                counts["infrared" if camera.infrared else "visible"] += n_images
        (stage / "exp").mkdir()
        for name, members in splits.items():
            (stage / "exp" / f"{name}_id.txt").write_text(",".join(str(i) for i in members) + "\n")
    return summary(
        "sysu", out, seed, (height, width), ids, (counts["visible"], counts["infrared"]), start
    )
