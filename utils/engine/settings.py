"""Typed settings below the scripts: built once from the parsed flags, checked here, frozen.

train.py, search.py and test.py parse their flags and turn them into these settings at the top
(:func:`training_settings`, :func:`search_settings`, :func:`evaluation_settings` and
:func:`data_settings`); everything below them takes settings or plain arguments. Every flag
check lives here, once, with the one-line message that names the flag; the defaults that depend
on the data set (EMA decay, EMA overwrite schedule, RegDB trial) are resolved here too.

Settings may also be built directly in code (the benchmark does); their defaults are the flags'
defaults (a test holds them equal). The flags a run was started with, resolved, are kept as
``TrainSettings.options``: checkpoints save them as their ``args`` entry, and a resume compares
them with the checkpoint's.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from data.registry import get_dataset
from model.losses import LossRecipe
from utils.base.errors import UserError
from utils.engine.options import check_data_root, select_device
from utils.engine.rundir import run_dir
from utils.evaluation.rerank import RerankSettings

__all__ = [
    "DataSettings",
    "EvalSettings",
    "OptimSettings",
    "SearchSettings",
    "TrainSettings",
    "data_settings",
    "evaluation_settings",
    "search_settings",
    "training_settings",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSettings:
    """Which data set, where, which split (``--trial``), at which image size."""

    data_root: str
    dataset: str = "sysu"
    trial: int | None = None
    img_h: int = 256
    img_w: int = 128
    cache_dir: str | None = None

    @property
    def img_size(self) -> tuple[int, int]:
        """(height, width) of the network's input."""
        return (self.img_h, self.img_w)

    @property
    def split(self) -> int:
        """The train/test split ``--trial`` selects (the data set's only one where it has one)."""
        return get_dataset(self.dataset).split_of(self.trial)


@dataclass(frozen=True)
class EvalSettings:
    """How features are extracted and ranked, and on which device."""

    device: str | None = None
    amp: str = "bf16"
    test_batch: int = 64
    flip: bool = False
    rerank: RerankSettings | None = None
    # SYSU's search mode of the training-time evaluation.
    mode: str = "all"


@dataclass(frozen=True)
class OptimSettings:
    """The optimizer and its learning-rate schedule (the paper's by default)."""

    lr: float = 0.01
    optim: str = "adam"
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 5e-4
    warmup_epochs: int = 10
    milestones: tuple[int, ...] = (40, 70)
    # Fused kernels (None: on CUDA only).
    fused: bool | None = None


@dataclass(frozen=True)
class TrainSettings:
    """A training run: data, recipe, run folder and bookkeeping (the paper's recipe by default).

    ``ema_decay`` and ``ema_overwrite_every`` left as None take the data set's values.
    """

    data: DataSettings
    folder: Path
    evaluation: EvalSettings = EvalSettings()
    optim: OptimSettings = OptimSettings()
    loss: LossRecipe = LossRecipe()
    config_path: str | None = "configs/all_shared.json"
    last_stride: int = 1
    pretrained: str = "imagenet"
    epochs: int = 120
    batch_size: int = 64
    num_pos: int = 4
    ema_decay: float | None = None
    ema_overwrite_every: int | None = None
    seed: int = 0
    deterministic: bool = False
    resume: str = ""
    overwrite: bool = False
    test_freq: int = 10
    save_freq: int = 20
    log_freq: int = 20
    channels_last: bool | None = None
    compile: bool = False
    max_steps: int = 0
    # The flags as given and resolved (a checkpoint's `args`); empty: the fields' own values.
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        dataset = get_dataset(self.data.dataset)
        if self.ema_decay is None:
            object.__setattr__(self, "ema_decay", dataset.ema_decay)
        if self.ema_overwrite_every is None:
            object.__setattr__(self, "ema_overwrite_every", dataset.ema_overwrite_every)

    @property
    def ema(self) -> float:
        """The EMA decay, resolved (0: no EMA)."""
        assert self.ema_decay is not None
        return self.ema_decay

    @property
    def overwrite_every(self) -> int:
        """Epochs between copies of the EMA into the live model, resolved (0: never)."""
        assert self.ema_overwrite_every is not None
        return self.ema_overwrite_every

    def flags(self) -> dict[str, Any]:
        """The run's options by flag name: the parsed flags, else the settings' own fields."""
        if self.options:
            return dict(self.options)
        flat: dict[str, Any] = {}
        for part in (self.data, self.evaluation, self.optim, self.loss, self):
            for item in fields(part):  # type: ignore[arg-type]
                value = getattr(part, item.name)
                if item.name != "options" and not hasattr(value, "__dataclass_fields__"):
                    flat[item.name] = str(value) if isinstance(value, Path) else value
        return flat


