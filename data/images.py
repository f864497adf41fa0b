"""Image files: decoding (16-bit greyscale scaled to 8 bits), and the up-front check that every
listed test image is a regular file that decodes."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.base.errors import UserError

# Decoding threads: PIL releases the GIL, and reads are I/O bound (network file systems).
_WORKERS = 8
# PIL modes of greyscale images with more than 8 bits per pixel (16-bit PNG and TIFF open as
# "I;16*", or as 32-bit "I" holding 16-bit values), and the divisor taking 65535 to 255.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WIDE_TO_8_BIT = 257.0


class ListedImage(NamedTuple):
    """A test image and where it is listed ("" when found by walking folders)."""

    path: str
    listed_in: str = ""


def check_img_size(img_size: Sequence[int]) -> tuple[int, int]:
    """Return ``img_size`` as (height, width) after checking it holds two positive integers."""
    try:
        height, width = (int(v) for v in img_size)
    except (TypeError, ValueError):
        raise UserError(f"--img_h/--img_w {img_size!r}: expected two positive integers") from None
    if height <= 0 or width <= 0:
        raise UserError(f"--img_h/--img_w {height}x{width}: expected two positive integers")
    return height, width


def prepare_image(image: Image.Image, size_wh: tuple[int, int]) -> np.ndarray:
    """A decoded image as uint8 (H, W, 3) RGB resized to ``size_wh`` (width, height) with LANCZOS
    (the authors' ANTIALIAS); 16-bit greyscale (what infrared sensors often write) is scaled from
    0..65535 to 0..255 instead of being clipped to white."""
    if image.mode in _WIDE_GREY_MODES:
        wide = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(wide / _WIDE_TO_8_BIT), 0, 255).astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    resized = image.convert("RGB").resize(size_wh, Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def read_image(path: str | os.PathLike[str], size_wh: tuple[int, int]) -> np.ndarray:
    """Decode one image file with :func:`prepare_image`; an unreadable file is a UserError."""
    problem = file_problem(path)  # opening a FIFO or a device would block or read forever
    if problem:
        raise UserError(f"{path}: cannot read image ({problem})")
    try:
        with Image.open(path) as img:
            return prepare_image(img, size_wh)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: cannot read image ({exc})") from None


def load_images(
    paths: Sequence[str],
    img_size: Sequence[int],
    progress: bool = True,
    desc: str = "images",
    out: np.ndarray | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """Decode ``paths`` with :func:`prepare_image` into uint8 (N, H, W, 3), or into ``out`` (e.g.
    a memory-mapped ``.npy``); an unreadable image raises UserError naming the file."""
    height, width = check_img_size(img_size)
    shape = (len(paths), height, width, 3)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out has shape {out.shape} {out.dtype}, expected {shape} uint8")
    if not paths:
        return out
    workers = workers or min(_WORKERS, os.cpu_count() or 1)
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(read_image, paths, [(width, height)] * len(paths))
        try:
            for i, pixels in enumerate(results):
                out[i] = pixels
                bar.update(1)
        except BaseException:
            # Stop at once (a bad image, Ctrl-C, SIGTERM): drop the images not yet started.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return out


def file_problem(path: str | os.PathLike) -> str:
    """Why ``path`` cannot be read as an image file ("" when it is a regular file or a link to
    one): a FIFO or a device named like an image would block whoever opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "not found"
    return "" if stat.S_ISREG(mode) else "is not a regular file"


def _image_problem(path: str) -> str:
    """Why ``path`` is not a readable image ("" when it decodes)."""
    problem = file_problem(path)
    if problem:
        return problem
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width < 1 or height < 1:
                return f"is an empty image ({width}x{height})"
            # Decoding at 1/8 scale reads every byte of a JPEG at a fraction of the cost.
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"is not a readable image ({err})"
    return ""


def check_images_decode(images: Sequence[ListedImage]) -> int:
    """Raise UserError naming the first image that is missing or does not decode; return the
    count."""
    paths = [image.path for image in images]
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        problems = list(pool.map(_image_problem, paths, chunksize=64))
    for image, problem in zip(images, problems, strict=True):
        if problem:
            where = f"{image.listed_in}: " if image.listed_in else ""
            raise UserError(f"{where}test image {image.path} {problem}")
    return len(images)
