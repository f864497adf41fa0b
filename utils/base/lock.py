"""An exclusive lock on a run folder, so that two processes never write one run at once.

It is ``flock`` on a file in the folder, dropped by the kernel with the holder's last descriptor
(even on SIGKILL); the file names the holder and stays (deleting it could let two runs lock it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from utils.base.errors import UserError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# File systems without flock support (some network or FUSE mounts) answer with these.
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """Hold an exclusive lock on ``folder`` (created if missing) until release or process exit;
    a second holder, in this process or another, gets a UserError naming the current holder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock without waiting; raise UserError if another process holds it."""
        if self._fd is not None:
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UserError(f"{self.folder}: cannot create the run folder's lock ({exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_of(fd)
            os.close(fd)
            raise UserError(
                f"{self.folder}: already in use by another run ({holder}); wait for it to end "
                "or choose another folder"
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _UNSUPPORTED:
                raise
            logger.warning(
                "%s: this file system cannot lock files (%s); a second run in this folder "
                "would not be detected",
                self.folder,
                exc.strerror,
            )
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder()) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (a no-op when not held); the lock file stays, emptied."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _holder() -> dict[str, object]:
    """Who takes the lock: pid, host, start time (UTC) and command line."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": shlex.join(argv),
    }


def _holder_of(fd: int) -> str:
    """One line naming the holder from the lock file (written right after locking: may be empty)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
    except OSError:
        text = ""
    try:
        info = json.loads(text)
        description = (
            f"pid {info['pid']} on {info['host']} since {info['started']}: {info['command']}"
        )
    except (ValueError, KeyError, TypeError):
        description = "holder not recorded yet" if not text.strip() else text.strip()
    return " ".join(description.split())  # one line, whatever the command line held
