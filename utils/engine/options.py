"""The parsers of train.py, search.py, test.py and the checkpoint tools, generated from the
declared settings, and the step from a command line to settings: the checks that look outside the
values (files, the device, the data set's folder), the run folder's name, and the options a
checkpoint recorded, which are the defaults on ``--resume``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from data.registry import get_dataset
from model.checkpoint import safe_load
from utils.base.cli import add_flags, build, load_plugins, options
from utils.base.errors import UserError
from utils.engine.build import check_data_root, select_device
from utils.engine.eval_settings import (
    CHECKPOINT,
    DATA,
    DEVICE,
    EVALUATION,
    SEARCH,
    TRAIN_GROUPS,
    CheckpointSettings,
    DataSettings,
    EvalSettings,
    TestSettings,
)
from utils.engine.settings import SearchSettings, TrainSettings

__all__ = ["HelpFormatter", "checkpoint_parser", "data_parser", "parse_flags", "select_device"]

log = logging.getLogger(__name__)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already explains it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        empty = action.default in (None, "", False, argparse.SUPPRESS) or action.default == []
        if "default" in text or empty:
            return text
        return super()._get_help_string(action) or text


def command_parser(
    description: str, settings: type, groups: Sequence[str | None], **context: str
) -> argparse.ArgumentParser:
    """A command's parser: the flags of ``settings`` in ``groups`` (None: its own options)."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=description, formatter_class=HelpFormatter
    )
    add_flags(parser, options(settings), groups, **context)
    return parser


def train_parser(description: str, search: bool = False) -> argparse.ArgumentParser:
    """The parser of train.py (``search``: of search.py, with the search's own flags)."""
    groups = (*TRAIN_GROUPS, SEARCH, None) if search else (*TRAIN_GROUPS, None)
    return command_parser(description, TrainSettings, groups)


def test_parser(description: str) -> argparse.ArgumentParser:
    """The parser of test.py: data, evaluation, the checkpoint, the protocols and outputs."""
    groups = (DATA, DEVICE, EVALUATION, CHECKPOINT, None)
    return command_parser(description, TestSettings, groups, use="evaluate")


def data_parser() -> argparse.ArgumentParser:
    """The flags every data tool shares: data, image size, device and evaluation."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_flags(parser, options(DataSettings) + options(EvalSettings), (DATA, DEVICE, EVALUATION))
    return parser


def checkpoint_parser(use: str) -> argparse.ArgumentParser:
    """The flags of every tool that reads a trained checkpoint; ``use`` is what it does with it."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_flags(parser, options(CheckpointSettings), (CHECKPOINT,), use=use)
    return parser


# ----- from the flags to the settings ---------------------------------------------------------
def check_data(data: DataSettings) -> None:
    """Refuse an image size the network cannot take; name what ``--data_root`` should hold when
    it is not a folder at all."""
    height, width = data.img_size
    if height < 32 or width < 16:
        raise UserError(f"--img_h/--img_w {height}x{width}: expected at least 32x16")
    if not os.path.isdir(data.data_root):
        check_data_root(data.dataset, data.data_root, data.trial)


def training_settings(values: Mapping[str, Any]) -> TrainSettings:
    """The settings of train.py's flag values, every value checked, the files named too."""
    trial = 1 if values["trial"] is None else values["trial"]
    data = build(DataSettings, values, trial=trial)
    settings = build(TrainSettings, values, data=data, folder=_folder(values))
    pretrained = str(settings.pretrained)
    if pretrained.lower() not in ("imagenet", "none") and not os.path.isfile(pretrained):
        raise UserError(
            f"--pretrained {pretrained}: file not found (expected imagenet, none or a "
            "torchvision-layout ResNet state-dict file)"
        )
    resume = settings.resume
    if resume and not os.path.isfile(resume):
        what = "is a folder, not a file" if os.path.isdir(resume) else "file not found"
        raise UserError(f"--resume {resume}: checkpoint {what}")
    get_dataset(data.dataset).check_trial(trial, testing=False)
    select_device(settings.evaluation.device)
    check_data(data)
    return settings


