"""Checkpoint I/O: this project's checkpoint format, the authors' checkpoints, ImageNet weights.

Every file is read with ``torch.load(..., weights_only=True)``: a file that carries arbitrary
pickled Python objects is refused, never executed. A checkpoint therefore holds only tensors,
numbers, strings and plain containers (:func:`plain` makes sure of it).

This project's checkpoint is one dict:

* the header, written by :func:`checkpoint_header`, which lets ``test.py`` rebuild the network
  from the file alone: ``format`` (``"cmnas-checkpoint"``), ``version``, ``arch`` (the
  architecture JSON), ``num_classes``, ``last_stride`` and ``args`` (the run's options);
* the weights: ``model`` (the live weights, as trained; on an epoch that copies the EMA into
  them, the weights from before the copy) and ``ema`` (the EMA weights, or None without an
  EMA), both state dicts;
* what a resumed run needs besides (written by the training engine's run state): ``epoch``
  (epochs completed), ``step_in_epoch`` (steps of the next epoch already trained),
  ``global_step``, ``optimizer``, ``scheduler``, ``scaler``, ``rng`` (Python, NumPy and torch
  random states), ``aug_rng`` (the augmentation generator), ``environment`` (versions, device,
  commit), ``epoch_losses`` (loss sums of a partly trained epoch, only when ``step_in_epoch``
  is not 0), ``search`` (only in a search's checkpoints: see :data:`SEARCH_KEY`),
  ``ema_overwrite_pending`` (True when the EMA overwrite of the run's schedule follows this
  save: a resume applies it), ``random_by_rank`` (each process's random states in a
  multi-process run) and ``checksum`` (a CRC-32 of every tensor, checked on reading).

The authors' checkpoints (``checkpointNNN.pth.tar``) are dicts with ``epoch``, ``model``, ``ema``
and ``optimizer``; their keys carry a ``module.`` prefix and every slot holds three BNs
(``visible_bn``, ``thermal_bn``, ``sharable_bn``) whatever the architecture.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.arch import Arch
from model.bn import find_slots
from utils.base.errors import UserError
from utils.base.io import write_atomic

log = logging.getLogger(__name__)

# torchvision's ImageNet files; ResNet-50 is the one the authors' published numbers started from.
IMAGENET_URLS = {
    18: "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    34: "https://download.pytorch.org/models/resnet34-b627a593.pth",
    50: "https://download.pytorch.org/models/resnet50-19c8e357.pth",
}
CHECKPOINT_FORMAT = "cmnas-checkpoint"
CHECKPOINT_VERSION = 1
# The entry holding a CRC-32 of the checkpoint's tensors (see write_checkpoint).
CHECKSUM_KEY = "checksum"
# The entry a search adds to its checkpoints (the alphas' optimizer, the identity split, ...);
# such a checkpoint holds a supernet, which test.py cannot score.
SEARCH_KEY = "search"
# The authors' three BN names per slot, and ours.
_AUTHOR_BRANCHES = {"visible_bn": "visible", "thermal_bn": "infrared", "sharable_bn": "shared"}
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


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
            text += f", dropped {len(self.dropped)} unused ({_summarize_keys(self.dropped)})"
        return text


def _summarize_keys(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def safe_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` with ``weights_only=True``, turning every failure into one clear line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    with open(path, "rb") as handle:
        head = handle.read(4)
    # torch.save writes a zip archive; files from before PyTorch 1.6 start with a pickle opcode.
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise UserError(f"{path}: not a PyTorch checkpoint (unrecognised file contents)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure becomes one line for the user
        message = str(err)
        if "Unsupported global" in message or "unsupported GLOBAL" in message:
            raise UserError(
                f"{path}: refused: the file holds pickled Python objects other than tensors and "
                "plain containers, which could run code when loaded (only weights are accepted)"
            ) from None
        raise UserError(
            f"{path}: not a PyTorch checkpoint, or truncated/corrupt ({_first_line(err)})"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _assign(
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
            f"{_summarize_keys(slots, 6)} (a checkpoint of a different architecture or depth?)"
        )
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
        for key in own
        if key in state and tuple(state[key].shape) != tuple(own[key].shape)
    ]
    if mismatched:
        raise UserError(
            f"{source}: shape mismatch (checkpoint vs model): {_summarize_keys(mismatched, 2)}"
            " (a different class count or architecture?)"
        )
    extra = [key for key in state if key not in own]
    if extra:
        parts = sorted({_owner(key) for key in extra})
        raise UserError(
            f"{source}: does not fit this model: weights for {len(parts)} part(s) the model "
            f"does not have: {_summarize_keys(parts, 6)} (a checkpoint of a different "
            "architecture or depth?)"
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
                f"cannot download ImageNet weights ({_first_line(err)}): place {url} at "
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
        if slot in slots and tensor_name in _BN_TENSORS:
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
    backbone_state = mapped
    return _assign(
        model, backbone_state, source, "torchvision ImageNet", dropped, strict_head=False
    )


def plain(value: Any) -> Any:
    """``value`` with str/int/float subclasses (e.g. ``torch.__version__``) made plain.

    ``torch.load(..., weights_only=True)`` refuses such subclasses, so everything stored in a
    checkpoint besides tensors goes through this.
    """
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {plain(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is a plain JSON-like value that weights-only loading accepts."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain(item) for item in value)
    return False


def checkpoint_header(
    arch: Arch, num_classes: int, last_stride: int, args: Mapping[str, Any]
) -> dict[str, Any]:
    """The fields that let ``test.py`` rebuild the model from the checkpoint alone."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": plain(arch.to_dict()),
        "num_classes": num_classes,
        "last_stride": last_stride,
        "args": {key: plain(value) for key, value in args.items() if _is_plain(value)},
    }


