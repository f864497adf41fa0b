"""The training loop shared by train.py and search.py.

    trainer = Trainer(settings)   # checks and builds everything; writes nothing
    trainer.resume()              # continues from --resume, if given
    trainer.train()               # creates the run folder, trains, evaluates; returns the results

The set-up order and the loop are fixed; a variant (the search) supplies what differs: its
model, step and extra state (the methods after ``__init__``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data import TrainSet
from model import Arch, build_model
from model.checkpoint import plain
from utils.base.distributed import broadcast_flag, cleanup
from utils.base.logger import log_run_header, setup_logging
from utils.engine import build
from utils.engine.checkpointer import (
    LATEST,
    RUN_FILES,
    Checkpointer,
    EarlyLog,
    NonFiniteLoss,
    RunPoint,
)
from utils.engine.evaluation import Evaluation, baseline_note, protocol_scores
from utils.engine.settings import TrainSettings
from utils.engine.signals import Interrupted, StopRequest
from utils.engine.state import (
    GeneratorState,
    LossMeter,
    ProcessRandomState,
    RunState,
    read_resume_checkpoint,
    run_architecture,
)
from utils.evaluation.evaluate import autocast

__all__ = ["LATEST", "Interrupted", "NonFiniteLoss", "Trainer", "run_trainer"]

log = logging.getLogger(__name__)


class Trainer:
    """Fixed set-up and loop; a variant supplies its model, step and state, never the order."""

    script = "train.py"  # the tool whose command line continues a stopped run
    run_files: tuple[str, ...] = RUN_FILES  # what --overwrite removes of an earlier run

    def __init__(self, settings: TrainSettings, train_set: TrainSet | None = None) -> None:
        """Check and build the run (``train_set``: train on these images, not the data set's)."""
        self.settings, self.out = settings, settings.folder
        self.device, self.dist, self.amp, self.channels_last = build.start_process(settings)
        self.early_log = EarlyLog(self.dist.rank)
        self.env = plain(log_run_header(settings.flags(), self.device))
        # Before the costly set-up (the images): what the flags name is read and checked, and the
        # run folder claimed, its disk sized by the network built on the meta device.
        self.resume_checkpoint = read_resume_checkpoint(settings)
        self.arch = self.load_architecture(self.resume_checkpoint)
        classes = train_set.num_classes if train_set else build.listed_identities(settings.data)
        with torch.device("meta"):
            network = self.build_model(classes, None)
        self.checkpointer = Checkpointer(
            settings, self.dist, self.script, self.run_files, network, self.resume_checkpoint
        )
        train_set = train_set or build.load_training_data(settings.data, self.dist)
        self.train_set = self.training_set(train_set)
        classes = self.train_set.num_classes
        model = self.model_without_ddp = self.build_model(classes, settings.pretrained)
        model.to(self.device, memory_format=torch.channels_last if self.channels_last else None)
        build.share_weights(model, self.dist)
        self.ema = build.ModelEMA(model, settings.ema) if settings.ema > 0 else None
        self.optimizer = build.build_optimizer(model, settings.optimizer, self.device)
        self.scheduler = build.build_schedule(self.optimizer, settings.optimizer)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.sampler = build.build_sampler(self.train_set, settings, settings.seed, self.dist)
        generator = torch.Generator().manual_seed(settings.seed * 1000 + self.dist.rank)
        self.images = build.ResidentImages.upload(
            self.train_set, self.device, generator, self.channels_last
        )
        # The module the steps run (DDP, torch.compile); model_without_ddp is the one saved.
        self.model = build.wrap_model(model, self.dist, settings.compile)
        self.state = RunState(
            distributed=self.dist.enabled,
            model=model,
            ema=self.ema.module if self.ema is not None else None,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            rng=ProcessRandomState(),
            aug_rng=GeneratorState(generator),
            environment=self.env,
            **self.extra_state(),
        )
        note = baseline_note(self.arch, settings.config_path) if self.arch is not None else ""
        self.evaluation = Evaluation(self.out, self.dist, self.evaluate, note)
        # Loss sums of the epoch being trained (restored by a resume, saved by an interruption).
        self.losses = LossMeter(self.device)
        # Where the run starts (a resume moves it); the epoch and step being trained; its clock.
        self.start = RunPoint(0, 0, 0)
        self.epoch = self.step = self.global_step = 0
        self.epoch_started = time.time()
        self.stop = StopRequest(self.script)

    def load_architecture(self, resumed: dict[str, Any] | None) -> Arch | None:
        """The architecture trained, checked against the checkpoint ``resumed`` (see
        :func:`run_architecture`); None: a variant derives its own."""
        settings = self.settings
        arch = run_architecture(settings.config_path, resumed, f"--resume {settings.resume}")
        log.info("architecture %s: %s", settings.config_path, arch.summary())
        return arch

    def training_set(self, train_set: TrainSet) -> TrainSet:
        """The images the steps train on, of the loaded ``train_set`` (here all of them)."""
        return train_set

    def build_model(self, classes: int, pretrained: str | None) -> nn.Module:
        """The network of ``classes`` identities, from ``pretrained`` weights (None: random)."""
        assert self.arch is not None
        return build_model(self.arch, classes, self.settings.last_stride, pretrained)

    def extra_state(self) -> dict[str, Any]:
        """A variant's own checkpoint entries (see :class:`RunState`), built with the model."""
        return {}

    def training_step(
        self, visible_idx: np.ndarray, infrared_idx: np.ndarray
    ) -> dict[str, torch.Tensor]:
        """One optimisation step of the network weights; returns the detached loss terms."""
        batch = self.images.batch(visible_idx, infrared_idx)
        with autocast(self.device, self.amp):
            pool, feat, logits = self.model(batch.images, batch.routing)
        terms = self.settings.loss(pool, feat, logits, batch.labels, batch.n_visible)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update()
        return {k: v.detach() for k, v in terms.items()}

    def evaluate(self, final: bool, epoch: int) -> dict[str, Any]:
        """The scores after ``epoch`` (0-based) epochs: the test protocol, live weights and EMA."""
        data, evaluation = self.settings.data, self.settings.evaluation
        ema = self.ema.module if self.ema is not None else None
        model = self.model_without_ddp
        return protocol_scores(model, ema, data, evaluation, self.device, final, epoch)

    def epoch_record(self, epoch: int) -> dict[str, Any]:
        """A variant's own entries of the record of ``epoch`` (0-based), before its checkpoint."""
        return {}

    def architecture(self) -> Arch:
        """The architecture a checkpoint records (``test.py`` rebuilds the network from it)."""
        assert self.arch is not None
        return self.arch

    def on_train_end(self, results: dict[str, Any]) -> None:
        """Called once after the final evaluation (the search writes its architecture)."""

    def resume(self) -> None:
        """Continue from ``--resume`` (if given): weights, EMA, optimizer, schedule, counters."""
        checkpoint, self.resume_checkpoint = self.resume_checkpoint, None
        if checkpoint is None:
            return
        self.start = self.checkpointer.restore(self.state, checkpoint, self.losses)
        self.epoch, self.global_step = self.start.epoch, self.start.global_step
        build.rescale_schedule(
            self.optimizer, self.scheduler, checkpoint, self.settings.optimizer.lr
        )

    def train(self) -> dict[str, Any]:
        """Train from the start (or the resume point) to the last epoch; returns the results."""
        quiet = not (self.dist.is_main and sys.stderr.isatty())
        try:
            self.checkpointer.open(self.start.epoch)
            self.early_log.open(self.out / "log.txt")
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
        settings, results, epoch = self.settings, {}, self.start.epoch
        # Epochs between copies of the EMA into the live model (0: never).
        every = settings.overwrite_every if self.ema is not None else 0
        # A run resumed at the end of an epoch owes that epoch its evaluation if a stop cut it
        # short (or it was the final one), then the EMA overwrite that followed its save.
        if epoch and not self.start.step_in_epoch:
            final = epoch >= settings.epochs
            if final:
                done = self.checkpointer.last_good
                what = "%s has trained all %d epochs: running the final evaluation only"
                log.info(what, done, settings.epochs)
            if final or broadcast_flag(self.evaluation.pending(epoch), self.dist, self.device):
                if not final:
                    log.info("epoch %d's evaluation was cut short: running it again", epoch)
                numbers = self.evaluation.run(final, epoch, epoch, self.stop)
                results = numbers if final else {}
            if self.start.overwrite_pending and self.ema is not None:
                self.ema.copy_to(self.model_without_ddp)
        for epoch in range(self.start.epoch, settings.epochs):
            self.epoch, done = epoch, epoch + 1
            resumed = self.start.seconds if epoch == self.start.epoch else 0.0
            self.epoch_started = time.time() - resumed  # a resumed epoch counts its first part
            lr = self.lr()  # the rate this epoch trains with (the schedule steps after it)
            losses = self.train_one_epoch(epoch)
            with warnings.catch_warnings():
                # A run resumed at the end of an epoch steps the schedule before the optimizer
                # in this process; torch warns although the restored schedule is right.
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
                self.scheduler.step()
            record: dict[str, Any] = {
                "epoch": done,
                "step": self.global_step,
                "lr": lr,
                "time_s": round(time.time() - self.epoch_started, 2),
                **losses,
                "loss_terms": [name for name in losses if name != "loss"],  # for utils.plot
                **self.epoch_record(epoch),
            }
            last = done == settings.epochs
            evaluated = last or bool(settings.test_freq) and done % settings.test_freq == 0
            overwrite = bool(every) and done % every == 0
            # The authors' order on an overwrite epoch is evaluate, save, overwrite. Saving first
            # (the evaluation leaves the weights alone) means a failing evaluation cannot cost the
            # epoch; the record, written before the save, survives a kill for the resume.
            checkpoint = self.checkpoint(done, 0, overwrite)
            self.evaluation.write_record(record, evaluated)
            saved = self.checkpointer.save(checkpoint)
            if evaluated:
                numbers = self.evaluation.run(last, epoch, done, self.stop)
                record.update(numbers)
                results = numbers if last else results
            if overwrite and self.ema is not None:
                self.ema.copy_to(self.model_without_ddp)
            if self.dist.is_main:
                brief = (
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in record.items()
                )
                log.info("epoch %d: %s", done, ", ".join(brief))
            if broadcast_flag(self.stop.requested, self.dist, self.device) and not last:
                raise self.stop.interrupted(saved)
        self.on_train_end(results)
        return results

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """Run one epoch (a resumed one from its resume step); returns each loss term's mean."""
        self.model.train()
        steps, max_steps = len(self.sampler), self.settings.max_steps
        total = min(steps, max_steps) if max_steps else steps
        first = self.start.step_in_epoch if epoch == self.start.epoch else 0
        self.sampler.set_epoch(epoch, first)
        shown = self.dist.is_main and sys.stderr.isatty()
        name = f"epoch {epoch + 1}/{self.settings.epochs}"
        with tqdm(total=total, initial=first, desc=name, leave=False, disable=not shown) as bar:
            for step, (visible_idx, infrared_idx) in enumerate(self.sampler, start=first):
                if step >= total:
                    break
                self.step = step
                terms = self.training_step(visible_idx, infrared_idx)
                self.losses.add(terms)
                self.global_step += 1
                bar.update(1)
                done = step + 1
                if done % self.settings.log_freq == 0 or done == total:
                    stop = self._report(epoch, done, total, terms, bar)
                else:  # between log points a stop waits for the other ranks
                    stop = self.stop.requested and not self.dist.enabled
                if stop:
                    if not self.losses.finite():
                        self.checkpointer.non_finite(f"loss is non-finite in epoch {epoch + 1}")
                    saved = self.checkpointer.save(self.checkpoint(epoch, done))
                    raise self.stop.interrupted(saved)
        means = self.losses.means()
        self.losses.reset()
        return means

    def _report(
        self, epoch: int, done: int, total: int, terms: dict[str, torch.Tensor], bar: tqdm
    ) -> bool:
        """At a log point, the loop's only host synchronisation: check the loss, log progress and
        agree with the other ranks on a stop (one collective); returns whether to stop."""
        mean_loss = self.losses.sums["loss"] / self.losses.count
        loss, mean = torch.stack([terms["loss"].float(), mean_loss]).tolist()
        # The epoch's running sum is non-finite if any step since the epoch began was.
        if not math.isfinite(mean):
            bad, where = mean if math.isfinite(loss) else loss, f"(at or before step {done})"
            self.checkpointer.non_finite(f"loss is {bad} in epoch {epoch + 1} {where}")
        bar.set_postfix(loss=f"{loss:.3f}")
        line, lr = "epoch %d/%d step %d/%d: loss %.4f (epoch mean %.4f), lr %.3g", self.lr()
        log.info(line, epoch + 1, self.settings.epochs, done, total, loss, mean, lr)
        return broadcast_flag(self.stop.requested, self.dist, self.device)

    def checkpoint(self, epoch: int, step_in_epoch: int, overwrite: bool = False) -> dict[str, Any]:
        """The run after ``epoch`` epochs and ``step_in_epoch`` steps of the next, checked."""
        seconds = time.time() - self.epoch_started
        point = RunPoint(epoch, step_in_epoch, self.global_step, overwrite, seconds)
        classes = self.model_without_ddp.num_classes
        return self.checkpointer.assemble(
            self.architecture(), classes, self.state, self.losses, point
        )

    def lr(self) -> float:
        """The learning rate of the head (the backbone's is a tenth of it)."""
        return self.optimizer.param_groups[-1]["lr"]

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop after the current step with a resumable checkpoint (what SIGINT/SIGTERM do)."""
        self.stop.request(signum)

    def close_log(self) -> None:
        """Close the log handlers the run opened (its log.txt); logging goes on to stderr."""
        setup_logging(None, self.dist.rank)


def run_trainer(trainer: Trainer) -> int:
    """Resume ``trainer`` (when asked) and train it to the end; returns the exit status (a stop
    signal: 128 + the signal number)."""
    trainer.resume()
    try:
        trainer.train()
    except Interrupted as stop:
        return 128 + stop.signum
    return 0