def _folder(values: Mapping[str, Any]) -> Path:
    """``--save/--note``; on ``--resume`` without ``--note``, the checkpoint's folder."""
    if values["resume"] and not values["note"]:
        return Path(values["resume"]).parent
    stem = Path(values["config_path"]).stem if values["config_path"] else "train"
    return Path(values["save"]) / (values["note"] or _run_name(values, "train", stem))


def _run_name(values: Mapping[str, Any], kind: str, middle: str) -> str:
    """A new run's default folder name: what it is, on which data and split, with which seed."""
    dataset = get_dataset(values["dataset"])
    split = 1 if values["trial"] is None else values["trial"]
    trial = f"_trial{split}" if dataset.num_splits > 1 else ""
    return f"{kind}_{dataset.name}{trial}_{middle}_seed{values['seed']}"


def search_settings(values: Mapping[str, Any]) -> SearchSettings:
    """The settings of search.py's flag values, every value checked."""
    # The search never overwrites (see SearchSettings): the flag contradicts it.
    every = values["ema_overwrite_every"]
    if every:
        raise UserError(
            f"--ema_overwrite_every {every}: the search never copies the EMA into the supernet "
            "(it would reset the alphas)"
        )
    if not values["note"] and not values["resume"]:  # a resume without --note stays in its folder
        middle = f"r{values['depth']}_{values['relaxation']}"
        values = {**values, "note": _run_name(values, "search", middle)}
    settings = build(SearchSettings, values, train=training_settings(values))
    if settings.train.test_freq:
        raise UserError(
            f"--test_freq {settings.train.test_freq}: the search never runs the test protocol; "
            "it scores the derived architecture on the architecture set (--eval_arch)"
        )
    if settings.train.config_path is not None:
        what = "--config_path %s is ignored: the search builds a supernet"
        log.warning(what, settings.train.config_path)
    return settings


# ----- the options a checkpoint recorded --------------------------------------------------
# Options that say where this invocation runs, not what the run is.
NOT_TAKEN_OVER = frozenset({"resume", "save", "note", "overwrite"})
# Options taken over only when the stored run had the option they depend on switched on, and
# the command line does not set that option anew (its flags).
DEPENDS_ON = dict.fromkeys(("k1", "k2", "lambda_value"), "rerank")
DEPENDS_ON["ema_overwrite_every"] = "ema_decay"
MASTER_FLAGS = {
    "rerank": ("--rerank",),
    "ema_decay": ("--ema_decay", "--ema_overwrite", "--no-ema_overwrite"),
}


def stored_options(path: str) -> dict[str, Any]:
    """The options a checkpoint of this project recorded (empty for any other file), read
    memory-mapped so that the weights are not; a file torch cannot load is named in one line."""
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
    """Parse ``argv`` into flag values, its ``--plugin`` modules imported first, else those the
    checkpoint ``checkpoint_flag`` names recorded (the parser's choices come from what they
    register); with ``--resume`` its stored options are the defaults, except where the run goes
    and options that need another not on. Returns the values and the stored options."""
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
        dropped = {
            dest
            for dest, master in DEPENDS_ON.items()
            if not stored.get(master) or given.intersection(MASTER_FLAGS[master])
        }
        defaults = {
            dest: value
            for dest, value in stored.items()
            if dest in known and dest not in NOT_TAKEN_OVER and dest not in dropped
        }
        parser.set_defaults(**defaults)
        for dest in defaults:
            known[dest].required = False
        if "--data_root" not in given:
            check_stored_root(stored.get("data_root"))
    return vars(parser.parse_args(words)), stored


def check_stored_root(root: object) -> None:
    """A resumed run's recorded ``--data_root``, when relative, names a folder relative to where
    the run started: refuse it in one line when it is not found from here."""
    if isinstance(root, str) and root and not os.path.isabs(root) and not os.path.isdir(root):
        raise UserError(
            f"--data_root {root}: the checkpoint recorded it relative to the folder the run "
            "started in, and it is not found from here; pass --data_root with the resume"
        )
