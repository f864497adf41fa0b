"""Modality-aware BatchNorm slots and the routing that tells them which sample is which.

A *slot* replaces one ``BatchNorm2d`` of the backbone: a shared slot is a single BN, a split slot
normalises each sample with its own modality's BN. A batch may mix modalities in any order; a BN
whose modality is absent is not called, so its running statistics stay untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from model.arch import SHARED, SPLIT, slot_names
from utils.base.modality import Modality


@dataclass(frozen=True)
class Routing:
    """Which samples of a batch are visible and which infrared: ``halves`` when the first
    ``halves`` samples are visible and the rest infrared (slots then use views, not gathers),
    else ``visible_index`` / ``infrared_index``, each modality's sample positions."""

    batch_size: int
    visible_index: torch.Tensor | None = None
    infrared_index: torch.Tensor | None = None
    halves: int | None = None

    @classmethod
    def of(
        cls,
        modality: str | Modality | torch.Tensor | Routing,
        batch_size: int,
        device: torch.device | None = None,
    ) -> Routing:
        """Build the routing for ``modality``: one name for the whole batch or per-sample ints."""
        if isinstance(modality, Routing):
            if modality.batch_size != batch_size:
                raise ValueError(
                    f"routing is for {modality.batch_size} samples, batch has {batch_size}"
                )
            return modality
        if isinstance(modality, str | Modality):
            visible = Modality.parse(modality) is Modality.VISIBLE
            return cls(batch_size, halves=batch_size if visible else 0)
        if not isinstance(modality, torch.Tensor):
            raise TypeError(f"modality must be a name or a tensor, got {type(modality).__name__}")
        if modality.shape != (batch_size,):
            raise ValueError(
                f"per-sample modality has shape {tuple(modality.shape)}, expected ({batch_size},)"
            )
        # One host read per forward, never per slot.
        codes = modality.detach().to("cpu", torch.long)
        if not bool(((codes == Modality.VISIBLE) | (codes == Modality.INFRARED)).all()):
            raise ValueError("per-sample modality values must be 0 (visible) or 1 (infrared)")
        is_visible = codes == Modality.VISIBLE
        n_visible = int(is_visible.sum())
        if bool(is_visible[:n_visible].all()):  # visible first (or one modality throughout)
            return cls(batch_size, halves=n_visible)
        target = device if device is not None else modality.device
        return cls(
            batch_size,
            visible_index=torch.nonzero(is_visible).flatten().to(target),
            infrared_index=torch.nonzero(~is_visible).flatten().to(target),
        )

    @classmethod
    def from_halves(cls, n_visible: int, n_infrared: int) -> Routing:
        """Routing for a batch whose first ``n_visible`` samples are visible, the rest infrared."""
        return cls(n_visible + n_infrared, halves=n_visible)


def route_split(
    x: torch.Tensor,
    routing: Routing,
    visible: Callable[[torch.Tensor], torch.Tensor],
    infrared: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Apply ``visible`` to the visible samples of ``x`` and ``infrared`` to the others."""
    n = routing.halves
    if n == routing.batch_size:
        return visible(x)
    if n == 0:
        return infrared(x)
    if n is not None:
        return torch.cat([visible(x[:n]), infrared(x[n:])], dim=0)
    assert routing.visible_index is not None and routing.infrared_index is not None
    out_visible = visible(x.index_select(0, routing.visible_index))
    out_infrared = infrared(x.index_select(0, routing.infrared_index))
    out = out_visible.new_empty((x.shape[0], *out_visible.shape[1:]))
    out.index_copy_(0, routing.visible_index, out_visible)
    out.index_copy_(0, routing.infrared_index, out_infrared)
    return out


class ModalityBN(nn.Module):
    """One BN slot: ``shared`` (a single BatchNorm2d) or ``split`` (one per modality)."""

    def __init__(self, num_features: int, choice: str = SHARED) -> None:
        super().__init__()
        if choice not in (SHARED, SPLIT):
            raise ValueError(f"slot choice must be 'shared' or 'split', got {choice!r}")
        self.choice = choice
        self.num_features = num_features
        if choice == SHARED:
            self.shared = nn.BatchNorm2d(num_features)
        else:
            self.visible = nn.BatchNorm2d(num_features)
            self.infrared = nn.BatchNorm2d(num_features)

    def branches(self) -> dict[str, nn.BatchNorm2d]:
        """The BNs this slot holds, by branch name (``shared`` or ``visible``/``infrared``)."""
        return dict(self.named_children())

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Normalise ``x``, each sample with its modality's BN when split."""
        if self.choice == SHARED:
            return self.shared(x)
        return route_split(x, routing, self.visible, self.infrared)

    def extra_repr(self) -> str:
        return f"{self.num_features}, {self.choice}"


NormFactory = Callable[[str, int], nn.Module]
"""Builds the norm layer for a slot: ``factory(slot_name, num_features)``."""


def find_slots(model: nn.Module) -> dict[str, nn.Module]:
    """The norm slots (modules with ``branches()``) of ``model``'s backbone by slot name (e.g.
    ``layer1.0.bn1``): a ResNet's in the order of :func:`~model.arch.slot_names` (registration
    puts a block's shortcut after its BNs), other modules' in registration order."""
    backbone = getattr(model, "backbone", model)
    modules = backbone.named_modules()
    found = {name: module for name, module in modules if name and hasattr(module, "branches")}
    if not hasattr(backbone, "depth"):
        return found
    return {name: found[name] for name in slot_names(backbone.depth) if name in found}
