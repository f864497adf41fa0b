"""Typed settings below the scripts: frozen, built once from the parsed flags.

train.py, search.py and test.py parse their flags and turn them into these settings at the top
(the builders in :mod:`utils.engine.options`, where every flag is checked once); everything
below them takes settings or plain arguments. Settings may also be built directly in code (the
benchmark does): their defaults are the flags' defaults (a test holds them equal), and the EMA
decay and overwrite schedule left out are the data set's, resolved here.

The flags a run was started with, resolved, are kept as ``TrainSettings.options``: checkpoints
save them as their ``args`` entry, and a resume compares them with the checkpoint's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from data.registry import get_dataset
from model.losses import LossRecipe
from utils.evaluation.rerank import RerankSettings

__all__ = [
    "DataSettings",
    "EvalSettings",
    "OptimSettings",
    "SearchSettings",
    "TrainSettings",
]


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
    optimizer: OptimSettings = OptimSettings()
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
        for part in (self.data, self.evaluation, self.optimizer, self.loss, self):
            if part is self.loss:  # the weights by their flags, as the loss table names them
                loss = self.loss
                flat |= loss.flags() | {"pairings": loss.pairings, "terms": loss.terms}
                continue
            for item in fields(part):  # type: ignore[arg-type]
                value = getattr(part, item.name)
                if item.name != "options" and not hasattr(value, "__dataclass_fields__"):
                    flat[item.name] = str(value) if isinstance(value, Path) else value
        return flat


@dataclass(frozen=True)
class SearchSettings:
    """An architecture search: a training run that never overwrites with the EMA, plus its own."""

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

    def __post_init__(self) -> None:
        # The EMA also averages the alphas: copying it into the supernet would pull the alphas
        # back, so the search never overwrites, whatever the data set's schedule.
        train = self.train
        options = {**train.options, "ema_overwrite_every": 0} if train.options else {}
        train = replace(train, ema_overwrite_every=0, options=MappingProxyType(options))
        object.__setattr__(self, "train", train)
