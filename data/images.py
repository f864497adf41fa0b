"""Image decoding (16-bit greyscale scaled to 8 bits), the up-front check that test images decode,
and the on-disk uint8 image cache of the training sets.

A cache is one folder holding ``<name>.npy`` arrays and a ``meta.json``. It is built in a
temporary sibling folder and moved into place with one ``os.replace``, so a reader sees either a
complete cache or none: an interrupted build (Ctrl-C, crash, full disk) leaves no cache behind.
The meta records what the images are (data root, and each file's name, size and modification
time), so a replaced image or another data root with the same file names rebuilds the cache,
and the log says why.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import stat
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.base.errors import StopNow, UserError
from utils.base.io import MB, check_free_space, disk_full, replace_dir

if TYPE_CHECKING:
    from data.dataset import ListedImage

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
# Bump when the cache contents or its meta change meaning (e.g. a different resize), so old caches
# rebuild. 2: keyed by the data root and each image's size and modification time.
CACHE_VERSION = 2
_MAX_WORKERS = 8
# The test-image check: decoding releases the GIL and reads are I/O bound (network file systems).
_CHECK_WORKERS = 8
# Free space asked for beyond the arrays themselves (meta.json, headers, and some room to spare).
_SPACE_MARGIN = 16 * MB
# PIL modes of greyscale images with more than 8 bits per pixel (16-bit PNG and TIFF open as
# "I;16*", or as 32-bit "I" holding 16-bit values), and the divisor taking 65535 to 255.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WIDE_TO_8_BIT = 257.0
# Signals whose default action kills the process without clean-up; during a cache build they
# remove the half-built folder first.
_BUILD_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def check_img_size(img_size: Sequence[int]) -> tuple[int, int]:
    """Return ``img_size`` as (height, width) after checking it holds two positive integers."""
    try:
        height, width = (int(v) for v in img_size)
    except (TypeError, ValueError):
        raise UserError(f"--img_h/--img_w {img_size!r}: expected two positive integers") from None
    if height <= 0 or width <= 0:
        raise UserError(f"--img_h/--img_w {height}x{width}: expected two positive integers")
    return height, width


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB; 16-bit greyscale (what infrared sensors often write) is scaled
    from 0..65535 to 0..255 instead of being clipped to white."""
    if image.mode in _WIDE_GREY_MODES:
        wide = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(wide / _WIDE_TO_8_BIT), 0, 255).astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    return image.convert("RGB")


def prepare_image(image: Image.Image, size_wh: tuple[int, int]) -> np.ndarray:
    """A decoded image as uint8 (H, W, 3), resized to ``size_wh`` (width, height).

    Converted to RGB (:func:`to_rgb`), then resized with LANCZOS (the authors' ANTIALIAS): what
    every training and test image goes through.
    """
    resized = to_rgb(image).resize(size_wh, Image.Resampling.LANCZOS)
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
    """Why ``path`` cannot be read as an image file ("" when it is a regular file).

    Only regular files (or links to one) count: a FIFO or a device named like an image would
    block whoever opens it.
    """
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
    with ThreadPoolExecutor(max_workers=_CHECK_WORKERS) as pool:
        problems = list(pool.map(_image_problem, paths, chunksize=64))
    for image, problem in zip(images, problems, strict=True):
        if problem:
            where = f"{image.listed_in}: " if image.listed_in else ""
            raise UserError(f"{where}test image {image.path} {problem}")
    return len(images)


def default_cache_dir(root: str | os.PathLike) -> Path:
    """Return ``<root>/cache`` when ``root`` is writable, else ``./cache``."""
    root = Path(root)
    cache = root / "cache"
    if cache.is_dir() and os.access(cache, os.W_OK | os.X_OK):
        return cache
    if not cache.exists() and os.access(root, os.W_OK | os.X_OK):
        return cache
    return Path("cache").absolute()


def image_signature(root: str | os.PathLike, groups: Mapping[str, Sequence[str]]) -> dict:
    """Describe what the images are: the resolved ``root`` and each file's size and mtime.

    ``groups`` maps a name (e.g. "visible") to image paths under ``root``. Each file becomes one
    ``"<size> <mtime_ns> <path relative to root>"`` line, so a file replaced or rewritten under the
    same name changes the signature, and so does another data root with the same file names.
    """
    files = {}
    for group, paths in groups.items():
        lines = []
        for path in paths:
            try:
                stat = os.stat(path)
            except OSError as exc:
                raise UserError(f"{path}: cannot read image ({exc.strerror})") from None
            lines.append(f"{stat.st_size} {stat.st_mtime_ns} {os.path.relpath(path, root)}")
        files[group] = lines
    return {"root": str(Path(root).resolve()), "files": files}


def cache_mismatch(stored: dict, wanted: dict) -> str | None:
    """Say in a few words why a cache whose meta is ``stored`` cannot serve ``wanted``, or None."""
    stored, wanted = _jsonable(stored), _jsonable(wanted)
    try:
        return _mismatch(stored, wanted)
    except (AttributeError, KeyError, TypeError, ValueError):
        return "its meta.json is malformed"


