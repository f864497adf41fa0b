"""Speed benchmark of the training, feature-extraction, metrics and search paths (JSON output).

    python -m utils.benchmark                       # paper sizes on CUDA, small sizes on a CPU
    python -m utils.benchmark --device cuda --depth 50 --img_h 256 --img_w 128 --batch_size 64 \
        --steps 50 --warmup 10 --workers 4 --out bench.json

Sections of the JSON document (printed to stdout and written to ``--out``):

- ``fast``: the engine's own training step (:meth:`Trainer.training_step`: uint8
  images resident on the device, batched augmentation there, bf16 autocast on CUDA,
  channels-last, fused Adam, ``foreach`` EMA, no host synchronisation per step) on random
  in-memory images; ``--compile`` adds torch.compile.
- ``plain``: the authors' style: fp32, NCHW, eager, every image augmented on its own on the CPU in
  DataLoader workers (:mod:`data.plain`), the batch copied to the device, a for-loop Adam, a
  per-tensor EMA and the loss read back every step.
- ``speedup``: fast images/s over plain images/s.
- ``features``: :func:`extract_features` images/s (half precision on CUDA).
- ``metrics``: vectorised SYSU metrics against the per-query loop at the SYSU multi-shot size.
- ``search``: a search step against a training step (the search's two steps timed apart).

Images/s count both modalities: ``2 * batch_size * steps / seconds`` of the fastest of
``--rounds`` timed windows, after ``--warmup`` untimed steps.
Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU it is the process's
maximum resident set size (``resource.getrusage``), reset before each path where Linux allows.
Timings are for the benchmark command only; no unit test asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
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
from torch import nn

from data.plain import PairedImages, plain_loader
from data.sampler import CrossModalitySampler
from data.trainset import TrainSet
from model import DEPTHS, Arch, Routing, build_model, load_arch, save_arch
from model.losses import LossRecipe
from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.base.logger import git_commit, setup_logging
from utils.base.modality import Modality
from utils.engine.options import EMA_DECAY, data_parser, model_parser, optim_parser, select_device
from utils.engine.search import SearchTrainer, search_parser
from utils.engine.trainer import Trainer
from utils.evaluation.evaluate import extract_features
from utils.evaluation.metrics import benchmark_metrics

log = logging.getLogger("benchmark")

SECTIONS = ("fast", "plain", "features", "metrics", "search")
# Default sizes per device type: the paper's on CUDA, a run of a few minutes on a small CPU.
PRESETS: dict[str, dict[str, int]] = {
    "cuda": {
        "depth": 50,
        "img_h": 256,
        "img_w": 128,
        "batch_size": 64,
        "steps": 30,
        "rounds": 3,
        "warmup": 10,
        "feature_images": 4096,
        "test_batch": 256,
        "search_steps": 16,
    },
    "cpu": {
        "depth": 18,
        "img_h": 128,
        "img_w": 64,
        "batch_size": 16,
        "steps": 4,
        "rounds": 3,
        "warmup": 2,
        "feature_images": 256,
        "test_batch": 64,
        "search_steps": 4,
    },
}
# The synthetic training set: SYSU's 395 training identities, a few images each per modality.
TRAIN_IDS = 395
IMAGES_PER_ID = 2
# The SYSU-MM01 multi-shot all-search problem: every infrared test image against 10 images
# per (identity, visible camera) folder.
SYSU_QUERIES = 3803
SYSU_MULTISHOT_GALLERY = 3010
MB = 2**20


def get_args_parser() -> argparse.ArgumentParser:
    """The benchmark's options; size options left out take the device's preset."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.benchmark",
        description="Benchmark the fast and the plain training paths, feature extraction, the "
        "metrics and the search; prints one JSON document.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cuda, cpu = PRESETS["cuda"], PRESETS["cpu"]

    def preset(key: str) -> str:
        return f"(default: {cuda[key]} on CUDA, {cpu[key]} on the CPU)"

    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if any)")
    parser.add_argument(
        "--depth", type=int, choices=DEPTHS, default=None, help=f"ResNet {preset('depth')}"
    )
    parser.add_argument("--img_h", type=int, default=None, help=f"image height {preset('img_h')}")
    parser.add_argument("--img_w", type=int, default=None, help=f"image width {preset('img_w')}")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help=f"images per modality per step {preset('batch_size')}",
    )
    parser.add_argument("--num_pos", type=int, default=4, help="images per identity and modality")
    parser.add_argument(
        "--steps", type=int, default=None, help=f"timed training steps {preset('steps')}"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"timed windows of --steps steps per path, the best counts {preset('rounds')}",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help=f"untimed steps first {preset('warmup')}"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers of the plain path (default: min(4, CPU count))",
    )
    parser.add_argument(
        "--arch",
        default="split",
        help="network: 'shared' or 'split' in every slot, or an architecture file",
    )
    parser.add_argument(
        "--amp",
        choices=("bf16", "fp16", "none"),
        default="bf16",
        help="fast path precision on CUDA (fp16 adds a gradient scaler; CPU: always fp32)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    parser.add_argument(
        "--channels_last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory format on the fast path (default: on CUDA only)",
    )
    parser.add_argument(
        "--feature_images",
        type=int,
        default=None,
        help=f"images of the feature-extraction run {preset('feature_images')}",
    )
    parser.add_argument(
        "--test_batch",
        type=int,
        default=None,
        help=f"feature-extraction batch {preset('test_batch')}",
    )
    parser.add_argument(
        "--metrics_query", type=int, default=SYSU_QUERIES, help="queries of the metrics problem"
    )
    parser.add_argument(
        "--metrics_gallery",
        type=int,
        default=SYSU_MULTISHOT_GALLERY,
        help="gallery images of the metrics problem",
    )
    parser.add_argument(
        "--search_steps",
        type=int,
        default=None,
        help=f"timed steps per round of the search comparison {preset('search_steps')}",
    )
    parser.add_argument(
        "--search_rounds", type=int, default=2, help="rounds of the search comparison (best kept)"
    )
    parser.add_argument(
        "--skip", nargs="*", choices=SECTIONS, default=[], help="sections to leave out"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the main process (default: torch's; 1 avoids OpenMP threads "
        "spin-waiting for each other on a CPU shared with other programs)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--out", default=None, help="also write the JSON document here")
    parser.add_argument(
        "--markdown", default=None, help="also write a Markdown table of the figures here"
    )
    return parser


def resolve_options(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill the size options the user left out from the device's preset; validate them."""
    for key, value in PRESETS[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers is None:
        args.workers = min(4, os.cpu_count() or 1)
    if args.channels_last is None:
        # Channels-last pays on GPUs; on a CPU it slows the convolutions down.
        args.channels_last = device.type == "cuda"
    positive = (
        "batch_size",
        "num_pos",
        "steps",
        "rounds",
        "feature_images",
        "test_batch",
        "search_steps",
    )
    for key in (*positive, "search_rounds", "metrics_query", "metrics_gallery"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} {getattr(args, key)}: expected a positive integer")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: expected a positive integer")
    if args.warmup < 0 or args.workers < 0:
        raise UserError("--warmup and --workers must be >= 0")
    if args.batch_size % args.num_pos or args.batch_size // args.num_pos < 2:
        raise UserError(
            f"--batch_size {args.batch_size} must be a multiple of --num_pos {args.num_pos} "
            "with at least 2 identities"
        )
    return args


# ----- measuring ---------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing boundaries only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; returns whether the window really restarted."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        # Linux: "5" resets the peak RSS to the current RSS (also seen by getrusage).
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device, windowed: bool) -> dict[str, Any]:
    """The peak memory of the window started by :func:`reset_peak_memory`, in MiB."""
    if device.type == "cuda":
        return {
            "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / MB, 1),
            "memory": "torch.cuda.max_memory_allocated",
        }
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    what = "max RSS of the process (getrusage)"
    return {
        "peak_memory_mb": round(rss_kb / 1024, 1),
        "memory": what + (" during this path" if windowed else " since start (cumulative)"),
    }


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "device_type": device.type,
        "device": _cpu_name(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def throughput(
    run_step: Callable[[int], Any],
    warmup: int,
    steps: int,
    rounds: int,
    images: int,
    device: torch.device,
) -> dict[str, Any]:
    """``warmup`` untimed steps, then ``rounds`` timed windows of ``steps`` steps; best counts.

    The best window filters out bursts of work from other programs sharing the machine.
    """
    for index in range(warmup):
        run_step(index)
    index = warmup
    windows = []
    for _ in range(rounds):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            run_step(index)
            index += 1
        synchronize(device)
        windows.append(time.perf_counter() - started)
    best = min(windows)
    return {
        "images_per_s": round(images * steps / best, 2),
        "step_s": round(best / steps, 5),
        "images_per_s_per_round": [round(images * steps / w, 2) for w in windows],
    }


# ----- set-up ------------------------------------------------------------------------------
def synthetic_train_set(
    img_size: tuple[int, int], ids: int = TRAIN_IDS, per_id: int = IMAGES_PER_ID, seed: int = 0
) -> TrainSet:
    """Random uint8 images, ``per_id`` per identity and modality; nothing read from disk."""
    rng = np.random.default_rng(seed)
    n = ids * per_id
    labels = np.repeat(np.arange(ids, dtype=np.int64), per_id)
    shape = (n, *img_size, 3)
    return TrainSet(
        visible_images=rng.integers(0, 256, size=shape, dtype=np.uint8),
        visible_labels=labels,
        infrared_images=rng.integers(0, 256, size=shape, dtype=np.uint8),
        infrared_labels=labels.copy(),
        pids=list(range(1, ids + 1)),
        visible_paths=[f"synthetic/visible/{k}" for k in range(n)],
        infrared_paths=[f"synthetic/infrared/{k}" for k in range(n)],
    )


def benchmark_arch(spec: str, depth: int) -> Arch:
    """``shared``/``split`` in every slot of a ResNet-``depth``, or an architecture file."""
    if spec in ("shared", "split"):
        return Arch.uniform(depth, spec)
    arch = load_arch(spec)
    if arch.depth != depth:
        raise UserError(f"--arch {spec} is a ResNet-{arch.depth}; --depth is {depth}")
    return arch


def training_options(
    args: argparse.Namespace, workdir: Path, arch: Arch, device: torch.device
) -> argparse.Namespace:
    """train.py's options for the benchmark sizes (the paper's recipe otherwise).

    Every value the training checks would fill in is given explicitly, so the options are
    complete without a data set on disk (only the data checks are left out).
    """
    config = workdir / "arch.json"
    save_arch(arch, config)
    parser = argparse.ArgumentParser(parents=[data_parser(), model_parser(), optim_parser()])
    argv = [
        "--data_root", str(workdir), "--dataset", "sysu", "--trial", "1",
        "--config_path", str(config), "--img_h", str(args.img_h), "--img_w", str(args.img_w),
        "--batch_size", str(args.batch_size), "--num_pos", str(args.num_pos),
        "--pretrained", "none", "--amp", args.amp, "--device", str(device),
        "--ema_decay", str(EMA_DECAY["sysu"]), "--save", str(workdir / "runs"),
        "--note", "fast", "--seed", str(args.seed), "--test_batch", str(args.test_batch),
        "--log_freq", str(10**9),
        "--channels_last" if args.channels_last else "--no-channels_last",
    ] + (["--compile"] if args.compile else [])  # fmt: skip
    return parser.parse_args(argv)


class SyntheticTrainer(Trainer):
    """The engine's Trainer with its training set given in memory instead of read from disk."""

    kind = "benchmark"

    def __init__(self, args: argparse.Namespace, train_set: TrainSet) -> None:
        """Build everything as train.py does, around ``train_set``."""
        self._given = train_set
        super().__init__(args)

    def build_data(self) -> TrainSet:
        """The training set given to the constructor."""
        return self._given


class LoopEMA:
    """The authors' EMA: one multiply-add per state tensor, in a Python loop."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        """Copy the model's state as the first average."""
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema = decay * ema + (1 - decay) * live, tensor by tensor."""
        for key, live in model.state_dict().items():
            average = self.state[key]
            if average.dtype.is_floating_point:
                average.mul_(self.decay).add_(live.detach(), alpha=1.0 - self.decay)
            else:
                average.copy_(live)


# ----- sections ----------------------------------------------------------------------------
def run_fast(
    args: argparse.Namespace, options: argparse.Namespace, train_set: TrainSet
) -> tuple[dict[str, Any], SyntheticTrainer]:
    """Time the engine's training step; returns the figures and the trainer (for features)."""
    device = select_device(options.device)
    windowed = reset_peak_memory(device)
    trainer = SyntheticTrainer(options, train_set)
    sampler = trainer.sampler
    trainer.model.train()

    def step(index: int) -> None:
        epoch, position = divmod(index, len(sampler))
        trainer.training_step(*sampler.batch(epoch, position))

    figures = throughput(step, args.warmup, args.steps, args.rounds, 2 * args.batch_size, device)
    figures.update(peak_memory(device, windowed))
    figures["settings"] = {
        "step": "utils.engine.trainer.Trainer.training_step",
        "amp": trainer.amp,
        "channels_last": options.channels_last,
        "compile": options.compile,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "augmentation": f"batched on the {device.type} (data.transforms.augment_batch)",
        "images": f"uint8, resident on the {device.type}",
        "optimizer": "Adam (fused)" if device.type == "cuda" else "Adam",
        "ema": "ModelEMA (foreach)",
        "loss_readback": "none per step",
    }
    return figures, trainer


def run_plain(
    args: argparse.Namespace, options: argparse.Namespace, train_set: TrainSet, arch: Arch
) -> dict[str, Any]:
    """Time the authors'-style step: per-image CPU augmentation in workers, fp32 NCHW eager."""
    device = select_device(options.device)
    windowed = reset_peak_memory(device)
    torch.manual_seed(args.seed)
    # Same cuDNN autotuning as the fast path: the comparison is about the input pipeline,
    # precision and memory format, not about cuDNN's choice of algorithms.
    torch.backends.cudnn.benchmark = True
    model = build_model(arch, train_set.num_classes, options.last_stride).to(device)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "backbone." not in n]
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and "backbone." in n]
    optimizer = torch.optim.Adam(
        [{"params": backbone, "lr": 0.1 * options.lr}, {"params": head, "lr": options.lr}],
        betas=(options.beta1, options.beta2),
        weight_decay=options.weight_decay,
        foreach=False,
    )
    ema = LoopEMA(model, options.ema_decay)
    sampler = CrossModalitySampler(
        train_set.visible_labels,
        train_set.infrared_labels,
        args.batch_size,
        args.num_pos,
        args.seed,
    )
    dataset = PairedImages(
        train_set.visible_images,
        train_set.visible_labels,
        train_set.infrared_images,
        train_set.infrared_labels,
        args.seed,
    )
    loader = plain_loader(
        dataset,
        sampler,
        args.workers,
        num_batches=args.warmup + args.rounds * args.steps,
        seed=args.seed,
    )
    batches = iter(loader)
    model.train()
    losses: list[float] = []

    def step(index: int) -> None:
        visible, infrared, visible_labels, infrared_labels = next(batches)
        images = torch.cat([visible, infrared]).to(device)
        labels = torch.cat([visible_labels, infrared_labels]).to(device)
        n = len(visible)
        pool, feat, logits = model(images, Routing.from_halves(n, len(infrared)))
        terms = LossRecipe.from_args(options)(pool, feat, logits, labels, n)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        ema.update(model)
        # The authors' loop reads the loss every step (a host synchronisation).
        losses.append(terms["loss"].item())

    figures = throughput(step, args.warmup, args.steps, args.rounds, 2 * args.batch_size, device)
    # Reaching the loader's end joins its workers, so their peak RSS is counted below.
    next(batches, None)
    figures.update(peak_memory(device, windowed))
    workers_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    figures["workers_peak_rss_mb"] = round(workers_kb / 1024, 1) if args.workers else 0.0
    figures["settings"] = {
        "step": "fp32, NCHW, eager",
        "amp": "none",
        "channels_last": False,
        "compile": False,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "augmentation": f"per image on the CPU in {args.workers} DataLoader workers "
        "(data.plain, data.transforms.augment_one)",
        "images": "float NCHW batches copied to the device every step",
        "optimizer": "Adam (for-loop)",
        "ema": "per-tensor loop",
        "loss_readback": "every step",
    }
    return figures


