"""What a benchmark section is, and what the sections share: a synthetic training set, train.py's
settings at the benchmark's sizes and the fast path's Trainer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.trainset import TrainSet
from model import Arch, save_arch
from utils.engine.build import select_device
from utils.engine.settings import DataSettings, EvalSettings, TrainSettings
from utils.engine.trainer import Trainer

# The synthetic training set: SYSU-MM01's 395 training identities, 2 images each per modality.
TRAIN_IDS, IMAGES_PER_ID = 395, 2


def synthetic_train_set(img_size: tuple[int, int], seed: int = 0) -> TrainSet:
    """Random uint8 images of ``TRAIN_IDS`` identities; nothing read from disk."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(TRAIN_IDS, dtype=np.int64), IMAGES_PER_ID)
    images = [rng.integers(0, 256, size=(len(labels), *img_size, 3), dtype=np.uint8) for _ in "vi"]
    paths = [f"synthetic/{k}" for k in range(len(labels))]
    pids = list(range(1, TRAIN_IDS + 1))
    return TrainSet(images[0], labels, images[1], labels.copy(), pids, paths, list(paths))


def training_settings(args: Any, workdir: Path, arch: Arch) -> TrainSettings:
    """train.py's defaults (the paper's recipe, its data set) at the benchmark's sizes (``args``:
    the benchmark's settings); runs go to ``workdir``."""
    save_arch(arch, workdir / "arch.json")
    return TrainSettings(
        DataSettings(str(workdir), img_h=args.img_h, img_w=args.img_w),
        workdir / "runs" / "train",
        evaluation=EvalSettings(str(select_device(args.device)), args.amp, args.test_batch),
        config_path=str(workdir / "arch.json"),
        pretrained="none",
        batch_size=args.batch_size,
        num_pos=args.num_pos,
        seed=args.seed,
        log_freq=10**9,
        channels_last=args.channels_last,
        compile=args.compile,
    )


def in_memory(settings: TrainSettings, note: str, train_set: TrainSet) -> Trainer:
    """A Trainer on ``train_set`` instead of a data set, run folder ``note`` (never created)."""
    return Trainer(replace(settings, folder=settings.folder.parent / note), train_set)


# A row of the Markdown table: what is measured, the fast and plain figures, their ratio.
Row = tuple[str, Any, Any, Any]


@dataclass
class Bench:
    """The run's options, device, architecture, training set and train.py's settings."""

    # The benchmark's settings (utils.benchmark.options.BenchSettings, whose module imports
    # every section).
    args: Any
    device: torch.device
    arch: Arch
    data: TrainSet
    settings: TrainSettings
    shared_trainer: Trainer | None = field(default=None, repr=False)

    def trainer(self) -> Trainer:
        """The fast path's Trainer, built on first use and shared by the sections asking for it."""
        if self.shared_trainer is None:
            self.shared_trainer = in_memory(self.settings, "fast", self.data)
        return self.shared_trainer

    def release_trainer(self) -> None:
        """Drop the shared Trainer (its memory must not count in later sections' peaks)."""
        if self.shared_trainer is not None:
            self.shared_trainer.close_log()
        self.shared_trainer = None


@dataclass(frozen=True)
class Section:
    """One part of the JSON document: its name, how to measure it, its Markdown rows (none by
    default); ``uses_trainer``: it runs on :meth:`Bench.trainer`, kept until the last such one."""

    name: str
    run: Callable[[Bench], dict[str, Any]]
    rows: Callable[[dict[str, Any]], list[Row]] = lambda doc: []
    uses_trainer: bool = False


def figure(doc: dict[str, Any], section: str, key: str) -> Any:
    """``doc[section][key]``, or None where the section was skipped."""
    return doc.get(section, {}).get(key)
