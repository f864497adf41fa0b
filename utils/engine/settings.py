"""Typed settings of a training run and a search, each declared once (see
:mod:`utils.engine.eval_settings`): the defaults are the paper's recipe, the flag names the
authors'. A run's settings by flag name (:meth:`TrainSettings.flags`) are its checkpoints' ``args``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, fields, replace
from pathlib import Path
from typing import Any

from data.dataset import ProtocolSettings
from data.registry import get_dataset, registered_datasets
from model.arch import DEPTHS
from model.losses import LOSS_TERMS, LossRecipe, recipe_from, weight_flags
from model.search import RELAXATIONS
from utils.base.cli import (
    Flag,
    Option,
    check_fields,
    composite,
    flag_values,
    options,
    ordered,
    plugin_setting,
    setting,
)
from utils.base.errors import UserError
from utils.engine.eval_settings import (
    AT_LEAST_0,
    FINITE_AT_LEAST_0,
    IN_0_1,
    MODEL,
    POSITIVE,
    POSITIVE_INTEGER,
    RECIPE,
    RUN,
    SEARCH,
    STRIDES,
    TRAIN_GROUPS,
    DataSettings,
    EvalSettings,
)


@dataclass(frozen=True)
class OptimSettings:
    """The optimizer and its learning-rate schedule (the paper's by default)."""

    lr: float = setting(
        0.01,
        "learning rate of BNNeck and classifier; the backbone gets lr/10",
        RECIPE,
        check=lambda v: v > 0 and math.isfinite(v),
        expected="a positive value",
    )
    optim: str = setting("adam", "optimizer", RECIPE, choices=("adam", "sgd"))
    beta1: float = setting(0.5, "Adam beta1", RECIPE, **IN_0_1)
    beta2: float = setting(0.999, "Adam beta2", RECIPE, **IN_0_1)
    weight_decay: float = setting(5e-4, "weight decay", RECIPE, **FINITE_AT_LEAST_0)
    warmup_epochs: int = setting(
        10, "linear warm-up from 0.01x over this many epochs", RECIPE, **AT_LEAST_0
    )
    milestones: tuple[int, ...] = setting(
        (40, 70),
        "epochs where the learning rate is multiplied by 0.1",
        RECIPE,
        check=lambda v: all(m >= 1 for m in v),
        expected="positive epoch numbers",
    )
    fused: bool | None = setting(
        None,
        "fused optimizer kernels (default: on CUDA only; --no-fused: the plain per-tensor "
        "optimizer, as the authors trained)",
        RUN,
        after="channels_last",
    )

    def __post_init__(self) -> None:
        check_fields(self)


def _loss_flags() -> list[Option]:
    """``--label_smooth``, ``--margin`` and the weight of each loss term that has a flag."""
    paper = LossRecipe()
    smooth = Flag("CE label smoothing", RECIPE, **IN_0_1)
    margin = Flag("triplet margin", RECIPE, **FINITE_AT_LEAST_0)
    weights = [
        Option(term.flag, term.weight, float, Flag(term.help, RECIPE, **FINITE_AT_LEAST_0))
        for term in LOSS_TERMS.values()
        if term.flag is not None
    ]
    return [
        Option("label_smooth", paper.label_smooth, float, smooth),
        Option("margin", paper.margin, float, margin),
        *weights,
    ]


def _loss_of(values: Mapping[str, Any]) -> LossRecipe:
    """The loss recipe of the flags."""
    weights = {name: values[flag] for flag, name in weight_flags().items()}
    return recipe_from(weights, label_smooth=values["label_smooth"], margin=values["margin"])


def _by_dataset(attribute: str) -> str:
    """Each registered data set's default of ``attribute``, for a help text."""
    return ", ".join(f"{getattr(d, attribute)} {d.title}" for d in registered_datasets())


@dataclass(frozen=True, kw_only=True)
class ArchSearch:
    """The search's own settings (search.py's flags beside the training run's)."""

    depth: int = setting(50, "ResNet depth", SEARCH, choices=DEPTHS)
    arch_fraction: float = setting(
        0.2,
        "share of the training identities that train the architecture (disjoint from those "
        "that train the weights)",
        SEARCH,
        check=lambda v: 0 < v < 1,
        expected="a value in (0, 1)",
    )
    relaxation: str = setting(
        "softmax",
        "mixing weights: softmax(alpha / tau) or Gumbel-softmax samples",
        SEARCH,
        choices=RELAXATIONS,
    )
    tau: float = setting(1.0, "softmax temperature (softmax)", SEARCH, **POSITIVE)
    tau_max: float = setting(
        5.0, "Gumbel temperature at the first search epoch", SEARCH, **POSITIVE
    )
    tau_min: float = setting(0.5, "Gumbel temperature at the last epoch", SEARCH, **POSITIVE)
    arch_lr: float = setting(3e-3, "Adam lr of the alphas", SEARCH, **POSITIVE)
    arch_weight_decay: float = setting(1e-3, "weight decay of the alphas", SEARCH, **AT_LEAST_0)
    arch_warmup: int = setting(10, "weights-only epochs before alphas train", SEARCH)
    arch_freq: int = setting(
        6,
        "one architecture step every N weight steps; a search epoch then costs about 1.26x a "
        "training epoch (CPU; 1.32x at 4)",
        SEARCH,
        **POSITIVE_INTEGER,
    )
    eval_arch: bool = setting(
        True, "score the derived architecture on the architecture set after every epoch", SEARCH
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.tau_min > self.tau_max:
            raise UserError(f"--tau_min {self.tau_min} is above --tau_max {self.tau_max}")


@dataclass(frozen=True)
class TrainSettings:
    """A training run: data, recipe, run folder and bookkeeping, the fields after ``folder`` in
    the order of train.py's ``--help``; the EMA settings left as None take the data set's."""

    data: DataSettings
    folder: Path
    _: KW_ONLY
    config_path: str | None = setting(
        "configs/all_shared.json",
        "architecture: this project's JSON or the authors' config.cfg",
        MODEL,
    )
    last_stride: int = setting(1, "stride of layer4", MODEL, choices=STRIDES)
    epochs: int = setting(120, "training epochs", RECIPE, **POSITIVE_INTEGER)
    batch_size: int = setting(64, "images per modality per step (identities x num_pos)", RECIPE)
    num_pos: int = setting(4, "images per identity per modality in a batch", RECIPE)
    optimizer: OptimSettings = OptimSettings()
    loss: LossRecipe = composite(LossRecipe(), _loss_flags, _loss_of, LossRecipe.flags)
    ema_decay: float | None = setting(
        None,
        lambda: f"EMA decay (default: the data set's, {_by_dataset('ema_decay')}; 0 disables EMA)",
        RECIPE,
        check=lambda v: 0 <= v < 1,
        expected="a value in [0, 1) (0 disables the EMA)",
    )
    ema_overwrite: bool = setting(
        True,
        "copy the EMA weights into the live model every --ema_overwrite_every epochs, as the "
        "authors' published runs did (--no-ema_overwrite: never)",
        RECIPE,
    )
    ema_overwrite_every: int | None = setting(
        None,
        lambda: (
            "epochs between copies of the EMA weights into the live model, independent of "
            f"--test_freq (default: the data set's, {_by_dataset('ema_overwrite_every')}; 0: never)"
        ),
        RECIPE,
        check=lambda v: v >= 0,
        expected="a value >= 0 (0: never)",
    )
    pretrained: str = setting(
        "imagenet",
        "backbone initialisation: imagenet, none, or a torchvision-layout state-dict file",
        RECIPE,
    )
    save: str = setting("runs", "folder holding run folders", RUN)
    note: str = setting(
        "",
        "run name (default: derived from the options; on --resume, the checkpoint's folder)",
        RUN,
    )
    overwrite: bool = setting(
        False,
        "start over in a run folder that already holds a run (its logs, results and checkpoints "
        "are removed first); without it such a folder is refused",
        RUN,
    )
    seed: int = setting(0, "random seed", RUN, **AT_LEAST_0)
    deterministic: bool = setting(
        False, "deterministic algorithms (bit-exact resume on CPU; slower)", RUN
    )
    resume: str = setting(
        "",
        "checkpoint to resume from (model, optimizer, EMA, schedule, step and random states); "
        "the run continues in the checkpoint's folder unless --note is given",
        RUN,
    )
    evaluation: EvalSettings = EvalSettings()
    test_freq: int = setting(
        10, "evaluate every N epochs for monitoring (0: only at the end)", RUN, **AT_LEAST_0
    )
    save_freq: int = setting(20, "keep a checkpoint every N epochs", RUN, **AT_LEAST_0)
    log_freq: int = setting(
        20, "read loss values every N steps (no host sync in between)", RUN, **POSITIVE_INTEGER
    )
    channels_last: bool | None = setting(
        None, "channels-last memory format (default: on CUDA only; it slows CPU steps)", RUN
    )
    compile: bool = setting(False, "torch.compile the model", RUN)
    max_steps: int = setting(
        0,
        "stop each epoch after this many steps (0: full epochs; for smoke runs)",
        RUN,
        **AT_LEAST_0,
    )
    # A search's own settings, recorded beside the run's (SearchSettings sets them).
    search: ArchSearch | None = None
    plugin: tuple[str, ...] = plugin_setting()

    def __post_init__(self) -> None:
        size, per_id = self.batch_size, self.num_pos
        if per_id < 1 or size < 1:
            raise UserError(f"--batch_size {size} / --num_pos {per_id}: expected positive values")
        if size % per_id:
            raise UserError(
                f"--batch_size {size} is not divisible by --num_pos {per_id} "
                "(batch_size = identities x num_pos images per modality)"
            )
        if size // per_id < 2:
            raise UserError(
                f"--batch_size {size} / --num_pos {per_id}: a batch needs at least 2 identities "
                "(triplet loss)"
            )
        check_fields(self)
        self._resolve_ema()
        if None in self.data.img_size:
            raise UserError("--img_h and --img_w are required for training")
        get_dataset(self.data.dataset).check_settings(ProtocolSettings(mode=self.evaluation.mode))

    def _resolve_ema(self) -> None:
        """The EMA decay and overwrite schedule: the data set's where left out, checked."""
        dataset = get_dataset(self.data.dataset)
        decay = dataset.ema_decay if self.ema_decay is None else self.ema_decay
        every = self.ema_overwrite_every
        if decay == 0 and every:
            raise UserError(
                f"--ema_overwrite_every {every}: takes effect only with an EMA "
                "(--ema_decay 0 disables it; drop one of the two)"
            )
        if not self.ema_overwrite:
            if every:
                raise UserError(
                    f"--no-ema_overwrite contradicts --ema_overwrite_every {every} "
                    "(give one of them)"
                )
            every = 0
        elif every is None:
            every = dataset.ema_overwrite_every
        object.__setattr__(self, "ema_decay", decay)
        object.__setattr__(self, "ema_overwrite_every", every)

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
        """The run's settings by flag name, in the order of the parser's: checkpoints' ``args``."""
        values = flag_values(self)
        listed = ordered(options(type(self)), (*TRAIN_GROUPS, SEARCH, None))
        return {option.name: values[option.name] for option in listed if option.name in values}


@dataclass(frozen=True)
class SearchSettings(ArchSearch):
    """An architecture search: a training run that never overwrites with the EMA, plus its own."""

    train: TrainSettings

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.arch_warmup < self.train.epochs:
            raise UserError(
                f"--arch_warmup {self.arch_warmup}: expected 0 <= value < --epochs "
                f"{self.train.epochs} (otherwise the architecture never trains)"
            )
        # The EMA also averages the alphas: copying it into the supernet would pull the alphas
        # back, so the search never overwrites, whatever the data set's schedule.
        own = ArchSearch(**{item.name: getattr(self, item.name) for item in fields(ArchSearch)})
        train = replace(self.train, ema_overwrite_every=0, search=own)
        object.__setattr__(self, "train", train)
