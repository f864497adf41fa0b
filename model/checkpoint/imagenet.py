"""ImageNet initialisation from torchvision-layout ResNet weights: downloaded or a local file.

``"imagenet"`` downloads torchvision's file into torch's hub cache (``<hub>/checkpoints``) once;
an offline machine places the file there or passes its path. Each BN's parameters and statistics
initialise every branch of its slot; the ImageNet classifier ``fc`` is dropped.
"""

from __future__ import annotations

import os
import re
import urllib.error
from pathlib import Path

import torch
from torch import nn

from model.bn import find_slots
from model.checkpoint.assign import LoadReport, assign
from model.checkpoint.safe import first_line, safe_load
from utils.base.errors import UserError

# torchvision's ImageNet files; ResNet-50 is the one the authors' published numbers started from.
IMAGENET_URLS = {
    18: "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    34: "https://download.pytorch.org/models/resnet34-b627a593.pth",
    50: "https://download.pytorch.org/models/resnet50-19c8e357.pth",
}
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _imagenet_state(depth: int, pretrained: str) -> tuple[dict[str, torch.Tensor], str]:
    """Fetch (or read) torchvision-layout ImageNet weights; return them and their source."""
    pretrained = str(pretrained)
    if pretrained.lower() != "imagenet":
        state = safe_load(pretrained)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UserError(f"{pretrained}: expected a state dict in torchvision's ResNet layout")
        return state, str(pretrained)
    url = IMAGENET_URLS[depth]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(cached.with_suffix(".part")), progress=True)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            Path(cached.with_suffix(".part")).unlink(missing_ok=True)
            raise UserError(
                f"cannot download ImageNet weights ({first_line(err)}): place {url} at "
                f"{cached} or pass --pretrained PATH or --pretrained none"
            ) from None
        os.replace(cached.with_suffix(".part"), cached)
    return safe_load(cached), str(cached)


def load_imagenet(model: nn.Module, pretrained: str) -> LoadReport:
    """Initialise ``model`` from torchvision-layout ResNet weights (``"imagenet"`` or a path).

    Each BN's ImageNet parameters and statistics initialise every branch of its slot; the
    ImageNet classifier ``fc`` is dropped; the head keeps its own initialisation.
    """
    depth = model.backbone.depth
    state, source = _imagenet_state(depth, pretrained)
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
    return assign(model, mapped, source, "torchvision ImageNet", dropped, strict_head=False)
