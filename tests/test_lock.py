"""The run-folder lock: one holder at a time, named to the next; dropped when its process dies."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from utils.base.errors import UserError
from utils.base.lock import LOCK_FILE, RunLock

REPO = Path(__file__).resolve().parent.parent
HOLDER = """
import sys, time
from utils.base.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_process_is_told_the_folder_and_holder_until_the_holder_is_killed(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(UserError) as caught:
            RunLock(folder).acquire()
        message = str(caught.value)
        assert message.startswith(
            f"{folder}: already in use by another run "
            f"(pid {holder.pid} on {socket.gethostname()} since "
        )
        assert message.endswith("); wait for it to end or choose another folder")
        assert "time.sleep(600)" in message and "\n" not in message
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs in the holder
        holder.wait()
    with RunLock(folder) as lock:
        assert lock.held
        record = json.loads((folder / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["started"].endswith("UTC") and record["command"]
    assert not lock.held and (folder / LOCK_FILE).read_text() == ""


def test_one_holder_at_a_time_within_a_process(tmp_path: Path) -> None:
    first = RunLock(tmp_path / "a" / "run").acquire()
    assert first.held and first.acquire() is first  # acquiring again is a no-op
    with pytest.raises(UserError, match=f"already in use by another run \\(pid {os.getpid()} "):
        RunLock(tmp_path / "a" / "run").acquire()
    with RunLock(tmp_path / "b"):  # another folder is independent
        pass
    first.release()
    first.release()  # releasing twice is harmless
    with RunLock(tmp_path / "a" / "run") as second:
        assert second.held


def test_a_folder_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match=f"^{blocker / 'run'}: cannot create the run folder's lock"):
        RunLock(blocker / "run").acquire()


def test_a_file_system_without_locks_warns_and_runs_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING):
        lock = RunLock(tmp_path).acquire()
    assert not lock.held
    assert f"{tmp_path}: this file system cannot lock files (No locks available)" in caplog.text
