"""``--resume CKPT`` alone continues a run: the options stored in the checkpoint become defaults.

    python train.py --resume runs/x/checkpoint_latest.pth             # the run's own options
    python train.py --resume runs/x/checkpoint_latest.pth --epochs 200  # one of them changed

Every option the checkpoint recorded (``args``) is the default of its flag, so a flag given
beside ``--resume`` overrides it (and the resume check warns of the change, as before). Where a
run goes (``--save``, ``--note``, ``--overwrite``) is never taken over, and an option that
takes effect only with another (``--k1`` needs ``--rerank``, ``--ema_overwrite_every`` an EMA)
is taken over only with it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from model.checkpoint import safe_load

# Options that say where this invocation runs, not what the run is.
NOT_TAKEN_OVER = frozenset({"resume", "save", "note", "overwrite"})
# Options taken over only when the stored run had the option they depend on switched on, and
# the command line does not set that option anew (its flags).
DEPENDS_ON = {
    "k1": "rerank",
    "k2": "rerank",
    "lambda_value": "rerank",
    "ema_overwrite_every": "ema_decay",
}
MASTER_FLAGS = {
    "rerank": ("--rerank",),
    "ema_decay": ("--ema_decay", "--ema_overwrite", "--no-ema_overwrite"),
}


def stored_options(path: str) -> dict[str, Any]:
    """The options a checkpoint of this project recorded (empty for any other file).

    Memory-mapped, so that the weights are not read; a file torch cannot load is reported in
    one line by :func:`model.checkpoint.safe_load`.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - safe_load names the problem in one line
        checkpoint = safe_load(path)
    stored = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    return dict(stored) if isinstance(stored, Mapping) else {}


def parse_resuming(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse ``argv``; with ``--resume CKPT``, the checkpoint's stored options are the defaults."""
    words = list(sys.argv[1:] if argv is None else argv)
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    probe.add_argument("--resume", default="")
    resume = probe.parse_known_args(words)[0].resume
    if resume and os.path.isfile(resume):
        stored = stored_options(resume)
        given = {word.split("=", 1)[0] for word in words if word.startswith("--")}
        defaults = {
            dest: value
            for dest, value in stored.items()
            if dest not in NOT_TAKEN_OVER and _takes_effect(dest, stored, given)
        }
        known = {action.dest: action for action in parser._actions}  # noqa: SLF001
        defaults = {dest: value for dest, value in defaults.items() if dest in known}
        parser.set_defaults(**defaults)
        for dest in defaults:
            known[dest].required = False
    return parser.parse_args(words)


def _takes_effect(dest: str, stored: Mapping[str, Any], given: set[str]) -> bool:
    """Whether the stored option ``dest`` still takes effect: the option it depends on was on
    and is not given anew (``given``: the flags written on the command line)."""
    master = DEPENDS_ON.get(dest)
    if master is None:
        return True
    return bool(stored.get(master)) and not given.intersection(MASTER_FLAGS[master])
