"""The training set-up the sections share: a synthetic training set and train.py's options."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from data.trainset import TrainSet
from model import Arch, save_arch
from utils.engine.options import EMA_DECAY, data_parser, model_parser, optim_parser, select_device
from utils.engine.search import SearchTrainer
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


def training_options(args: argparse.Namespace, workdir: Path, arch: Arch) -> argparse.Namespace:
    """train.py's options (the paper's recipe) at the benchmark's sizes; runs go to ``workdir``."""
    save_arch(arch, workdir / "arch.json")
    parser = argparse.ArgumentParser(parents=[data_parser(), model_parser(), optim_parser()])
    channels_last = {True: ["--channels_last"], False: ["--no-channels_last"], None: []}
    return parser.parse_args([
        "--data_root", str(workdir), "--dataset", "sysu", "--config_path",
        str(workdir / "arch.json"), "--img_h", str(args.img_h), "--img_w", str(args.img_w),
        "--batch_size", str(args.batch_size), "--num_pos", str(args.num_pos), "--pretrained",
        "none", "--amp", args.amp,
        "--device", str(select_device(args.device)), "--ema_decay", str(EMA_DECAY["sysu"]),
        "--save", str(workdir / "runs"), "--seed", str(args.seed), "--test_batch",
        str(args.test_batch), "--log_freq", str(10**9), *channels_last[args.channels_last],
        *(["--compile"] if args.compile else []),
    ])  # fmt: skip


def in_memory(
    options: argparse.Namespace, note: str, train_set: TrainSet, search: bool = False
) -> Trainer:
    """A Trainer (or SearchTrainer) on ``train_set`` instead of a data set, run folder ``note``."""

    class Given(Trainer):
        def build_data(self) -> TrainSet:
            return train_set

    # The search splits what Trainer.build_data returns into its weights and architecture sets.
    kind = type("GivenSearch", (SearchTrainer, Given), {}) if search else Given
    return kind(argparse.Namespace(**{**vars(options), "note": note}))
