"""Speed benchmark: training paths, feature extraction, metrics, re-ranking, search (JSON).

    python -m utils.benchmark                       # paper sizes on CUDA, small sizes on a CPU
    python -m utils.benchmark --threads 1 --out bench.json --markdown bench.md

Sections of the JSON document (printed to stdout, written to ``--out``):

- ``fast``: the engine's own :meth:`Trainer.training_step` (uint8 images resident on the device,
  batched augmentation there, bf16, channels-last and fused Adam on CUDA, no host sync per step).
- ``plain``: the authors' style: fp32, NCHW, every image augmented alone on the CPU in DataLoader
  workers, the batch copied to the device, for-loop Adam and EMA, the loss read back every step.
- ``speedup``: fast images/s over plain images/s.
- ``features``: :func:`extract_features` images/s.
- ``metrics``: ``eval_sysu`` against its per-query loop at the SYSU multi-shot size.
- ``rerank``: ``rerank`` (on the run's torch threads) against ``rerank_reference`` (one core).
- ``llcm``: ``eval_llcm`` and ``rerank`` at the size of LLCM's infrared-to-visible test.
- ``search``: a search step against a training step.

Images/s count both modalities, ``2 * batch_size * steps / seconds``, for the fastest of
``--rounds`` windows after ``--warmup`` untimed steps (the best window filters out other programs'
bursts on a shared machine). Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the
process's maximum resident set size on the CPU. No unit test asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.sampler import CrossModalitySampler
from data.trainset import TrainSet
from data.transforms import augment_batch
from model import DEPTHS, Arch, Routing, build_model, load_arch, save_arch
from model.losses import LossRecipe
from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.base.logger import environment, setup_logging
from utils.base.modality import Modality
from utils.engine.options import EMA_DECAY, data_parser, model_parser, optim_parser, select_device
from utils.engine.search import SearchTrainer, search_parser
from utils.engine.trainer import Trainer
from utils.evaluation.evaluate import extract_features
from utils.evaluation.metrics import eval_llcm, eval_sysu, eval_sysu_loop
from utils.evaluation.rerank import feature_distances, rerank, rerank_reference

log = logging.getLogger("benchmark")

SECTIONS = ("fast", "plain", "features", "metrics", "rerank", "llcm", "search")
# (option, CUDA default, CPU default, help): the paper's sizes on CUDA, minutes on a small CPU.
PRESETS = (
    ("depth", 50, 18, "ResNet depth"),
    ("img_h", 256, 128, "image height"),
    ("img_w", 128, 64, "image width"),
    ("batch_size", 64, 16, "images per modality per step"),
    ("steps", 30, 4, "timed training steps per round"),
    ("rounds", 3, 3, "timed rounds per training path (the fastest counts)"),
    ("warmup", 10, 2, "untimed steps first"),
    ("feature_images", 4096, 256, "images of the feature extraction"),
    ("test_batch", 256, 64, "feature-extraction batch"),
    ("search_steps", 16, 4, "timed steps per round of the search comparison"),
)
# (option, default, help) of the other integer options.
INTEGERS = (
    ("num_pos", 4, "images per identity and modality in a batch"),
    ("workers", None, "DataLoader workers of the plain path (default: min(4, CPUs))"),
    ("search_rounds", 2, "rounds of the search comparison"),
    # SYSU-MM01 multi-shot all-search: 3,803 infrared queries, 10 images per visible folder.
    ("metrics_query", 3803, "queries of the SYSU multi-shot problem (metrics, re-ranking)"),
    ("metrics_gallery", 3010, "gallery images of the SYSU multi-shot problem"),
    # LLCM infrared-to-visible: its 7,166 infrared test images against one image per (identity,
    # visible camera) folder, at most 351 identities x 9 cameras.
    ("llcm_query", 7166, "queries of the LLCM problem"),
    ("llcm_gallery", 3159, "gallery images of the LLCM problem"),
    ("threads", None, "torch threads (default: torch's; 1 keeps threads from spin-waiting for "
     "each other on a CPU shared with other programs)"),
    ("seed", 0, "random seed"),
)  # fmt: skip
# Identities, query cameras and gallery cameras of the two test problems.
SYSU = (96, (3, 6), (1, 2, 4, 5))
LLCM = (351, (1, 2, 4, 5, 6, 7, 8, 9), tuple(range(1, 10)))
# The synthetic training set: SYSU-MM01's 395 training identities, 2 images each per modality.
TRAIN_IDS, IMAGES_PER_ID = 395, 2
FEATURE_DIM = 2048  # a ResNet-50's pool features, the usual input of re-ranking


def get_args_parser() -> argparse.ArgumentParser:
    """The benchmark's options; sizes left out take the device's preset."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m utils.benchmark",
        description="Benchmark training, features, metrics, re-ranking and the search (JSON).",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if any)")
    for key, cuda, cpu, text in PRESETS:
        choices = DEPTHS if key == "depth" else None
        text += f" (default: {cuda} on CUDA, {cpu} on the CPU)"
        parser.add_argument(f"--{key}", type=int, choices=choices, default=None, help=text)
    for key, default, text in INTEGERS:
        text += "" if default is None else f" (default: {default})"
        parser.add_argument(f"--{key}", type=int, default=default, help=text)
    parser.add_argument("--arch", default="split", help="shared, split or an architecture file")
    parser.add_argument(
        "--amp", choices=("bf16", "fp16", "none"), default="bf16", help="fast path, CUDA"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    parser.add_argument(
        "--channels_last", action=argparse.BooleanOptionalAction, help="default: on CUDA only"
    )
    parser.add_argument("--skip", nargs="*", choices=SECTIONS, default=[], help="sections to skip")
    parser.add_argument("--out", default=None, help="also write the JSON document here")
    parser.add_argument("--markdown", default=None, help="also write a Markdown table here")
    return parser


def resolve_options(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill the sizes left out from the device's preset; validate them."""
    for key, cuda, cpu, _ in PRESETS:
        if getattr(args, key) is None:
            setattr(args, key, cuda if device.type == "cuda" else cpu)
    if args.workers is None:
        args.workers = min(4, os.cpu_count() or 1)
    at_least = {key: 1 for key, *_ in PRESETS + INTEGERS} | {"warmup": 0, "workers": 0, "seed": 0}
    for key, low in at_least.items():
        if getattr(args, key) is not None and getattr(args, key) < low:
            raise UserError(f"--{key} {getattr(args, key)}: expected an integer >= {low}")
    if args.batch_size % args.num_pos or args.batch_size // args.num_pos < 2:
        raise UserError(
            f"--batch_size {args.batch_size} must be a multiple of --num_pos {args.num_pos} "
            "with at least 2 identities"
        )
    return args


# ----- measuring ---------------------------------------------------------------------------
def throughput(
    step: Callable[[int], Any], args: argparse.Namespace, steps: int, rounds: int
) -> dict[str, Any]:
    """``--warmup`` untimed steps, then ``rounds`` timed windows of ``steps`` steps each."""
    cuda = select_device(args.device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    for index in range(args.warmup):
        step(index)
    windows = []
    for first in range(args.warmup, args.warmup + rounds * steps, steps):
        sync()
        started = time.perf_counter()
        for index in range(first, first + steps):
            step(index)
        sync()
        windows.append(time.perf_counter() - started)
    images = 2 * args.batch_size * steps
    return {
        "images_per_s": round(images / min(windows), 2),
        "step_s": round(min(windows) / steps, 5),
        "images_per_s_per_round": [round(images / window, 2) for window in windows],
    }


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; returns whether it really restarted."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: "5" resets the peak resident set size to the current one.
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device, windowed: bool) -> dict[str, Any]:
    """The peak memory since :func:`reset_peak_memory` in MiB, and how it was measured."""
    if device.type == "cuda":
        peak, how = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        how = "max RSS of the process" + (" during this path" if windowed else " since start")
    return {"peak_memory_mb": round(peak / 2**20, 1), "memory": how}


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    """``function()`` and the seconds it took."""
    started = time.perf_counter()
    return function(), time.perf_counter() - started


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info = environment(device)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line]
    info["cpu"] = names[0] if names else platform.processor() or platform.machine()
    info.update(device_type=device.type, device=info.get("gpu", info["cpu"]))
    info.update(cpu_count=os.cpu_count(), platform=platform.platform())
    info["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return info


# ----- set-up ------------------------------------------------------------------------------
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
    parser = argparse.ArgumentParser(
        allow_abbrev=False, parents=[data_parser(), model_parser(), optim_parser()]
    )
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


class PairedImages(Dataset):
    """Item ``(v, i)``: visible image v and infrared image i, each augmented alone, and labels."""

    def __init__(self, train_set: TrainSet) -> None:
        """Keep the arrays (worker processes share them copy-on-write)."""
        self.data = train_set

    def __len__(self) -> int:
        """Visible images (items are index pairs)."""
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


# ----- sections ----------------------------------------------------------------------------
def run_fast(args: argparse.Namespace, trainer: Trainer) -> dict[str, Any]:
    """Time the engine's own training step."""
    windowed = reset_peak_memory(trainer.device)
    sampler = trainer.sampler
    step = lambda k: trainer.training_step(*sampler.batch(*divmod(k, len(sampler))))  # noqa: E731
    figures = throughput(step, args, args.steps, args.rounds)
    figures |= peak_memory(trainer.device, windowed)
    figures["settings"] = dict(
        step="utils.engine.trainer.Trainer.training_step", amp=trainer.amp,
        channels_last=trainer.channels_last, compile=args.compile, loss_readback="none",
        augmentation=f"batched on the {trainer.device.type}", ema="ModelEMA (foreach)",
    )  # fmt: skip
    return figures


def run_plain(
    args: argparse.Namespace, options: argparse.Namespace, data: TrainSet, arch: Arch
) -> dict[str, Any]:
    """Time the authors'-style step: per-image CPU augmentation in workers, fp32 NCHW eager."""
    device = select_device(args.device)
    windowed = reset_peak_memory(device)
    torch.manual_seed(args.seed)
    model = build_model(arch, data.num_classes, options.last_stride).to(device).train()
    groups: dict[bool, list[torch.nn.Parameter]] = {True: [], False: []}
    for name, parameter in model.named_parameters():
        groups[name.startswith("backbone.")].append(parameter)
    optimizer = torch.optim.Adam(
        [{"params": groups[True], "lr": 0.1 * options.lr}, {"params": groups[False]}],
        options.lr,
        (options.beta1, options.beta2),
        weight_decay=options.weight_decay,
        foreach=False,
    )
    decay, average = options.ema_decay, {k: v.clone() for k, v in model.state_dict().items()}
    loss = LossRecipe.from_args(options)
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
        step="fp32, NCHW, eager", amp="none", channels_last=False, compile=False,
        loss_readback="every step", augmentation=f"per image in {args.workers} CPU workers",
        ema="per-tensor loop", optimizer="Adam (for-loop)",
    )  # fmt: skip
    return figures


def run_features(args: argparse.Namespace, trainer: Trainer) -> dict[str, Any]:
    """Time :func:`extract_features` on random uint8 images, after a warm-up batch."""
    model, batch, amp = trainer.eval_model(), args.test_batch, trainer.amp
    shape = (args.feature_images, args.img_h, args.img_w, 3)
    images = np.random.default_rng(args.seed + 1).integers(0, 256, size=shape, dtype=np.uint8)
    extract_features(model, images[:batch], Modality.INFRARED, trainer.device, batch, amp)
    (pool, _), seconds = timed(
        lambda: extract_features(model, images, Modality.INFRARED, trainer.device, batch, amp)
    )
    return dict(
        images_per_s=round(len(images) / seconds, 2), images=len(images), batch_size=batch,
        amp=amp, feature_dim=int(pool.shape[1]), timed_s=round(seconds, 3),
    )  # fmt: skip


def ranking_problem(
    protocol: tuple[int, tuple[int, ...], tuple[int, ...]],
    num_query: int,
    num_gallery: int,
    seed: int,
) -> tuple[np.ndarray, ...]:
    """Random (distmat, q_pids, g_pids, q_cams, g_cams); same identities closer on average."""
    rng = np.random.default_rng(seed)
    ids, query_cams, gallery_cams = protocol
    q_pids, g_pids = rng.integers(ids, size=num_query), rng.integers(ids, size=num_gallery)
    distmat = rng.standard_normal((num_query, num_gallery), dtype=np.float32)
    distmat -= 1.5 * (q_pids[:, None] == g_pids[None, :])
    cams = rng.choice(query_cams, num_query), rng.choice(gallery_cams, num_gallery)
    return distmat, q_pids, g_pids, *cams


def run_metrics(args: argparse.Namespace) -> dict[str, Any]:
    """``eval_sysu`` against ``eval_sysu_loop`` on one random SYSU multi-shot-sized problem."""
    sizes = dict(num_query=args.metrics_query, num_gallery=args.metrics_gallery)
    problem = ranking_problem(SYSU, *sizes.values(), args.seed)
    fast, vectorised_s = timed(lambda: eval_sysu(*problem))
    slow, loop_s = timed(lambda: eval_sysu_loop(*problem))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(fast, slow, strict=True))
    speedup = round(loop_s / vectorised_s, 2)
    return dict(
        vectorised_s=vectorised_s, loop_s=loop_s, speedup=speedup, max_abs_diff=diff, **sizes
    )


