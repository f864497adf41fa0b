"""The training engine shared by train.py and search.py.

:class:`Trainer` owns the fixed loop (epochs -> steps -> checkpoints -> evaluation). A variant
overrides single steps: search.py replaces :meth:`Trainer.training_step` and the data/model set-up,
and reuses everything else.

Speed: images stay uint8 (on the GPU when there is one) and are augmented in batch on the device;
losses are read back to the host only every ``--log_freq`` steps; bf16 autocast, channels-last,
fused Adam and a ``foreach`` EMA on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data import CrossModalitySampler, TrainSet, augment_batch, load_train_set
from model import Arch, Routing, build_model, load_arch
from model.losses import cmmd_loss, cross_modality_triplet, identity_loss, sp_loss
from model.weights import checkpoint_state, read_checkpoint
from utils.checkpoint import (
    capture_rng_state,
    checkpoint_header,
    restore_rng_state,
    save_atomic,
)
from utils.distributed import barrier, broadcast_flag, cleanup, init_distributed
from utils.ema import ModelEMA
from utils.errors import UserError
from utils.evaluation import autocast, evaluate_regdb, evaluate_sysu, format_table
from utils.logger import append_json_line, log_run_header, setup_logging
from utils.options import prepare_run_dir, run_dir

log = logging.getLogger(__name__)
LATEST = "checkpoint_latest.pth"


class Interrupted(Exception):
    """Raised after a SIGINT/SIGTERM once a resumable checkpoint is on disk."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(
            f"stopped by {signal.Signals(signum).name}; resumable checkpoint: "
            f"{checkpoint} (continue with --resume {checkpoint})"
        )
        self.signum = signum


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the run stops and names its last good checkpoint."""


@dataclass
class Batch:
    """One cross-modality step: images (visible half first), labels and routing."""

    images: torch.Tensor
    labels: torch.Tensor
    routing: Routing
    n_visible: int


def select_device(name: str | None) -> torch.device:
    """``--device`` or CUDA when available, else the CPU; a bad name is a user error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; optionally force deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def lr_factor(epoch: int, warmup: int, milestones: list[int]) -> float:
    """The paper's schedule: linear warm-up from 0.01, then x0.1 at each milestone."""
    if epoch < warmup:
        return 0.01 + (1.0 - 0.01) * epoch / warmup
    return 0.1 ** sum(epoch >= m for m in milestones)


def reid_losses(
    pool: torch.Tensor,
    feat: torch.Tensor,
    logits: torch.Tensor | None,
    labels: torch.Tensor,
    n_visible: int,
    args: argparse.Namespace,
    pairings: tuple[str, ...] = ("vv", "ii", "vi", "iv"),
) -> dict[str, torch.Tensor]:
    """The CM-NAS loss terms on a batch whose first ``n_visible`` samples are visible.

    Returns the weighted terms and their sum under ``"loss"``; CE is skipped when ``logits`` is
    None (identities the classifier does not know, as in the architecture step of the search).
    """
    pool, feat = pool.float(), feat.float()
    v_labels, i_labels = labels[:n_visible], labels[n_visible:]
    terms: dict[str, torch.Tensor] = {}
    if logits is not None:
        terms["ce"] = identity_loss(logits.float(), labels, args.label_smooth)
    terms["triplet"] = cross_modality_triplet(
        pool[:n_visible], v_labels, pool[n_visible:], i_labels, args.margin, pairings
    )
    if args.sp_lambda > 0:
        terms["sp"] = args.sp_lambda * sp_loss(feat[:n_visible], feat[n_visible:])
    if args.cmmd_lambda > 0:
        terms["cmmd"] = args.cmmd_lambda * cmmd_loss(
            feat[:n_visible], v_labels, feat[n_visible:], i_labels
        )
    terms["loss"] = sum(terms.values())  # type: ignore[assignment]
    return terms