def named_tensors(value: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested checkpoint value, named by its path (``model.bnneck.weight``).

    Dicts are walked in key order and lists in index order, so the order is fixed for a
    given checkpoint.
    """
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            yield from named_tensors(value[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from named_tensors(item, f"{prefix}.{index}" if prefix else str(index))


def non_finite_tensors(checkpoint: Mapping[str, Any]) -> list[str]:
    """The names of the floating-point tensors in ``checkpoint`` holding a NaN or infinity.

    Weights, BN statistics, EMA and optimizer state alike: one such value makes the whole
    checkpoint unusable. The test runs on each tensor's own device, with one read-back.
    """
    named = [(n, t) for n, t in named_tensors(checkpoint) if t.is_floating_point() and t.numel()]
    if not named:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for index, (_, tensor) in enumerate(named):
        by_device.setdefault(tensor.device, []).append(index)
    bad: list[int] = []
    for indices in by_device.values():
        flags = torch.stack([named[i][1].detach().isfinite().all() for i in indices]).cpu()
        bad += [i for i, finite in zip(indices, flags.tolist(), strict=True) if not finite]
    return [named[i][0] for i in sorted(bad)]


def tensor_checksums(checkpoint: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``[CRC-32 of the bytes, dtype, shape]`` of every tensor in ``checkpoint``, by name.

    The bytes are read on the CPU, so the values do not depend on the device the tensors were
    saved from (about 1 s per GB).
    """
    sums = {}
    for name, tensor in named_tensors(checkpoint):
        if name.split(".")[0] == CHECKSUM_KEY:
            continue
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        sums[name] = [zlib.crc32(data.numpy().data), str(tensor.dtype), list(tensor.shape)]
    return sums


def write_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save`` ``checkpoint`` to ``path`` atomically (a kill leaves the old or the new).

    A checkpoint of this project gets a checksum of each tensor, which
    :func:`read_checkpoint` verifies.
    """
    if checkpoint.get("format") == CHECKPOINT_FORMAT:
        checksum = {"algorithm": "crc32", "tensors": tensor_checksums(checkpoint)}
        checkpoint = {**checkpoint, CHECKSUM_KEY: checksum}
    write_atomic(path, lambda handle: torch.save(checkpoint, handle))


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Safely read a checkpoint file of this project or the authors' and check it is one.

    The tensors of a checkpoint with stored checksums are verified; files from before
    checksums load as they are.
    """
    data = safe_load(path)
    if not isinstance(data, dict) or "model" not in data or not isinstance(data["model"], dict):
        raise UserError(
            f"{path}: not a training checkpoint (expected a dict with a 'model' state dict)"
        )
    damaged = damaged_tensors(data)
    if damaged:
        raise UserError(
            f"{path}: corrupt checkpoint: {len(damaged)} tensor(s) differ from the checksums "
            f"saved with them ({_summarize_keys(damaged, 2)}); the file was damaged on disk or "
            "in a copy (a checkpoint edited on purpose loads once its 'checksum' entry is "
            "deleted)"
        )
    return data


def damaged_tensors(checkpoint: Mapping[str, Any]) -> list[str]:
    """The tensors of ``checkpoint`` whose bytes differ from the checksums stored at saving.

    A tensor removed since, or with another dtype or shape (an edit, not damage), is not
    compared.
    """
    stored = checkpoint.get(CHECKSUM_KEY)
    if not isinstance(stored, dict) or stored.get("algorithm") != "crc32":
        return []
    saved = stored.get("tensors") or {}
    return [
        name
        for name, (crc, dtype, shape) in tensor_checksums(checkpoint).items()
        if name in saved and saved[name][1:] == [dtype, shape] and saved[name][0] != crc
    ]


def is_authors_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` is in the authors' layout (three BNs per slot, ``module.``)."""
    return checkpoint.get("format") != CHECKPOINT_FORMAT


def is_resumable(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` is this project's and holds the optimizer state a resume needs."""
    return checkpoint.get("format") == CHECKPOINT_FORMAT and "optimizer" in checkpoint


def is_search_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` was written by a search (its ``model`` is a supernet)."""
    return isinstance(checkpoint.get(SEARCH_KEY), dict)


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
        for theirs, ours in _AUTHOR_BRANCHES.items():
            name = name.replace(f".{theirs}.", f".{ours}.")
        slot_path, _, _ = name.rpartition(".")
        slot, _, branch = slot_path.rpartition(".")
        unused_branch = (
            name not in own
            and branch in _AUTHOR_BRANCHES.values()
            and slot.removeprefix("backbone.") in slots
        )
        if unused_branch:
            dropped.append(key)
        else:
            converted[name] = value
    return converted, dropped


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
        return _assign(model, converted, source, "authors'", dropped)
    return load_state(model, state, source)


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> LoadReport:
    """Load a state dict of this project's layout into ``model``, every key and shape checked."""
    state = {key.removeprefix("module."): value for key, value in state.items()}
    return _assign(model, state, source, "cmnas", [])
