"""This project's checkpoints: loading into a model (mismatches named), checksums."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import SHARED, SPLIT, Arch, build_model, load_checkpoint
from model.checkpoint import read_checkpoint
from utils.base.errors import UserError

from checkpoint_files import authors_checkpoint, save_authors, save_ours  # isort: skip


# --------------------------------------------------------------------------------------------
# Mismatches
# --------------------------------------------------------------------------------------------
def test_wrong_class_count_names_classifier(tmp_path: Path, two_stream18: Arch) -> None:
    """A checkpoint for another class count is refused, naming the classifier and both shapes."""
    theirs, ours = authors_checkpoint(two_stream18, 6, seed=6)
    model = build_model(two_stream18, 9)
    for path in (save_authors(tmp_path / "a.pth", theirs), save_ours(tmp_path / "o.pth", ours)):
        with pytest.raises(UserError, match="shape mismatch") as info:
            load_checkpoint(model, path)
        message = str(info.value)
        assert "classifier.weight" in message and "(6, 512)" in message and "(9, 512)" in message
        assert str(path) in message


def test_shallower_checkpoint_names_missing_slots(tmp_path: Path) -> None:
    """A ResNet-18 checkpoint does not fit a ResNet-34: the missing blocks are named."""
    arch18, arch34 = Arch.uniform(18, SPLIT), Arch.uniform(34, SPLIT)
    theirs, ours = authors_checkpoint(arch18, 4, seed=7)
    model = build_model(arch34, 4)
    for path in (save_authors(tmp_path / "a.pth", theirs), save_ours(tmp_path / "o.pth", ours)):
        with pytest.raises(UserError, match="missing weights") as info:
            load_checkpoint(model, path)
        assert "layer1.2" in str(info.value)
        assert str(path) in str(info.value)


def test_split_checkpoint_into_shared_model(tmp_path: Path) -> None:
    """Our all-split checkpoint cannot load into an all-shared model: the slots are named."""
    _, ours = authors_checkpoint(Arch.uniform(18, SPLIT), 4, seed=8)
    path = save_ours(tmp_path / "split.pth", ours)
    model = build_model(Arch.uniform(18, SHARED), 4)
    before = model.backbone.bn1.shared.running_mean.clone()
    with pytest.raises(UserError, match="missing weights for 20 part") as info:
        load_checkpoint(model, path)
    assert "backbone.bn1" in str(info.value)
    assert torch.equal(model.backbone.bn1.shared.running_mean, before)


@pytest.mark.parametrize("layout", ["ours", "authors"])
def test_deeper_checkpoint_is_refused(tmp_path: Path, layout: str) -> None:
    """A ResNet-34 checkpoint must not load into a ResNet-18 model (extra blocks ignored)."""
    theirs, ours = authors_checkpoint(Arch.uniform(34, SPLIT), 4, seed=9)
    path = (
        save_ours(tmp_path / "o.pth", ours)
        if layout == "ours"
        else save_authors(tmp_path / "a.pth", theirs)
    )
    model = build_model(Arch.uniform(18, SPLIT), 4)
    with pytest.raises(UserError, match="layer1.2"):
        load_checkpoint(model, path)


def test_not_a_training_checkpoint(tmp_path: Path) -> None:
    """A bare state dict is not a training checkpoint: refused, saying what was expected."""
    path = tmp_path / "bare.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="expected a dict with a 'model' state dict") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_flipped_bytes_are_found_by_the_checksum(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint of ours whose tensor bytes changed on disk is refused, naming the file."""
    from model.checkpoint import write_checkpoint

    marked = torch.arange(4096, dtype=torch.float32) + 0.5
    state = {"format": "cmnas-checkpoint", "model": {"w": marked, "b": torch.zeros(3)}}
    path = tmp_path / "ours.pth"
    write_checkpoint(state, path)
    assert read_checkpoint(path)["model"]["w"].equal(marked)  # intact: loads
    data = bytearray(path.read_bytes())
    where = data.find(marked.numpy().tobytes())
    assert where > 0
    data[where + 5000] ^= 0x10  # one bit, in the middle of the tensor
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    with pytest.raises(UserError) as info:
        read_checkpoint(damaged)
    message = str(info.value)
    assert (
        message.startswith(f"{damaged}: corrupt checkpoint: 1 tensor(s) differ")
        and "model.w" in message
    )
    # Files without checksums (earlier versions, the authors') load as before, silently.
    old = tmp_path / "old.pth"
    torch.save(state, old)
    with caplog.at_level("WARNING"):
        assert read_checkpoint(old)["model"]["w"].equal(marked)
    assert not caplog.records
