"""One modality's network with every backbone BN folded into the convolution before it.

In eval mode a BN is a per-channel affine map, so ``bn(conv(x))`` is one convolution with a
rescaled weight and a bias; with each slot resolved to the modality's BN, the folded network is
a plain convolutional network giving the same features. The BNNeck stays (it follows pooling).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from model.arch import SPLIT
from model.bn import ModalityBN, Routing
from model.net import CMNASNet
from utils.base.modality import Modality


class FoldedBN(nn.Module):
    """The place of a BN slot whose BN was folded into the convolution before it."""

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Return ``x`` unchanged: the convolution already applied the BN."""
        return x


def conv_of_slot(slot: str) -> str:
    """The convolution a BN slot follows: ``bn1`` -> ``conv1``, ``downsample.bn`` -> ``.conv``."""
    head, _, last = slot.rpartition(".")
    conv = "conv" + last.removeprefix("bn")
    return f"{head}.{conv}" if head else conv


def modality_bn(slot: ModalityBN, modality: str | Modality) -> nn.BatchNorm2d:
    """The BN a sample of ``modality`` goes through in ``slot``."""
    branches = slot.branches()
    name = Modality.parse(modality).name.lower()
    return branches[name] if slot.choice == SPLIT else branches["shared"]


def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution equal (in eval mode) to ``bn(conv(x))``."""
    assert bn.running_mean is not None and bn.running_var is not None
    # Float64 keeps the folded network within round-off of the unfolded one.
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale[:, None, None, None]
    bias = bn.bias.double() - bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


def backbone_slots(model: CMNASNet) -> dict[str, ModalityBN]:
    """The backbone's BN slots by module name, each checked to follow a convolution."""
    modules = dict(model.backbone.named_modules())
    slots = {name: m for name, m in modules.items() if isinstance(m, ModalityBN)}
    missing = [s for s in slots if not isinstance(modules.get(conv_of_slot(s)), nn.Conv2d)]
    if missing:
        raise ValueError(f"no convolution before BN slot(s) {', '.join(missing)}")
    return slots


@torch.no_grad()
def folded_network(model: CMNASNet, modality: str | Modality) -> CMNASNet:
    """A copy of ``model`` (eval mode) for ``modality`` alone, every backbone BN folded."""
    folded = copy.deepcopy(model).eval()
    backbone = folded.backbone
    for slot_name, slot in backbone_slots(folded).items():
        conv = backbone.get_submodule(conv_of_slot(slot_name))
        weight, bias = fold(conv, modality_bn(slot, modality))
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
        parent, _, leaf = slot_name.rpartition(".")
        setattr(backbone.get_submodule(parent) if parent else backbone, leaf, FoldedBN())
    return folded
