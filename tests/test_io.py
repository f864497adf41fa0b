"""Atomic files and folders (utils.base.io): the old or the new, never a mix, nothing left over."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from utils.base.io import (
    DiskFull,
    check_free_space,
    copy_atomic,
    remove_temp_files,
    replace_dir,
    write_atomic,
    write_text_atomic,
)


def test_replace_dir_swaps_a_whole_folder_and_leaves_nothing_aside(tmp_path: Path) -> None:
    old, new = tmp_path / "data", tmp_path / "stage"
    old.mkdir()
    (old / "a.txt").write_text("old")
    (old / "only_old.txt").write_text("x")
    new.mkdir()
    (new / "a.txt").write_text("new")
    replace_dir(new, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert sorted(p.name for p in old.iterdir()) == ["a.txt"]
    assert (old / "a.txt").read_text() == "new"


def test_replace_dir_into_a_new_place(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "f").write_text("1")
    replace_dir(stage, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "f").read_text() == "1"


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_text_atomic(path, "old\n")

    def broken(handle: object) -> None:
        handle.write("half")  # type: ignore[attr-defined]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_atomic(path, broken, binary=False)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_full_disk_is_one_line_naming_the_folder_and_the_size(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pth"

    def full(handle: object) -> None:
        handle.write(b"x" * 3_000_000)  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull) as caught:
        write_atomic(path, full)
    message = str(caught.value)
    assert message.startswith(f"no space left on {tmp_path}, need about ")
    assert "MB" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_check_free_space_refuses_more_than_the_disk_has(tmp_path: Path) -> None:
    check_free_space(tmp_path / "not" / "yet", 1)  # an absent folder is judged by its parent
    with pytest.raises(DiskFull, match=f"no space left on {tmp_path}"):
        check_free_space(tmp_path, 2**62)


def test_copy_atomic_and_stale_temporaries(tmp_path: Path) -> None:
    src = tmp_path / "checkpoint_latest.pth"
    src.write_bytes(b"weights")
    copy_atomic(src, tmp_path / "checkpoint_ep010.pth")
    assert (tmp_path / "checkpoint_ep010.pth").read_bytes() == b"weights"
    (tmp_path / ".checkpoint_latest.pth.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".lock").write_text("")
    assert remove_temp_files(tmp_path) == [".checkpoint_latest.pth.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock",
        "checkpoint_ep010.pth",
        "checkpoint_latest.pth",
    ]
