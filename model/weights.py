"""Loading weights into a network: this project's checkpoints, the authors' (``module.`` prefix,
three BNs per slot) and torchvision's ImageNet files, the last two renamed to this project's keys.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.bn import find_slots
from model.checkpoint import (
    first_line,
    is_authors_checkpoint,
    non_finite_tensors,
    read_checkpoint,
    safe_load,
    summarize_keys,
)
from utils.base.errors import UserError

log = logging.getLogger(__name__)

# The authors' three BN names per slot, and ours.
AUTHOR_BRANCHES = {"visible_bn": "visible", "thermal_bn": "infrared", "sharable_bn": "shared"}
# torchvision's ImageNet files; ResNet-50 is the one the authors' published numbers started from.
IMAGENET_URLS = {
    18: "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    34: "https://download.pytorch.org/models/resnet34-b627a593.pth",
    50: "https://download.pytorch.org/models/resnet50-19c8e357.pth",
}
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


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


def assign(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    layout: str,
    dropped: list[str],
    backbone_only: bool = False,
) -> LoadReport:
    """Copy ``state`` (in this project's key names) into ``model``; anything missing, extra or
    mis-shaped, or NaN or infinite, fails naming the parts before any tensor is copied.
    ``backbone_only``: ImageNet weights, so the head and the alphas keep their own values."""
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    if backbone_only:
        missing = [
            key
            for key in missing
            if not key.startswith(("bnneck.", "classifier.")) and not key.endswith(".alpha")
        ]
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


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> LoadReport:
    """Load a state dict of this project's layout into ``model``, every key and shape checked."""
    state = {key.removeprefix("module."): value for key, value in state.items()}
    return assign(model, state, source, "cmnas", [])


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str] | Mapping[str, Any],
    ema: bool = False,
    source: str | None = None,
) -> LoadReport:
    """Load this project's or the authors' checkpoint into ``model`` (live or ``ema`` weights);
    ``path`` is a file or an already-read checkpoint dict (``source`` names it in messages)."""
    if isinstance(path, Mapping):
        checkpoint, source = path, source or "checkpoint"
    else:
        checkpoint, source = read_checkpoint(path), source or str(path)
    state = checkpoint["model"]
    if ema:
        state = checkpoint.get("ema")
        if not isinstance(state, dict) or not state:
            raise UserError(f"{source}: --ema asked for, but the checkpoint holds no EMA weights")
    if is_authors_checkpoint(checkpoint):
        converted, dropped = convert_authors_state(state, model)
        return assign(model, converted, source, "authors'", dropped)
    return load_state(model, state, source)


def convert_authors_state(
    state: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename the authors' keys to ours and drop the BN branches ``model`` does not use (any
    other key it lacks stays, for :func:`assign` to report)."""
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


def _imagenet_state(depth: int, pretrained: str) -> tuple[dict[str, torch.Tensor], str]:
    """Torchvision-layout ImageNet weights and their source: a file, or for ``"imagenet"``
    torchvision's, downloaded once into torch's hub cache (``<hub>/checkpoints``)."""
    if pretrained.lower() != "imagenet":
        state = safe_load(pretrained)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UserError(f"{pretrained}: expected a state dict in torchvision's ResNet layout")
        return state, pretrained
    url = IMAGENET_URLS[depth]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        part = cached.with_suffix(".part")
        try:
            torch.hub.download_url_to_file(url, str(part), progress=True)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            part.unlink(missing_ok=True)
            raise UserError(
                f"cannot download ImageNet weights ({first_line(err)}): place {url} at "
                f"{cached} or pass --pretrained PATH or --pretrained none"
            ) from None
        os.replace(part, cached)
    return safe_load(cached), str(cached)


def load_imagenet(model: nn.Module, pretrained: str | None) -> LoadReport | None:
    """Initialise ``model`` from torchvision-layout ResNet weights: ``"imagenet"`` or a path
    (None or ``"none"``: nothing to load). Each BN initialises every branch of its slot."""
    if pretrained is None or str(pretrained).lower() == "none":
        return None
    state, source = _imagenet_state(model.backbone.depth, str(pretrained))
    state = {key.removeprefix("module."): value for key, value in state.items()}
    slots = find_slots(model)
    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        name = re.sub(r"\.downsample\.0\.", ".downsample.conv.", key)
        name = re.sub(r"\.downsample\.1\.", ".downsample.bn.", name)
        slot, _, tensor_name = name.rpartition(".")
        if slot in slots and tensor_name in BN_TENSORS:
            for branch in slots[slot].branches():
                mapped[f"backbone.{slot}.{branch}.{tensor_name}"] = value
        elif name.startswith("fc."):
            dropped.append(key)
        else:
            mapped[f"backbone.{name}"] = value
    # Files saved before PyTorch 0.4 (like the authors' ResNet-50) lack num_batches_tracked.
    for key in model.state_dict():
        if key.startswith("backbone.") and key.endswith(".num_batches_tracked"):
            mapped.setdefault(key, torch.zeros((), dtype=torch.long))
    return assign(model, mapped, source, "torchvision ImageNet", dropped, backbone_only=True)
