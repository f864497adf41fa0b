"""Walking the tensors a checkpoint holds: their names, and which are not finite or largest."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch


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


def largest_tensors(state: Mapping[str, Any], count: int = 3) -> list[str]:
    """The ``count`` floating-point tensors of ``state`` with the largest magnitude, described.

    Each as ``name (max |value| 1.2e+10)``, largest first: where to look when finite weights
    make the features overflow.
    """
    named = [(n, t) for n, t in named_tensors(state) if t.is_floating_point() and t.numel()]
    peaks = [(float(tensor.detach().abs().max()), name) for name, tensor in named]
    peaks.sort(key=lambda peak: -peak[0])
    return [f"{name} (max |value| {peak:.1e})" for peak, name in peaks[:count]]
