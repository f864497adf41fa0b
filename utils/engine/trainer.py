"""The training loop shared by train.py and search.py.

    trainer = Trainer(settings)   # checks and builds everything; writes nothing
    trainer.resume()              # continues from --resume, if given
    trainer.train()               # creates the run folder, trains, evaluates; returns the results

:class:`Trainer` owns the fixed loop (epochs -> steps -> checkpoint -> evaluation); beside it,
:class:`~utils.engine.checkpointer.Checkpointer` keeps the run folder and its checkpoints and
:class:`~utils.engine.evaluation.Evaluation` scores the run and keeps its ``log.jsonl``. A variant
overrides :meth:`Trainer.training_step` and its set-up (the ``build_*`` methods, each returning
what it builds from what it is given) and registers extra checkpointed state with
``self.state.register(name, object)``. ``self.model`` is the module the steps run (DDP or
torch.compile when asked for); ``self.model_without_ddp`` is the network saved and evaluated.

Speed: uint8 images resident on the device, augmented there in batch; losses read back every
``--log_freq`` steps only. The authors' schedule: every ``--ema_overwrite_every`` epochs the EMA
weights replace the live ones, after that epoch's checkpoint (which notes that the overwrite
follows, for a resume to apply) and evaluation. Stop signals end the run after the current step
(or evaluation) with a resumable checkpoint; a resumed run (``--deterministic`` on the CPU)
continues bit-exactly. The log handlers a run opens are closed when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data import TrainSet
from model import Arch, build_model, load_arch
from model.checkpoint import checkpoint_header, plain
from utils.base.distributed import broadcast_flag, cleanup
from utils.base.logger import log_run_header, setup_logging
from utils.engine.batch import ResidentImages
from utils.engine.build import (
    build_optimizer,
    build_sampler,
    build_schedule,
    load_training_data,
    rescale_schedule,
    share_weights,
    start_process,
    wrap_model,
)
from utils.engine.checkpointer import EPOCH_TIME, Checkpointer, NonFiniteLoss, checkpoints_held
from utils.engine.ema import ModelEMA
from utils.engine.evaluation import Evaluation, ProtocolEvaluation, baseline_note, evaluated_weights
from utils.engine.rundir import LATEST, RUN_FILES, EarlyLog, claim_run_dir
from utils.engine.settings import TrainSettings
from utils.engine.signals import Interrupted, StopRequest
from utils.engine.state import (
    GeneratorState,
    LossMeter,
    ProcessRandomState,
    RunState,
    check_same_arch,
    gather_objects,
    read_resume_checkpoint,
)
from utils.evaluation.evaluate import autocast

__all__ = ["LATEST", "Interrupted", "NonFiniteLoss", "Trainer", "TrainingData", "run_trainer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingData:
    """The images a run trains on: ``train`` feeds the loop's steps (a variant may add sets)."""

    train: TrainSet