def run_features(args: argparse.Namespace, model: nn.Module, amp: str) -> dict[str, Any]:
    """Time :func:`utils.evaluation.evaluate.extract_features` on random uint8 images."""
    device = next(model.parameters()).device
    rng = np.random.default_rng(args.seed + 1)
    shape = (args.feature_images, args.img_h, args.img_w, 3)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    # Warm-up: kernels, cudnn autotuning and the allocator.
    extract_features(
        model, images[: args.test_batch], Modality.INFRARED, device, args.test_batch, amp
    )
    synchronize(device)
    started = time.perf_counter()
    pool, _ = extract_features(model, images, Modality.INFRARED, device, args.test_batch, amp)
    synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "images_per_s": round(len(images) / seconds, 2),
        "images": len(images),
        "batch_size": args.test_batch,
        "amp": amp,
        "feature_dim": int(pool.shape[1]),
        "timed_s": round(seconds, 3),
    }


def run_metrics(args: argparse.Namespace) -> dict[str, Any]:
    """Vectorised SYSU metrics against the per-query loop (benchmark_metrics)."""
    result: dict[str, Any] = dict(
        benchmark_metrics(args.metrics_query, args.metrics_gallery, seed=args.seed)
    )
    result.update({"num_query": args.metrics_query, "num_gallery": args.metrics_gallery})
    return result


