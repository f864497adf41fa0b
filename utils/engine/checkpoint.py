"""Checkpoints: atomic saves and the random states needed for an exact resume.

A checkpoint holds only tensors, numbers, strings and plain containers, so it loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from model.weights import CHECKPOINT_FORMAT
from utils.base.io import write_atomic

CHECKPOINT_VERSION = 1


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`utils.base.io.write_atomic`)."""
    write_atomic(path, lambda handle: torch.save(obj, handle))


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


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) random states as weights-only-loadable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "python_version": random.getstate()[0],
        "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured."""
    python = state["python"]
    random.setstate((state["python_version"], tuple(python[:-1]), python[-1]))
    gauss = state["numpy_gauss"]
    np.random.set_state(
        (
            "MT19937",
            state["numpy"].numpy().astype(np.uint32),
            state["numpy_pos"],
            gauss[0],
            gauss[1],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_header(
    arch: dict[str, Any], num_classes: int, last_stride: int, args: dict[str, Any]
) -> dict[str, Any]:
    """The fields that let ``test.py`` rebuild the model from the checkpoint alone."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": plain(arch),
        "num_classes": num_classes,
        "last_stride": last_stride,
        "args": {key: plain(value) for key, value in args.items() if _plain(value)},
    }


def _plain(value: Any) -> bool:
    """Whether ``value`` is a plain JSON-like value that weights-only loading accepts."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(item) for item in value)
    return False