def run_rerank(args: argparse.Namespace) -> dict[str, Any]:
    """``rerank`` (best of 3 after a warm-up, on the run's torch threads) against one run of
    ``rerank_reference`` (NumPy, one core whatever the threads) on random features."""
    sizes = dict(num_query=args.metrics_query, num_gallery=args.metrics_gallery)
    distances = feature_distances(*sizes.values(), FEATURE_DIM, args.seed)
    rerank(*distances)
    runs = [timed(lambda: rerank(*distances)) for _ in range(3)]
    fast, vectorised_s = min(runs, key=lambda run: run[1])
    slow, reference_s = timed(lambda: rerank_reference(*distances))
    speedup, diff = round(reference_s / vectorised_s, 2), float(np.abs(fast - slow).max())
    times = dict(vectorised_s=vectorised_s, reference_s=reference_s, speedup=speedup)
    return times | dict(max_abs_diff=diff, threads=torch.get_num_threads(), **sizes)


def run_llcm(args: argparse.Namespace) -> dict[str, Any]:
    """``eval_llcm``, and ``rerank`` of random features, at the LLCM size."""
    sizes = dict(num_query=args.llcm_query, num_gallery=args.llcm_gallery)
    _, eval_s = timed(lambda: eval_llcm(*ranking_problem(LLCM, *sizes.values(), args.seed)))
    distances = feature_distances(*sizes.values(), FEATURE_DIM, args.seed)
    _, rerank_s = timed(lambda: rerank(*distances))
    return dict(eval_s=eval_s, rerank_s=rerank_s, **sizes)


