"""The authors' checkpoints: their three BNs per slot and ``module.`` keys loaded as ours."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import SHARED, SPLIT, Arch, build_model, load_checkpoint
from utils.base.errors import UserError

from checkpoint_files import (  # isort: skip
    BN_TENSORS,
    authors_checkpoint,
    images,
    outputs,
    save_authors,
    save_ours,
)


# --------------------------------------------------------------------------------------------
# The authors' checkpoints
# --------------------------------------------------------------------------------------------
def test_authors_checkpoint_equals_own_format(tmp_path: Path, two_stream18: Arch) -> None:
    """The authors' file and the same weights in our format load to identical models/outputs."""
    theirs, ours = authors_checkpoint(two_stream18, 6, seed=1)
    authors_path = save_authors(tmp_path / "checkpoint119.pth.tar", theirs)
    ours_path = save_ours(tmp_path / "ours.pth", ours)
    a = build_model(two_stream18, 6)
    b = build_model(two_stream18, 6)
    report_a = load_checkpoint(a, authors_path)
    report_b = load_checkpoint(b, ours_path)
    assert report_a.layout == "authors'" and report_b.layout == "cmnas"
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == ours.keys() == state_b.keys()
    for key, value in ours.items():
        assert torch.equal(state_a[key], value), key
        assert torch.equal(state_b[key], value), key
    x = images(4, seed=2)
    for out_a, out_b in zip(outputs(a, x), outputs(b, x), strict=True):
        assert torch.equal(out_a, out_b)
    # Sharpness: visible and infrared inputs go through different stem/layer1 BNs.
    visible, _, infrared, _, _, _ = outputs(a, x)
    assert not torch.allclose(visible, infrared)


def test_authors_branches_map_to_slots(tmp_path: Path, two_stream18: Arch) -> None:
    """Split slots take visible_bn/thermal_bn, shared slots sharable_bn; the rest is dropped."""
    theirs, _ = authors_checkpoint(two_stream18, 6, seed=3)
    path = save_authors(tmp_path / "checkpoint.pth.tar", theirs)
    model = build_model(two_stream18, 6)
    report = load_checkpoint(model, path)
    backbone = model.backbone
    assert two_stream18.slots["bn1"] == SPLIT
    assert two_stream18.slots["layer1.1.bn2"] == SPLIT
    assert two_stream18.slots["layer3.0.downsample.bn"] == SHARED
    key = "module.backbone.{}.{}_bn.{}"
    assert torch.equal(
        backbone.bn1.visible.running_mean, theirs[key.format("bn1", "visible", "running_mean")]
    )
    assert torch.equal(
        backbone.bn1.infrared.running_mean, theirs[key.format("bn1", "thermal", "running_mean")]
    )
    assert torch.equal(
        backbone.layer1[1].bn2.infrared.weight,
        theirs[key.format("layer1.1.bn2", "thermal", "weight")],
    )
    shared = backbone.layer3[0].downsample.bn.shared
    slot = "layer3.0.downsample.bn"
    assert torch.equal(shared.running_mean, theirs[key.format(slot, "sharable", "running_mean")])
    assert torch.equal(shared.running_var, theirs[key.format(slot, "sharable", "running_var")])
    assert int(shared.num_batches_tracked) == int(
        theirs[key.format(slot, "sharable", "num_batches_tracked")]
    )
    # The three branches really differ, so the checks above pick the right one.
    for which in ("visible", "thermal"):
        assert not torch.equal(
            theirs[key.format(slot, which, "running_mean")],
            theirs[key.format(slot, "sharable", "running_mean")],
        )
    # The report lists exactly the unused branches.
    expected = set()
    for name, choice in two_stream18.slots.items():
        unused = ("sharable",) if choice == SPLIT else ("visible", "thermal")
        expected |= {key.format(name, which, t) for which in unused for t in BN_TENSORS}
    assert set(report.dropped) == expected
    assert len(report.dropped) == len(expected)
    assert report.mapped == len(model.state_dict())
    assert "dropped" in report.describe()


def test_ema_weights(tmp_path: Path, two_stream18: Arch) -> None:
    """ema=True loads the checkpoint's 'ema' entry; without one it fails clearly."""
    live, _ = authors_checkpoint(two_stream18, 6, seed=4)
    ema, ema_ours = authors_checkpoint(two_stream18, 6, seed=5)
    path = save_authors(tmp_path / "with_ema.pth.tar", live, ema)
    model = build_model(two_stream18, 6)
    load_checkpoint(model, path, ema=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema_ours[key]), key
    load_checkpoint(model, path)
    assert torch.equal(model.classifier.weight, live["module.classifier.weight"])
    no_ema = save_authors(tmp_path / "no_ema.pth.tar", live, None)
    with pytest.raises(UserError, match="EMA") as info:
        load_checkpoint(model, no_ema, ema=True)
    assert str(no_ema) in str(info.value)
