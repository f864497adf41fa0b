"""The checkpoint side of a training run, beside the loop: the run folder and its checkpoints.

:class:`Checkpointer` opens the run folder (its lock held for the run's life), turns the run's
state (:class:`utils.engine.state.RunState`) into a checkpoint, refuses one that holds a NaN or
infinity (the run stops, naming the last good checkpoint), writes it atomically as the folder's
latest checkpoint with a copy every ``save_freq`` epochs, and restores a resumed run from one.
Every checkpoint of a run is written here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from model.checkpoint import non_finite_tensors, write_checkpoint
from utils.base.distributed import DistInfo, barrier
from utils.base.errors import UserError
from utils.base.io import MB, check_free_space, copy_atomic, remove_temp_files
from utils.base.lock import LOCK_FILE, RunLock
from utils.engine.rundir import (
    LATEST,
    check_run_dir,
    clear_run_dir,
    prepare_run_dir,
    trim_epoch_log,
)
from utils.engine.state import LossMeter, RunState

__all__ = ["OVERWRITE_PENDING", "Checkpointer", "NonFiniteLoss", "ResumePoint", "checkpoint_size"]

log = logging.getLogger(__name__)

# The checkpoint entry saying that the EMA overwrite follows the save (see Trainer.train).
OVERWRITE_PENDING = "ema_overwrite_pending"


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the run stops and names its last good checkpoint."""


def checkpoint_size(model: nn.Module, has_ema: bool, optimizer: torch.optim.Optimizer) -> int:
    """About the bytes of one checkpoint: weights, EMA and the optimizer's state.

    The optimizer's state appears at its first step; Adam keeps two tensors per weight,
    SGD with momentum one.
    """
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if has_ema:
        size *= 2
    per_weight = 2 if isinstance(optimizer, torch.optim.Adam) else 1
    params = [p for group in optimizer.param_groups for p in group["params"]]
    size += per_weight * sum(p.numel() * p.element_size() for p in params)
    return size + MB


@dataclass(frozen=True)
class ResumePoint:
    """Where a restored checkpoint left its run."""

    epoch: int
    step_in_epoch: int
    global_step: int
    # The EMA overwrite that followed the checkpoint's save is still owed.
    overwrite_pending: bool


class Checkpointer:
    """Assembles, checks and writes the checkpoints of the run in folder ``out``.

    ``header`` gives the checkpoint's self-description (architecture, classes, options) at the
    moment of the save; ``state`` the objects it saves and a resume restores.
    """

    def __init__(
        self,
        out: Path,
        state: RunState,
        header: Callable[[], dict[str, Any]],
        save_freq: int,
        dist: DistInfo,
    ) -> None:
        self.out = out
        self.state = state
        self.header = header
        self.save_freq = save_freq
        self.dist = dist
        self.lock = RunLock(out)
        # The last checkpoint known to hold finite weights (named when the run diverges).
        self.last_good: Path | None = None

    @staticmethod
    def check_folder(out: Path, resume: str, overwrite: bool, dist: DistInfo) -> None:
        """Refuse a run folder that holds another run (see :func:`check_run_dir`) or one that a
        run still going holds, before the costly set-up; its lock is taken from the start."""
        check_run_dir(out, resume or None, overwrite)
        if dist.is_main and (out / LOCK_FILE).exists():
            RunLock(out).acquire().release()

    def check_space(
        self, model: nn.Module, has_ema: bool, optimizer: torch.optim.Optimizer
    ) -> None:
        """Refuse a run whose folder's disk cannot hold one more checkpoint (rank 0)."""
        if self.dist.is_main:
            check_free_space(self.out, checkpoint_size(model, has_ema, optimizer))

    def open_folder(
        self, clear: bool, run_files: Sequence[str], resumed_at: int | None = None
    ) -> None:
        """Lock and create the run folder and tidy it (``clear``: remove an old run's files).

        Rank 0 holds the folder's lock for the run's life (the kernel drops it when the process
        ends), taken before anything is written there; then an old run is cleared on
        --overwrite and temporary files that killed writes left are removed. A run resumed
        after ``resumed_at`` epochs drops the later epochs' records from its log.jsonl.
        """
        if self.dist.is_main:
            self.lock.acquire()
            prepare_run_dir(self.out)
            if clear:
                removed = clear_run_dir(self.out, run_files)
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
            if resumed_at is not None:
                trim_epoch_log(self.out / "log.jsonl", resumed_at)
        barrier(self.dist)

    def restore(self, checkpoint: dict[str, Any], path: str, losses: LossMeter) -> ResumePoint:
        """Load the run state and the epoch's loss sums that ``checkpoint`` (read from ``path``)
        holds; returns where it left the run."""
        source = f"--resume {path}"
        self.state.load_state_dict(
            checkpoint, source, rank=self.dist.rank, world_size=self.dist.world_size
        )
        losses.load_state_dict(checkpoint.get("epoch_losses") or {})
        self.last_good = Path(path)
        point = ResumePoint(
            int(checkpoint["epoch"]),
            int(checkpoint.get("step_in_epoch", 0)),
            int(checkpoint.get("global_step", 0)),
            bool(checkpoint.get(OVERWRITE_PENDING)),
        )
        log.info(
            "resumed from %s at epoch %d step %d (global step %d); run folder %s",
            path,
            point.epoch + 1,
            point.step_in_epoch,
            point.global_step,
            self.out,
        )
        return point

    def assemble(
        self,
        epoch: int,
        step_in_epoch: int,
        global_step: int,
        losses: LossMeter,
        overwrite_pending: bool = False,
    ) -> dict[str, Any]:
        """The checkpoint of the run after ``epoch`` epochs and ``step_in_epoch`` steps.

        Every floating-point tensor in it (weights, BN statistics, EMA, optimizer state) is
        checked: a non-finite one stops the run before anything is written.
        ``overwrite_pending`` records that the EMA overwrite follows this save, so that a
        resume applies it.
        """
        checkpoint = self.header()
        checkpoint.update(epoch=epoch, step_in_epoch=step_in_epoch)
        checkpoint.update(global_step=global_step, **self.state.state_dict())
        if step_in_epoch:
            # The epoch's loss sums so far, so that its log record covers every step.
            checkpoint["epoch_losses"] = losses.state_dict()
        if overwrite_pending:
            checkpoint[OVERWRITE_PENDING] = True
        self._check_finite(checkpoint, epoch, step_in_epoch)
        return checkpoint

    def save(self, checkpoint: dict[str, Any], epoch: int, step_in_epoch: int) -> Path:
        """Write ``checkpoint`` (after ``epoch`` epochs and ``step_in_epoch`` steps of the next)
        as the latest checkpoint, and a copy every ``save_freq`` epochs."""
        path = self.out / LATEST
        if self.dist.is_main:
            write_checkpoint(checkpoint, path)
            if step_in_epoch == 0 and self.save_freq and epoch % self.save_freq == 0:
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
            self.non_finite(f"{len(bad)} saved tensor(s) became non-finite at {where}: {shown}")

    def non_finite(self, what: str) -> NoReturn:
        """Stop the run: the weights may be ruined, so nothing is saved over the last good file."""
        if self.last_good is None:
            advice = "none, no checkpoint saved yet (lower --lr, or check the data)"
        else:
            advice = f"{self.last_good} (resume from it with a lower --lr, or check the data)"
        raise NonFiniteLoss(f"{what}; stopped without saving. Last good checkpoint: {advice}")
