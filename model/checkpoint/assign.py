"""Copying a state dict (already in this project's key names) into a model, checking it fits.

Every load (ImageNet, the authors' checkpoints, ours) ends here: anything missing, extra or
mis-shaped, or any weight that is NaN or infinite, fails with the slots or tensors named before
any tensor is copied, and the load is reported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from model.checkpoint.tensors import non_finite_tensors
from utils.base.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What a weight load did: how many tensors it set and which keys it left unused."""

    source: str
    layout: str
    mapped: int = 0
    dropped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the log."""
        text = f"{self.source}: loaded {self.mapped} tensors ({self.layout} layout)"
        if self.dropped:
            text += f", dropped {len(self.dropped)} unused ({summarize_keys(self.dropped)})"
        return text


def summarize_keys(keys: list[str], limit: int = 3) -> str:
    """The first ``limit`` keys, then how many more, for one-line messages."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def assign(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    layout: str,
    dropped: list[str],
    strict_head: bool = True,
) -> LoadReport:
    """Copy ``state`` (already in this project's key names) into ``model``, checking it fits."""
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    if not strict_head:
        missing = [key for key in missing if not key.startswith(("bnneck.", "classifier."))]
    if missing:
        slots = sorted({_owner(key) for key in missing})
        raise UserError(
            f"{source}: does not fit this model: missing weights for {len(slots)} part(s): "
            f"{summarize_keys(slots, 6)} (a checkpoint of a different architecture or depth?)"
        )
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
        for key in own
        if key in state and tuple(state[key].shape) != tuple(own[key].shape)
    ]
    if mismatched:
        raise UserError(
            f"{source}: shape mismatch (checkpoint vs model): {summarize_keys(mismatched, 2)}"
            " (a different class count or architecture?)"
        )
    extra = [key for key in state if key not in own]
    if extra:
        parts = sorted({_owner(key) for key in extra})
        raise UserError(
            f"{source}: does not fit this model: weights for {len(parts)} part(s) the model "
            f"does not have: {summarize_keys(parts, 6)} (a checkpoint of a different "
            "architecture or depth?)"
        )
    non_finite = non_finite_tensors({key: state[key] for key in own if key in state})
    if non_finite:
        raise UserError(
            f"{source}: {len(non_finite)} tensor(s) hold NaN or infinity "
            f"({summarize_keys(non_finite, 4)}): weights of a run that diverged, or edited; "
            "they cannot be used"
        )
    with torch.no_grad():
        for key, tensor in own.items():
            if key in state:
                tensor.copy_(state[key])
    report = LoadReport(source, layout, mapped=sum(key in state for key in own), dropped=dropped)
    log.info(report.describe())
    return report


def _owner(key: str) -> str:
    """The slot or layer a state-dict key belongs to, for error messages."""
    parts = key.split(".")
    for branch in ("shared", "visible", "infrared"):
        if branch in parts:
            return ".".join(parts[: parts.index(branch)])
    return ".".join(parts[:-1])
