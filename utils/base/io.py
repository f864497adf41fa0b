"""Atomic files and folders: write aside, then rename, so that a kill at any moment leaves the
previous file (folder) or the new one; a failure removes the temporary (a kill -9's, the next
write), and a full disk is one line naming the folder and the size needed.
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
from typing import IO, Any, NoReturn

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


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable (not possible on every platform; best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
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
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException as err:
        _fail(err, path.parent, written + MB, lambda: Path(tmp).unlink(missing_ok=True))
    fsync_dir(path.parent)


def _fail(
    err: BaseException, folder: Path, need_bytes: int, remove: Callable[[], object]
) -> NoReturn:
    """Call ``remove`` (delete the partial output), then raise what the failure means: a stop
    signal in ``err``'s context (a library's writer that a signal handler interrupted fails with
    its own error, as torch's "unexpected pos"), else a full disk, else ``err`` itself."""
    # Judged before the partial output goes: a writer may hide ENOSPC in its own error.
    full = _out_of_space(err, folder)
    remove()
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            raise seen from None
        seen = seen.__context__
    if full:
        raise disk_full(folder, need_bytes) from None
    raise err


def _out_of_space(err: BaseException, folder: Path) -> bool:
    """Whether ``err`` means a full disk: ENOSPC, also wrapped in a library's own error, or
    (when the library hid it, as torch's "unexpected pos") under 1 MB left free on ``folder``."""
    if isinstance(err, UserError):
        return False
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(err) or "file write failed" in str(err):
        return True
    try:
        return shutil.disk_usage(folder).free < MB
    except OSError:
        return False


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_atomic(path, lambda handle: handle.write(text), binary=False)


def copy_atomic(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Make ``dst`` a copy of the finished file ``src``, atomically: a hard link when the file
    system allows it (a later atomic write over ``src`` replaces its name, not the data)."""
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
        _fail(err, dst.parent, src.stat().st_size, lambda: tmp.unlink(missing_ok=True))
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
    """Move the finished folder ``src`` onto ``dst``, replacing an older ``dst``: swapped in one
    step where the system can (Linux), else the old ``dst`` first set aside as
    ``.NAME.old-HOST-PID-TAG``, which :func:`remove_leftovers` puts back if the process dies."""
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
    """Swap the folders ``src`` and ``dst`` atomically (Linux's ``renameat2``); False where
    ``dst`` is absent or the system or file system cannot."""
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
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return kind if entry.is_dir() else None
    except PermissionError:
        pass  # it exists, as another user's
    return None


def remove_leftovers(dst: str | os.PathLike[str]) -> list[str]:
    """Tidy what killed writes of the folder ``dst`` by dead processes of this host left beside
    it (an old ``dst`` set aside is put back if ``dst`` is missing); return the names handled."""
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
    """Yield an empty hidden sibling of ``dst`` to fill (after tidying leftovers and checking
    ``need_bytes`` of free space); swap it in for ``dst`` at the end. An exception, Ctrl-C,
    SIGTERM or SIGHUP in the block deletes it and leaves ``dst`` as it was."""
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
        _fail(err, dst.parent, need_bytes, lambda: shutil.rmtree(staging, ignore_errors=True))


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise StopNow (so Ctrl-C's clean-up runs for them),
    unless someone else handles them or this is not the main thread (only it gets signals)."""
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


# Where outputs may go: checked before any work.
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
    """An existing ``out`` is replaced whole: refuse one holding a file ``own`` does not claim
    (a hidden ``.NAME.*``, the temporary of a killed write, counts as NAME's)."""
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
    ``named`` maps what each file read is to its path (or None), ``images`` holds (path as
    listed, resolved path) of the images read."""
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
