"""Rebuild the network a checkpoint was trained with (this project's or the authors') and load it.

The authors' checkpoints carry no architecture, class count or last stride: their ``config.cfg``
is needed, the classifier gives the class count and the caller the last stride (default 1).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from model.arch import Arch, arch_from_dict, load_arch
from model.checkpoint import SEARCH_KEY, is_authors_checkpoint, read_checkpoint, stored_integer
from model.net import CMNASNet, build_model
from model.weights import load_checkpoint
from utils.base.errors import UserError

log = logging.getLogger(__name__)
# The paper's image size (height, width); the authors' checkpoints carry none and use it.
DEFAULT_IMG_SIZE = (256, 128)


@dataclass
class Restored:
    """A network rebuilt from a checkpoint, with what it was rebuilt from."""

    model: CMNASNet
    arch: Arch
    num_classes: int
    last_stride: int
    authors: bool
    checkpoint: dict[str, Any]
    img_size: tuple[int, int] = DEFAULT_IMG_SIZE


def slot_difference(given: Arch, stored: Arch) -> str:
    """The slots where two architectures differ, for error messages."""
    if given.depth != stored.depth:
        return f"ResNet-{given.depth} vs ResNet-{stored.depth}"
    differ = [name for name in stored.slots if given.slots[name] != stored.slots[name]]
    shown = ", ".join(f"{n} ({given.slots[n]} vs {stored.slots[n]})" for n in differ[:4])
    return f"{len(differ)} slot(s): {shown}{', ...' if len(differ) > 4 else ''}"


def model_from_checkpoint(
    weights: str | os.PathLike[str],
    checkpoint: Mapping[str, Any] | None = None,
    config_path: str | os.PathLike[str] | None = None,
    last_stride: int | None = None,
    ema: bool = False,
) -> Restored:
    """Rebuild and load the network of checkpoint file ``weights`` (already read: ``checkpoint``).

    ``config_path``, needed for the authors' checkpoints, must match this project's stored
    architecture; ``last_stride`` overrides the stored one; ``ema`` loads the EMA weights.
    """
    if checkpoint is None:
        checkpoint = read_checkpoint(weights)
    checkpoint = dict(checkpoint)
    authors = is_authors_checkpoint(checkpoint)
    if authors:
        if not config_path:
            raise UserError(
                f"--weights {weights}: an authors' checkpoint needs "
                "--config_path (their config.cfg)"
            )
        arch = load_arch(config_path)
        classifier = checkpoint["model"].get("module.classifier.weight")
        if not isinstance(classifier, torch.Tensor) or classifier.dim() != 2:
            raise UserError(f"--weights {weights}: no module.classifier.weight matrix")
        num_classes, stride = int(classifier.shape[0]), last_stride or 1
    else:
        if isinstance(checkpoint.get(SEARCH_KEY), dict):
            raise UserError(
                f"--weights {weights}: a search checkpoint (a supernet); train its "
                "arch.json with train.py and use that checkpoint"
            )
        for key in ("arch", "num_classes"):
            if key not in checkpoint:
                raise UserError(f"--weights {weights}: checkpoint has no '{key}' entry")
        arch = arch_from_dict(checkpoint["arch"], f"{weights} (architecture)")
        if config_path:
            given = load_arch(config_path)
            if given.slots != arch.slots:
                raise UserError(
                    f"--config_path {config_path} differs from the architecture stored in "
                    f"{weights} in {slot_difference(given, arch)} (config vs checkpoint); "
                    "leave --config_path out for this project's checkpoints"
                )
        num_classes = stored_integer(checkpoint["num_classes"], "num_classes", weights, 1)
        stored_stride = checkpoint.get("last_stride", 1)
        stride = last_stride or stored_integer(stored_stride, "last_stride", weights, 1, 2)
    model = build_model(arch, num_classes, stride)
    load_checkpoint(model, checkpoint, ema=ema, source=str(weights))
    log.info("model: %s, %d classes, last stride %d", arch.summary(), num_classes, stride)
    # The (height, width) it was trained at: the stored size, else the paper's.
    trained = checkpoint.get("args") if not authors else None
    trained = trained if isinstance(trained, Mapping) else {}
    height, width = (
        stored_integer(trained.get(flag) or fallback, flag, weights, 1)
        for flag, fallback in zip(("img_h", "img_w"), DEFAULT_IMG_SIZE, strict=True)
    )
    return Restored(model, arch, num_classes, stride, authors, checkpoint, (height, width))
