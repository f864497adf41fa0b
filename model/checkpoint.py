"""Checkpoint files: reading any PyTorch file safely, and this project's checkpoint format.

Every file is read with ``torch.load(..., weights_only=True)``: pickled Python objects other than
tensors and plain values are refused, never executed. A checkpoint of this project is one dict:

* the header (:func:`checkpoint_header`), from which ``test.py`` rebuilds the network: ``format``
  (``"cmnas-checkpoint"``), ``version``, ``arch``, ``num_classes``, ``last_stride``, ``args``;
* ``model`` (the live weights; on an epoch that copies the EMA into them, those from before the
  copy) and ``ema`` (the EMA weights, or None), both state dicts;
* what a resume needs (written by the engine's run state): ``epoch``, ``step_in_epoch``,
  ``global_step``, ``optimizer``, ``scheduler``, ``scaler``, ``rng``, ``aug_rng``,
  ``environment``, ``epoch_losses`` (only when ``step_in_epoch`` is not 0), ``search`` (only a
  search's: see :data:`SEARCH_KEY`), ``ema_overwrite_pending`` (a resume applies the EMA
  overwrite this save preceded), ``random_by_rank`` (each process's random states);
* ``checksum``: a CRC-32 of every tensor, checked on reading.

Reading also checks every record of the zip archive against its CRC-32 (a legacy-format file has
none and loads unverified). The authors' checkpoints (no ``format`` entry) read the same way.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from model.arch import Arch
from utils.base.errors import UserError
from utils.base.io import write_atomic

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cmnas-checkpoint"
CHECKPOINT_VERSION = 1
CHECKSUM_KEY = "checksum"
# The entry a search adds to its checkpoints (the alphas' optimizer, the identity split, ...);
# such a checkpoint holds a supernet, which test.py cannot score.
SEARCH_KEY = "search"
# How a damaged pickled record is named in messages.
PICKLED_RECORD = "data.pkl (every entry but the tensor data)"
# The newest checkpoint of a run folder (what --weights RUN_DIR most likely meant).
RUN_LATEST = "checkpoint_latest.pth"
# Bytes read at a time when checking a record's CRC-32.
RECORD_CHUNK = 1 << 20


def safe_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` with ``weights_only=True``, turning every failure into one clear line."""
    path = Path(path)
    if path.is_dir():
        latest = path / RUN_LATEST
        hint = f"; did you mean {latest}?" if latest.is_file() else ""
        raise UserError(f"{path}: a folder, not a checkpoint file{hint}")
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
            f"{path}: not a PyTorch checkpoint, or truncated/corrupt ({first_line(err)})"
        ) from None


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def damaged_records(path: str | os.PathLike[str], tensor_data: bool = True) -> list[str] | None:
    """The records of a zip-format PyTorch file whose bytes differ from their stored CRC-32
    (which ``torch.load`` never compares), None when it stores none; ``tensor_data=False`` skips
    the tensor data (when the tensors have checksums of their own)."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            return None
    damaged = []
    try:
        with zipfile.ZipFile(path) as archive:
            records = [info for info in archive.infolist() if not info.is_dir()]
            if all(info.CRC == 0 for info in records if info.file_size):
                return None
            for info in records:
                name = info.filename.partition("/")[2]
                if not tensor_data and name.startswith("data/"):
                    continue
                try:  # reading a record to its end compares it with its CRC-32
                    with archive.open(info) as record:
                        while record.read(RECORD_CHUNK):
                            pass
                except zipfile.BadZipFile:
                    damaged.append(name)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as err:
        return [f"the archive's directory ({first_line(err)})"]
    return damaged


def summarize_keys(keys: list[str], limit: int = 3) -> str:
    """The first ``limit`` keys, then how many more, for one-line messages."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def named_tensors(value: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested checkpoint value, named by its path (``model.bnneck.weight``),
    dicts in sorted key order."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            yield from named_tensors(value[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from named_tensors(item, f"{prefix}.{index}" if prefix else str(index))


def _float_tensors(value: Any) -> list[tuple[str, torch.Tensor]]:
    """The non-empty floating-point tensors of a nested value, by name."""
    return [(n, t) for n, t in named_tensors(value) if t.is_floating_point() and t.numel()]


def non_finite_tensors(checkpoint: Mapping[str, Any]) -> list[str]:
    """The names of the floating-point tensors in ``checkpoint`` holding a NaN or infinity
    (tested on each tensor's device, with one read-back per device)."""
    named = _float_tensors(checkpoint)
    finite = [True] * len(named)
    for device in {tensor.device for _, tensor in named}:
        indices = [i for i, (_, tensor) in enumerate(named) if tensor.device == device]
        flags = torch.stack([named[i][1].detach().isfinite().all() for i in indices]).tolist()
        for index, flag in zip(indices, flags, strict=True):
            finite[index] = flag
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def largest_tensors(state: Mapping[str, Any], count: int = 3) -> list[str]:
    """The ``count`` floating-point tensors of ``state`` with the largest magnitude, largest
    first, each as ``name (max |value| 1.2e+10)``: where to look when features overflow."""
    peaks = [(float(t.detach().abs().max()), name) for name, t in _float_tensors(state)]
    peaks.sort(key=lambda peak: -peak[0])
    return [f"{name} (max |value| {peak:.1e})" for peak, name in peaks[:count]]


