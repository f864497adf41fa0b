"""Measuring: timed windows of steps, peak memory, and the machine the figures come from."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from utils.base.logger import environment
from utils.engine.build import select_device


def throughput(step: Callable[[int], Any], args: Any, steps: int, rounds: int) -> dict[str, Any]:
    """``--warmup`` untimed steps, then ``rounds`` timed windows of ``steps`` steps each
    (``args``: the benchmark's settings)."""
    cuda = select_device(args.device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    for index in range(args.warmup):
        step(index)
    windows = []
    for first in range(args.warmup, args.warmup + rounds * steps, steps):
        sync()
        started = time.perf_counter()
        for index in range(first, first + steps):
            step(index)
        sync()
        windows.append(time.perf_counter() - started)
    images = 2 * args.batch_size * steps
    return {
        "images_per_s": round(images / min(windows), 2),
        "step_s": round(min(windows) / steps, 5),
        "images_per_s_per_round": [round(images / window, 2) for window in windows],
    }


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; returns whether it really restarted."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: "5" resets the peak resident set size to the current one.
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device, windowed: bool) -> dict[str, Any]:
    """The peak memory since :func:`reset_peak_memory` in MiB, and how it was measured."""
    if device.type == "cuda":
        peak, how = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        how = "max RSS of the process" + (" during this path" if windowed else " since start")
    return {"peak_memory_mb": round(peak / 2**20, 1), "memory": how}


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    """``function()`` and the seconds it took."""
    started = time.perf_counter()
    return function(), time.perf_counter() - started


def best_of(rounds: int, function: Callable[[], Any]) -> tuple[Any, float]:
    """``function()``'s result and its fastest time over ``rounds`` calls."""
    return min((timed(function) for _ in range(rounds)), key=lambda run: run[1])


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info = environment(device)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line]
    info["cpu"] = names[0] if names else platform.processor() or platform.machine()
    info.update(device_type=device.type, device=info.get("gpu", info["cpu"]))
    info.update(cpu_count=os.cpu_count(), platform=platform.platform())
    info["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return info
