"""What every synthetic layout shares: seeded random streams, size checks and staged output.

A layout writes into a temporary folder beside ``--out`` that replaces ``--out`` in one rename
only when the whole data set is written, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from utils.base.errors import UserError
from utils.base.io import replace_dir

logger = logging.getLogger(__name__)

JPEG_QUALITY = 90
MIN_HEIGHT, MIN_WIDTH = 32, 16

# Tags that keep the random streams of data sets, splits, identities, cameras and images apart.
DATASET_TAG = {"sysu": 1, "regdb": 2, "llcm": 3}
TAG_SPLIT, TAG_IDENTITY, TAG_PRESENCE, TAG_CAMERA, TAG_POSE, TAG_IMAGE = range(1, 7)


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
    """Yield a temporary folder beside ``out`` that replaces ``out`` only if the block succeeds."""
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
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UserError(f"--out {out}: cannot write to its parent folder ({reason})") from None
    try:
        yield stage
        replace_dir(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


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
