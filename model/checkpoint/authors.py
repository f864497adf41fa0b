"""The authors' checkpoints (``checkpointNNN.pth.tar``) in this project's key names.

They are dicts with ``epoch``, ``model``, ``ema`` and ``optimizer``; their keys carry a
``module.`` prefix and every slot holds three BNs (``visible_bn``, ``thermal_bn``,
``sharable_bn``) whatever the architecture: a split slot uses the first two, a shared slot the
third, and the unused ones are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from model.bn import find_slots
from model.checkpoint.ours import CHECKPOINT_FORMAT

# The authors' three BN names per slot, and ours.
AUTHOR_BRANCHES = {
    "visible_bn": "visible",
    "thermal_bn": "infrared",
    "sharable_bn": "shared",
}


def is_authors_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` is in the authors' layout (three BNs per slot, ``module.``)."""
    return checkpoint.get("format") != CHECKPOINT_FORMAT


def convert_authors_state(
    state: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename the authors' keys to ours and drop the BN branches ``model`` does not use.

    Any other key the model lacks is kept in the result, so that loading reports it as a
    mismatch instead of silently ignoring it.
    """
    own = model.state_dict()
    slots = find_slots(model)
    converted: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        name = key.removeprefix("module.")
        for theirs, ours in AUTHOR_BRANCHES.items():
            name = name.replace(f".{theirs}.", f".{ours}.")
        slot_path, _, _ = name.rpartition(".")
        slot, _, branch = slot_path.rpartition(".")
        unused_branch = (
            name not in own
            and branch in AUTHOR_BRANCHES.values()
            and slot.removeprefix("backbone.") in slots
        )
        if unused_branch:
            dropped.append(key)
        else:
            converted[name] = value
    return converted, dropped