def _mismatch(stored: dict, wanted: dict) -> str | None:
    if stored.get("version") != wanted.get("version"):
        return f"written in cache format {stored.get('version')}, not {wanted.get('version')}"
    if stored.get("img_size") != wanted.get("img_size"):
        old_size, new_size = (
            "x".join(str(v) for v in meta.get("img_size") or ["?"]) for meta in (stored, wanted)
        )
        return f"image size changed ({old_size} -> {new_size})"
    old, new = stored.get("images") or {}, wanted.get("images") or {}
    if old.get("root") != new.get("root"):
        return f"built for another data root {old.get('root')}"
    old_files, new_files = old.get("files") or {}, new.get("files") or {}
    changed = []
    for group in sorted(set(old_files) | set(new_files)):
        before, after = old_files.get(group, []), new_files.get(group, [])
        old_names = [_file_name(line) for line in before]
        names = [_file_name(line) for line in after]
        if old_names != names:
            known = set(old_names)
            added = [name for name in names if name not in known]
            first = f"; first new: {added[0]}" if added else ""
            return f"the list of {group} image files changed ({len(before)} -> {len(after)}{first})"
        changed += [_file_name(y) for x, y in zip(before, after, strict=True) if x != y]
    if changed:
        return f"{len(changed)} image files changed since it was built (first: {changed[0]})"
    different = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    if different:
        return f"built with other settings ({', '.join(different)})"
    return None


def _file_name(line: str) -> str:
    """The relative path of one ``image_signature`` line."""
    return line.split(" ", 2)[-1]


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
    reason = cache_mismatch(stored, meta)
    if reason is not None:
        logger.info("rebuilding cache %s: %s", path, reason)
        return None
    arrays = {}
    for name in names:
        try:
            arrays[name] = np.load(path / f"{name}.npy", mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as exc:
            logger.warning("cache %s is unreadable (%s); rebuilding", path, exc)
            return None
    return arrays


def image_bytes(count: int, img_size: Sequence[int]) -> int:
    """Bytes that ``count`` uint8 RGB images of (height, width) take in the cache."""
    height, width = check_img_size(img_size)
    return count * height * width * 3


def write_cache(
    path: str | os.PathLike, meta: dict, build: Callable[[Path], None], need_bytes: int = 0
) -> None:
    """Build a cache at ``path``: ``build(tmp_dir)`` writes the arrays, then one atomic move.

    ``need_bytes`` (what the arrays will take) is checked against the free space first. Any
    failure removes the half-built folder; a full disk, an unwritable folder or a cache folder
    deleted meanwhile is a one-line UserError. If another process finished the same cache
    first, its copy is kept and ours dropped.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path)
    except OSError as exc:
        raise UserError(
            f"--cache_dir {path.parent}: cannot write the image cache ({exc})"
        ) from None
    need = need_bytes + need_bytes // 100 + _SPACE_MARGIN
    check_free_space(path.parent, need)
    try:
        tmp = path.parent / f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{_tag()}"
        tmp.mkdir()
    except OSError as exc:
        raise UserError(
            f"--cache_dir {path.parent}: cannot write the image cache ({exc})"
        ) from None
    try:
        with _stop_signals_raise():
            build(tmp)
        # meta.json last: a folder is only ever complete once it has it.
        (tmp / META_FILE).write_text(json.dumps(_jsonable(meta), indent=1, sort_keys=True))
        _replace_dir(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path.parent, need) from None
        if isinstance(exc, FileNotFoundError) and not tmp.is_dir():
            raise UserError(
                f"--cache_dir {path.parent}: the cache folder disappeared while {path.name} was "
                "being built (deleted by another process?); run again"
            ) from None
        if exc.errno in (errno.EACCES, errno.EROFS):
            raise UserError(
                f"--cache_dir {path.parent}: cannot write the image cache ({exc})"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise StopNow where they would kill the process.

    A signal someone else already handles (e.g. a training loop stopping after its step) is
    left alone, and so is everything outside the main thread (signals cannot be caught there).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in _BUILD_STOP_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _raise_stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _raise_stop(signum: int, frame: object) -> None:
    raise StopNow(signum)


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _jsonable(meta: dict) -> dict:
    """Round-trip through JSON so tuples and lists compare equal to what was stored."""
    return json.loads(json.dumps(meta, sort_keys=True))


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the built cache ``src`` onto ``dst``; a concurrent build that got there first wins."""
    try:
        replace_dir(src, dst)
    except OSError:
        if not dst.exists():
            raise
        # A concurrent build (another rank) won the race; its cache is as good as ours.
        shutil.rmtree(src, ignore_errors=True)


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
    shape = (len(paths), height, width, 3)
    # Create the file (header and a sparse body), reserve its disk blocks, then map it for
    # writing: on a full disk the reservation fails with ENOSPC instead of a write to the map
    # killing the process with SIGBUS.
    array = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=shape)
    offset, size = array.offset, array.nbytes
    del array
    _reserve(target, offset, size)
    array = np.lib.format.open_memmap(target, mode="r+")
    load_images(paths, (height, width), progress=progress, desc=name, out=array)
    array.flush()
    del array


def _reserve(path: Path, offset: int, size: int) -> None:
    """Allocate the disk blocks of ``path``'s bytes [offset, offset + size) now."""
    with open(path, "r+b") as handle:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(handle.fileno(), offset, size)
                return
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        # No fallocate on this platform or file system: writing zeros reserves the blocks too.
        handle.seek(offset)
        chunk = bytes(min(size, 16 * MB))
        left = size
        while left > 0:
            left -= handle.write(chunk[: min(left, len(chunk))])
        handle.flush()
        os.fsync(handle.fileno())
