"""Reading a PyTorch file safely: weights only, its kind sniffed first, every failure one line.

Every file is read with ``torch.load(..., weights_only=True)``: a file that carries arbitrary
pickled Python objects is refused, never executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from utils.base.errors import UserError


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
            f"{path}: not a PyTorch checkpoint, or truncated/corrupt ({first_line(err)})"
        ) from None


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
