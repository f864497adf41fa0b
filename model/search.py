"""The search supernet: a :class:`~model.net.CMNASNet` whose every BN slot holds both choices.

A :class:`SearchableBN` computes ``w_split * split(x) + w_shared * shared(x)``, ``w = softmax(alpha
/ tau)`` (or Gumbel-softmax, training with ``"gumbel"``); :func:`derive_arch` takes the argmaxes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from model.arch import SHARED, SPLIT, Arch
from model.bn import Routing, find_slots, route_split
from model.net import CMNASNet
from model.weights import load_imagenet

RELAXATIONS = ("softmax", "gumbel")


def _check_settings(tau: float, relaxation: str = RELAXATIONS[0]) -> None:
    if relaxation not in RELAXATIONS:
        raise ValueError(f"relaxation must be one of {', '.join(RELAXATIONS)}, got {relaxation!r}")
    if not tau > 0:
        raise ValueError(f"temperature must be positive, got {tau}")


class SearchableBN(nn.Module):
    """A BN slot of the supernet: shared BN and split pair, mixed by ``softmax(alpha / tau)``."""

    def __init__(self, num_features: int, relaxation: str = "softmax", tau: float = 1.0) -> None:
        super().__init__()
        _check_settings(tau, relaxation)
        self.num_features = num_features
        self.relaxation = relaxation
        self.tau = float(tau)
        self.hard_choice: str | None = None  # what a hard forward computes; None: the mixture
        self.shared = nn.BatchNorm2d(num_features)
        self.visible = nn.BatchNorm2d(num_features)
        self.infrared = nn.BatchNorm2d(num_features)
        # Order [shared, split]; zeros = no preference (argmax ties resolve to shared).
        self.alpha = nn.Parameter(torch.zeros(2))

    def branches(self) -> dict[str, nn.BatchNorm2d]:
        """All three BNs by branch name (``shared``, ``visible``, ``infrared``)."""
        return dict(self.named_children())

    def mixing_weights(self) -> torch.Tensor:
        """``[w_shared, w_split]``: a Gumbel-softmax sample in training, else the softmax."""
        if self.relaxation == "gumbel" and self.training:
            return F.gumbel_softmax(self.alpha.float(), tau=self.tau, hard=False)
        return torch.softmax(self.alpha.float() / self.tau, dim=0)

    def choice(self) -> str:
        """The argmax choice (``"shared"`` on a tie)."""
        alpha = self.alpha.detach()
        return SPLIT if bool(alpha[1] > alpha[0]) else SHARED

    def split_probability(self) -> float:
        """The eval-mode weight of the split choice, ``softmax(alpha / tau)[split]``."""
        with torch.no_grad():
            return float(torch.softmax(self.alpha.float() / self.tau, dim=0)[1])

    def set_hard(self, choice: str | None) -> None:
        """Compute only ``choice`` from now on (None: back to the soft mixture)."""
        if choice not in (None, SHARED, SPLIT):
            raise ValueError(f"choice must be 'shared', 'split' or None, got {choice!r}")
        self.hard_choice = choice

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Mix the shared and split outputs (or compute only the hard choice)."""
        if self.hard_choice == SHARED:
            return self.shared(x)
        if self.hard_choice == SPLIT:
            return route_split(x, routing, self.visible, self.infrared)
        shared = self.shared(x)
        split = route_split(x, routing, self.visible, self.infrared)
        w_split = self.mixing_weights()[1].to(shared.dtype)
        # The weights sum to one, so one lerp kernel forms w_shared*shared + w_split*split.
        return torch.lerp(shared, split, w_split)

    def extra_repr(self) -> str:
        mode = f", hard={self.hard_choice}" if self.hard_choice else ""
        return f"{self.num_features}, {self.relaxation}, tau={self.tau:g}{mode}"


def searchable_slots(model: nn.Module) -> dict[str, SearchableBN]:
    """The supernet's slots by slot name, in the canonical order of :func:`slot_names`."""
    return {
        name: slot for name, slot in find_slots(model).items() if isinstance(slot, SearchableBN)
    }


def build_supernet(
    depth: int,
    num_classes: int,
    last_stride: int = 1,
    pretrained: str | None = None,
    relaxation: str = "softmax",
    tau: float = 1.0,
) -> CMNASNet:
    """The search supernet; ``pretrained`` is None, ``"none"``, ``"imagenet"`` or a file path."""
    model = CMNASNet(depth, num_classes, lambda _, n: SearchableBN(n, relaxation, tau), last_stride)
    load_imagenet(model, pretrained)
    return model


def arch_parameter_names(model: nn.Module) -> set[str]:
    """Fully qualified names of the architecture parameters (the slots' alphas)."""
    owned = {id(slot.alpha) for slot in searchable_slots(model).values()}
    return {name for name, param in model.named_parameters() if id(param) in owned}


def arch_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The architecture parameters: one ``alpha`` per slot."""
    return [slot.alpha for slot in searchable_slots(model).values()]


def set_temperature(model: nn.Module, tau: float) -> None:
    """Set the softmax / Gumbel-softmax temperature of every slot."""
    _check_settings(tau)
    for slot in searchable_slots(model).values():
        slot.tau = float(tau)


def split_probabilities(model: nn.Module) -> dict[str, float]:
    """The split weight ``softmax(alpha / tau)[split]`` of every slot, by slot name."""
    return {name: slot.split_probability() for name, slot in searchable_slots(model).items()}


def derive_arch(model: nn.Module, provenance: dict[str, Any] | None = None) -> Arch:
    """The derived architecture: each slot's argmax, with its split probabilities recorded."""
    slots = searchable_slots(model)
    if not slots:
        raise ValueError("the model has no searchable slots (not a supernet)")
    record = dict(provenance or {})
    record["split_probability"] = {n: round(p, 6) for n, p in split_probabilities(model).items()}
    return Arch(model.backbone.depth, {name: slot.choice() for name, slot in slots.items()}, record)


@contextlib.contextmanager
def hard_mode(model: nn.Module, arch: Arch | None = None) -> Iterator[Arch]:
    """Run the supernet as ``arch`` (default: its derived architecture) inside the block (the
    choices are read once on entry, so a forward never synchronises with the device)."""
    arch = arch if arch is not None else derive_arch(model)
    slots = searchable_slots(model)
    for name, slot in slots.items():
        slot.set_hard(arch.slots[name])
    try:
        yield arch
    finally:
        for slot in slots.values():
            slot.set_hard(None)


@contextlib.contextmanager
def _set_inside(items: list[Any], attribute: str, value: bool) -> Iterator[None]:
    """Set ``attribute`` of every item to ``value`` inside the block, restoring each one's after."""
    before = [getattr(item, attribute) for item in items]
    for item in items:
        setattr(item, attribute, value)
    try:
        yield
    finally:
        for item, old in zip(items, before, strict=True):
            setattr(item, attribute, old)


def requires_grad(params: Iterable[nn.Parameter], flag: bool) -> AbstractContextManager[None]:
    """Set ``requires_grad`` of ``params`` inside the block, restoring each one's flag after
    (with it off, a step cannot move them and autograd skips their gradients)."""
    return _set_inside(list(params), "requires_grad", flag)


def frozen_bn_statistics(model: nn.Module) -> AbstractContextManager[None]:
    """Normalise with batch statistics inside the block but leave the running ones untouched
    (the architecture step's batches come from other identities)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    return _set_inside(bns, "track_running_stats", False)
