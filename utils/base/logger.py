"""Logging set-up and the run header (arguments, git commit, versions, device)."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(log_file: Path | None = None, rank: int = 0) -> None:
    """Log INFO to stderr (rank 0 only) and, when given, to ``log_file``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(console)
    if log_file is not None and rank == 0:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)


def git_commit() -> str:
    """The commit of the code being run, or ``unknown`` outside a git checkout."""
    try:
        sha = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def _git(*args: str) -> str:
    """The stripped output of ``git ARGS`` run in this code's folder."""
    here = Path(__file__).resolve().parent
    done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=here)
    return done.stdout.strip()


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and device of this run, for the log and checkpoints."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "device": str(device),
        "commit": git_commit(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def log_run_header(options: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Log every option (sorted by name) and the environment; return the environment."""
    log = logging.getLogger("run")
    log.info("command: %s", " ".join(sys.argv))
    for key, value in sorted(options.items()):
        log.info("  %s: %s", key, value)
    env = environment(device)
    log.info("environment: %s", json.dumps(env))
    return env


def append_json_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON record as a line (the per-epoch log)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
