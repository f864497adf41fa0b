"""ImageNet initialisation: a local torchvision-layout file, the hub cache, the download."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch

from model import SHARED, SPLIT, Arch, CMNASNet, build_model
from utils.base.errors import UserError

from checkpoint_files import torchvision_state  # isort: skip


# --------------------------------------------------------------------------------------------
# ImageNet initialisation
# --------------------------------------------------------------------------------------------
def check_imagenet_loaded(model: CMNASNet, state: dict[str, torch.Tensor]) -> None:
    """Every conv and every branch of every slot holds the ImageNet tensors."""
    backbone = model.backbone
    assert torch.equal(backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(
        backbone.layer2[0].downsample.conv.weight, state["layer2.0.downsample.0.weight"]
    )
    for branch in backbone.bn1.branches().values():
        assert torch.equal(branch.running_var, state["bn1.running_var"])
        assert torch.equal(branch.weight, state["bn1.weight"])
    for branch in backbone.layer4[0].downsample.bn.branches().values():
        assert torch.equal(branch.running_mean, state["layer4.0.downsample.1.running_mean"])


def test_pretrained_path_loads(tmp_path: Path) -> None:
    """pretrained=<path> initialises both branches from a torchvision-layout file."""
    state = torchvision_state(18, seed=11)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = build_model(Arch.uniform(18, SPLIT), 3, pretrained=str(path))
    check_imagenet_loaded(model, state)
    assert tuple(model.classifier.weight.shape) == (3, 512)


def test_pretrained_without_num_batches_tracked(tmp_path: Path) -> None:
    """An ImageNet file without num_batches_tracked (the old torchvision files) still loads."""
    state = torchvision_state(18, seed=12, batches_tracked=False)
    assert not any(key.endswith("num_batches_tracked") for key in state)
    path = tmp_path / "old.pth"
    torch.save(state, path)
    model = build_model(Arch.uniform(18, SPLIT), 3, pretrained=str(path))
    check_imagenet_loaded(model, state)


IMAGENET18 = "resnet18-f37072fd.pth"


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """Point torch's hub dir at an empty tmp dir; any download attempt is recorded and fails."""
    hub = tmp_path / "hub"
    calls: list[str] = []

    def no_network(url: str, dst: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return hub, calls


def test_imagenet_offline_names_the_file_to_place(offline_hub: tuple[Path, list[str]]) -> None:
    """With no network, 'imagenet' fails with a UserError naming where to put the file."""
    hub, calls = offline_hub
    with pytest.raises(UserError) as info:
        build_model(Arch.uniform(18, SHARED), 2, pretrained="imagenet")
    message = str(info.value)
    assert str(hub / "checkpoints" / IMAGENET18) in message
    assert f"https://download.pytorch.org/models/{IMAGENET18}" in message
    assert calls == [f"https://download.pytorch.org/models/{IMAGENET18}"]
    assert not list(hub.rglob("*.part"))


def test_imagenet_from_cache_never_downloads(offline_hub: tuple[Path, list[str]]) -> None:
    """With the file placed in the hub cache, 'imagenet' loads it without any download."""
    hub, calls = offline_hub
    state = torchvision_state(18, seed=13)
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(state, hub / "checkpoints" / IMAGENET18)
    model = build_model(Arch.uniform(18, SPLIT), 2, pretrained="imagenet")
    check_imagenet_loaded(model, state)
    assert calls == []


def test_imagenet_download_into_fresh_hub_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """First use on a fresh machine: the download lands in <hub>/checkpoints and loads."""
    hub = tmp_path / "hub"
    state = torchvision_state(18, seed=14)

    def fake_download(url: str, dst: str, *args: object, **kwargs: object) -> None:
        # Like torch.hub.download_url_to_file: write a temporary file next to dst, then move.
        partial = dst + ".123.partial"
        with open(partial, "w+b") as handle:
            torch.save(state, handle)
        os.replace(partial, dst)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = build_model(Arch.uniform(18, SPLIT), 2, pretrained="imagenet")
    check_imagenet_loaded(model, state)
    assert (hub / "checkpoints" / IMAGENET18).is_file()