class Trainer:
    """Fixed training loop; subclasses override set-up or single steps, never the loop."""

    kind = "train"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = select_device(args.device)
        self.dist = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        seed_everything(args.seed + self.dist.rank, args.deterministic)
        self.out = run_dir(args, self.kind)
        if self.dist.is_main:
            prepare_run_dir(self.out)
        barrier(self.dist)
        setup_logging(self.out / "log.txt", self.dist.rank)
        self.env = log_run_header(args, self.device)
        self.img_size = (args.img_h, args.img_w)
        self.amp = args.amp if self.device.type == "cuda" else "none"
        self.train_set = self.build_data()
        self.model = self.build_model()
        self.model.to(self.device)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.ema = ModelEMA(self.model, args.ema_decay) if args.ema_decay > 0 else None
        self.optimizer = self.build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda e: lr_factor(e, args.warmup_epochs, args.milestones)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.sampler = CrossModalitySampler(
            self.train_set.visible_labels,
            self.train_set.infrared_labels,
            args.batch_size,
            args.num_pos,
            args.seed,
            self.dist.rank,
            self.dist.world_size,
        )
        self.aug_generator = torch.Generator().manual_seed(args.seed * 1000 + self.dist.rank)
        self.start_epoch, self.start_step, self.global_step = 0, 0, 0
        self.last_good: Path | None = None
        self._stop_signal: int | None = None
        self._upload_images()
        if args.resume:
            self.resume(args.resume)
        self.net = self._wrap(self.model)

    # ----- set-up, overridable -------------------------------------------------------------
    def build_data(self) -> TrainSet:
        """Load (and cache) the training images."""
        args = self.args
        # Rank 0 builds the cache first so that the other ranks only read it.
        if not self.dist.is_main:
            barrier(self.dist)
        train_set = load_train_set(
            args.dataset,
            args.data_root,
            self.img_size,
            args.trial,
            args.cache_dir,
            progress=self.dist.is_main,
        )
        if self.dist.is_main:
            barrier(self.dist)
        return train_set

    def build_arch(self) -> Arch:
        """The architecture to train, from ``--config_path``."""
        return load_arch(self.args.config_path)

    def build_model(self) -> nn.Module:
        """The network, initialised from ``--pretrained``."""
        self.arch = self.build_arch()
        log.info("architecture %s: %s", self.args.config_path, self.arch.summary())
        return build_model(
            self.arch, self.train_set.num_classes, self.args.last_stride, self.args.pretrained
        )

    def param_groups(self) -> list[dict[str, Any]]:
        """Backbone at lr/10, BNNeck and classifier at lr (the paper's recipe)."""
        head, backbone = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad or not self.is_weight(name):
                continue
            (backbone if name.startswith("backbone.") else head).append(param)
        return [
            {"params": backbone, "lr": 0.1 * self.args.lr},
            {"params": head, "lr": self.args.lr},
        ]

    def is_weight(self, name: str) -> bool:
        """Whether parameter ``name`` is a network weight (not an architecture parameter)."""
        return True

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Adam (or SGD) over the network weights."""
        args = self.args
        fused = {"fused": True} if self.device.type == "cuda" else {}
        if args.optim == "adam":
            return torch.optim.Adam(
                self.param_groups(),
                betas=(args.beta1, args.beta2),
                weight_decay=args.weight_decay,
                **fused,
            )
        return torch.optim.SGD(
            self.param_groups(),
            momentum=0.9,
            nesterov=True,
            weight_decay=args.weight_decay,
            **fused,
        )

    def _wrap(self, model: nn.Module) -> nn.Module:
        """DDP and/or torch.compile around the model used for training steps."""
        net = model
        if self.dist.enabled:
            net = nn.parallel.DistributedDataParallel(net, device_ids=None)
        if self.args.compile:
            net = torch.compile(net)  # type: ignore[assignment]
        return net

    def _upload_images(self) -> None:
        """Keep the uint8 training images where the steps read them (the GPU when present)."""
        self.images = {
            "visible": torch.from_numpy(np.ascontiguousarray(self.train_set.visible_images)),
            "infrared": torch.from_numpy(np.ascontiguousarray(self.train_set.infrared_images)),
        }
        self.labels = {
            "visible": torch.from_numpy(self.train_set.visible_labels.astype(np.int64)),
            "infrared": torch.from_numpy(self.train_set.infrared_labels.astype(np.int64)),
        }
        if self.device.type == "cuda":
            self.images = {k: v.to(self.device) for k, v in self.images.items()}
            self.labels = {k: v.to(self.device) for k, v in self.labels.items()}

    # ----- steps ---------------------------------------------------------------------------
    def make_batch(
        self,
        visible_idx: np.ndarray,
        infrared_idx: np.ndarray,
        images: dict[str, torch.Tensor] | None = None,
        labels: dict[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> Batch:
        """Gather, augment and stack one step's images (visible half first)."""
        images = images or self.images
        labels = labels or self.labels
        store = images["visible"].device
        v_idx = torch.from_numpy(visible_idx).to(store, non_blocking=True)
        i_idx = torch.from_numpy(infrared_idx).to(store, non_blocking=True)
        raw = torch.cat(
            [images["visible"].index_select(0, v_idx), images["infrared"].index_select(0, i_idx)]
        )
        raw = raw.to(self.device, non_blocking=True)
        x = augment_batch(raw, generator or self.aug_generator)
        if self.args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.cat(
            [labels["visible"].index_select(0, v_idx), labels["infrared"].index_select(0, i_idx)]
        ).to(self.device)
        n = len(visible_idx)
        return Batch(x, y, Routing.from_halves(n, len(infrared_idx)), n)

    def forward_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Forward pass and loss terms of one training batch."""
        with autocast(self.device, self.amp):
            pool, feat, logits = self.net(batch.images, batch.routing)
        return reid_losses(pool, feat, logits, batch.labels, batch.n_visible, self.args)

    def training_step(
        self, visible_idx: np.ndarray, infrared_idx: np.ndarray
    ) -> dict[str, torch.Tensor]:
        """One optimisation step of the network weights; returns detached loss terms."""
        batch = self.make_batch(visible_idx, infrared_idx)
        terms = self.forward_losses(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update()
        return {k: v.detach() for k, v in terms.items()}

    # ----- the loop ------------------------------------------------------------------------
    def batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The sampler's batches of ``epoch``, skipping those done before a resume."""
        self.sampler.set_epoch(epoch)
        skip = self.start_step if epoch == self.start_epoch else 0
        for step, (v_idx, i_idx) in enumerate(self.sampler):
            if step >= skip:
                yield v_idx, i_idx

    def steps_per_epoch(self) -> int:
        """Steps in one epoch (``--max_steps`` caps it for smoke runs)."""
        steps = len(self.sampler)
        return min(steps, self.args.max_steps) if self.args.max_steps else steps

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """Run one epoch; returns the mean of each loss term over the steps read back."""
        self.net.train()
        total = self.steps_per_epoch()
        first = self.start_step if epoch == self.start_epoch else 0
        sums: dict[str, torch.Tensor] = {}
        count = 0
        bar = tqdm(
            total=total,
            initial=first,
            desc=f"epoch {epoch + 1}/{self.args.epochs}",
            leave=False,
            disable=not self.dist.is_main,
        )
        for step, (v_idx, i_idx) in enumerate(self.batches(epoch), start=first):
            if step >= total:
                break
            terms = self.training_step(v_idx, i_idx)
            for key, value in terms.items():
                sums[key] = sums.get(key, torch.zeros((), device=value.device)) + value.float()
            count += 1
            self.global_step += 1
            bar.update(1)
            if (step + 1) % self.args.log_freq == 0 or step + 1 == total:
                # The only host synchronisation of the loop.
                loss = float(terms["loss"])
                if not math.isfinite(loss):
                    raise NonFiniteLoss(
                        f"loss is {loss} at epoch {epoch + 1} step {step + 1}; last good "
                        f"checkpoint: {self.last_good or 'none saved yet'}"
                    )
                bar.set_postfix(loss=f"{loss:.3f}")
                if self.dist.enabled and broadcast_flag(
                    self._stop_signal is not None, self.dist, self.device
                ):
                    self._save_interrupted(epoch, step + 1)
            if not self.dist.enabled and self._stop_signal is not None:
                self._save_interrupted(epoch, step + 1)
        bar.close()
        return {key: float(value) / max(count, 1) for key, value in sums.items()}

    def run(self) -> dict[str, Any]:
        """Train from the start (or the resume point) to the last epoch; returns the results."""
        args = self.args
        handlers = self._install_signal_handlers()
        try:
            for epoch in range(self.start_epoch, args.epochs):
                started = time.time()
                losses = self.train_one_epoch(epoch)
                self.scheduler.step()
                self.start_step = 0
                record: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "step": self.global_step,
                    "lr": self.optimizer.param_groups[-1]["lr"],
                    "time_s": round(time.time() - started, 2),
                    **losses,
                }
                last = epoch + 1 == args.epochs
                if args.test_freq and (epoch + 1) % args.test_freq == 0 and not last:
                    record.update(self.evaluate_and_log(final=False))
                self.on_epoch_end(epoch, record)
                self.save_checkpoint(epoch + 1, 0)
                if self.dist.is_main:
                    append_json_line(self.out / "log.jsonl", record)
                    log.info("epoch %d: %s", epoch + 1, _brief(record))
            results = self.evaluate_and_log(final=True)
            self.on_train_end(results)
            return results
        finally:
            self._restore_signal_handlers(handlers)
            cleanup(self.dist)

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Hook for variants (the search logs its architecture probabilities here)."""

    def on_train_end(self, results: dict[str, Any]) -> None:
        """Hook for variants, called once after the final evaluation."""

    # ----- evaluation ----------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        """The weights to evaluate: the EMA when there is one, else the live model."""
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self, final: bool) -> dict[str, Any]:
        """Monitoring evaluation on the test protocol (no model selection is made with it)."""
        args = self.args
        model = self.eval_model()
        if args.dataset == "sysu":
            trials = list(range(10)) if final else [0]
            result, _ = evaluate_sysu(
                model,
                args.data_root,
                args.mode,
                1,
                trials,
                self.device,
                self.img_size,
                args.test_batch,
                self.amp,
            )
            return {f"sysu_{args.mode}": result}
        result = evaluate_regdb(
            model,
            args.data_root,
            args.trial,
            "both",
            self.device,
            self.img_size,
            args.test_batch,
            self.amp,
        )
        return {f"regdb_{k}": v for k, v in result.items()}

    def evaluate_and_log(self, final: bool) -> dict[str, Any]:
        """Evaluate on rank 0, log a short summary; afterwards copy EMA into the live model."""
        flat: dict[str, Any] = {}
        if self.dist.is_main:
            results = self.evaluate(final)
            rows = []
            for protocol, result in results.items():
                for kind in ("pool", "bnneck"):
                    flat[f"{protocol}_{kind}_rank1"] = round(result[kind]["rank1"], 2)
                    flat[f"{protocol}_{kind}_mAP"] = round(result[kind]["mAP"], 2)
                    rows.append((f"{protocol} {kind}", result[kind]))
            log.info("evaluation%s:\n%s", " (final)" if final else "", format_table(rows))
            if final:
                import json

                (self.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
                (self.out / "results.md").write_text(format_table(rows) + "\n")
        barrier(self.dist)
        if self.ema is not None and self.args.ema_overwrite and not final:
            self.ema.copy_to(self.model)
        self.model.train()
        return flat

    # ----- checkpoints ---------------------------------------------------------------------
    def checkpoint(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        """Everything needed to rebuild the model and resume exactly."""
        state = checkpoint_header(
            self.arch.to_dict(), self.model.num_classes, self.args.last_stride, vars(self.args)
        )
        state.update(
            {
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": self.global_step,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": capture_rng_state(),
                "aug_rng": self.aug_generator.get_state(),
                "environment": self.env,
            }
        )
        return state

    def save_checkpoint(self, epoch: int, step_in_epoch: int) -> Path:
        """Write the latest checkpoint (and a periodic copy at ``--save_freq`` epochs)."""
        path = self.out / LATEST
        if self.dist.is_main:
            state = self.checkpoint(epoch, step_in_epoch)
            save_atomic(state, path)
            if step_in_epoch == 0 and self.args.save_freq and epoch % self.args.save_freq == 0:
                save_atomic(state, self.out / f"checkpoint_ep{epoch:03d}.pth")
        barrier(self.dist)
        self.last_good = path
        return path

    def resume(self, path: str) -> None:
        """Restore model, optimizer, scheduler, EMA, counters and every random state."""
        state = read_checkpoint(path)
        if state.get("format") != "cmnas-checkpoint" or "optimizer" not in state:
            raise UserError(f"--resume {path}: not a resumable checkpoint of this project")
        if state["arch"] != self.arch.to_dict() and state["arch"]["slots"] != self.arch.slots:
            raise UserError(
                f"--resume {path}: the checkpoint's architecture differs from "
                f"--config_path {self.args.config_path}"
            )
        self.model.load_state_dict(checkpoint_state(state, False, path))
        if self.ema is not None:
            if state.get("ema") is None:
                raise UserError(
                    f"--resume {path}: the checkpoint has no EMA weights but --ema_decay > 0"
                )
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.start_step = int(state.get("step_in_epoch", 0))
        self.global_step = int(state.get("global_step", 0))
        if self.dist.world_size == 1:
            restore_rng_state(state["rng"])
            self.aug_generator.set_state(state["aug_rng"])
        self.last_good = Path(path)
        log.info("resumed from %s at epoch %d step %d", path, self.start_epoch + 1, self.start_step)

    # ----- signals -------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict[int, Any]:
        def request_stop(signum: int, frame: Any) -> None:
            self._stop_signal = signum

        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Outside the main thread signals cannot be caught: keep the defaults there.
            with contextlib.suppress(ValueError):
                previous[signum] = signal.signal(signum, request_stop)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _save_interrupted(self, epoch: int, step_in_epoch: int) -> None:
        path = self.save_checkpoint(epoch, step_in_epoch)
        raise Interrupted(self._stop_signal or signal.SIGTERM, path)


def _brief(record: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
    )
