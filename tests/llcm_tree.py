"""A tiny hand-made LLCM tree (8x4 images) whose every folder and index line the tests know."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from utils.base.modality import Modality

# Test folders: {pid: {cam: number of images}} per modality. Id 12 has no visible cam3 folder
# and id 5 has cam2 in both modalities; folders hold several images so that trials can differ.
TEST_VISIBLE = {
    5: {1: 4, 2: 3, 9: 5},
    12: {1: 2, 2: 6, 4: 3},
    40: {3: 5, 7: 4},
}
TEST_INFRARED = {
    5: {2: 4, 8: 3},
    12: {1: 5, 9: 2},
    40: {4: 6},
}
TEST_ID_LINE = "40,5,12"  # unsorted on purpose: the protocol orders ids ascending
TEST_IDS = [5, 12, 40]
# Training images: (relative path, label) per modality, in file order.
TRAIN_VISIBLE = [
    (f"vis/{pid:04d}/{pid:04d}_c0{cam}_{n}_rgb.jpg", label)
    for label, pid in enumerate((351, 7))
    for cam in (1, 2)
    for n in range(2)
]
TRAIN_INFRARED = [
    (f"nir/{pid:04d}/{pid:04d}_c06_{n}_nir.jpg", label)
    for label, pid in enumerate((351, 7))
    for n in range(3)
]
FOLDERS = {Modality.VISIBLE: "test_vis", Modality.INFRARED: "test_nir"}
# Every camera folder of each modality (infrared has no camera 3).
FOLDER_CAMS = {
    Modality.VISIBLE: (1, 2, 3, 4, 5, 6, 7, 8, 9),
    Modality.INFRARED: (1, 2, 4, 5, 6, 7, 8, 9),
}


def write_image(path: Path, seed: int) -> None:
    """Write a tiny random RGB JPEG (8x4)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 4, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_llcm_tree(root: Path) -> Path:
    """Write a fake LLCM tree under ``root`` (every camera folder, some of them empty)."""
    seed = 0
    for modality, cams in FOLDER_CAMS.items():
        for cam in cams:
            (root / FOLDERS[modality] / f"cam{cam}").mkdir(parents=True, exist_ok=True)
    for modality, layout in ((Modality.VISIBLE, TEST_VISIBLE), (Modality.INFRARED, TEST_INFRARED)):
        for pid, cams in layout.items():
            for cam, count in cams.items():
                for n in range(count):
                    seed += 1
                    name = f"{pid:04d}_c{cam:02d}_s{seed:06d}_f{n}.jpg"
                    write_image(root / FOLDERS[modality] / f"cam{cam}" / f"{pid:04d}" / name, seed)
    (root / "idx").mkdir(parents=True, exist_ok=True)
    for name, rows in (("train_vis", TRAIN_VISIBLE), ("train_nir", TRAIN_INFRARED)):
        for rel, _ in rows:
            seed += 1
            write_image(root / rel, seed)
        (root / "idx" / f"{name}.txt").write_text("".join(f"{r} {label}\n" for r, label in rows))
    (root / "idx" / "test_id.txt").write_text(TEST_ID_LINE + "\n")
    return root
