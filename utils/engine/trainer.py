"""The training loop shared by train.py and search.py.

    trainer = Trainer(args)   # checks and builds everything; writes nothing
    trainer.resume()          # continues from --resume, if given
    trainer.train()           # creates the run folder, trains, evaluates; returns the results

:class:`Trainer` owns the fixed loop (epochs -> steps -> checkpoint -> evaluation). A variant
subclasses it and overrides :meth:`Trainer.training_step` and, where it must, the ``build_*``
set-up; extra state it wants checkpointed goes into ``self.state.register(name, object)``.
``self.model`` is the module the steps run (wrapped in DDP or torch.compile when asked for);
``self.model_without_ddp`` is the plain network that is saved, evaluated and averaged.

Speed: images stay uint8 (on the GPU when there is one) and are augmented in batch on the device;
losses are read back to the host only every ``--log_freq`` steps; bf16 autocast, channels-last,
fused Adam and a ``foreach`` EMA on CUDA.

The authors' schedule: every ``--ema_overwrite_every`` epochs (the data set's default) the EMA
weights replace the live ones, after that epoch's checkpoint and evaluation, so the checkpoint's
``model`` holds the live weights the evaluation scored and ``ema`` the average; the checkpoint
records that the overwrite follows, and a resume from it applies it. Training-time evaluations
score the live model and, beside it, the EMA (keys ending in ``_ema``).

Safety: one run per folder (a lock held for the run's life); checkpoints are written atomically
with a checksum of their tensors, after a check that every saved tensor is finite (else the run
stops, naming the last good checkpoint); SIGINT/SIGTERM/SIGHUP stop after the current step (or
evaluation) with a resumable checkpoint; an epoch's log record is written before its checkpoint
and completed after its evaluation, so a resume completes an evaluation a kill cut short. A
resumed run (``--deterministic`` on the CPU) continues bit-exactly: model, optimizer, schedule,
EMA, step and every random state (each rank's in a multi-process run) come back, and the
sampler regenerates any step of any epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data import CrossModalitySampler, TrainSet
from model import Arch, build_model, load_arch
from model.checkpoint import (
    checkpoint_header,
    non_finite_tensors,
    plain,
    write_checkpoint,
)
from utils.base.distributed import barrier, broadcast_flag, cleanup, init_distributed
from utils.base.errors import UserError
from utils.base.io import (
    MB,
    check_free_space,
    copy_atomic,
    remove_temp_files,
    write_text_atomic,
)
from utils.base.lock import LOCK_FILE, RunLock
from utils.base.logger import append_json_line, log_run_header
from utils.engine.batch import ResidentImages
from utils.engine.build import (
    build_optimizer,
    build_schedule,
    load_training_data,
    seed_everything,
    wrap_model,
)
from utils.engine.ema import ModelEMA
from utils.engine.options import loss_recipe, resolve_ema_overwrite, select_device
from utils.engine.rundir import (
    LATEST,
    PENDING,
    RUN_FILES,
    EarlyLog,
    check_run_dir,
    clear_run_dir,
    complete_epoch_record,
    is_own_folder,
    pending_evaluation,
    prepare_run_dir,
    run_dir,
    trim_epoch_log,
)
from utils.engine.signals import Interrupted, StopRequest
from utils.engine.state import (
    GeneratorState,
    LossMeter,
    ProcessRandomState,
    RunState,
    check_same_arch,
    read_resume_checkpoint,
)
from utils.evaluation.evaluate import autocast, evaluate_training_run, format_table

__all__ = ["LATEST", "Interrupted", "NonFiniteLoss", "Trainer", "run_trainer"]

log = logging.getLogger(__name__)


# The checkpoint entry saying that the EMA overwrite follows the save (see Trainer.train).
OVERWRITE_PENDING = "ema_overwrite_pending"
WEIGHTS_NOTE = (
    "live: the live model (the checkpoint's `model`, scored by test.py); "
    "ema: the EMA weights (its `ema`, test.py --ema)"
)


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the run stops and names its last good checkpoint."""


