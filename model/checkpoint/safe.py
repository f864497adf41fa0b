"""Reading a PyTorch file safely: weights only, its kind sniffed first, every failure one line.

Every file is read with ``torch.load(..., weights_only=True)``: a file that carries arbitrary
pickled Python objects is refused, never executed. :func:`damaged_records` compares a file's
bytes with the checksums its zip archive stores.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from utils.base.errors import UserError

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
    """The records of a zip-format PyTorch file whose bytes differ from their stored CRC-32.

    ``torch.save`` writes a zip archive and stores a CRC-32 with every record: the pickled
    entries (``data.pkl``: every number, string and container, and each tensor's dtype and
    shape) and each tensor's data. ``torch.load`` does not compare them; this reads every
    record once and does (about 1 s per GB); ``tensor_data=False`` skips the tensor data (when
    the tensors have checksums of their own). None when the file stores no checksums (PyTorch's
    legacy format, or saved with CRC-32s turned off).
    """
    with open(path, "rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            return None
    try:
        with zipfile.ZipFile(path) as archive:
            records = [info for info in archive.infolist() if not info.is_dir()]
            if all(info.CRC == 0 for info in records if info.file_size):
                return None
            checked = [
                info
                for info in records
                if tensor_data or not info.filename.partition("/")[2].startswith("data/")
            ]
            damaged = [info for info in checked if not _intact(archive, info)]
            return [info.filename.partition("/")[2] for info in damaged]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as err:
        return [f"the archive's directory ({first_line(err)})"]


def _intact(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    """Whether one record reads back with the CRC-32 stored for it."""
    try:
        with archive.open(info) as record:
            while record.read(RECORD_CHUNK):
                pass
    except zipfile.BadZipFile:
        return False
    return True