class Trainer:
    """Fixed training loop; subclasses override set-up or the step, never the loop."""

    kind = "train"
    # The tool that runs this loop (its command line continues a stopped run).
    script = "train.py"
    # Said first in the results' title (the all-shared baseline's note); set by build_model.
    results_note = ""
    # What --overwrite removes of an earlier run in the folder.
    run_files: tuple[str, ...] = RUN_FILES

    def __init__(self, settings: TrainSettings, train_set: TrainSet | None = None) -> None:
        """Check and build the run (``train_set``: train on these images, not the data set's)."""
        self.settings = settings
        self._start_process()
        # Everything the flags name is read before the costly set-up (the image cache).
        self.arch = self.load_architecture()
        self.resume_checkpoint = self.read_resume()
        self.data = self.build_data(train_set)
        self.model_without_ddp = self.build_model(self.data.train).to(self.device)
        if self.channels_last:
            self.model_without_ddp.to(memory_format=torch.channels_last)
        share_weights(self.model_without_ddp, self.dist)
        decay = settings.ema
        self.ema = ModelEMA(self.model_without_ddp, decay) if decay > 0 else None
        self.loss = settings.loss
        self.optimizer = self.build_optimizer(self.model_without_ddp)
        optim = settings.optimizer
        self.scheduler = build_schedule(self.optimizer, optim.warmup_epochs, optim.milestones)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        batches = (settings.batch_size, settings.num_pos, settings.seed, self.dist)
        self.sampler = build_sampler(self.data.train, *batches)
        self.aug_generator = torch.Generator().manual_seed(settings.seed * 1000 + self.dist.rank)
        self.images = ResidentImages.upload(self.data.train, self.device)
        self.model = wrap_model(self.model_without_ddp, self.dist, settings.compile)
        self.state = RunState(
            gather=gather_objects if self.dist.enabled else None,
            model=self.model_without_ddp,
            ema=self.ema.module if self.ema is not None else None,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            rng=ProcessRandomState(),
            aug_rng=GeneratorState(self.aug_generator),
            environment=self.env,
        )
        self.checkpointer = Checkpointer(
            self.out, self.state, self.checkpoint_header, settings.save_freq, self.dist
        )
        self.evaluation = self.build_evaluation()
        # Loss sums of the epoch being trained (restored by a resume, saved by an interruption).
        self.losses = LossMeter(self.device)
        # Where the run stands: the epoch and step being trained (0-based), steps so far.
        self.epoch = self.step = self.global_step = 0
        self.start_epoch = self.start_step = 0
        self.stop = StopRequest(self.script)
        # Seconds the epoch had run before a resume; when the epoch began (counting them).
        self.resumed_time, self.epoch_started = 0.0, time.time()
        # Epochs between copies of the EMA into the live model (0: never).
        self.overwrite_every = settings.overwrite_every if self.ema is not None else 0
        # A resume from the end of an overwrite epoch owes the overwrite that followed its save.
        self.overwrite_pending = False
        first = int(self.resume_checkpoint["epoch"]) if self.resume_checkpoint else 0
        held = checkpoints_held(first, settings.epochs, settings.save_freq)
        self.checkpointer.check_space(
            self.model_without_ddp, self.ema is not None, self.optimizer, held
        )

    def _start_process(self) -> None:
        """Device, processes, seeds, the run folder's name and the early log, in that order."""
        settings = self.settings
        device, seed = settings.evaluation.device, settings.seed
        self.device, self.dist = start_process(device, seed, settings.deterministic)
        self.out = settings.folder
        Checkpointer.check_folder(
            self.out, settings.resume, settings.overwrite, self.dist, self.script
        )
        self.early_log = EarlyLog(self.dist.rank)
        self.env = plain(log_run_header(settings.flags(), self.device))
        self.amp = settings.evaluation.amp if self.device.type == "cuda" else "none"
        # Channels-last pays on GPUs; on a CPU it made the steps slower.
        channels_last = settings.channels_last
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last

    # ----- set-up, overridable: each returns what it builds ---------------------------------
    def load_architecture(self) -> Arch | None:
        """The architecture of ``--config_path`` (None: a variant derives it from its network)."""
        return load_arch(self.settings.config_path)

    def read_resume(self) -> dict[str, Any] | None:
        """The checkpoint to resume, read and checked before the training data is loaded (so
        that a bad flag costs seconds); None without ``--resume``."""
        settings = self.settings
        if not settings.resume:
            return None
        checkpoint = read_resume_checkpoint(
            settings.resume, settings.flags(), settings.epochs, settings.ema
        )
        self.check_checkpoint(checkpoint, f"--resume {settings.resume}")
        return checkpoint

    def check_checkpoint(self, checkpoint: dict[str, Any], source: str) -> None:
        """Refuse a checkpoint this run cannot continue: one of another architecture."""
        assert self.arch is not None
        given = f"--config_path {self.settings.config_path}"
        check_same_arch(checkpoint, self.arch, source, given)

    def check_data_fits(self, checkpoint: dict[str, Any], source: str) -> None:
        """Refuse a checkpoint that does not fit the loaded data (nothing to check here)."""

    def build_data(self, train_set: TrainSet | None) -> TrainingData:
        """``train_set`` if given, else the data set's: check ``--data_root``, load (and cache)."""
        if train_set is None:
            train_set = load_training_data(self.settings.data, self.dist)
        return TrainingData(train_set)

    def build_model(self, train_set: TrainSet) -> nn.Module:
        """The network of ``--config_path``, initialised from ``--pretrained``."""
        assert self.arch is not None
        settings = self.settings
        log.info("architecture %s: %s", settings.config_path, self.arch.summary())
        self.results_note = baseline_note(self.arch, settings.config_path)
        classes, stride = train_set.num_classes, settings.last_stride
        return build_model(self.arch, classes, stride, settings.pretrained)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam (or SGD) over the network weights, in the paper's two learning-rate groups."""
        return build_optimizer(model.named_parameters(), self.settings.optimizer, self.device)

    def build_evaluation(self) -> Evaluation:
        """The test protocol, scored with the live weights and the EMA."""
        ema = self.ema.module if self.ema is not None else None
        weights = evaluated_weights(self.model_without_ddp, ema)
        data, evaluation = self.settings.data, self.settings.evaluation
        protocol = ProtocolEvaluation(self.out, self.dist, weights, data, evaluation, self.device)
        protocol.note = self.results_note
        return protocol

    def architecture(self) -> Arch:
        """The architecture a checkpoint records (``test.py`` rebuilds the network from it)."""
        assert self.arch is not None
        return self.arch

    def checkpoint_header(self) -> dict[str, Any]:
        """What a checkpoint says of itself: architecture, classes, stride and options."""
        classes, settings = self.model_without_ddp.num_classes, self.settings
        return checkpoint_header(
            self.architecture(), classes, settings.last_stride, settings.flags()
        )

    def eval_model(self) -> nn.Module:
        """The EMA when there is one, else the live model (the search scores these)."""
        return self.ema.module if self.ema is not None else self.model_without_ddp

    # ----- resume ---------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from ``--resume``: weights, EMA, optimizer, schedule, counters, random states.

        Without ``--resume`` nothing changes: the run starts at epoch 0.
        """
        path = self.settings.resume
        if not path:
            return
        checkpoint, self.resume_checkpoint = self.resume_checkpoint or self.read_resume(), None
        assert checkpoint is not None
        self.check_data_fits(checkpoint, f"--resume {path}")
        point = self.checkpointer.restore(checkpoint, path, self.losses)
        self.start_epoch = self.epoch = point.epoch
        self.start_step, self.global_step = point.step_in_epoch, point.global_step
        self.overwrite_pending = point.overwrite_pending and self.ema is not None
        self.resumed_time = float(checkpoint.get(EPOCH_TIME, 0.0)) if self.start_step else 0.0
        rescale_schedule(self.optimizer, self.scheduler, checkpoint, self.settings.optimizer.lr)

    # ----- the loop -------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train from the start (or the resume point) to the last epoch; returns the results."""
        quiet = not (self.dist.is_main and sys.stderr.isatty())
        try:
            self.open_run_folder()
            with self.stop, contextlib.nullcontext() if quiet else logging_redirect_tqdm():
                results = self._train_epochs()
            log.info("run folder: %s", self.out)
            return results
        except Interrupted as stop:
            log.warning("%s", stop)
            raise
        finally:
            self.checkpointer.lock.release()
            cleanup(self.dist)
            self.close_log()

    def _train_epochs(self) -> dict[str, Any]:
        epochs = self.settings.epochs
        results = self._finish_resumed_epoch()
        for epoch in range(self.start_epoch, epochs):
            self.epoch = epoch
            resumed = self.resumed_time if epoch == self.start_epoch else 0.0
            self.epoch_started = time.time() - resumed  # a resumed epoch counts its first part
            lr = self.lr()  # the rate this epoch trains with (the schedule steps after it)
            losses = self.train_one_epoch(epoch)
            with warnings.catch_warnings():
                # A run resumed at the end of an epoch steps the schedule before the optimizer
                # in this process; torch warns although the restored schedule is right.
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
                self.scheduler.step()
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": self.global_step,
                "lr": lr,
                "time_s": round(time.time() - self.epoch_started, 2),
                **losses,
                "loss_terms": [name for name in losses if name != "loss"],  # for utils.plot
            }
            last = epoch + 1 == epochs
            evaluated = last or self.evaluates(epoch + 1)
            overwrite = self.overwrites(epoch + 1)
            self.on_epoch_end(epoch, record)
            # The authors' order on an overwrite epoch: evaluate the live model, save (`model`
            # live, `ema` averaged), then overwrite. The save comes first here, so that a
            # failing evaluation cannot cost the epoch; it changes no number, as the
            # evaluation leaves the weights alone. The record is written before the save, so a
            # kill at any later moment leaves it in the log for the resumed run to complete.
            checkpoint = self.checkpointer.assemble(
                epoch + 1, 0, self.global_step, self.losses, overwrite
            )
            self.evaluation.write_record(record, evaluated)
            saved = self.checkpointer.save(checkpoint, epoch + 1, 0)
            if evaluated:
                numbers = self.evaluate_and_log(final=last, epochs_done=epoch + 1)
                record.update(numbers)
                results = numbers if last else results
            if overwrite:
                self.apply_ema_overwrite()
            if self.dist.is_main:
                log.info("epoch %d: %s", epoch + 1, _brief(record))
            stop = broadcast_flag(self.stop.requested, self.dist, self.device)
            if stop and not last:
                raise self.stop.interrupted(saved)
        self.on_train_end(results)
        return results

    def evaluates(self, epochs_done: int) -> bool:
        """Whether the monitoring evaluation runs after ``epochs_done`` epochs."""
        test_freq = self.settings.test_freq
        return bool(test_freq) and epochs_done % test_freq == 0

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
        epoch, results, epochs = self.start_epoch, {}, self.settings.epochs
        if epoch == 0 or self.start_step:
            return results
        final = epoch >= epochs
        if final:
            log.info(
                "%s has trained all %d epochs: running the final evaluation only",
                self.checkpointer.last_good,
                epochs,
            )
        pending = self.evaluation.pending(epoch)
        if final or broadcast_flag(pending, self.dist, self.device):
            if not final:
                log.info("epoch %d's evaluation was cut short: running it again", epoch)
            numbers = self.evaluate_and_log(final=final, epochs_done=epoch)
            results = numbers if final else {}
        if self.overwrite_pending:
            self.apply_ema_overwrite()
        return results

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """Run one epoch (a resumed one from its resume step); returns each loss term's mean."""
        self.model.train()
        steps, max_steps = len(self.sampler), self.settings.max_steps
        total = min(steps, max_steps) if max_steps else steps
        first = self.start_step if epoch == self.start_epoch else 0
        self.sampler.set_epoch(epoch, first)
        bar = tqdm(
            total=total,
            initial=first,
            desc=f"epoch {epoch + 1}/{self.settings.epochs}",
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
                if done % self.settings.log_freq == 0 or done == total:
                    self._report(epoch, done, total, terms, bar)
                    # Ranks agree on a stop at the log points only (one collective there).
                    stop = broadcast_flag(stop, self.dist, self.device)
                elif self.dist.enabled:
                    stop = False
                if stop:
                    if not self.losses.finite():
                        self.checkpointer.non_finite(f"loss is non-finite in epoch {epoch + 1}")
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
            where = f"in epoch {epoch + 1} (at or before step {done})"
            self.checkpointer.non_finite(f"loss is {bad} {where}")
        bar.set_postfix(loss=f"{loss:.3f}")
        line, lr = "epoch %d/%d step %d/%d: loss %.4f (epoch mean %.4f), lr %.3g", self.lr()
        log.info(line, epoch + 1, self.settings.epochs, done, total, loss, mean, lr)

    def lr(self) -> float:
        """The learning rate of the head (the backbone's is a tenth of it)."""
        return self.optimizer.param_groups[-1]["lr"]

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop after the current step with a resumable checkpoint (what SIGINT/SIGTERM do)."""
        self.stop.request(signum)

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Hook for variants, before the epoch's checkpoint (the search logs its alphas here)."""

    def on_train_end(self, results: dict[str, Any]) -> None:
        """Hook for variants, called once after the final evaluation."""

    # ----- the run folder, checkpoints, evaluation ------------------------------------------
    def open_run_folder(self) -> None:
        """Lock, create and tidy the run folder (:meth:`Checkpointer.open_folder`); log.txt."""
        settings = self.settings
        resume, overwrite = settings.resume, settings.overwrite
        resumed_at = self.start_epoch if resume else None
        check = lambda: claim_run_dir(self.out, resume, overwrite, self.script)  # noqa: E731
        self.checkpointer.open_folder(check, self.run_files, resumed_at)
        self.early_log.open(self.out / "log.txt")

    def close_log(self) -> None:
        """Close the log handlers the run opened (its log.txt); logging goes on to stderr."""
        setup_logging(None, self.dist.rank)

    def save_checkpoint(self, epoch: int, step_in_epoch: int) -> Path:
        """Save the run after ``epoch`` epochs and ``step_in_epoch`` steps of the next."""
        checkpoint = self.checkpointer.assemble(epoch, step_in_epoch, self.global_step, self.losses)
        if step_in_epoch:  # the epoch's time so far, for its record after a resume
            checkpoint[EPOCH_TIME] = round(time.time() - self.epoch_started, 3)
        return self.checkpointer.save(checkpoint, epoch, step_in_epoch)

    def evaluate_and_log(self, final: bool, epochs_done: int) -> dict[str, Any]:
        """Evaluate after ``epochs_done`` epochs (:meth:`Evaluation.run`); returns its numbers."""
        numbers = self.evaluation.run(final, self.epoch, epochs_done, self.stop)
        self.model.train()
        return numbers


def _brief(record: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
    )


def run_trainer(trainer: Trainer) -> int:
    """Resume ``trainer`` (when asked) and train it to the end; returns the exit status (a stop
    signal: 128 + the signal number)."""
    trainer.resume()
    try:
        trainer.train()
    except Interrupted as stop:
        return 128 + stop.signum
    return 0
