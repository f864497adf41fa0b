"""What every synthetic layout shares: seeded random streams, size checks and staged output.

A layout writes into a temporary folder beside ``--out`` that replaces ``--out`` in one rename
only when the whole data set is written, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from utils.base.errors import UserError
from utils.base.io import replace_dir

JPEG_QUALITY = 90
MIN_HEIGHT, MIN_WIDTH = 32, 16

# Tags that keep the random streams of data sets, splits, identities, cameras and images apart.
DATASET_TAG = {"sysu": 1, "regdb": 2, "llcm": 3}
TAG_SPLIT, TAG_IDENTITY, TAG_PRESENCE, TAG_CAMERA, TAG_POSE, TAG_IMAGE = range(1, 7)


def stream(seed: int, dataset: str, tag: int, *keys: int) -> np.random.Generator:
    """Return an independent generator for one (seed, data set, stream, keys) combination."""
    return np.random.default_rng([seed, DATASET_TAG[dataset], tag, *keys])


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


def save(image: np.ndarray, path: Path) -> None:
    """Write one image; JPEG for SYSU and LLCM, BMP for RegDB, chosen by the extension."""
    if path.suffix == ".jpg":
        Image.fromarray(image).save(path, quality=JPEG_QUALITY)
    else:
        Image.fromarray(image).save(path)