def plain(value: Any) -> Any:
    """``value`` with str/int/float subclasses (e.g. ``torch.__version__``), which weights-only
    loading refuses, made plain."""
    if isinstance(value, bool) or value is None:
        return value
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, dict):
        return {plain(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is a plain JSON-like value that weights-only loading accepts."""
    if isinstance(value, list | tuple):
        return all(_is_plain(item) for item in value)
    return value is None or isinstance(value, bool | int | float | str)


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


def is_authors_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` is in the authors' layout (three BNs per slot, ``module.``)."""
    return checkpoint.get("format") != CHECKPOINT_FORMAT


def is_resumable(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` is this project's and holds the optimizer state a resume needs."""
    return checkpoint.get("format") == CHECKPOINT_FORMAT and "optimizer" in checkpoint


def stored_integer(
    value: Any,
    name: str,
    source: str | os.PathLike[str],
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    """A number stored in checkpoint ``source`` (``name`` for messages) as an int: integral
    floats and digit strings are taken; anything else, or out of ``minimum``..``maximum``, fails."""
    number: int | None = None
    integral_float = isinstance(value, float) and value.is_integer()
    if integral_float or (isinstance(value, str) and value.strip().isdigit()):
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    low = minimum is not None and number is not None and number < minimum
    if number is None or low or (maximum is not None and number > maximum):
        expected = "an integer"
        if minimum is not None:
            expected += f" in {minimum}..{maximum}" if maximum is not None else f" >= {minimum}"
        raise UserError(
            f"{source}: the checkpoint's stored {name} is {value!r}, expected {expected} "
            "(an edited checkpoint?)"
        )
    return number


def tensor_checksums(checkpoint: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``[CRC-32 of the bytes, dtype, shape]`` of every tensor in ``checkpoint``, by name (read
    on the CPU, so the device the tensors were saved from does not matter)."""
    sums = {}
    for name, tensor in named_tensors(checkpoint):
        if name.split(".")[0] == CHECKSUM_KEY:
            continue
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        sums[name] = [zlib.crc32(data.numpy().data), str(tensor.dtype), list(tensor.shape)]
    return sums


def _stored_checksums(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The tensor checksums stored in ``checkpoint`` by name, or None when it has none."""
    stored = checkpoint.get(CHECKSUM_KEY)
    if not isinstance(stored, dict) or stored.get("algorithm") != "crc32":
        return None
    return stored.get("tensors") or {}


def damaged_tensors(checkpoint: Mapping[str, Any]) -> list[str]:
    """The tensors of ``checkpoint`` whose bytes differ from the checksums stored at saving
    (one removed since, or with another dtype or shape, is an edit and not compared)."""
    saved = _stored_checksums(checkpoint)
    if saved is None:
        return []
    return [
        name
        for name, (crc, dtype, shape) in tensor_checksums(checkpoint).items()
        if name in saved and saved[name][1:] == [dtype, shape] and saved[name][0] != crc
    ]


def write_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save`` ``checkpoint`` to ``path`` atomically; one of this project's gets a
    checksum of each tensor, which :func:`read_checkpoint` verifies."""
    if checkpoint.get("format") == CHECKPOINT_FORMAT:
        checksum = {"algorithm": "crc32", "tensors": tensor_checksums(checkpoint)}
        checkpoint = {**checkpoint, CHECKSUM_KEY: checksum}
    write_atomic(path, lambda handle: torch.save(checkpoint, handle))


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Safely read a checkpoint file of this project or the authors', verifying its tensors'
    checksums and its records' CRC-32s where it stores them."""
    data = safe_load(path)
    if not isinstance(data, dict) or "model" not in data or not isinstance(data["model"], dict):
        raise UserError(
            f"{path}: not a training checkpoint (expected a dict with a 'model' state dict)"
        )
    damaged = damaged_tensors(data)
    if damaged:
        raise UserError(
            f"{path}: corrupt checkpoint: {len(damaged)} tensor(s) differ from the checksums "
            f"saved with them ({summarize_keys(damaged, 2)}); the file was damaged on disk or "
            "in a copy (a checkpoint edited on purpose loads once its 'checksum' entry is "
            "deleted)"
        )
    records = damaged_records(path, tensor_data=_stored_checksums(data) is None)
    if records is None:
        log.info(
            "%s: the file stores no checksums (PyTorch's legacy format, or saved with CRC-32s "
            "turned off): its bytes are not verified",
            path,
        )
    elif records:
        named = [PICKLED_RECORD if name == "data.pkl" else name for name in records]
        raise UserError(
            f"{path}: corrupt checkpoint: {len(records)} record(s) of the file differ from the "
            f"CRC-32 stored with them ({summarize_keys(named, 2)}); the file was damaged on "
            "disk or in a copy"
        )
    return data
