"""Checkpoint files for the checkpoint tests: the authors' layout, ours, torchvision's ImageNet."""

from __future__ import annotations

from pathlib import Path

import torch

from model import SPLIT, Arch, CMNASNet
from model.arch import RESNET_LAYOUT

ROOT = Path(__file__).resolve().parents[1]
TWO_STREAM_18 = ROOT / "configs" / "resnet18_two_stream.json"
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------------------------
# Key layouts of torchvision-style basic-block ResNets (18 and 34), as the authors' files hold them
# --------------------------------------------------------------------------------------------
def basic_resnet_layout(depth: int) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Conv weight shapes and BN widths of a basic-block ResNet, keyed by module path."""
    convs: dict[str, tuple[int, ...]] = {"conv1": (64, 3, 7, 7)}
    bns: dict[str, int] = {"bn1": 64}
    inplanes = 64
    for stage, count in enumerate(RESNET_LAYOUT[depth][1], start=1):
        planes = 64 * 2 ** (stage - 1)
        for block in range(count):
            prefix = f"layer{stage}.{block}"
            convs[f"{prefix}.conv1"] = (planes, inplanes, 3, 3)
            bns[f"{prefix}.bn1"] = planes
            convs[f"{prefix}.conv2"] = (planes, planes, 3, 3)
            bns[f"{prefix}.bn2"] = planes
            if block == 0 and stage > 1:
                convs[f"{prefix}.downsample.conv"] = (planes, inplanes, 1, 1)
                bns[f"{prefix}.downsample.bn"] = planes
            inplanes = planes
    return convs, bns


def random_bn(width: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random BN parameters and statistics (distinct on every call)."""
    return {
        "weight": 0.5 + torch.rand(width, generator=gen),
        "bias": 0.2 * torch.randn(width, generator=gen),
        "running_mean": 0.2 * torch.randn(width, generator=gen),
        "running_var": 0.5 + torch.rand(width, generator=gen),
        "num_batches_tracked": torch.randint(1, 10**6, (), generator=gen),
    }


def random_conv(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    fan_in = shape[1] * shape[2] * shape[3]
    return torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5


def authors_checkpoint(
    arch: Arch, num_classes: int, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A state dict in the authors' layout and the same weights in this project's layout.

    Authors: ``module.`` prefix, three BNs per slot (visible_bn / thermal_bn / sharable_bn, all
    different), ``downsample.conv`` / ``downsample.bn``, head ``module.bnneck.*`` and
    ``module.classifier.weight``. Ours: ``backbone.<slot>.visible|infrared`` for split slots,
    ``backbone.<slot>.shared`` for shared ones, the same head without the prefix.
    """
    gen = torch.Generator().manual_seed(seed)
    convs, bns = basic_resnet_layout(arch.depth)
    assert sorted(bns) == sorted(arch.slots)
    theirs: dict[str, torch.Tensor] = {}
    ours: dict[str, torch.Tensor] = {}
    for name, shape in convs.items():
        weight = random_conv(shape, gen)
        theirs[f"module.backbone.{name}.weight"] = weight
        ours[f"backbone.{name}.weight"] = weight
    for slot, width in bns.items():
        branches = {which: random_bn(width, gen) for which in ("visible", "thermal", "sharable")}
        for which, tensors in branches.items():
            for tensor, value in tensors.items():
                theirs[f"module.backbone.{slot}.{which}_bn.{tensor}"] = value
        used = (
            {"visible": "visible", "infrared": "thermal"}
            if arch.slots[slot] == SPLIT
            else {"shared": "sharable"}
        )
        for branch, which in used.items():
            for tensor, value in branches[which].items():
                ours[f"backbone.{slot}.{branch}.{tensor}"] = value
    for tensor, value in random_bn(512, gen).items():
        theirs[f"module.bnneck.{tensor}"] = value
        ours[f"bnneck.{tensor}"] = value
    ours["bnneck.bias"] = theirs["module.bnneck.bias"] = torch.zeros(512)
    classifier = 0.01 * torch.randn(num_classes, 512, generator=gen)
    theirs["module.classifier.weight"] = ours["classifier.weight"] = classifier
    return theirs, ours


def torchvision_state(depth: int, seed: int, batches_tracked: bool = True) -> dict:
    """Random weights in torchvision's ResNet layout (``downsample.0/1``, ``fc``)."""
    gen = torch.Generator().manual_seed(seed)
    convs, bns = basic_resnet_layout(depth)
    state: dict[str, torch.Tensor] = {}
    for name, shape in convs.items():
        state[name.replace("downsample.conv", "downsample.0") + ".weight"] = random_conv(shape, gen)
    for name, width in bns.items():
        for tensor, value in random_bn(width, gen).items():
            if tensor != "num_batches_tracked" or batches_tracked:
                state[f"{name.replace('downsample.bn', 'downsample.1')}.{tensor}"] = value
    state["fc.weight"] = torch.randn(1000, 512, generator=gen)
    state["fc.bias"] = torch.randn(1000, generator=gen)
    return state


def save_authors(path: Path, model: dict, ema: dict | None = None) -> Path:
    """Write a checkpoint dict the way the authors' training script does."""
    torch.save({"epoch": 120, "model": model, "ema": ema, "optimizer": {"state": {}}}, path)
    return path


def save_ours(path: Path, model: dict) -> Path:
    torch.save({"format": "cmnas-checkpoint", "model": model}, path)
    return path


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 32, generator=torch.Generator().manual_seed(seed))


def outputs(model: CMNASNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Eval-mode pool and bnneck features for visible, infrared and a mixed batch."""
    model.eval()
    mixed = torch.tensor([1, 0] * (x.shape[0] // 2))
    with torch.no_grad():
        return [t for modality in ("visible", "infrared", mixed) for t in model(x, modality)]
