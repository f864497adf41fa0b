"""Parsing a command line that names a checkpoint: its plugins first, its options as defaults.

    python train.py --resume runs/x/checkpoint_latest.pth             # the run's own options
    python train.py --resume runs/x/checkpoint_latest.pth --epochs 200  # one of them changed

The parser is built after the plugins are imported (``--dataset`` choices and the loss-weight
flags come from the registries they add to): those the command line names with ``--plugin``,
else those the checkpoint recorded. With ``--resume CKPT`` every option the checkpoint recorded
(``args``) is the default of its flag, so a flag given beside ``--resume`` overrides it (and the
resume check warns of the change). Where a run goes (``--save``, ``--note``, ``--overwrite``) is
never taken over, and an option that takes effect only with another (``--k1`` needs
``--rerank``, ``--ema_overwrite_every`` an EMA) is taken over only with it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from model.checkpoint import safe_load
from utils.base.cli import load_plugins
from utils.base.errors import UserError

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


def parse_flags(
    make_parser: Callable[[], argparse.ArgumentParser],
    argv: Sequence[str] | None = None,
    checkpoint_flag: str = "--resume",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse ``argv`` into flag values, its plugins imported first (else those the checkpoint
    that ``checkpoint_flag`` names recorded); with ``--resume``, the stored options are the
    defaults. Returns the flag values and the checkpoint's stored options."""
    words = list(sys.argv[1:] if argv is None else argv)
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    probe.add_argument(checkpoint_flag, dest="path", default="")
    probe.add_argument("--plugin", action="append")
    known = probe.parse_known_args(words)[0]
    path, plugins = known.path, known.plugin
    resuming = checkpoint_flag == "--resume"
    try:
        stored = stored_options(path) if path and os.path.isfile(path) else {}
    except UserError:
        if resuming:
            raise
        stored = {}  # test.py: the checkpoint's own check names the problem, after the flags'
    recorded = stored.get("plugin")
    if plugins is not None:
        load_plugins(plugins)
    elif isinstance(recorded, list):
        load_plugins(recorded, source=path)
    parser = make_parser()
    if resuming and stored:
        given = {word.split("=", 1)[0] for word in words if word.startswith("--")}
        known = {action.dest: action for action in parser._actions}  # noqa: SLF001
        defaults = {
            dest: value
            for dest, value in stored.items()
            if dest not in NOT_TAKEN_OVER and dest in known and _takes_effect(dest, stored, given)
        }
        parser.set_defaults(**defaults)
        for dest in defaults:
            known[dest].required = False
    return vars(parser.parse_args(words)), stored


def _takes_effect(dest: str, stored: Mapping[str, Any], given: set[str]) -> bool:
    """Whether the stored option ``dest`` still takes effect: the option it depends on was on
    and is not given anew (``given``: the flags written on the command line)."""
    master = DEPENDS_ON.get(dest)
    if master is None:
        return True
    return bool(stored.get(master)) and not given.intersection(MASTER_FLAGS[master])
