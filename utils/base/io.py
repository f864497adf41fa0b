"""Atomic files and folders: write aside, then rename, so no reader sees half a file or a folder
mixing two runs.

A kill at any moment leaves either the previous file (folder) or the new one; a failure removes
the temporary; what a kill -9 leaves is removed by the next write of the same folder; a full disk
is reported in one line naming the folder and the size needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from utils.base.errors import StopNow, UserError

log = logging.getLogger(__name__)

MB = 2**20
TEMP_SUFFIX = ".tmp"
# renameat2(2): the current folder as the base of relative paths; swap the two names.
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


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
    """Move the finished folder ``src`` onto ``dst``, replacing an older ``dst``.

    Where the system can swap two names in one step (Linux), ``dst`` is never absent: the swap
    puts the old folder under ``src``'s name, deleted next. Elsewhere the old ``dst`` is first
    renamed to a hidden sibling (``.NAME.old-HOST-PID-TAG``), which :func:`remove_leftovers`
    puts back should the process die before the new folder took its place. A reader sees the
    old folder or the new one, never a mix.
    """
    src, dst = Path(src), Path(dst)
    if _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)
        return
    aside = dst.with_name(f"{temp_name(dst)}old-{_owner()}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(dst, aside)
    except FileNotFoundError:
        os.replace(src, dst)
        return
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(aside, dst)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(src: Path, dst: Path) -> bool:
    """Swap the folders ``src`` and ``dst`` atomically; False where either is absent or the
    system cannot (only Linux's ``renameat2`` can, and not on every file system)."""
    if not dst.is_dir():
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p] * 2 + [ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def _owner() -> str:
    """``HOST-PID``: whose temporary folder this is, so that a later run knows if it is stale."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _stale(entry: Path, dst: Path) -> str | None:
    """``tmp`` or ``old`` when ``entry`` is a folder that a dead process on this host left while
    writing ``dst`` (names ``.NAME.KIND-[HOST-]PID-TAG``), else None."""
    kind, _, rest = entry.name[len(temp_name(dst)) :].partition("-")
    host, _, pid = rest.rpartition("-")[0].rpartition("-")
    if kind not in ("tmp", "old") or not pid.isdigit() or host not in ("", socket.gethostname()):
        return None
    return kind if entry.is_dir() and not _alive(int(pid)) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user's
    return True


def remove_leftovers(dst: str | os.PathLike[str]) -> list[str]:
    """Tidy what killed writes of the folder ``dst`` left beside it; return the names handled.

    A folder set aside by a swap that never finished is put back when ``dst`` is missing (so
    ``dst`` is never lost), else deleted; half-written folders are deleted. Only the leftovers
    of dead processes on this host are touched.
    """
    dst = Path(dst)
    handled = []
    for entry in sorted(dst.parent.glob(f"{glob.escape(temp_name(dst))}*-*")):
        kind = _stale(entry, dst)
        if kind is None:
            continue
        if kind == "old" and not dst.exists():
            os.replace(entry, dst)
            log.warning("restored %s from %s, set aside by an interrupted run", dst, entry.name)
        else:
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed %s, left by an interrupted run", entry)
        handled.append(entry.name)
    return handled


@contextmanager
def folder_aside(dst: str | os.PathLike[str], need_bytes: int = 0) -> Iterator[Path]:
    """Yield an empty hidden sibling of ``dst`` to fill; swap it in for ``dst`` whole at the end.

    Leftovers of killed runs are tidied first (:func:`remove_leftovers`), then ``need_bytes``
    (what the folder will take) is checked against the free space. An exception, Ctrl-C,
    SIGTERM or SIGHUP in the block deletes the half-written folder and leaves ``dst`` as it
    was (a full disk is one :class:`DiskFull` line); after a kill -9 the next call deletes it.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dst)
    check_free_space(dst.parent, need_bytes)
    staging = dst.with_name(f"{temp_name(dst)}tmp-{_owner()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        with stop_signals_raise():
            yield staging
            replace_dir(staging, dst)
    except BaseException as err:
        # Judged before the half-written folder goes: a writer may hide ENOSPC in its own error.
        full = not isinstance(err, UserError) and (_is_disk_full(err) or _no_space_left(dst.parent))
        shutil.rmtree(staging, ignore_errors=True)
        _reraise(err, full, dst.parent, need_bytes)


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise StopNow where they would kill the process.

    So the clean-up written for Ctrl-C runs for them too. A signal that someone else already
    handles is left alone, and so is every thread but the main one (only it receives signals).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _raise_stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _raise_stop(signum: int, frame: object) -> None:
    raise StopNow(signum)


# --------------------------------------------------------------------------------------------
# Where outputs may go: checked before any work
# --------------------------------------------------------------------------------------------
def _check_writable(folder: Path, shown: Path, flag: str) -> None:
    """Fail unless ``folder`` (or, absent, the folder that would hold it) allows writing."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {shown}: not writable ({probe} does not allow writing)")


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """Fail before any work unless the folder ``out`` can be written whole (made or replaced)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: is a file, expected a folder")
    with contextlib.suppress(OSError):  # no current folder (deleted): none to strand
        if Path.cwd().resolve().is_relative_to(out.resolve()):
            # Replacing the folder we stand in would strand the shell in a deleted folder.
            raise UserError(f"{flag} {out}: holds the current folder; name another folder")
    _check_writable(out.parent, out, flag)


def check_replaceable(
    out: Path, own: Callable[[str], bool], what: str, earlier: str, flag: str = "--out"
) -> None:
    """An existing ``out`` is replaced whole: refuse one holding a file ``own`` does not claim.

    A hidden ``.NAME.*`` (the temporary of a killed write) counts as NAME's.
    """
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not _claimed(p.name, own))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UserError(
            f"{flag} {out}: holds other files than {what} ({shown}); expected a new folder "
            f"or {earlier} to replace"
        )


def _claimed(name: str, own: Callable[[str], bool]) -> bool:
    parts = name[1:].split(".") if name.startswith(".") else []
    return own(name) or any(own(".".join(parts[:end])) for end in range(1, len(parts)))


def check_not_input(
    out: Path, named: dict[str, str | None], images: Iterable[tuple[str, str]] = ()
) -> None:
    """Refuse an output that is an input, or a folder that holds one, also through links:
    writing it would overwrite or delete the input.

    ``named``: what each file read is -> its path (None: not given); ``images``: (path as
    listed, resolved path) of the images read.
    """
    target = out.resolve()
    inputs = [(what, Path(path).resolve()) for what, path in named.items() if path]
    inputs += [(f"the input image {given}", Path(real)) for given, real in images]
    for what, real in inputs:
        if real == target:
            raise UserError(
                f"--out {out}: is {what} (it would be overwritten); choose another file name"
            )
        if target in real.parents:
            raise UserError(
                f"--out {out}: holds {what} (it would be deleted); choose another folder"
            )


def check_output_file(path: str | os.PathLike[str], flag: str) -> None:
    """Fail before any work unless the file ``path`` can be written in its existing folder."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{flag} {out}: is a folder, expected a file name")
    if not out.parent.is_dir():
        raise UserError(f"{flag} {out}: folder {out.parent} does not exist")
    _check_writable(out.parent, out.parent, flag)
