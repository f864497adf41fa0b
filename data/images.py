"""Image decoding and the on-disk uint8 image cache shared by the SYSU-MM01 and RegDB readers.

A cache is one folder holding ``<name>.npy`` arrays and a ``meta.json``. It is built in a
temporary sibling folder and moved into place with one ``os.replace``, so a reader sees either a
complete cache or none: an interrupted build (Ctrl-C, crash, full disk) leaves no cache behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.base.errors import UserError

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
# Bump when the cache contents change meaning (e.g. a different resize), so old caches rebuild.
CACHE_VERSION = 1
_MAX_WORKERS = 8


def check_img_size(img_size: Sequence[int]) -> tuple[int, int]:
    """Return ``img_size`` as (height, width) after checking it holds two positive integers."""
    try:
        height, width = (int(v) for v in img_size)
    except (TypeError, ValueError):
        raise UserError(f"--img_h/--img_w {img_size!r}: expected two positive integers") from None
    if height <= 0 or width <= 0:
        raise UserError(f"--img_h/--img_w {height}x{width}: expected two positive integers")
    return height, width


def _read_one(path: str, size_wh: tuple[int, int]) -> np.ndarray:
    """Decode one image as RGB and resize it with LANCZOS (the authors' ANTIALIAS)."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            resized = rgb.resize(size_wh, Image.Resampling.LANCZOS)
            return np.asarray(resized, dtype=np.uint8)
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
    """Decode ``paths`` as RGB, resize to (height, width) with LANCZOS, return uint8 (N,H,W,3).

    ``out`` (e.g. a memory-mapped ``.npy``) receives the pixels instead of a new array. An
    unreadable image raises UserError naming the file.
    """
    height, width = check_img_size(img_size)
    shape = (len(paths), height, width, 3)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out has shape {out.shape} {out.dtype}, expected {shape} uint8")
    if not paths:
        return out
    # PIL releases the GIL while decoding and resizing, so threads give a real speed-up.
    workers = workers or min(_MAX_WORKERS, os.cpu_count() or 1)
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_read_one, paths, [(width, height)] * len(paths))
        for i, pixels in enumerate(results):
            out[i] = pixels
            bar.update(1)
    return out


def default_cache_dir(root: str | os.PathLike) -> Path:
    """Return ``<root>/cache`` when ``root`` is writable, else ``./cache``."""
    root = Path(root)
    cache = root / "cache"
    if cache.is_dir() and os.access(cache, os.W_OK | os.X_OK):
        return cache
    if not cache.exists() and os.access(root, os.W_OK | os.X_OK):
        return cache
    return Path("cache").absolute()


def file_list_hash(entries: Iterable[str]) -> str:
    """Return the SHA-256 hex digest of ``entries`` joined by newlines (order matters)."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(entry.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def read_cache(
    path: str | os.PathLike, meta: dict, names: Sequence[str], mmap: bool = False
) -> dict[str, np.ndarray] | None:
    """Return the arrays ``names`` of the cache at ``path`` if its meta equals ``meta``, else None.

    With ``mmap`` the arrays are read-only memory maps; otherwise they are loaded into memory.
    """
    path = Path(path)
    try:
        stored = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if stored != _jsonable(meta):
        logger.info("cache %s is stale (different size or file list); rebuilding", path)
        return None
    arrays = {}
    for name in names:
        try:
            arrays[name] = np.load(path / f"{name}.npy", mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as exc:
            logger.warning("cache %s is unreadable (%s); rebuilding", path, exc)
            return None
    return arrays


def write_cache(path: str | os.PathLike, meta: dict, build: Callable[[Path], None]) -> None:
    """Build a cache at ``path``: ``build(tmp_dir)`` writes the arrays, then one atomic move.

    If another process finished the same cache first, its copy is kept and ours dropped.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path)
        tmp = path.parent / f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{_tag()}"
        tmp.mkdir()
    except OSError as exc:
        raise UserError(
            f"--cache_dir {path.parent}: cannot write the image cache ({exc})"
        ) from None
    try:
        build(tmp)
        # meta.json last: a folder is only ever complete once it has it.
        (tmp / META_FILE).write_text(json.dumps(_jsonable(meta), indent=1, sort_keys=True))
        _replace_dir(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            raise UserError(
                f"--cache_dir {path.parent}: cannot write the image cache ({exc})"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _jsonable(meta: dict) -> dict:
    """Round-trip through JSON so tuples and lists compare equal to what was stored."""
    return json.loads(json.dumps(meta, sort_keys=True))


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` onto ``dst``, replacing an older ``dst``."""
    old = None
    if dst.exists():
        # os.replace cannot overwrite a non-empty folder: move the old one aside first.
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{_tag()}"
        try:
            os.replace(dst, old)
        except FileNotFoundError:
            old = None
    try:
        os.replace(src, dst)
    except OSError:
        if not dst.exists():
            raise
        # A concurrent build (another rank) won the race; its cache is as good as ours.
        shutil.rmtree(src, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(path: Path) -> None:
    """Delete temporary folders that killed builds on this host left beside ``path``."""
    host = socket.gethostname()
    for entry in path.parent.glob(f".{path.name}.*-*"):
        kind, _, rest = entry.name[len(path.name) + 2 :].partition("-")
        if kind == "old":
            shutil.rmtree(entry, ignore_errors=True)
        elif kind == "tmp" and rest.startswith(host + "-"):
            pid_text = rest[len(host) + 1 :].split("-")[0]
            if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                logger.info("removing %s left by an interrupted cache build", entry)
                shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_images(
    folder: Path, name: str, paths: Sequence[str], img_size: Sequence[int], progress: bool
) -> None:
    """Decode ``paths`` straight into ``folder/<name>.npy`` (memory-mapped, so RAM stays low)."""
    height, width = check_img_size(img_size)
    target = folder / f"{name}.npy"
    if not paths:
        # numpy cannot memory-map a zero-sized array.
        np.save(target, np.empty((0, height, width, 3), dtype=np.uint8))
        return
    array = np.lib.format.open_memmap(
        target, mode="w+", dtype=np.uint8, shape=(len(paths), height, width, 3)
    )
    load_images(paths, (height, width), progress=progress, desc=name, out=array)
    array.flush()
    del array
