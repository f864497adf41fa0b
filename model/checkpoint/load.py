"""Loading a checkpoint (this project's or the authors') into a model built for it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from model.checkpoint.assign import LoadReport, assign
from model.checkpoint.authors import convert_authors_state, is_authors_checkpoint
from model.checkpoint.ours import read_checkpoint
from utils.base.errors import UserError


def checkpoint_state(
    checkpoint: Mapping[str, Any], ema: bool, source: str
) -> Mapping[str, torch.Tensor]:
    """Pick the live or EMA state dict out of a checkpoint."""
    if not ema:
        return checkpoint["model"]
    state = checkpoint.get("ema")
    if not isinstance(state, dict) or not state:
        raise UserError(f"{source}: --ema asked for, but the checkpoint holds no EMA weights")
    return state


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str] | Mapping[str, Any],
    ema: bool = False,
    source: str | None = None,
) -> LoadReport:
    """Load this project's or the authors' checkpoint into ``model`` (live or ``ema`` weights).

    ``path`` is a file or an already-read checkpoint dict (then ``source`` names it in
    messages). Unused BN branches of the authors' files (every slot stored three BNs) are
    dropped and reported; anything missing or mis-shaped fails with the slots named.
    """
    if isinstance(path, Mapping):
        checkpoint, source = path, source or "checkpoint"
    else:
        checkpoint, source = read_checkpoint(path), source or str(path)
    state = checkpoint_state(checkpoint, ema, source)
    if is_authors_checkpoint(checkpoint):
        converted, dropped = convert_authors_state(state, model)
        return assign(model, converted, source, "authors'", dropped)
    return load_state(model, state, source)


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> LoadReport:
    """Load a state dict of this project's layout into ``model``, every key and shape checked."""
    state = {key.removeprefix("module."): value for key, value in state.items()}
    return assign(model, state, source, "cmnas", [])
