"""The on-disk uint8 cache of the training images: one folder of ``<name>.npy`` arrays and a
``meta.json``, built in a hidden sibling folder that then replaces it whole (an interrupted build
leaves no cache). The meta records the data root and each file's name, size and modification time,
so a replaced image or another root rebuilds the cache, and the log says why.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from data.images import check_img_size, load_images
from utils.base.errors import UserError
from utils.base.io import MB, folder_aside

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
# Bump when the cache contents or its meta change meaning (e.g. a different resize), so old caches
# rebuild. 2: keyed by the data root and each image's size and modification time.
CACHE_VERSION = 2
# Free space asked for beyond the arrays themselves (meta.json, headers, and some room to spare).
_SPACE_MARGIN = 16 * MB
# Why a cache folder cannot be made or written: the user's --cache_dir, not a bug.
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR)


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
    """Describe what the images of ``groups`` (name -> paths under ``root``) are: the resolved
    ``root`` and a ``"<size> <mtime_ns> <relative path>"`` line per file."""
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
                counts = f"{len(before)} -> {len(after)}{first}"
                return f"the list of {group} image files changed ({counts})"
            changed += [_file_name(y) for x, y in zip(before, after, strict=True) if x != y]
        if changed:
            return f"{len(changed)} image files changed since it was built (first: {changed[0]})"
        different = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        if different:
            return f"built with other settings ({', '.join(different)})"
        return None
    except (AttributeError, KeyError, TypeError, ValueError):
        return "its meta.json is malformed"


def _file_name(line: str) -> str:
    """The relative path of one ``image_signature`` line."""
    return line.split(" ", 2)[-1]


def cached_training_images(
    path: Path,
    meta: dict,
    visible: Sequence[str],
    infrared: Sequence[str],
    title: str,
    progress: bool,
    mmap: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The decoded images from the cache at ``path`` (read-only memory maps with ``mmap``),
    built first when missing or made from other images than ``meta`` describes."""
    files = {"visible_images": visible, "infrared_images": infrared}
    size = check_img_size(meta["img_size"])
    arrays = _read_cache(path, meta, files, size, mmap)
    if arrays is None:
        logger.info(
            "building %s training cache %s (%d visible + %d infrared images, %dx%d)",
            title,
            path,
            len(visible),
            len(infrared),
            *size,
        )

        def build(folder: Path) -> None:
            for name, paths in files.items():
                save_images(folder, name, paths, size, progress)

        need = (len(visible) + len(infrared)) * size[0] * size[1] * 3
        write_cache(path, meta, build, need_bytes=need)
        arrays = _read_cache(path, meta, files, size, mmap)
        if arrays is None:
            raise UserError(f"--cache_dir {path.parent}: cache {path} unreadable")
    else:
        logger.info("using %s training cache %s", title, path)
    return arrays["visible_images"], arrays["infrared_images"]


def _read_cache(
    path: Path,
    meta: dict,
    files: Mapping[str, Sequence[str]],
    size: tuple[int, int],
    mmap: bool,
) -> dict[str, np.ndarray] | None:
    """The arrays of the cache at ``path`` if its meta equals ``meta`` and each array holds its
    files' images (a cache edited by hand does not), else None."""
    try:
        stored = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    reason = cache_mismatch(stored, meta)
    if reason is not None:
        logger.info("rebuilding cache %s: %s", path, reason)
        return None
    arrays = {}
    for name, paths in files.items():
        try:
            array = np.load(path / f"{name}.npy", mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as exc:
            logger.warning("cache %s is unreadable (%s); rebuilding", path, exc)
            return None
        if array.shape != (len(paths), *size, 3) or array.dtype != np.uint8:
            return None
        arrays[name] = array
    return arrays


def write_cache(
    path: str | os.PathLike, meta: dict, build: Callable[[Path], None], need_bytes: int = 0
) -> None:
    """Build a cache at ``path``: ``build(folder)`` writes the arrays in a folder set aside, which
    then replaces ``path`` whole. The free space must hold ``need_bytes``; any failure removes the
    half-built folder, and a full disk or an unwritable or vanished folder is a UserError."""
    path = Path(path)
    need = need_bytes + need_bytes // 100 + _SPACE_MARGIN
    try:
        with folder_aside(path, need) as folder:
            build(folder)
            # meta.json last: a folder is only ever complete once it has it.
            (folder / META_FILE).write_text(json.dumps(_jsonable(meta), indent=1, sort_keys=True))
    except FileNotFoundError:
        raise UserError(
            f"--cache_dir {path.parent}: the cache folder disappeared while {path.name} was "
            "being built (deleted by another process?); run again"
        ) from None
    except OSError as exc:
        if isinstance(exc, UserError) or exc.errno not in _UNWRITABLE:
            raise
        raise UserError(
            f"--cache_dir {path.parent}: cannot write the image cache ({exc})"
        ) from None


def _jsonable(meta: dict) -> dict:
    """Round-trip through JSON so tuples and lists compare equal to what was stored."""
    return json.loads(json.dumps(meta, sort_keys=True))


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
