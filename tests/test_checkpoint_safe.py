"""Safe loading: truncated, text, missing and pickled-object files are refused in one line."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from model import SHARED, Arch, build_model, load_arch, load_checkpoint
from model.checkpoint import read_checkpoint, safe_load
from utils.base.errors import UserError

from checkpoint_files import TWO_STREAM_18, authors_checkpoint, save_ours  # isort: skip

# --------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------
MARKER_NAME = "pwned"


class Exploit:
    """Unpickling this would run a shell command creating a marker file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.directory / MARKER_NAME}",))


class Plain:
    """An ordinary Python object: not a weight, so refused too."""

    def __init__(self) -> None:
        self.value = 3


@pytest.fixture
def good_checkpoint(tmp_path: Path, two_stream18: Arch) -> Path:
    _, ours = authors_checkpoint(two_stream18, 6, seed=10)
    return save_ours(tmp_path / "good.pth", ours)


def test_truncated_checkpoint_refused(tmp_path: Path, good_checkpoint: Path) -> None:
    """Half a checkpoint (zip or legacy format) is refused as truncated/corrupt."""
    data = good_checkpoint.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    model = build_model(load_arch(TWO_STREAM_18), 6)
    with pytest.raises(UserError, match="truncated/corrupt") as info:
        load_checkpoint(model, cut)
    assert str(cut) in str(info.value)
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {"x": torch.randn(500)}}, legacy, _use_new_zipfile_serialization=False)
    data = legacy.read_bytes()
    legacy.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated/corrupt"):
        safe_load(legacy)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        safe_load(empty)


@pytest.mark.parametrize(
    "text", ["hello world\n", "this is not a checkpoint\n", "model weights\n"], ids=["h", "t", "m"]
)
def test_text_file_refused_as_not_a_checkpoint(tmp_path: Path, text: str) -> None:
    """A text file is refused with UserError saying it is not a checkpoint (no traceback)."""
    path = tmp_path / "notes.txt"
    path.write_text(text)
    with pytest.raises(UserError, match="not a PyTorch checkpoint") as info:
        safe_load(path)
    assert str(path) in str(info.value)
    assert "pickled" not in str(info.value)


def test_text_file_never_loads(tmp_path: Path) -> None:
    """Whatever the message, a text file never loads as a checkpoint."""
    path = tmp_path / "notes.txt"
    path.write_text("model weights\n")
    with pytest.raises(UserError):
        read_checkpoint(path)


def test_missing_checkpoint(tmp_path: Path) -> None:
    """A missing file is named in a UserError."""
    path = tmp_path / "nope" / "checkpoint.pth"
    model = build_model(Arch.uniform(18, SHARED), 2)
    with pytest.raises(UserError, match="not found") as info:
        load_checkpoint(model, path)
    assert str(path) in str(info.value)
    with pytest.raises(UserError, match="not found"):
        build_model(Arch.uniform(18, SHARED), 2, pretrained=str(path))


@pytest.mark.parametrize("how", ["torch.save", "pickle", "plain-object"])
def test_pickled_objects_refused_and_never_run(tmp_path: Path, how: str) -> None:
    """A file carrying arbitrary pickled objects is refused as unsafe, and no code runs."""
    path = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save({"epoch": 1, "model": {"x": Exploit(tmp_path)}}, path)
    elif how == "pickle":
        path.write_bytes(pickle.dumps({"model": Exploit(tmp_path)}, protocol=2))
    else:
        torch.save({"model": {"conv1.weight": torch.zeros(1)}, "extra": Plain()}, path)
    model = build_model(Arch.uniform(18, SHARED), 2)
    with pytest.raises(UserError, match="refused") as info:
        load_checkpoint(model, path)
    message = str(info.value)
    assert str(path) in message
    assert "could run code" in message or "unsafe" in message
    with pytest.raises(UserError, match="refused"):
        build_model(Arch.uniform(18, SHARED), 2, pretrained=str(path))
    assert not (tmp_path / MARKER_NAME).exists()