def run_search(
    args: argparse.Namespace, options: argparse.Namespace, data: TrainSet
) -> dict[str, Any]:
    """A search step against a training step: ``weights_step + arch_step / arch_freq``."""
    defaults = vars(search_parser().parse_args([]))
    # Weights steps timed alone (no architecture step is ever due); architecture steps directly.
    search = {"depth": args.depth, "config_path": None, "arch_warmup": 0, "arch_freq": 10**9}
    search = argparse.Namespace(**{**vars(options), **defaults, **search, "eval_arch": False})
    trainer, searcher = in_memory(options, "train", data), in_memory(search, "search", data, True)

    def batch(owner: Trainer, k: int) -> tuple[np.ndarray, np.ndarray]:
        return owner.sampler.batch(*divmod(k, len(owner.sampler)))

    steps: dict[str, Callable[[int], Any]] = {
        "train": lambda k: trainer.training_step(*batch(trainer, k)),
        "weights": lambda k: searcher.training_step(*batch(searcher, k)),
        "arch": lambda k: searcher.architecture_step(*divmod(k, len(searcher.arch_sampler))),
    }
    rounds = (args.search_steps, args.search_rounds)
    seconds = {name: throughput(step, args, *rounds)["step_s"] for name, step in steps.items()}
    freq = defaults["arch_freq"]
    search_step = seconds["weights"] + seconds["arch"] / freq
    return dict(
        status="measured", train_step_s=seconds["train"], search_step_s=round(search_step, 5),
        ratio=round(search_step / seconds["train"], 3), weights_step_s=seconds["weights"],
        arch_step_s=seconds["arch"], arch_freq=freq,
    )  # fmt: skip


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run every section not skipped; returns the JSON document."""
    device = select_device(args.device)
    resolve_options(args, device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.arch in ("shared", "split"):
        arch = Arch.uniform(args.depth, args.arch)
    elif (arch := load_arch(args.arch)).depth != args.depth:
        raise UserError(f"--arch {args.arch} is a ResNet-{arch.depth}; --depth is {args.depth}")
    keys = [key for key, *_ in PRESETS + INTEGERS] + ["arch"]
    settings = {key: getattr(args, key) for key in keys} | {"threads": torch.get_num_threads()}
    settings.update(images_per_step=2 * args.batch_size, train_ids=TRAIN_IDS)
    doc = {"machine": machine(device), "settings": settings}
    doc |= {section: {"skipped": True} for section in args.skip}
    wanted = [section for section in SECTIONS if section not in args.skip]
    data = synthetic_train_set((args.img_h, args.img_w), args.seed)
    with tempfile.TemporaryDirectory(prefix="cmnas_bench_") as tmp:
        options = training_options(args, Path(tmp), arch)
        if "fast" in wanted or "features" in wanted:
            trainer = in_memory(options, "fast", data)
            log.info("fast path: %d + %d x %d steps", args.warmup, args.rounds, args.steps)
            if "fast" in wanted:
                doc["fast"] = run_fast(args, trainer)
            if "features" in wanted:
                doc["features"] = run_features(args, trainer)
            del trainer
        if "plain" in wanted:
            log.info("plain path: %d + %d x %d steps", args.warmup, args.rounds, args.steps)
            doc["plain"] = run_plain(args, options, data, arch)
        for section, run in (("metrics", run_metrics), ("rerank", run_rerank), ("llcm", run_llcm)):
            if section in wanted:
                log.info("%s", section)
                doc[section] = run(args)
        if "search" in wanted:
            log.info("search step against training step")
            doc["search"] = run_search(args, options, data)
    rates = doc["fast"].get("images_per_s"), doc["plain"].get("images_per_s")
    doc["speedup"] = round(rates[0] / rates[1], 3) if all(rates) else None
    return doc


def markdown_table(doc: dict[str, Any]) -> str:
    """The figures as a Markdown table, under a line naming the machine they came from."""
    info, settings = doc["machine"], doc["settings"]

    def get(section: str, key: str) -> Any:
        return doc.get(section, {}).get(key)

    def cell(value: Any, unit: str = "") -> str:
        if value is None or value == "":
            return "-" if value is None else ""
        return f"{value:,.2f}{unit}" if unit or value < 100 else f"{value:,.0f}"

    sysu = f"{settings['metrics_query']:,} x {settings['metrics_gallery']:,}"
    llcm = f"{settings['llcm_query']:,} x {settings['llcm_gallery']:,}"
    count = doc.get("rerank", {}).get("threads", settings["threads"])
    threads = f"{count} thread{'' if count == 1 else 's'}"
    rows = [
        ("training images/s", *(get(p, "images_per_s") for p in ("fast", "plain")), doc["speedup"]),
        ("training peak memory (MiB)", *(get(p, "peak_memory_mb") for p in ("fast", "plain")), ""),
        ("feature extraction images/s", get("features", "images_per_s"), "", ""),
        (f"SYSU metrics {sysu} (s): vectorised / per-query loop",
         *(get("metrics", k) for k in ("vectorised_s", "loop_s", "speedup"))),
        (f"re-ranking {sysu}, {threads} (s): vectorised / reference",
         *(get("rerank", k) for k in ("vectorised_s", "reference_s", "speedup"))),
        (f"LLCM {llcm} (s): eval_llcm / re-ranking",
         *(get("llcm", k) for k in ("eval_s", "rerank_s")), ""),
        ("step (s): search / training",
         *(get("search", k) for k in ("search_step_s", "train_step_s", "ratio"))),
    ]  # fmt: skip
    return "\n".join([
        f"Measured on {info['device']} ({info['cpu_count']} CPUs, {settings['threads']} torch "
        f"threads), torch {info['torch']}, commit {info['commit']}, {info['date']}: ResNet-"
        f"{settings['depth']} ({settings['arch']}), {settings['img_h']}x{settings['img_w']}, "
        f"{settings['images_per_step']} images per step.",
        "",
        "| measure | fast | plain | ratio |",
        "|---|---|---|---|",
        *(f"| {what} | {cell(a)} | {cell(b)} | {cell(r, 'x')} |" for what, a, b, r in rows),
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, run the benchmark, print the JSON document (and write the files)."""
    args = get_args_parser().parse_args(argv)
    setup_logging()
    doc = run_benchmark(args)
    setup_logging()  # the trainers pointed logging at their (deleted) run folders
    text = json.dumps(doc, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(doc) + "\n")
    log.info("summary:\n%s", markdown_table(doc))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