@dataclass(frozen=True)
class SearchSettings:
    """An architecture search: a training run (never overwriting with the EMA) plus its own."""

    train: TrainSettings
    depth: int = 50
    arch_fraction: float = 0.2
    relaxation: str = "softmax"
    tau: float = 1.0
    tau_max: float = 5.0
    tau_min: float = 0.5
    arch_lr: float = 3e-3
    arch_weight_decay: float = 1e-3
    arch_warmup: int = 10
    arch_freq: int = 6
    eval_arch: bool = True


# ----- from the flags -------------------------------------------------------------------------
def evaluation_settings(args: argparse.Namespace) -> EvalSettings:
    """The feature and ranking flags, checked (device, batch, re-ranking parameters)."""
    if args.test_batch < 1:
        raise UserError(f"--test_batch {args.test_batch}: expected a positive integer")
    for flag in ("k1", "k2"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected an integer >= 1")
    if not 0 <= args.lambda_value <= 1:
        raise UserError(f"--lambda_value {args.lambda_value}: expected a value in [0, 1]")
    select_device(args.device)
    rerank = RerankSettings(args.k1, args.k2, args.lambda_value) if args.rerank else None
    return EvalSettings(args.device, args.amp, args.test_batch, args.flip, rerank, args.mode)


def data_settings(
    args: argparse.Namespace, img_size: tuple[int, int], trial: int | None
) -> DataSettings:
    """The data flags with the image size and ``--trial`` resolved by the caller, checked."""
    height, width = img_size
    if height < 32 or width < 16:
        raise UserError(f"--img_h/--img_w {height}x{width}: expected at least 32x16")
    if not os.path.isdir(args.data_root):
        check_data_root(args.dataset, args.data_root, trial)  # names what the folder should hold
    return DataSettings(args.data_root, args.dataset, trial, height, width, args.cache_dir)


def _check_recipe(args: argparse.Namespace) -> None:
    """The batch, schedule and optimizer flags."""
    if args.num_pos < 1 or args.batch_size < 1:
        raise UserError(
            f"--batch_size {args.batch_size} / --num_pos {args.num_pos}: expected positive values"
        )
    if args.batch_size % args.num_pos:
        raise UserError(
            f"--batch_size {args.batch_size} is not divisible by --num_pos {args.num_pos} "
            "(batch_size = identities x num_pos images per modality)"
        )
    if args.batch_size // args.num_pos < 2:
        raise UserError(
            f"--batch_size {args.batch_size} / --num_pos {args.num_pos}: a batch needs at least "
            "2 identities (triplet loss)"
        )
    if args.epochs < 1:
        raise UserError(f"--epochs {args.epochs}: expected a positive integer")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr {args.lr}: expected a positive value")
    for flag in ("weight_decay", "sp_lambda", "cmmd_lambda", "margin"):
        value = getattr(args, flag)
        if not (value >= 0 and math.isfinite(value)):
            raise UserError(f"--{flag} {value}: expected a finite value >= 0")
    if not 0 <= args.label_smooth < 1:
        raise UserError(f"--label_smooth {args.label_smooth}: expected a value in [0, 1)")
    for flag in ("beta1", "beta2"):
        if not 0 <= getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected a value in [0, 1)")


def _ema(args: argparse.Namespace) -> tuple[float, int]:
    """``--ema_decay`` and ``--ema_overwrite_every``, the data set's where not given."""
    dataset = get_dataset(args.dataset)
    decay = dataset.ema_decay if args.ema_decay is None else args.ema_decay
    if not 0 <= decay < 1:
        raise UserError(f"--ema_decay {decay}: expected a value in [0, 1) (0 disables the EMA)")
    every = args.ema_overwrite_every
    if every is not None and every < 0:
        raise UserError(f"--ema_overwrite_every {every}: expected a value >= 0 (0: never)")
    if not args.ema_overwrite:
        if every:
            raise UserError(
                f"--no-ema_overwrite contradicts --ema_overwrite_every {every} (give one of them)"
            )
        every = 0
    elif every is None:
        every = dataset.ema_overwrite_every
    return decay, every


def _check_run(args: argparse.Namespace) -> None:
    """The schedule, bookkeeping and input-file flags."""
    if args.warmup_epochs < 0:
        raise UserError(f"--warmup_epochs {args.warmup_epochs}: expected a value >= 0")
    if any(m < 1 for m in args.milestones):
        raise UserError(f"--milestones {args.milestones}: expected positive epoch numbers")
    for flag in ("test_freq", "save_freq", "max_steps"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected a value >= 0")
    if args.log_freq < 1:
        raise UserError(f"--log_freq {args.log_freq}: expected a positive integer")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: expected a value >= 0")
    if args.img_h is None or args.img_w is None:
        raise UserError("--img_h and --img_w are required for training")
    pretrained = str(args.pretrained)
    if pretrained.lower() not in ("imagenet", "none") and not os.path.isfile(pretrained):
        raise UserError(
            f"--pretrained {pretrained}: file not found (expected imagenet, none or a "
            "torchvision-layout ResNet state-dict file)"
        )
    if args.resume and not os.path.isfile(args.resume):
        what = "is a folder, not a file" if os.path.isdir(args.resume) else "file not found"
        raise UserError(f"--resume {args.resume}: checkpoint {what}")


def training_settings(
    args: argparse.Namespace, ema_overwrite_every: int | None = None, kind: str = "train"
) -> TrainSettings:
    """The settings of train.py's flags (``ema_overwrite_every``: the caller's rule instead of
    the flags'; ``kind`` names a new run's folder), every flag checked."""
    _check_recipe(args)
    ema_decay, every = _ema(args)
    if ema_overwrite_every is not None:
        every = ema_overwrite_every
    _check_run(args)
    trial = 1 if args.trial is None else args.trial
    get_dataset(args.dataset).check_trial(trial, testing=False)
    evaluation = evaluation_settings(args)
    data = data_settings(args, (args.img_h, args.img_w), trial)
    options = {**vars(args), "ema_decay": ema_decay, "ema_overwrite_every": every, "trial": trial}
    optim = OptimSettings(
        args.lr, args.optim, args.beta1, args.beta2, args.weight_decay, args.warmup_epochs,
        tuple(args.milestones), args.fused,
    )  # fmt: skip
    return TrainSettings(
        data, _folder(args, trial, kind), evaluation, optim, LossRecipe.from_args(args),
        args.config_path, args.last_stride, args.pretrained, args.epochs, args.batch_size,
        args.num_pos, ema_decay, every, args.seed, args.deterministic, args.resume,
        args.overwrite, args.test_freq, args.save_freq, args.log_freq, args.channels_last,
        args.compile, args.max_steps, MappingProxyType(options),
    )  # fmt: skip


def _folder(args: argparse.Namespace, trial: int, kind: str) -> Path:
    """``--save/--note``; on ``--resume`` without ``--note``, the checkpoint's folder."""
    config = Path(args.config_path).stem if args.config_path else kind
    suffix = f"_trial{trial}" if get_dataset(args.dataset).num_splits > 1 else ""
    return run_dir(
        args.save, args.note, args.resume, f"{kind}_{args.dataset}{suffix}_{config}_seed{args.seed}"
    )


def search_settings(args: argparse.Namespace) -> SearchSettings:
    """The settings of search.py's flags, every flag checked."""
    # The EMA also averages the alphas: copying it into the supernet would pull the alphas
    # back, so the search never overwrites (its default, whatever the data set's).
    if args.ema_overwrite_every:
        raise UserError(
            f"--ema_overwrite_every {args.ema_overwrite_every}: the search never copies the EMA "
            "into the supernet (it would reset the alphas)"
        )
    train = training_settings(args, ema_overwrite_every=0, kind="search")
    if not 0 < args.arch_fraction < 1:
        raise UserError(f"--arch_fraction {args.arch_fraction}: expected a value in (0, 1)")
    for flag in ("tau", "tau_max", "tau_min", "arch_lr"):
        if not getattr(args, flag) > 0:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected a positive value")
    if args.tau_min > args.tau_max:
        raise UserError(f"--tau_min {args.tau_min} is above --tau_max {args.tau_max}")
    if args.arch_weight_decay < 0:
        raise UserError(f"--arch_weight_decay {args.arch_weight_decay}: expected a value >= 0")
    if args.arch_freq < 1:
        raise UserError(f"--arch_freq {args.arch_freq}: expected a positive integer")
    if not 0 <= args.arch_warmup < args.epochs:
        raise UserError(
            f"--arch_warmup {args.arch_warmup}: expected 0 <= value < --epochs {args.epochs} "
            "(otherwise the architecture never trains)"
        )
    if args.test_freq:
        raise UserError(
            f"--test_freq {args.test_freq}: the search never runs the test protocol; it scores "
            "the derived architecture on the architecture set (--eval_arch)"
        )
    if args.config_path is not None:
        log.warning("--config_path %s is ignored: the search builds a supernet", args.config_path)
    if not args.note and not args.resume:  # a resume without --note stays in its folder
        trial = f"_trial{train.data.trial}" if get_dataset(args.dataset).num_splits > 1 else ""
        note = f"search_{args.dataset}{trial}_r{args.depth}_{args.relaxation}_seed{args.seed}"
        options = MappingProxyType({**train.options, "note": note})
        train = replace(train, folder=Path(args.save) / note, options=options)
    return SearchSettings(
        train, args.depth, args.arch_fraction, args.relaxation, args.tau, args.tau_max,
        args.tau_min, args.arch_lr, args.arch_weight_decay, args.arch_warmup, args.arch_freq,
        args.eval_arch,
    )  # fmt: skip
