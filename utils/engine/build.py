"""The parts a training run is built from: device, seeds, data (after its root check), optimizer,
schedule, model wrapping."""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from data import CrossModalitySampler, TrainSet, load_train_set
from data.registry import get_dataset
from model.search import arch_parameter_names
from utils.base.distributed import DistInfo, barrier, init_distributed
from utils.base.errors import UserError
from utils.engine.settings import DataSettings, OptimSettings, TrainSettings

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; optionally force deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic results; set before it starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def select_device(name: str | None) -> torch.device:
    """``--device`` or CUDA when available, else the CPU; a bad or absent device is a user error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def check_data_root(
    dataset_name: str, root: str, trial: int | None, parts: Sequence[str] = ("train", "test")
) -> None:
    """Fail with one line naming what is absent or broken before any work is done.

    Checks that ``root`` has the layout of data set ``dataset_name`` for ``parts`` ("train",
    "test") in the split ``trial`` selects, parses its list files, and, when "test" is among
    ``parts``, that every test image exists and has a readable header (a bad test image would
    otherwise stop training at its first evaluation).
    """
    dataset = get_dataset(dataset_name)
    split = dataset.split_of(trial)
    dataset.check_root(root, split, parts)
    if "test" in parts:
        dataset.check_test_images(root, split)


def start_process(settings: TrainSettings) -> tuple[torch.device, DistInfo, str, bool]:
    """This process's device and place among the run's processes (seeded: ``--seed`` + rank),
    its autocast precision and whether it trains channels-last."""
    device = select_device(settings.evaluation.device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    seed_everything(settings.seed + dist.rank, settings.deterministic)
    amp = settings.evaluation.amp if device.type == "cuda" else "none"
    # Channels-last pays on GPUs; on a CPU it made the steps slower.
    wanted, cuda = settings.channels_last, device.type == "cuda"
    return device, dist, amp, cuda if wanted is None else wanted


def share_weights(model: nn.Module, dist: DistInfo) -> None:
    """Start every rank from rank 0's weights (in a multi-process run).

    Each rank initialised its own weights (seed + rank); the EMA copies them before DDP would
    sync the live model, so they are shared here.
    """
    if dist.enabled:
        with torch.no_grad():
            for tensor in model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)


def lr_factor(epoch: int, warmup: int, milestones: list[int]) -> float:
    """The paper's schedule: linear warm-up from 0.01, then x0.1 at each milestone."""
    if epoch < warmup:
        return 0.01 + (1.0 - 0.01) * epoch / warmup
    return 0.1 ** sum(epoch >= m for m in milestones)


def build_schedule(
    optimizer: torch.optim.Optimizer, optim: OptimSettings
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of :func:`lr_factor`, stepped once per epoch."""
    warmup, milestones = optim.warmup_epochs, list(optim.milestones)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, warmup, milestones))


def listed_identities(data: DataSettings) -> int:
    """Check ``--data_root``; the identities its training lists name, no image read (at least
    as many as the training set has classes)."""
    check_data_root(data.dataset, data.data_root, data.trial)
    files = get_dataset(data.dataset).train_files(data.data_root, data.split)
    return len(set(files.visible_pids) | set(files.infrared_pids))


def load_training_data(data: DataSettings, dist: DistInfo) -> TrainSet:
    """Load (and cache) the training images of ``--data_root`` (checked: listed_identities)."""
    # Rank 0 builds the cache first so that the other ranks only read it.
    if not dist.is_main:
        barrier(dist)
    train_set = load_train_set(
        data.dataset,
        data.data_root,
        data.img_size,
        data.trial,
        data.cache_dir,
        progress=dist.is_main and sys.stderr.isatty(),
    )
    if dist.is_main:
        barrier(dist)
    return train_set


def build_sampler(
    train_set: TrainSet, settings: TrainSettings, seed: int, dist: DistInfo
) -> CrossModalitySampler:
    """The batches of ``train_set`` this process trains on (``--batch_size`` images per
    modality, ``--num_pos`` per identity), drawn from ``seed``."""
    labels = (train_set.visible_labels, train_set.infrared_labels)
    batch = (settings.batch_size, settings.num_pos)
    return CrossModalitySampler(*labels, *batch, seed, dist.rank, dist.world_size)


def build_optimizer(
    model: nn.Module, optim: OptimSettings, device: torch.device
) -> torch.optim.Optimizer:
    """Adam (or SGD) over the weights of ``model``: backbone at lr/10, BNNeck and classifier at lr.

    Parameters that do not require grad are left out, and so are a supernet's alphas (they
    train with an optimizer of their own).
    """
    alphas, head, backbone = arch_parameter_names(model), [], []
    for name, param in model.named_parameters():
        if param.requires_grad and name not in alphas:
            (backbone if name.startswith("backbone.") else head).append(param)
    groups = [{"params": backbone, "lr": 0.1 * optim.lr}, {"params": head, "lr": optim.lr}]
    use_fused = device.type == "cuda" if optim.fused is None else optim.fused
    fused = {"fused": True} if use_fused else {}
    if optim.optim == "adam":
        betas = (optim.beta1, optim.beta2)
        return torch.optim.Adam(groups, betas=betas, weight_decay=optim.weight_decay, **fused)
    return torch.optim.SGD(
        groups, momentum=0.9, nesterov=True, weight_decay=optim.weight_decay, **fused
    )


def rescale_schedule(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    checkpoint: dict[str, Any],
    lr: float,
) -> None:
    """Continue a schedule restored from ``checkpoint`` at the base rate ``lr`` when its run had
    another ``--lr``: warm-up and milestones are kept, every group's rates scaled (and said)."""
    saved = (checkpoint.get("args") or {}).get("lr")
    if not isinstance(saved, (int, float)) or saved <= 0 or saved == lr:
        return
    scheduler.base_lrs = [base * lr / saved for base in scheduler.base_lrs]
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["initial_lr"] = base
        group["lr"] *= lr / saved
    head, backbone = optimizer.param_groups[-1]["lr"], optimizer.param_groups[0]["lr"]
    log.warning(
        "--lr %g applied to the resumed schedule: learning rate now %.4g (head), %.4g (backbone)",
        lr,
        head,
        backbone,
    )


def wrap_model(model: nn.Module, dist: DistInfo, compile_model: bool) -> nn.Module:
    """DDP (in a multi-process run) and/or torch.compile around the model the steps run."""
    if dist.enabled:
        # A supernet's alphas are averaged by hand in the architecture step; DDP would expect a
        # gradient for them in every weights step, where they get none.
        alphas = sorted(arch_parameter_names(model))
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, alphas
        )
        model = nn.parallel.DistributedDataParallel(model, device_ids=None)
    if compile_model:
        model = torch.compile(model)  # type: ignore[assignment]
    return model
