"""The parts a training run is built from: device, seeds, data (after its root check), batches on
the device, optimizer, schedule, the EMA, model wrapping."""

from __future__ import annotations

import copy
import logging
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from data import CrossModalitySampler, TrainSet, augment_batch, load_train_set
from data.registry import get_dataset
from model import Routing
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
    """Fail with one line, before any work, unless ``root`` has the layout of ``dataset_name``
    for ``parts`` in the split ``trial`` selects, with readable test images (a bad one would
    otherwise stop training at its first evaluation)."""
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
    """Start every rank from rank 0's weights (each initialised its own, seed + rank, and the
    EMA copies them before DDP would sync the live model)."""
    if dist.enabled:
        with torch.no_grad():
            for tensor in model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)


def lr_factor(epoch: int, warmup: int, milestones: list[int]) -> float:
    """The paper's schedule: linear warm-up from 0.01, then x0.1 at each milestone."""
    if epoch < warmup:
        return 0.01 + (1.0 - 0.01) * epoch / warmup
    return 0.1 ** sum(epoch >= m for m in milestones)


def build_schedule(optimizer: Optimizer, optim: OptimSettings) -> LambdaLR:
    """The learning-rate schedule of :func:`lr_factor`, stepped once per epoch."""
    warmup, milestones = optim.warmup_epochs, list(optim.milestones)
    return LambdaLR(optimizer, lambda e: lr_factor(e, warmup, milestones))


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
    progress = dist.is_main and sys.stderr.isatty()
    train_set = load_train_set(
        data.dataset, data.data_root, data.img_size, data.trial, data.cache_dir, progress=progress
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


def build_optimizer(model: nn.Module, optim: OptimSettings, device: torch.device) -> Optimizer:
    """Adam (or SGD) over the trained weights of ``model`` (a supernet's alphas have their own):
    backbone at lr/10, BNNeck and classifier at lr."""
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
    optimizer: Optimizer, scheduler: LambdaLR, checkpoint: dict[str, Any], lr: float
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
    what = "--lr %g applied to the resumed schedule: learning rate now %.4g (head), %.4g (backbone)"
    log.warning(what, lr, head, backbone)


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


@dataclass
class Batch:
    """One cross-modality step: images (visible half first), labels and routing."""

    images: torch.Tensor
    labels: torch.Tensor
    routing: Routing
    n_visible: int


def _index_tensor(index: np.ndarray, device: torch.device) -> torch.Tensor:
    """Indices on ``device`` without a host synchronisation (pinned, non-blocking on CUDA)."""
    tensor = torch.from_numpy(index)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@dataclass
class ResidentImages:
    """A training set's uint8 images and labels, (visible, infrared), on the GPU when there is
    one; its batches are made on ``device``, augmented with ``generator``, maybe channels-last."""

    images: tuple[torch.Tensor, ...]
    labels: tuple[torch.Tensor, ...]
    device: torch.device
    generator: torch.Generator
    channels_last: bool

    @classmethod
    def upload(
        cls,
        train_set: TrainSet,
        device: torch.device,
        generator: torch.Generator,
        channels_last: bool,
    ) -> ResidentImages:
        """Move ``train_set`` where the steps read it (the device itself when it is a GPU)."""
        store = device if device.type == "cuda" else torch.device("cpu")
        images = (train_set.visible_images, train_set.infrared_images)
        labels = (train_set.visible_labels, train_set.infrared_labels)
        return cls(
            tuple(torch.from_numpy(np.ascontiguousarray(part)).to(store) for part in images),
            tuple(torch.from_numpy(part.astype(np.int64)).to(store) for part in labels),
            device,
            generator,
            channels_last,
        )

    def batch(self, visible_idx: np.ndarray, infrared_idx: np.ndarray) -> Batch:
        """Gather, augment and stack one step's images, visible half first."""
        store = self.images[0].device
        index = [_index_tensor(visible_idx, store), _index_tensor(infrared_idx, store)]
        raw = torch.cat(
            [part.index_select(0, i) for part, i in zip(self.images, index, strict=True)]
        )
        x = augment_batch(raw.to(self.device, non_blocking=True), self.generator)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = torch.cat(
            [part.index_select(0, i) for part, i in zip(self.labels, index, strict=True)]
        )
        n = len(visible_idx)
        y = labels.to(self.device, non_blocking=True)
        return Batch(x, y, Routing.from_halves(n, len(infrared_idx)), n)


class ModelEMA:
    """An EMA copy of a model, updated with fused ``foreach`` operations every step: floating-point
    parameters and buffers are averaged, integer buffers (``num_batches_tracked``) copied. Build it
    after the model has its final device and memory format (the tensors are collected once)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self._live = model
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        live = model.state_dict(keep_vars=True)
        ema = {key: value.data for key, value in self.module.state_dict(keep_vars=True).items()}
        floats = {key for key, value in ema.items() if value.dtype.is_floating_point}
        self._float_ema = [ema[key] for key in ema if key in floats]
        self._float_live = [live[key].data for key in ema if key in floats]
        self._int_pairs = [(ema[key], live[key].data) for key in ema if key not in floats]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the live model: ema = decay * ema + (1 - decay) * live."""
        torch._foreach_lerp_(self._float_ema, self._float_live, 1.0 - self.decay)
        for ema, live in self._int_pairs:
            ema.copy_(live)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model`` with the averaged weights (the authors' loop does this)."""
        if model is not self._live:
            model.load_state_dict(self.module.state_dict())
            return
        torch._foreach_copy_(self._float_live, self._float_ema)
        for ema, live in self._int_pairs:
            live.copy_(ema)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, in the model's own key names."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore averaged weights saved by :meth:`state_dict`."""
        self.module.load_state_dict(state)