class Trainer:
    """Fixed training loop; subclasses override set-up or the step, never the loop."""

    kind = "train"
    # What --overwrite removes of an earlier run in the folder.
    run_files: tuple[str, ...] = RUN_FILES

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = select_device(args.device)
        self.dist = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        seed_everything(args.seed + self.dist.rank, args.deterministic)
        self.out = run_dir(args, self.kind)
        check_run_dir(self.out, args.resume or None, args.overwrite)
        if self.dist.is_main and (self.out / LOCK_FILE).exists():
            # A run still going in this folder is named now, before the costly set-up; the
            # lock is held from train() on.
            RunLock(self.out).acquire().release()
        self.early_log = EarlyLog(self.dist.rank)
        self.env = plain(log_run_header(args, self.device))
        self.img_size = (args.img_h, args.img_w)
        self.amp = args.amp if self.device.type == "cuda" else "none"
        # Channels-last pays on GPUs; on a CPU it made the steps slower.
        self.channels_last = (
            self.device.type == "cuda" if args.channels_last is None else args.channels_last
        )
        # Everything the flags name is read before the costly set-up (the image cache).
        self.check_inputs()
        self.train_set = self.build_data()
        self.model_without_ddp = self.build_model().to(self.device)
        if self.channels_last:
            self.model_without_ddp.to(memory_format=torch.channels_last)
        if self.dist.enabled:
            # Each rank initialised its own weights (seed + rank): start every rank, and its
            # EMA, from rank 0's (DDP would sync the live model only, after the EMA copy).
            with torch.no_grad():
                for tensor in self.model_without_ddp.state_dict().values():
                    torch.distributed.broadcast(tensor, src=0)
        self.ema = ModelEMA(self.model_without_ddp, args.ema_decay) if args.ema_decay > 0 else None
        self.loss = loss_recipe(args)
        self.optimizer = self.build_optimizer()
        self.scheduler = build_schedule(self.optimizer, args)
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
        self.images = ResidentImages.upload(self.train_set, self.device)
        self.model = wrap_model(self.model_without_ddp, self.dist, args.compile)
        self.state = RunState(
            gather=_gather_objects if self.dist.enabled else None,
            model=self.model_without_ddp,
            ema=self.ema.module if self.ema is not None else None,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            rng=ProcessRandomState(),
            aug_rng=GeneratorState(self.aug_generator),
            environment=self.env,
        )
        # Loss sums of the epoch being trained (restored by a resume, saved by an interruption).
        self.losses = LossMeter(self.device)
        # Where the run stands: the epoch and step being trained (0-based), steps so far.
        self.epoch = self.step = self.global_step = 0
        self.start_epoch = self.start_step = 0
        self.last_good: Path | None = None
        self.stop = StopRequest()
        # Epochs between copies of the EMA into the live model (0: never).
        self.overwrite_every = self.ema_overwrite_every() if self.ema is not None else 0
        # A resume from the end of an overwrite epoch owes the overwrite that followed its save.
        self.overwrite_pending = False
        self.lock = RunLock(self.out)
        if self.dist.is_main:
            check_free_space(self.out, self.checkpoint_size())

    # ----- set-up, overridable -------------------------------------------------------------
    def build_data(self) -> TrainSet:
        """The training set: check ``--data_root``, load (and cache) the images."""
        return load_training_data(self.args, self.img_size, self.dist)

    def check_inputs(self) -> None:
        """Read the architecture file and the checkpoint to resume, and check they fit.

        Runs before the training data is loaded, so that a bad flag costs seconds.
        """
        self.arch = load_arch(self.args.config_path)
        self.resume_checkpoint = read_resume_checkpoint(self.args) if self.args.resume else None
        if self.resume_checkpoint is not None:
            given = f"--config_path {self.args.config_path}"
            check_same_arch(
                self.resume_checkpoint, self.arch, f"--resume {self.args.resume}", given
            )

    def build_model(self) -> nn.Module:
        """The network of ``--config_path``, initialised from ``--pretrained``."""
        log.info("architecture %s: %s", self.args.config_path, self.arch.summary())
        return build_model(
            self.arch, self.train_set.num_classes, self.args.last_stride, self.args.pretrained
        )

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Adam (or SGD) over the network weights, in the paper's two learning-rate groups."""
        return build_optimizer(self.model_without_ddp.named_parameters(), self.args, self.device)

    def ema_overwrite_every(self) -> int:
        """``--ema_overwrite_every`` (the data set's default when not given; 0: never)."""
        if getattr(self.args, "ema_overwrite_every", None) is None:
            resolve_ema_overwrite(self.args)
        return int(self.args.ema_overwrite_every)

    def architecture(self) -> Arch:
        """The architecture a checkpoint records (``test.py`` rebuilds the network from it)."""
        return self.arch

    # ----- resume ---------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from ``--resume``: weights, EMA, optimizer, schedule, counters, random states.

        Without ``--resume`` nothing changes: the run starts at epoch 0.
        """
        if not self.args.resume:
            return
        source = f"--resume {self.args.resume}"
        checkpoint, self.resume_checkpoint = self.resume_checkpoint, None
        if checkpoint is None:
            checkpoint = read_resume_checkpoint(self.args)
        self.check_checkpoint(checkpoint, source)
        self.state.load_state_dict(
            checkpoint, source, rank=self.dist.rank, world_size=self.dist.world_size
        )
        self.losses.load_state_dict(checkpoint.get("epoch_losses") or {})
        self.start_epoch = self.epoch = int(checkpoint["epoch"])
        self.start_step = int(checkpoint.get("step_in_epoch", 0))
        self.global_step = int(checkpoint.get("global_step", 0))
        self.overwrite_pending = bool(checkpoint.get(OVERWRITE_PENDING)) and self.ema is not None
        self.last_good = Path(self.args.resume)
        log.info(
            "resumed from %s at epoch %d step %d (global step %d); run folder %s",
            self.args.resume,
            self.start_epoch + 1,
            self.start_step,
            self.global_step,
            self.out,
        )

    def check_checkpoint(self, checkpoint: dict[str, Any], source: str) -> None:
        """Refuse a checkpoint this run cannot continue: one of another architecture."""
        given = f"--config_path {self.args.config_path}"
        check_same_arch(checkpoint, self.arch, source, given)

    # ----- the loop -------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train from the start (or the resume point) to the last epoch; returns the results."""
        quiet = not (self.dist.is_main and sys.stderr.isatty())
        try:
            self.open_run_folder()
            with self.stop, contextlib.nullcontext() if quiet else logging_redirect_tqdm():
                return self._train_epochs()
        finally:
            self.lock.release()
            cleanup(self.dist)

    def _train_epochs(self) -> dict[str, Any]:
        args = self.args
        results = self._finish_resumed_epoch()
        for epoch in range(self.start_epoch, args.epochs):
            self.epoch = epoch
            started = time.time()
            losses = self.train_one_epoch(epoch)
            with warnings.catch_warnings():
                # A run resumed at the end of an epoch steps the schedule before the optimizer
                # in this process; torch warns although the restored schedule is right.
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
                self.scheduler.step()
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": self.global_step,
                "lr": self.optimizer.param_groups[-1]["lr"],
                "time_s": round(time.time() - started, 2),
                **losses,
            }
            last = epoch + 1 == args.epochs
            evaluated = last or self.evaluates(epoch + 1)
            overwrite = self.overwrites(epoch + 1)
            self.on_epoch_end(epoch, record)
            # The authors' order on an overwrite epoch: evaluate the live model, save (`model`
            # live, `ema` averaged), then overwrite. The save comes first here, so that a
            # failing evaluation cannot cost the epoch; it changes no number, as the
            # evaluation leaves the weights alone. The record is written before the save, so a
            # kill at any later moment leaves it in the log for the resumed run to complete.
            checkpoint_state = self.checkpoint_state(epoch + 1, 0, overwrite)
            if self.dist.is_main:
                append_json_line(
                    self.out / "log.jsonl", {**record, PENDING: "pending"} if evaluated else record
                )
            checkpoint = self.save_checkpoint(epoch + 1, 0, checkpoint_state)
            if evaluated:
                numbers = self.evaluate_and_log(final=last)
                record.update(numbers)
                if self.dist.is_main:
                    complete_epoch_record(self.out / "log.jsonl", epoch + 1, numbers)
                if last:
                    results = numbers
            if overwrite:
                self.apply_ema_overwrite()
            if self.dist.is_main:
                log.info("epoch %d: %s", epoch + 1, _brief(record))
            stop = broadcast_flag(self.stop.requested, self.dist, self.device)
            if stop and not last:
                raise self.stop.interrupted(checkpoint)
        self.on_train_end(results)
        return results

    def evaluates(self, epochs_done: int) -> bool:
        """Whether the monitoring evaluation runs after ``epochs_done`` epochs."""
        return bool(self.args.test_freq) and epochs_done % self.args.test_freq == 0

    def overwrites(self, epochs_done: int) -> bool:
        """Whether the EMA weights replace the live ones after ``epochs_done`` epochs."""
        return bool(self.overwrite_every) and epochs_done % self.overwrite_every == 0

    def apply_ema_overwrite(self) -> None:
        """Copy the EMA weights into the live model; training goes on from them (the authors')."""
        assert self.ema is not None
        self.ema.copy_to(self.model_without_ddp)
        self.overwrite_pending = False

    def _finish_resumed_epoch(self) -> dict[str, Any]:
        """Complete what a run resumed at the end of an epoch owes that epoch.

        Its evaluation, when the stop came before the evaluation's numbers reached the log (or
        when it was the final one, whose results a stop may have cut short), then the EMA
        overwrite that followed its checkpoint. Returns the final results, if it ran them.
        """
        args = self.args
        epoch, results = self.start_epoch, {}
        if epoch == 0 or self.start_step:
            return results
        final = epoch >= args.epochs
        if final:
            log.info(
                "%s has trained all %d epochs: running the final evaluation only",
                self.last_good,
                args.epochs,
            )
        pending = self.dist.is_main and pending_evaluation(self.out / "log.jsonl", epoch)
        if final or broadcast_flag(pending, self.dist, self.device):
            if not final:
                log.info("epoch %d's evaluation was cut short: running it again", epoch)
            numbers = self.evaluate_and_log(final=final)
            if self.dist.is_main:
                complete_epoch_record(self.out / "log.jsonl", epoch, numbers)
            results = numbers if final else {}
        if self.overwrite_pending:
            self.apply_ema_overwrite()
        return results

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """Run one epoch (a resumed one from its resume step); returns each loss term's mean."""
        self.model.train()
        steps = len(self.sampler)
        total = min(steps, self.args.max_steps) if self.args.max_steps else steps
        first = self.start_step if epoch == self.start_epoch else 0
        self.sampler.set_epoch(epoch, first)
        bar = tqdm(
            total=total,
            initial=first,
            desc=f"epoch {epoch + 1}/{self.args.epochs}",
            leave=False,
            disable=not (self.dist.is_main and sys.stderr.isatty()),
        )
        with bar:
            for step, (visible_idx, infrared_idx) in enumerate(self.sampler, start=first):
                if step >= total:
                    break
                self.step = step
                terms = self.training_step(visible_idx, infrared_idx)
                self.losses.add(terms)
                self.global_step += 1
                bar.update(1)
                done, stop = step + 1, self.stop.requested
                if done % self.args.log_freq == 0 or done == total:
                    self._report(epoch, done, total, terms, bar)
                    # Ranks agree on a stop at the log points only (one collective there).
                    stop = broadcast_flag(stop, self.dist, self.device)
                elif self.dist.enabled:
                    stop = False
                if stop:
                    if not self.losses.finite():
                        self._non_finite(f"loss is non-finite in epoch {epoch + 1}")
                    raise self.stop.interrupted(self.save_checkpoint(epoch, done))
        means = self.losses.means()
        self.losses.reset()
        return means

    def training_step(
        self, visible_idx: np.ndarray, infrared_idx: np.ndarray
    ) -> dict[str, torch.Tensor]:
        """One optimisation step of the network weights; returns the detached loss terms."""
        batch = self.images.batch(
            visible_idx, infrared_idx, self.device, self.aug_generator, self.channels_last
        )
        with autocast(self.device, self.amp):
            pool, feat, logits = self.model(batch.images, batch.routing)
        terms = self.loss(pool, feat, logits, batch.labels, batch.n_visible)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update()
        return {k: v.detach() for k, v in terms.items()}

    def _report(
        self, epoch: int, done: int, total: int, terms: dict[str, torch.Tensor], bar: tqdm
    ) -> None:
        """The loop's only host synchronisation: check the loss and log progress."""
        mean_loss = self.losses.sums["loss"] / self.losses.count
        loss, mean = torch.stack([terms["loss"].float(), mean_loss]).tolist()
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

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop after the current step with a resumable checkpoint (what SIGINT/SIGTERM do)."""
        self.stop.request(signum)

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Hook for variants, before the epoch's checkpoint (the search logs its alphas here)."""

    def on_train_end(self, results: dict[str, Any]) -> None:
        """Hook for variants, called once after the final evaluation."""

    # ----- checkpoints ----------------------------------------------------------------------
    def open_run_folder(self) -> None:
        """Lock and create the run folder, tidy it, and start its log.txt.

        Rank 0 holds the folder's lock for the run's life (the kernel drops it when the process
        ends), taken before anything is written there; then an old run is cleared on
        --overwrite and temporary files that killed writes left are removed.
        """
        args = self.args
        if self.dist.is_main:
            self.lock.acquire()
            prepare_run_dir(self.out)
            if args.overwrite and not is_own_folder(self.out, args.resume):
                removed = clear_run_dir(self.out, self.run_files)
                if removed:
                    log.warning("--overwrite: removed %s from %s", ", ".join(removed), self.out)
            stale = remove_temp_files(self.out)
            if stale:
                log.warning(
                    "removed %d temporary file(s) that an interrupted write left in %s: %s",
                    len(stale),
                    self.out,
                    ", ".join(stale),
                )
        barrier(self.dist)
        self.early_log.open(self.out / "log.txt")
        if args.resume and self.dist.is_main:
            trim_epoch_log(self.out / "log.jsonl", self.start_epoch)

    def checkpoint_size(self) -> int:
        """About the bytes of one checkpoint: weights, EMA and the optimizer's state.

        The optimizer's state appears at its first step; Adam keeps two tensors per weight,
        SGD with momentum one.
        """
        size = sum(
            t.numel() * t.element_size() for t in self.model_without_ddp.state_dict().values()
        )
        if self.ema is not None:
            size *= 2
        per_weight = 2 if isinstance(self.optimizer, torch.optim.Adam) else 1
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        size += per_weight * sum(p.numel() * p.element_size() for p in params)
        return size + MB

    def checkpoint_state(
        self, epoch: int, step_in_epoch: int, overwrite_pending: bool = False
    ) -> dict[str, Any]:
        """The checkpoint of the run after ``epoch`` epochs and ``step_in_epoch`` steps.

        Every floating-point tensor in it (weights, BN statistics, EMA, optimizer state) is
        checked: a non-finite one stops the run before anything is written.
        ``overwrite_pending`` records that the EMA overwrite follows this save, so that a
        resume applies it.
        """
        checkpoint = checkpoint_header(
            self.architecture(),
            self.model_without_ddp.num_classes,
            self.args.last_stride,
            vars(self.args),
        )
        checkpoint.update(epoch=epoch, step_in_epoch=step_in_epoch)
        checkpoint.update(global_step=self.global_step, **self.state.state_dict())
        if step_in_epoch:
            # The epoch's loss sums so far, so that its log record covers every step.
            checkpoint["epoch_losses"] = self.losses.state_dict()
        if overwrite_pending:
            checkpoint[OVERWRITE_PENDING] = True
        self._check_finite(checkpoint, epoch, step_in_epoch)
        return checkpoint

    def save_checkpoint(
        self, epoch: int, step_in_epoch: int, checkpoint: dict[str, Any] | None = None
    ) -> Path:
        """Save the run after ``epoch`` epochs and ``step_in_epoch`` steps of the next.

        Writes ``checkpoint`` (default: :meth:`checkpoint_state`) as the latest checkpoint,
        and a copy every ``--save_freq`` epochs; every checkpoint of the run is written here.
        """
        if checkpoint is None:
            checkpoint = self.checkpoint_state(epoch, step_in_epoch)
        path = self.out / LATEST
        if self.dist.is_main:
            write_checkpoint(checkpoint, path)
            if step_in_epoch == 0 and self.args.save_freq and epoch % self.args.save_freq == 0:
                copy_atomic(path, self.out / f"checkpoint_ep{epoch:03d}.pth")
        barrier(self.dist)
        self.last_good = path
        return path

    def _check_finite(self, checkpoint: dict[str, Any], epoch: int, step_in_epoch: int) -> None:
        """Refuse to save a checkpoint holding a NaN or infinity over the last good one."""
        bad = non_finite_tensors(checkpoint)
        if bad:
            where = (
                f"epoch {epoch + 1} step {step_in_epoch}"
                if step_in_epoch
                else f"the end of epoch {epoch}"
            )
            shown = ", ".join(bad[:4]) + (f", ... ({len(bad) - 4} more)" if len(bad) > 4 else "")
            self._non_finite(f"{len(bad)} saved tensor(s) became non-finite at {where}: {shown}")

    def _non_finite(self, what: str) -> None:
        """Stop the run: the weights may be ruined, so nothing is saved over the last good file."""
        if self.last_good is None:
            advice = "none, no checkpoint saved yet (lower --lr, or check the data)"
        else:
            advice = f"{self.last_good} (resume from it with a lower --lr, or check the data)"
        raise NonFiniteLoss(f"{what}; stopped without saving. Last good checkpoint: {advice}")

    # ----- evaluation -----------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        """The EMA when there is one, else the live model (the search scores these)."""
        return self.ema.module if self.ema is not None else self.model_without_ddp

    def evaluated_weights(self) -> list[tuple[str, nn.Module]]:
        """What a training-time evaluation scores, by label: the live model, then the EMA.

        The live weights are the checkpoint's ``model`` (``test.py``), the ones the authors'
        loop evaluated; the EMA, its ``ema`` (``test.py --ema``), is reported beside them.
        """
        weights = [("live", self.model_without_ddp)]
        if self.ema is not None:
            weights.append(("ema", self.ema.module))
        return weights

    def evaluate(self, final: bool) -> dict[str, Any]:
        """Monitoring evaluation on the test protocol (no model selection is made with it).

        Results are keyed by protocol, ``_ema`` appended for the EMA's; each says which
        weights it scored (``"weights": "live"`` or ``"ema"``).
        """
        results: dict[str, Any] = {}
        for label, model in self.evaluated_weights():
            suffix = "" if label == "live" else f"_{label}"
            try:
                scored = evaluate_training_run(
                    model, self.args, final, self.device, self.img_size, self.amp
                )
            except ValueError as err:
                if "NaN" not in str(err):
                    raise
                # Finite weights so large that the features overflow: the run diverged.
                raise NonFiniteLoss(
                    f"the {label} weights give non-finite features in the evaluation after "
                    f"epoch {self.epoch + 1}: the run diverged (its checkpoints of the last "
                    "epochs are finite but useless; train again with a lower --lr)"
                ) from None
            for key, result in scored.items():
                results[key + suffix] = {"weights": label, **result}
        return results

    def evaluate_and_log(self, final: bool) -> dict[str, Any]:
        """Evaluate on rank 0 and log a summary; the final results also go to results.json/md.

        Returns the flat Rank-1/mAP numbers for the epoch's log.jsonl record.
        """
        flat: dict[str, Any] = {}
        self.stop.phase = "final evaluation" if final else "evaluation"
        try:
            if self.dist.is_main:
                results = self.evaluate(final)
                rows = []
                for protocol, result in results.items():
                    weights = f" ({result['weights']})" if "weights" in result else ""
                    for kind in ("pool", "bnneck"):
                        flat[f"{protocol}_{kind}_rank1"] = round(result[kind]["rank1"], 2)
                        flat[f"{protocol}_{kind}_mAP"] = round(result[kind]["mAP"], 2)
                        rows.append((f"{protocol} {kind}{weights}", result[kind]))
                title = WEIGHTS_NOTE if any("weights" in r for r in results.values()) else ""
                table = format_table(rows, title)
                log.info("evaluation%s:\n%s", " (final)" if final else "", table)
                if final:
                    text = json.dumps(results, indent=2) + "\n"
                    write_text_atomic(self.out / "results.json", text)
                    write_text_atomic(self.out / "results.md", table + "\n")
            barrier(self.dist)
        finally:
            self.stop.phase = "step"
        self.model.train()
        return flat


def _gather_objects(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order, on every rank."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _brief(record: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
    )


def run_trainer(trainer: Trainer) -> int:
    """Train ``trainer`` to the end; a stop signal exits with 128 + the signal number."""
    try:
        trainer.train()
    except Interrupted as stop:
        log.warning("%s", stop)
        return 128 + stop.signum
    log.info("run folder: %s", trainer.out)
    return 0