def run_search(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """A search step against a training step, on synthetic SYSU-MM01 written to disk.

    A search epoch is one supernet weights step per training step plus an architecture step
    every ``--arch_freq`` steps: ``search_step_s = weights_step_s + arch_step_s / arch_freq``.
    """
    from data.toy import make_sysu

    with tempfile.TemporaryDirectory(prefix="cmnas_search_") as tmp:
        root = Path(tmp) / "sysu"
        ids = 5 * (args.batch_size // args.num_pos)
        make_sysu(
            root, args.seed, train_ids=ids, val_ids=2, test_ids=2, images_per_camera=6,
            height=args.img_h, width=args.img_w,
        )  # fmt: skip
        options = training_options(args, Path(tmp), Arch.uniform(args.depth, "shared"), device)
        options.data_root, options.cache_dir = str(root), str(Path(tmp) / "cache")
        search_defaults = vars(search_parser().parse_args([]))
        # Weights steps timed alone (no architecture step ever due); architecture steps direct.
        search_options = argparse.Namespace(**{
            **vars(options), **search_defaults, "depth": args.depth, "config_path": None,
            "arch_warmup": 0, "arch_freq": 10**9, "eval_arch": False, "note": "search",
        })  # fmt: skip
        trainer, searcher = Trainer(options), SearchTrainer(search_options)

        def batch(owner: Trainer, index: int) -> tuple[np.ndarray, np.ndarray]:
            return owner.sampler.batch(*divmod(index, len(owner.sampler)))

        kinds: dict[str, Callable[[int], Any]] = {
            "train": lambda i: trainer.training_step(*batch(trainer, i)),
            "weights": lambda i: searcher.training_step(*batch(searcher, i)),
            "arch": lambda i: searcher.architecture_step(*divmod(i, len(searcher.arch_sampler))),
        }
        seconds = {}
        for name, step in kinds.items():
            figures = throughput(
                step,
                args.warmup,
                args.search_steps,
                args.search_rounds,
                2 * args.batch_size,
                device,
            )
            seconds[name] = figures["step_s"]
    freq = search_defaults["arch_freq"]
    search_step = seconds["weights"] + seconds["arch"] / freq
    return {
        "status": "measured",
        "train_step_s": seconds["train"],
        "search_step_s": round(search_step, 5),
        "ratio": round(search_step / seconds["train"], 3) if seconds["train"] else None,
        "weights_step_s": seconds["weights"],
        "arch_step_s": seconds["arch"],
        "arch_freq": freq,
        "source": "utils.engine.search.SearchTrainer (synthetic SYSU data)",
    }


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run every section not skipped; returns the JSON document as a dict."""
    device = select_device(args.device)
    resolve_options(args, device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    arch = benchmark_arch(args.arch, args.depth)
    skip = set(args.skip)
    doc: dict[str, Any] = {
        "machine": machine(device),
        "settings": {
            "depth": args.depth,
            "arch": args.arch,
            "img_h": args.img_h,
            "img_w": args.img_w,
            "batch_size_per_modality": args.batch_size,
            "images_per_step": 2 * args.batch_size,
            "num_pos": args.num_pos,
            "steps": args.steps,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "workers": args.workers,
            "threads": torch.get_num_threads(),
            "train_ids": TRAIN_IDS,
            "images_per_id_and_modality": IMAGES_PER_ID,
        },
    }
    img_size = (args.img_h, args.img_w)
    train_set = synthetic_train_set(img_size, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="cmnas_bench_") as tmp:
        options = training_options(args, Path(tmp), arch, device)
        if "fast" in skip and "features" in skip:
            doc["fast"] = doc["features"] = {"skipped": True}
        else:
            log.info("fast path: %d + %d steps", args.warmup, args.steps)
            fast, trainer = run_fast(args, options, train_set)
            doc["fast"] = {"skipped": True} if "fast" in skip else fast
            if "features" in skip:
                doc["features"] = {"skipped": True}
            else:
                log.info("feature extraction: %d images", args.feature_images)
                doc["features"] = run_features(args, trainer.eval_model(), trainer.amp)
            del trainer
            _release(device)
        if "plain" in skip:
            doc["plain"] = {"skipped": True}
        else:
            log.info("plain path: %d + %d steps, %d workers", args.warmup, args.steps, args.workers)
            doc["plain"] = run_plain(args, options, train_set, arch)
            _release(device)
    fast_rate = doc["fast"].get("images_per_s")
    plain_rate = doc["plain"].get("images_per_s")
    doc["speedup"] = round(fast_rate / plain_rate, 3) if fast_rate and plain_rate else None
    if "metrics" in skip:
        doc["metrics"] = {"skipped": True}
    else:
        log.info("metrics: %d queries x %d gallery", args.metrics_query, args.metrics_gallery)
        doc["metrics"] = run_metrics(args)
    if "search" in skip:
        doc["search"] = {"skipped": True}
    else:
        log.info("search step against training step")
        doc["search"] = run_search(args, device)
    return doc


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def markdown_table(doc: dict[str, Any]) -> str:
    """The figures as a Markdown table for the README, with the machine they came from."""
    info, settings = doc["machine"], doc["settings"]

    def figure(section: str, key: str, unit: str = "") -> str:
        value = doc.get(section, {}).get(key)
        return "-" if value is None else f"{value:,.1f}{unit}"

    search = doc.get("search", {})
    metrics = doc.get("metrics", {})
    lines = [
        f"Measured on {info['device']} ({info['cpu_count']} CPUs), torch {info['torch']}, "
        f"commit {info['commit']}, {info['date']}: ResNet-{settings['depth']} "
        f"({settings['arch']}), {settings['img_h']}x{settings['img_w']}, "
        f"{settings['images_per_step']} images per step.",
        "",
        "| measure | fast | plain | ratio |",
        "|---|---|---|---|",
        f"| training images/s | {figure('fast', 'images_per_s')} | "
        f"{figure('plain', 'images_per_s')} | {_ratio(doc.get('speedup'))} |",
        f"| training peak memory (MiB) | {figure('fast', 'peak_memory_mb')} | "
        f"{figure('plain', 'peak_memory_mb')} | |",
        f"| feature extraction images/s | {figure('features', 'images_per_s')} | | |",
        f"| SYSU multi-shot metrics (s): vectorised / per-query loop | "
        f"{figure('metrics', 'vectorised_s')} | {figure('metrics', 'loop_s')} | "
        f"{_ratio(metrics.get('speedup'))} |",
        f"| step (s): search / training | {figure('search', 'search_step_s')} | "
        f"{figure('search', 'train_step_s')} | {_ratio(search.get('ratio'))} |",
    ]
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, run the benchmark, print the JSON document (and write --out)."""
    args = get_args_parser().parse_args(argv)
    setup_logging()
    doc = run_benchmark(args)
    # The Trainers of the run re-configure logging to their (deleted) run folders.
    setup_logging()
    text = json.dumps(doc, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        log.info("wrote %s", args.out)
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(doc) + "\n")
        log.info("wrote %s", args.markdown)
    log.info("summary:\n%s", markdown_table(doc))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
