"""Atomic files: write through a temporary file and a rename, so no reader sees half a file.

A kill at any moment leaves either the previous file or the new one; a failure removes the
temporary file; a full disk is reported in one line naming the folder and the size needed.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from utils.base.errors import UserError

MB = 2**20
TEMP_SUFFIX = ".tmp"


class DiskFull(UserError, OSError):
    """A write failed for lack of space; the message names the folder and the size needed."""


def disk_full(folder: str | os.PathLike[str], need_bytes: int | None = None) -> DiskFull:
    """The one-line error for a full disk at ``folder`` (``need_bytes``: what the write needed)."""
    need = f", need about {max(1, round(need_bytes / MB))} MB" if need_bytes else ""
    return DiskFull(f"no space left on {folder}{need} (free some space and run again)")


def check_free_space(folder: str | os.PathLike[str], need_bytes: int) -> None:
    """Fail before writing unless the file system of ``folder`` has ``need_bytes`` free."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if free < need_bytes:
        raise disk_full(folder, need_bytes)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable (not possible on every platform; best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> str:
    """The prefix of ``path``'s temporary files (``.NAME.``): one pattern for every writer."""
    return f".{path.name}."


def write_atomic(
    path: str | os.PathLike[str], write: Callable[[IO[Any]], None], binary: bool = True
) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_name(path), suffix=TEMP_SUFFIX)
    written = 0
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            try:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                written = os.fstat(handle.fileno()).st_size
        # mkstemp creates the file readable by its owner only; give it the usual permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        full = _is_disk_full(err) or _no_space_left(path.parent)
        Path(tmp).unlink(missing_ok=True)
        _reraise(err, full, path.parent, written + MB)
    fsync_dir(path.parent)


def _reraise(err: BaseException, full: bool, folder: Path, need_bytes: int) -> None:
    """Raise what a failed write means to the user: its stop signal, a full disk, or ``err``.

    A signal handler that raises inside a library's writer (torch's zip writer calls back into
    Python for every record) makes the writer fail with its own error ("unexpected pos"); the
    stop (a KeyboardInterrupt in ``err``'s context), not that error, is what the user must see.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            raise seen from None
        seen = seen.__context__
    if full:
        raise disk_full(folder, need_bytes) from None
    raise err


def _no_space_left(folder: Path) -> bool:
    """Whether the file system of ``folder`` is (nearly) full: under 1 MB free.

    A writer that hides the ENOSPC under its own message (torch's "unexpected pos") is
    recognised by the disk it leaves full.
    """
    try:
        return shutil.disk_usage(folder).free < MB
    except OSError:
        return False


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC, also when a library wrapped it in its own error (torch's writer does)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "file write failed" in text


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_atomic(path, lambda handle: handle.write(text), binary=False)


def copy_atomic(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Make ``dst`` a copy of the finished file ``src``, atomically.

    A hard link when the file system allows it (no second write of a large file; a later atomic
    write over ``src`` replaces ``src``'s name, not the linked data), else a copy.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f"{temp_name(dst)}{os.getpid()}.link{TEMP_SUFFIX}")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, dst)
    except BaseException as err:
        full = _is_disk_full(err) or _no_space_left(dst.parent)
        tmp.unlink(missing_ok=True)
        _reraise(err, full, dst.parent, src.stat().st_size)
    fsync_dir(dst.parent)


def remove_temp_files(folder: str | os.PathLike[str]) -> list[str]:
    """Remove the temporary files that killed atomic writes left in ``folder``; return names."""
    removed = []
    for leftover in sorted(Path(folder).glob(f".*{TEMP_SUFFIX}")):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
            removed.append(leftover.name)
    return removed


def replace_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Move the finished folder ``src`` onto ``dst`` with one rename, replacing an older ``dst``.

    ``os.replace`` cannot overwrite a non-empty folder, so an older ``dst`` is first renamed to
    a hidden sibling (``.NAME.old-PID-TAG``) and deleted once the new one is in place. A reader
    sees the old folder or the new one, never a mix.
    """
    src, dst = Path(src), Path(dst)
    aside = dst.with_name(f"{temp_name(dst)}old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(dst, aside)
    except FileNotFoundError:
        aside = None
    try:
        os.replace(src, dst)
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
