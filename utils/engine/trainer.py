"""The training engine shared by train.py and search.py.

:class:`Trainer` owns the fixed loop (epochs -> steps -> checkpoints -> evaluation). A variant
overrides single steps: search.py replaces :meth:`Trainer.training_step` and the data/model set-up,
and reuses everything else.

Speed: images stay uint8 (on the GPU when there is one) and are augmented in batch on the device;
losses are read back to the host only every ``--log_freq`` steps; bf16 autocast, channels-last,
fused Adam and a ``foreach`` EMA on CUDA.

Safety: every option, the data, the architecture and a ``--resume`` checkpoint are checked
before the run folder is created, so a rejected run leaves nothing behind. Checkpoints are
written atomically; SIGINT/SIGTERM stop after the current step with a resumable checkpoint; a
non-finite loss stops the run before it can overwrite the last good checkpoint. A resumed run
(``--deterministic`` on the CPU) continues bit-exactly: model, optimizer, schedule, EMA, step
and every random state come back, and the sampler regenerates any step of any epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data import CrossModalitySampler, TrainSet, augment_batch, load_train_set
from model import Arch, Routing, build_model, load_arch, load_checkpoint
from model.losses import cmmd_loss, cross_modality_triplet, identity_loss, sp_loss
from model.weights import CHECKPOINT_FORMAT, read_checkpoint
from utils.base.distributed import barrier, broadcast_flag, cleanup, init_distributed
from utils.base.errors import UserError
from utils.base.io import copy_atomic, write_text_atomic
from utils.base.logger import append_json_line, log_run_header, setup_logging
from utils.engine.checkpoint import (
    capture_rng_state,
    checkpoint_header,
    plain,
    restore_rng_state,
    save_atomic,
)
from utils.engine.ema import ModelEMA
from utils.engine.options import (
    check_data_root,
    check_run_dir,
    clear_run_dir,
    prepare_run_dir,
    run_dir,
    select_device,
)
from utils.evaluation.evaluate import autocast, evaluate_training_run, format_table

__all__ = [
    "LATEST",
    "Batch",
    "Interrupted",
    "NonFiniteLoss",
    "Trainer",
    "lr_factor",
    "reid_losses",
    "seed_everything",
    "select_device",
]

log = logging.getLogger(__name__)
LATEST = "checkpoint_latest.pth"
# Options a resumed run must share with its checkpoint: they fix the data, the batches and the
# model, so a change would silently continue a different run.
RESUME_FIXED = ("dataset", "img_h", "img_w", "batch_size", "num_pos", "last_stride", "seed")
# Options that may change on a resume without comment (paths, bookkeeping, evaluation).
RESUME_FREE = frozenset(
    {
        "data_root", "cache_dir", "save", "note", "resume", "device", "test_batch", "log_freq",
        "save_freq", "test_freq", "epochs", "compile", "channels_last", "mode", "eval_arch",
        "overwrite",
    }
)  # fmt: skip


class Interrupted(Exception):
    """Raised after a SIGINT/SIGTERM once a resumable checkpoint is on disk."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(
            f"stopped by {signal.Signals(signum).name}; resumable checkpoint: "
            f"{checkpoint} (continue with --resume {checkpoint})"
        )
        self.signum = signum
        self.checkpoint = checkpoint


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the run stops and names its last good checkpoint."""


@dataclass
class Batch:
    """One cross-modality step: images (visible half first), labels and routing."""

    images: torch.Tensor
    labels: torch.Tensor
    routing: Routing
    n_visible: int


class _RecordBuffer(logging.Handler):
    """Holds the log records of the set-up until the run folder (and log.txt) exists."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _index_tensor(index: np.ndarray, device: torch.device) -> torch.Tensor:
    """Indices on ``device`` without a host synchronisation (pinned, non-blocking on CUDA)."""
    tensor = torch.from_numpy(index)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


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
        overwrite = bool(getattr(args, "overwrite", False))
        check_run_dir(self.out, args.resume or None, overwrite)
        # Until the run folder exists (it appears only once every check has passed), log
        # records wait in memory; they open log.txt.
        setup_logging(None, self.dist.rank)
        early = _RecordBuffer()
        logging.getLogger().addHandler(early)
        self.env = plain(log_run_header(args, self.device))
        self.img_size = (args.img_h, args.img_w)
        self.amp = args.amp if self.device.type == "cuda" else "none"
        # Channels-last pays on GPUs; on a CPU it made the steps slower.
        self.channels_last = (
            self.device.type == "cuda" if args.channels_last is None else args.channels_last
        )
        self.train_set = self.build_data()
        self.model = self.build_model()
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.dist.enabled:
            # Each rank initialised its own weights (seed + rank): start every rank, and its
            # EMA, from rank 0's (DDP would sync the live model only, after the EMA copy).
            with torch.no_grad():
                for tensor in self.model.state_dict().values():
                    torch.distributed.broadcast(tensor, src=0)
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
        # Loss sums of a partly trained epoch: restored by a resume, saved by an interruption.
        self._epoch_sums: dict[str, float] = {}
        self._epoch_count = 0
        self._upload_images()
        if args.resume:
            self.resume(args.resume)
        self.net = self._wrap(self.model)
        if self.dist.is_main:
            prepare_run_dir(self.out)
            own_folder = args.resume and self.out.resolve() == Path(args.resume).resolve().parent
            if overwrite and not own_folder:
                removed = clear_run_dir(self.out)
                if removed:
                    log.warning("--overwrite: removed %s from %s", ", ".join(removed), self.out)
        barrier(self.dist)
        self._open_run_log(early)
        if args.resume and self.dist.is_main:
            self._trim_epoch_log()

    # ----- set-up, overridable -------------------------------------------------------------
    def build_data(self) -> TrainSet:
        """Check ``--data_root`` and load (and cache) the training images."""
        args = self.args
        check_data_root(args)
        # Rank 0 builds the cache first so that the other ranks only read it.
        if not self.dist.is_main:
            barrier(self.dist)
        train_set = load_train_set(
            args.dataset,
            args.data_root,
            self.img_size,
            args.trial,
            args.cache_dir,
            progress=self.dist.is_main and sys.stderr.isatty(),
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

    def _open_run_log(self, early: _RecordBuffer) -> None:
        """Log to ``log.txt`` in the run folder (appending on a resume), set-up records first."""
        setup_logging(self.out / "log.txt", self.dist.rank)
        files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
        for record in early.records:
            for handler in files:
                if record.levelno >= handler.level:
                    handler.handle(record)
        early.records.clear()

    def _trim_epoch_log(self) -> None:
        """Drop log.jsonl records of epochs after the resume point (they are trained again)."""
        path = self.out / "log.jsonl"
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                epoch = int(json.loads(line).get("epoch", 0))
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                continue  # e.g. a line torn by a crash
            if epoch <= self.start_epoch:
                keep.append(line)
        if len(keep) != len(lines):
            write_text_atomic(path, "".join(line + "\n" for line in keep))
            log.warning(
                "%s: dropped %d record(s) after epoch %d, which this run trains again",
                path,
                len(lines) - len(keep),
                self.start_epoch,
            )

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
        v_idx = _index_tensor(visible_idx, store)
        i_idx = _index_tensor(infrared_idx, store)
        raw = torch.cat(
            [images["visible"].index_select(0, v_idx), images["infrared"].index_select(0, i_idx)]
        )
        raw = raw.to(self.device, non_blocking=True)
        x = augment_batch(raw, generator or self.aug_generator)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.cat(
            [labels["visible"].index_select(0, v_idx), labels["infrared"].index_select(0, i_idx)]
        ).to(self.device, non_blocking=True)
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
        """The sampler's batches of ``epoch``, from the resume step on in the resumed epoch."""
        self.sampler.set_epoch(epoch, self.start_step if epoch == self.start_epoch else 0)
        yield from self.sampler

    def steps_per_epoch(self) -> int:
        """Steps in one epoch (``--max_steps`` caps it for smoke runs)."""
        steps = len(self.sampler)
        return min(steps, self.args.max_steps) if self.args.max_steps else steps

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """Run one epoch; returns the mean of each loss term over its steps."""
        self.net.train()
        total = self.steps_per_epoch()
        first = self.start_step if epoch == self.start_epoch else 0
        # Sums stay on the device: reading them back would synchronise every step.
        sums: dict[str, torch.Tensor] = {}
        count = 0
        if first:
            sums = {k: torch.tensor(v, device=self.device) for k, v in self._epoch_sums.items()}
            count = self._epoch_count
        bar = tqdm(
            total=total,
            initial=first,
            desc=f"epoch {epoch + 1}/{self.args.epochs}",
            leave=False,
            disable=not (self.dist.is_main and sys.stderr.isatty()),
        )
        with bar:
            for step, (v_idx, i_idx) in enumerate(self.batches(epoch), start=first):
                if step >= total:
                    break
                terms = self.training_step(v_idx, i_idx)
                for key, value in terms.items():
                    sums[key] = sums[key] + value.float() if key in sums else value.float()
                count += 1
                self.global_step += 1
                bar.update(1)
                done = step + 1
                stop = self._stop_signal is not None
                if done % self.args.log_freq == 0 or done == total:
                    self._report(epoch, done, total, terms, sums, count, bar)
                    # Ranks agree on a stop at the log points only (one collective there).
                    stop = broadcast_flag(stop, self.dist, self.device)
                elif self.dist.enabled:
                    stop = False
                if stop:
                    self._save_interrupted(epoch, done, sums, count)
        return {key: float(value) / max(count, 1) for key, value in sums.items()}

    def _report(
        self,
        epoch: int,
        done: int,
        total: int,
        terms: dict[str, torch.Tensor],
        sums: dict[str, torch.Tensor],
        count: int,
        bar: tqdm,
    ) -> None:
        """The loop's only host synchronisation: check the loss and log progress."""
        loss, mean = torch.stack([terms["loss"].float(), sums["loss"] / count]).tolist()
        # The epoch's running sum is non-finite if any step since the epoch began was.
        if not math.isfinite(mean):
            bad = mean if math.isfinite(loss) else loss
            self._non_finite(f"loss is {bad} in epoch {epoch + 1} (at or before step {done})")
        bar.set_postfix(loss=f"{loss:.3f}")
        log.info(
            "epoch %d/%d step %d/%d: loss %.4f (epoch mean %.4f), lr %.3g",
            epoch + 1,
            self.args.epochs,
            done,
            total,
            loss,
            mean,
            self.optimizer.param_groups[-1]["lr"],
        )

    def _non_finite(self, what: str) -> None:
        """Stop the run: the weights may be ruined, so nothing is saved over the last good file."""
        if self.last_good is None:
            advice = "no checkpoint saved yet (lower --lr, or check the data)"
        else:
            advice = f"{self.last_good} (resume from it with a lower --lr, or check the data)"
        raise NonFiniteLoss(f"{what}; stopped without saving. Last good checkpoint: {advice}")

    def run(self) -> dict[str, Any]:
        """Train from the start (or the resume point) to the last epoch; returns the results."""
        handlers = self._install_signal_handlers()
        redirect = (
            logging_redirect_tqdm()
            if self.dist.is_main and sys.stderr.isatty()
            else contextlib.nullcontext()
        )
        try:
            with redirect:
                return self._run_epochs()
        finally:
            self._restore_signal_handlers(handlers)
            cleanup(self.dist)

    def _run_epochs(self) -> dict[str, Any]:
        """The epochs of :meth:`run`: train, save, evaluate, log; stop when asked to."""
        args = self.args
        results: dict[str, Any] = {}
        if self.start_epoch >= args.epochs:
            log.info(
                "%s has trained all %d epochs: running the final evaluation only",
                self.last_good,
                args.epochs,
            )
            results = self.evaluate_and_log(final=True)
        for epoch in range(self.start_epoch, args.epochs):
            started = time.time()
            losses = self.train_one_epoch(epoch)
            with warnings.catch_warnings():
                # A run resumed at the end of an epoch steps the schedule before the optimizer
                # in this process; torch warns although the restored schedule is right.
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
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
            evaluated = bool(args.test_freq) and (epoch + 1) % args.test_freq == 0
            if evaluated and self.ema is not None and args.ema_overwrite:
                # The authors train on from the EMA weights after each evaluation. The
                # evaluation reads the EMA copy only, so copying first changes no number and
                # lets the checkpoint below hold the state the next epoch starts from.
                self.ema.copy_to(self.model)
            self.on_epoch_end(epoch, record)
            # Saved before the evaluation: a failing evaluation cannot cost the epoch.
            checkpoint = self.save_checkpoint(epoch + 1, 0)
            if last:
                results = self.evaluate_and_log(final=True)
                record.update(results)
            elif evaluated:
                record.update(self.evaluate_and_log(final=False))
            if self.dist.is_main:
                append_json_line(self.out / "log.jsonl", record)
                log.info("epoch %d: %s", epoch + 1, _brief(record))
            stop = broadcast_flag(self._stop_signal is not None, self.dist, self.device)
            if stop and not last:
                raise Interrupted(self._stop_signal or signal.SIGTERM, checkpoint)
        self.on_train_end(results)
        return results

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
        return evaluate_training_run(
            self.eval_model(), self.args, final, self.device, self.img_size, self.amp
        )

    def evaluate_and_log(self, final: bool) -> dict[str, Any]:
        """Evaluate on rank 0 and log a summary; the final results also go to results.json/md.

        Returns the flat Rank-1/mAP numbers for the epoch's log.jsonl record.
        """
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
                write_text_atomic(self.out / "results.json", json.dumps(results, indent=2) + "\n")
                write_text_atomic(self.out / "results.md", format_table(rows) + "\n")
        barrier(self.dist)
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
                "environment": plain(self.env),
            }
        )
        if step_in_epoch:
            # The epoch's loss sums so far, so that its log record covers every step.
            state["epoch_losses"] = {"sums": dict(self._epoch_sums), "count": self._epoch_count}
        return state

    def save_checkpoint(self, epoch: int, step_in_epoch: int) -> Path:
        """Write the latest checkpoint (and a periodic copy at ``--save_freq`` epochs)."""
        self._check_finite_weights(epoch, step_in_epoch)
        path = self.out / LATEST
        if self.dist.is_main:
            state = self.checkpoint(epoch, step_in_epoch)
            save_atomic(state, path)
            if step_in_epoch == 0 and self.args.save_freq and epoch % self.args.save_freq == 0:
                copy_atomic(path, self.out / f"checkpoint_ep{epoch:03d}.pth")
        barrier(self.dist)
        self.last_good = path
        return path

    def _check_finite_weights(self, epoch: int, step_in_epoch: int) -> None:
        """Refuse to save non-finite weights over the last good checkpoint."""
        params = [p.detach() for p in self.model.parameters() if p.dtype.is_floating_point]
        if params and not bool(torch.stack([p.isfinite().all() for p in params]).all()):
            where = (
                f"epoch {epoch + 1} step {step_in_epoch}"
                if step_in_epoch
                else f"the end of epoch {epoch}"
            )
            self._non_finite(f"the weights became non-finite (at {where})")

    def resume(self, path: str) -> None:
        """Restore model, optimizer, scheduler, EMA, counters and every random state."""
        state = read_checkpoint(path)
        if state.get("format") != CHECKPOINT_FORMAT or "optimizer" not in state:
            raise UserError(
                f"--resume {path}: not a resumable checkpoint of this project (test.py reads "
                "the authors' checkpoints; they cannot be resumed)"
            )
        self._check_resume_options(state, path)
        slots = state.get("arch", {}).get("slots", {})
        if slots != self.arch.slots:
            differ = [name for name in self.arch.slots if slots.get(name) != self.arch.slots[name]]
            differ += [name for name in slots if name not in self.arch.slots]
            shown = ", ".join(
                f"{n} ({slots.get(n, 'absent')} vs {self.arch.slots.get(n, 'absent')})"
                for n in differ[:4]
            )
            raise UserError(
                f"--resume {path}: the checkpoint's architecture differs from --config_path "
                f"{self.args.config_path} in {len(differ)} slot(s): {shown}"
                f"{', ...' if len(differ) > 4 else ''} (checkpoint vs config)"
            )
        epoch = int(state["epoch"])
        if epoch > self.args.epochs:
            raise UserError(
                f"--resume {path}: the checkpoint is at epoch {epoch}, beyond --epochs "
                f"{self.args.epochs}"
            )
        load_checkpoint(self.model, state, source=f"--resume {path}")
        if self.ema is not None:
            if not state.get("ema"):
                raise UserError(
                    f"--resume {path}: the checkpoint has no EMA weights but --ema_decay is "
                    f"{self.args.ema_decay} (resume with --ema_decay 0)"
                )
            load_checkpoint(self.ema.module, state, ema=True, source=f"--resume {path} (EMA)")
        elif state.get("ema"):
            log.warning("--resume %s: --ema_decay 0 drops the checkpoint's EMA weights", path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError) as err:
            raise UserError(
                f"--resume {path}: the optimizer or schedule state does not fit this run "
                f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
            ) from None
        self.start_epoch = epoch
        self.start_step = int(state.get("step_in_epoch", 0))
        self.global_step = int(state.get("global_step", 0))
        partial = state.get("epoch_losses") or {}
        self._epoch_sums = {k: float(v) for k, v in partial.get("sums", {}).items()}
        self._epoch_count = int(partial.get("count", 0))
        if self.dist.world_size == 1:
            restore_rng_state(state["rng"])
            self.aug_generator.set_state(state["aug_rng"])
        else:
            log.warning("multi-process resume: random states are reseeded, not restored")
        self.last_good = Path(path)
        log.info(
            "resumed from %s at epoch %d step %d (global step %d); run folder %s",
            path,
            self.start_epoch + 1,
            self.start_step,
            self.global_step,
            self.out,
        )

    def _check_resume_options(self, state: dict[str, Any], path: str) -> None:
        """Refuse a resume that changes the data or batches; name every other changed option."""
        saved = state.get("args") or {}
        now = {key: plain(value) for key, value in vars(self.args).items()}
        fixed = list(RESUME_FIXED) + (["trial"] if self.args.dataset == "regdb" else [])
        wrong = [key for key in fixed if key in saved and saved[key] != now.get(key)]
        if wrong:
            raise UserError(
                f"--resume {path}: the checkpoint's run used "
                + ", ".join(f"--{k} {saved[k]}" for k in wrong)
                + "; this run has "
                + ", ".join(f"--{k} {now.get(k)}" for k in wrong)
                + " (a resumed run must keep them)"
            )
        changed = [
            f"--{key} {saved[key]} -> {now[key]}"
            for key in sorted(saved)
            if key in now and key not in RESUME_FREE and saved[key] != now[key]
        ]
        if changed:
            log.warning("--resume %s with changed options: %s", path, ", ".join(changed))

    # ----- signals -------------------------------------------------------------------------
    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop after the current step with a resumable checkpoint (what SIGINT/SIGTERM do)."""
        self._stop_signal = signum

    def _install_signal_handlers(self) -> dict[int, Any]:
        def on_signal(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:
                raise KeyboardInterrupt  # a second signal stops at once
            self.request_stop(signum)
            log.warning(
                "%s: stopping after this step with a resumable checkpoint (again: stop now)",
                signal.Signals(signum).name,
            )

        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Outside the main thread signals cannot be caught: keep the defaults there.
            with contextlib.suppress(ValueError):
                previous[signum] = signal.signal(signum, on_signal)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _save_interrupted(
        self, epoch: int, step_in_epoch: int, sums: dict[str, torch.Tensor], count: int
    ) -> None:
        """Save where the epoch stands (unless the loss went bad) and raise Interrupted."""
        self._epoch_sums = {key: float(value) for key, value in sums.items()}
        self._epoch_count = count
        if not math.isfinite(self._epoch_sums.get("loss", 0.0)):
            self._non_finite(f"loss is non-finite in epoch {epoch + 1}")
        path = self.save_checkpoint(epoch, step_in_epoch)
        raise Interrupted(self._stop_signal or signal.SIGTERM, path)


def _brief(record: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
    )


def run_trainer(trainer: Trainer) -> int:
    """Run ``trainer`` to the end; an interruption exits with 128 + the signal number."""
    try:
        trainer.run()
    except Interrupted as stop:
        log.warning("%s", stop)
        return 128 + stop.signum
    log.info("run folder: %s", trainer.out)
    return 0
