"""Sections ``fast``, ``features``, ``plain`` and ``search``: the engine's training step and
feature extraction, an authors'-style training step, and a search step."""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.sampler import CrossModalitySampler
from data.trainset import TrainSet
from data.transforms import augment_batch
from model import Routing, build_model
from utils.base.modality import Modality
from utils.benchmark.measure import peak_memory, reset_peak_memory, throughput, timed
from utils.benchmark.section import Bench, Row, Section, figure, in_memory
from utils.engine.search import SearchTrainer
from utils.engine.settings import SearchSettings
from utils.engine.trainer import Trainer
from utils.evaluation.evaluate import extract_features

log = logging.getLogger("benchmark")


class PairedImages(Dataset):
    """Item ``(v, i)``: visible image v and infrared image i, each augmented alone, and labels."""

    def __init__(self, train_set: TrainSet) -> None:
        self.data = train_set  # worker processes share the arrays copy-on-write

    def __len__(self) -> int:
        return len(self.data.visible_labels)

    def __getitem__(self, pair: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Both as normalised float (3, H, W), drawn from torch's generator (seeded per worker)."""
        (v, i), data = pair, self.data
        visible = augment_batch(torch.from_numpy(data.visible_images[v : v + 1]))[0]
        infrared = augment_batch(torch.from_numpy(data.infrared_images[i : i + 1]))[0]
        return visible, infrared, int(data.visible_labels[v]), int(data.infrared_labels[i])


def plain_loader(
    train_set: TrainSet, sampler: CrossModalitySampler, workers: int, batches: int, seed: int = 0
) -> DataLoader:
    """The sampler's first ``batches`` batches: (visible, infrared, labels, labels) on the CPU."""
    steps = (sampler.batch(*divmod(b, len(sampler))) for b in range(batches))
    pairs = [list(zip(v.tolist(), i.tolist(), strict=True)) for v, i in steps]
    generator = torch.Generator().manual_seed(seed)
    dataset = PairedImages(train_set)
    return DataLoader(dataset, batch_sampler=pairs, num_workers=workers, generator=generator)


def run_fast(bench: Bench) -> dict[str, Any]:
    """Time the engine's own training step."""
    args, trainer = bench.args, bench.trainer()
    log.info("fast path: %d + %d x %d steps", args.warmup, args.rounds, args.steps)
    windowed = reset_peak_memory(trainer.device)
    sampler = trainer.sampler
    step = lambda k: trainer.training_step(*sampler.batch(*divmod(k, len(sampler))))  # noqa: E731
    figures = throughput(step, args, args.steps, args.rounds)
    figures |= peak_memory(trainer.device, windowed)
    figures["settings"] = dict(
        step="utils.engine.trainer.Trainer.training_step",
        amp=trainer.amp,
        channels_last=trainer.channels_last,
        compile=args.compile,
        loss_readback="none",
        augmentation=f"batched on the {trainer.device.type}",
        ema="ModelEMA (foreach)",
    )
    return figures


def run_features(bench: Bench) -> dict[str, Any]:
    """Time :func:`extract_features` on random uint8 images, after a warm-up batch."""
    args, trainer = bench.args, bench.trainer()
    model = trainer.ema.module if trainer.ema is not None else trainer.model_without_ddp
    batch, amp = args.test_batch, trainer.amp
    shape = (args.feature_images, args.img_h, args.img_w, 3)
    images = np.random.default_rng(args.seed + 1).integers(0, 256, size=shape, dtype=np.uint8)
    extract_features(model, images[:batch], Modality.INFRARED, trainer.device, batch, amp)
    (pool, _), seconds = timed(
        lambda: extract_features(model, images, Modality.INFRARED, trainer.device, batch, amp)
    )
    return dict(
        images_per_s=round(len(images) / seconds, 2),
        images=len(images),
        batch_size=batch,
        amp=amp,
        feature_dim=int(pool.shape[1]),
        timed_s=round(seconds, 3),
    )


def feature_rows(doc: dict[str, Any]) -> list[Row]:
    """Feature-extraction images/s."""
    return [("feature extraction images/s", figure(doc, "features", "images_per_s"), "", "")]


def run_plain(bench: Bench) -> dict[str, Any]:
    """Time the authors'-style step: per-image CPU augmentation in workers, fp32 NCHW eager."""
    args, settings, data, device = bench.args, bench.settings, bench.data, bench.device
    log.info("plain path: %d + %d x %d steps", args.warmup, args.rounds, args.steps)
    windowed = reset_peak_memory(device)
    torch.manual_seed(args.seed)
    model = build_model(bench.arch, data.num_classes, settings.last_stride).to(device).train()
    optim = settings.optimizer
    groups: dict[bool, list[torch.nn.Parameter]] = {True: [], False: []}
    for name, parameter in model.named_parameters():
        groups[name.startswith("backbone.")].append(parameter)
    optimizer = torch.optim.Adam(
        [{"params": groups[True], "lr": 0.1 * optim.lr}, {"params": groups[False]}],
        optim.lr,
        (optim.beta1, optim.beta2),
        weight_decay=optim.weight_decay,
        foreach=False,
    )
    decay, average = settings.ema, {k: v.clone() for k, v in model.state_dict().items()}
    loss = settings.loss
    labels = (data.visible_labels, data.infrared_labels)
    sampler = CrossModalitySampler(*labels, args.batch_size, args.num_pos, args.seed)
    total = args.warmup + args.rounds * args.steps
    batches = iter(plain_loader(data, sampler, args.workers, total, args.seed))

    def step(_: int) -> None:
        visible, infrared, visible_labels, infrared_labels = next(batches)
        images = torch.cat([visible, infrared]).to(device)
        targets = torch.cat([visible_labels, infrared_labels]).to(device)
        pool, feat, logits = model(images, Routing.from_halves(len(visible), len(infrared)))
        terms = loss(pool, feat, logits, targets, len(visible))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        with torch.no_grad():  # the EMA one tensor at a time
            for key, live in model.state_dict().items():
                if live.dtype.is_floating_point:
                    average[key].mul_(decay).add_(live, alpha=1 - decay)
                else:
                    average[key].copy_(live)
        terms["loss"].item()  # the authors' loop reads the loss back every step

    figures = throughput(step, args, args.steps, args.rounds)
    next(batches, None)  # the loader's end joins its workers: their peak RSS is counted below
    figures |= peak_memory(device, windowed)
    workers_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if args.workers else 0
    figures["workers_peak_rss_mb"] = round(workers_kb / 1024, 1)
    figures["settings"] = dict(
        step="fp32, NCHW, eager",
        amp="none",
        channels_last=False,
        compile=False,
        loss_readback="every step",
        augmentation=f"per image in {args.workers} CPU workers",
        ema="per-tensor loop",
        optimizer="Adam (for-loop)",
    )
    return figures


def run_search(bench: Bench) -> dict[str, Any]:
    """A search step against a training step: ``weights_step + arch_step / arch_freq``."""
    args, settings, data = bench.args, bench.settings, bench.data
    log.info("search step against training step")
    trainer = in_memory(settings, "train", data)
    # Weights steps timed alone (no architecture step is ever due); architecture steps directly.
    train = replace(settings, folder=settings.folder.parent / "search")
    search = SearchSettings(
        train, depth=args.depth, arch_warmup=0, arch_freq=10**9, eval_arch=False
    )
    searcher = SearchTrainer(search, data)

    def batch(owner: Trainer, k: int) -> tuple[np.ndarray, np.ndarray]:
        return owner.sampler.batch(*divmod(k, len(owner.sampler)))

    steps: dict[str, Callable[[int], Any]] = {
        "train": lambda k: trainer.training_step(*batch(trainer, k)),
        "weights": lambda k: searcher.training_step(*batch(searcher, k)),
        "arch": lambda k: searcher.architecture_step(*divmod(k, len(searcher.arch_sampler))),
    }
    rounds = (args.search_steps, args.search_rounds)
    seconds = {name: throughput(step, args, *rounds)["step_s"] for name, step in steps.items()}
    trainer.close_log()
    searcher.close_log()
    freq = SearchSettings(train).arch_freq
    search_step = seconds["weights"] + seconds["arch"] / freq
    return dict(
        status="measured",
        train_step_s=seconds["train"],
        search_step_s=round(search_step, 5),
        ratio=round(search_step / seconds["train"], 3),
        weights_step_s=seconds["weights"],
        arch_step_s=seconds["arch"],
        arch_freq=freq,
    )


def search_rows(doc: dict[str, Any]) -> list[Row]:
    """Seconds per search step and per training step."""
    times = (figure(doc, "search", k) for k in ("search_step_s", "train_step_s", "ratio"))
    return [("step (s): search / training", *times)]


def speedup(doc: dict[str, Any]) -> float | None:
    """Fast images/s over plain images/s; None unless both paths ran."""
    rates = figure(doc, "fast", "images_per_s"), figure(doc, "plain", "images_per_s")
    return round(rates[0] / rates[1], 3) if all(rates) else None


def training_rows(doc: dict[str, Any]) -> list[Row]:
    """Images/s and peak memory of both paths."""
    paths = ("fast", "plain")
    return [
        ("training images/s", *(figure(doc, p, "images_per_s") for p in paths), doc["speedup"]),
        ("training peak memory (MiB)", *(figure(doc, p, "peak_memory_mb") for p in paths), ""),
    ]


FEATURES = Section("features", run_features, feature_rows, uses_trainer=True)
FAST = Section("fast", run_fast, training_rows, uses_trainer=True)
PLAIN = Section("plain", run_plain)
SEARCH = Section("search", run_search, search_rows)
