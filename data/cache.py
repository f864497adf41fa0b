"""The on-disk uint8 cache of the training images.

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
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from data.images import check_img_size, load_images
from utils.base.errors import StopNow, UserError
from utils.base.io import MB, check_free_space, disk_full, replace_dir

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
# Bump when the cache contents or its meta change meaning (e.g. a different resize), so old caches
# rebuild. 2: keyed by the data root and each image's size and modification time.
CACHE_VERSION = 2
# Free space asked for beyond the arrays themselves (meta.json, headers, and some room to spare).
_SPACE_MARGIN = 16 * MB
# Signals whose default action kills the process without clean-up; during a cache build they
# remove the half-built folder first.
_BUILD_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


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


def cached_training_images(
    path: Path,
    meta: dict,
    visible: Sequence[str],
    infrared: Sequence[str],
    title: str,
    progress: bool,
    mmap: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The decoded ``visible`` and ``infrared`` images from the cache at ``path``, built first
    when it is missing or was made from other images than ``meta`` describes.

    ``meta["img_size"]`` is the (height, width) of the images. With ``mmap`` the arrays are
    read-only memory maps of the cache; otherwise they are loaded into memory.
    """
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
        tag = uuid.uuid4().hex[:8]
        tmp = path.parent / f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{tag}"
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
