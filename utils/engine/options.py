"""The parsers of train.py, search.py, test.py and the checkpoint tools, generated from the
declared settings (:mod:`utils.engine.settings`), and the step from parsed flags to settings.

Every flag is declared, with its default, help and check, once in the settings; what is left
here are the checks that look outside the values (files, the device, the data set's folder and
splits) and the run folder's name.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from data.registry import get_dataset
from utils.base.cli import add_flags, build, options
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
from utils.engine.rundir import run_dir
from utils.engine.settings import SearchSettings, TrainSettings

__all__ = [
    "HelpFormatter",
    "checkpoint_parser",
    "command_parser",
    "data_parser",
    "search_settings",
    "select_device",
    "test_parser",
    "training_settings",
]

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
    found = options(DataSettings) + options(EvalSettings)
    add_flags(parser, found, (DATA, DEVICE, EVALUATION))
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
    settings = build(TrainSettings, values, data=data, folder=_folder(values, trial))
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


def _folder(values: Mapping[str, Any], trial: int) -> Path:
    """``--save/--note``; on ``--resume`` without ``--note``, the checkpoint's folder."""
    dataset, config = values["dataset"], values["config_path"]
    suffix = f"_trial{trial}" if get_dataset(dataset).num_splits > 1 else ""
    stem = Path(config).stem if config else "train"
    name = f"train_{dataset}{suffix}_{stem}_seed{values['seed']}"
    return run_dir(values["save"], values["note"], values["resume"], name)


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
        dataset = get_dataset(values["dataset"])
        split = 1 if values["trial"] is None else values["trial"]
        trial = f"_trial{split}" if dataset.num_splits > 1 else ""
        name = f"_r{values['depth']}_{values['relaxation']}_seed{values['seed']}"
        values = {**values, "note": f"search_{dataset.name}{trial}{name}"}
    settings = build(SearchSettings, values, train=training_settings(values))
    if settings.train.test_freq:
        raise UserError(
            f"--test_freq {settings.train.test_freq}: the search never runs the test protocol; "
            "it scores the derived architecture on the architecture set (--eval_arch)"
        )
    if settings.train.config_path is not None:
        log.warning(
            "--config_path %s is ignored: the search builds a supernet", settings.train.config_path
        )
    return settings
