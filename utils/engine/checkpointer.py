"""The checkpoint side of a training run, beside the loop: the run folder and its checkpoints.

:meth:`Checkpointer.claim` judges the run folder once, before the costly set-up and without
writing anything: usable, holding no other run, locked by no run going on, on a disk with room
for every checkpoint the run will hold. :meth:`Checkpointer.open` creates it as the run begins,
under its lock (held for the run's life). Every checkpoint of a run is assembled here from the
run's state (:class:`utils.engine.state.RunState`), refused if it holds a NaN or infinity (the
run stops, naming the last good checkpoint), written atomically as the folder's latest with a
copy every ``--save_freq`` epochs, and restored on a resume.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from torch import nn

from model import Arch
from model.checkpoint import checkpoint_header, non_finite_tensors, write_checkpoint
from utils.base.distributed import DistInfo, barrier
from utils.base.errors import UserError
from utils.base.io import MB, check_free_space, copy_atomic, remove_temp_files
from utils.base.lock import LOCK_FILE, RunLock
from utils.engine.rundir import (
    LATEST,
    check_run_dir,
    claim_run_dir,
    clear_run_dir,
    is_own_folder,
    prepare_run_dir,
    trim_epoch_log,
)
from utils.engine.settings import TrainSettings
from utils.engine.state import LossMeter, RunState

__all__ = ["OVERWRITE_PENDING", "Checkpointer", "NonFiniteLoss", "RunPoint", "checkpoint_size"]

log = logging.getLogger(__name__)

# The checkpoint entry saying that the EMA overwrite follows the save (see Trainer.train).
OVERWRITE_PENDING = "ema_overwrite_pending"
# The checkpoint entry of a mid-epoch save holding the seconds the epoch had run.
EPOCH_TIME = "epoch_time_s"


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the run stops and names its last good checkpoint."""


def checkpoint_size(network: nn.Module, has_ema: bool, adam: bool) -> int:
    """About the bytes of one checkpoint of ``network``: weights, EMA and the optimizer's state.

    ``network`` may live on the meta device (sized, never allocated). The optimizer keeps two
    tensors per trained weight (Adam) or one (SGD with momentum).
    """
    size = sum(t.numel() * t.element_size() for t in network.state_dict().values())
    if has_ema:
        size *= 2
    trained = [p for p in network.parameters() if p.requires_grad]
    size += (2 if adam else 1) * sum(p.numel() * p.element_size() for p in trained)
    return size + MB


def freed_bytes(paths: Sequence[Path]) -> int:
    """The bytes that replacing or removing the files ``paths`` frees: a file with another
    hard link left (a periodic copy of the latest checkpoint) frees nothing."""
    files: dict[int, os.stat_result] = {}
    names: Counter[int] = Counter()
    for path in paths:
        if path.is_file():
            stat = path.stat()
            files[stat.st_ino] = stat
            names[stat.st_ino] += 1
    return sum(stat.st_size for ino, stat in files.items() if names[ino] >= stat.st_nlink)


@dataclass(frozen=True)
class RunPoint:
    """Where a run stands: ``epoch`` epochs done and ``step_in_epoch`` steps of the next."""

    epoch: int
    step_in_epoch: int
    global_step: int
    # The EMA overwrite of the epoch just done is still owed (it follows the save).
    overwrite_pending: bool = False
    # Seconds the epoch had run, at a mid-epoch point (for its record after a resume).
    seconds: float = 0.0


class Checkpointer:
    """The run folder of ``settings`` and the checkpoints written there.

    ``script`` is the tool whose command line continues the run (named in refusals);
    ``run_files`` is what ``--overwrite`` removes of an earlier run.
    """

    def __init__(
        self, settings: TrainSettings, dist: DistInfo, script: str, run_files: Sequence[str]
    ) -> None:
        self.out = settings.folder
        self.resume, self.overwrite = settings.resume, settings.overwrite
        self.save_freq, self.last_stride = settings.save_freq, settings.last_stride
        self.flags = settings.flags()
        self.dist, self.script, self.run_files = dist, script, run_files
        self.lock = RunLock(self.out)
        # The last checkpoint known to hold finite weights (named when the run diverges).
        self.last_good: Path | None = None

    @classmethod
    def claim(
        cls,
        settings: TrainSettings,
        dist: DistInfo,
        script: str,
        run_files: Sequence[str],
        network: nn.Module,
        resumed: dict[str, Any] | None,
    ) -> Checkpointer:
        """The checkpoint side of the run of ``settings`` (resuming ``resumed``), its folder
        judged before the costly set-up, writing nothing: refused if it cannot be created or
        holds another run (:func:`check_run_dir`), if a run going on holds it, or if its disk
        lacks room for the checkpoints of ``network`` the run holds at most (checked on rank 0).

        Those are the latest checkpoint and, while the next one is written, its temporary file,
        plus every periodic copy still to be made (a hard link at first, it keeps its own data
        once the latest moves on). The checkpoints already in the folder that the run replaces
        (or that ``--overwrite`` removes) count as room.
        """
        claimed = cls(settings, dist, script, run_files)
        check_run_dir(claimed.out, claimed.resume or None, claimed.overwrite, script)
        if not dist.is_main:
            return claimed
        if (claimed.out / LOCK_FILE).exists():
            RunLock(claimed.out).acquire().release()
        first, every = int(resumed["epoch"]) if resumed else 0, claimed.save_freq
        saved = [e for e in range(first + 1, settings.epochs + 1) if every and e % every == 0]
        copies = [claimed.out / periodic_name(epoch) for epoch in saved]
        if claimed.overwrite and not is_own_folder(claimed.out, claimed.resume):
            replaced = list(claimed.out.glob("checkpoint_*.pth"))
        else:
            replaced = [claimed.out / LATEST, *copies]
        one = checkpoint_size(network, settings.ema > 0, settings.optimizer.optim == "adam")
        check_free_space(claimed.out, (2 + len(copies)) * one - freed_bytes(replaced))
        return claimed

    def open(self, resumed_at: int) -> None:
        """Lock, create and tidy the run folder as the run begins.

        Rank 0 holds the folder's lock for the run's life (the kernel drops it when the process
        ends), taken before anything is written there. Under the lock the folder is judged
        again (:func:`claim_run_dir`: another run may have used it meanwhile) and an old run's
        files go where ``--overwrite`` (or a run stopped before its first checkpoint) says so;
        then temporary files that killed writes left are removed. A run resumed after
        ``resumed_at`` epochs drops the later epochs' records from its log.jsonl.
        """
        if self.dist.is_main:
            self.lock.acquire()
            why = claim_run_dir(self.out, self.resume, self.overwrite, self.script)
            prepare_run_dir(self.out)
            removed = clear_run_dir(self.out, self.run_files) if why else []
            if removed:
                log.warning("%s: removed %s from %s", why, ", ".join(removed), self.out)
            stale = remove_temp_files(self.out)
            if stale:
                log.warning(
                    "removed %d temporary file(s) that an interrupted write left in %s: %s",
                    len(stale),
                    self.out,
                    ", ".join(stale),
                )
            if self.resume:
                trim_epoch_log(self.out / "log.jsonl", resumed_at)
        barrier(self.dist)

    def restore(self, state: RunState, checkpoint: dict[str, Any], losses: LossMeter) -> RunPoint:
        """Load ``state`` and the epoch's loss sums from the ``--resume`` ``checkpoint``;
        returns where it left the run."""
        path = self.resume
        state.load_state_dict(
            checkpoint, f"--resume {path}", rank=self.dist.rank, world_size=self.dist.world_size
        )
        losses.load_state_dict(checkpoint.get("epoch_losses") or {})
        self.last_good = Path(path)
        step = int(checkpoint.get("step_in_epoch", 0))
        point = RunPoint(
            int(checkpoint["epoch"]),
            step,
            int(checkpoint.get("global_step", 0)),
            bool(checkpoint.get(OVERWRITE_PENDING)),
            float(checkpoint.get(EPOCH_TIME, 0.0)) if step else 0.0,
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
        self, arch: Arch, classes: int, state: RunState, losses: LossMeter, point: RunPoint
    ) -> dict[str, Any]:
        """The checkpoint of the run at ``point``: its header (the network of ``arch`` with
        ``classes`` identities), then ``state``'s entries and the point.

        Every floating-point tensor in it (weights, BN statistics, EMA, optimizer state) is
        checked: a non-finite one stops the run before anything is written. A mid-epoch
        checkpoint holds the epoch's loss sums and time so far, so that its log record covers
        every step; ``point.overwrite_pending`` records that the EMA overwrite follows this
        save, so that a resume applies it.
        """
        checkpoint = checkpoint_header(arch, classes, self.last_stride, self.flags)
        checkpoint.update(epoch=point.epoch, step_in_epoch=point.step_in_epoch)
        checkpoint.update(global_step=point.global_step, **state.state_dict())
        if point.step_in_epoch:
            checkpoint["epoch_losses"] = losses.state_dict()
        if point.overwrite_pending:
            checkpoint[OVERWRITE_PENDING] = True
        bad = non_finite_tensors(checkpoint)
        if bad:
            where = (
                f"epoch {point.epoch + 1} step {point.step_in_epoch}"
                if point.step_in_epoch
                else f"the end of epoch {point.epoch}"
            )
            shown = ", ".join(bad[:4]) + (f", ... ({len(bad) - 4} more)" if len(bad) > 4 else "")
            self.non_finite(f"{len(bad)} saved tensor(s) became non-finite at {where}: {shown}")
        if point.step_in_epoch:
            checkpoint[EPOCH_TIME] = round(point.seconds, 3)
        return checkpoint

    def save(self, checkpoint: dict[str, Any]) -> Path:
        """Write ``checkpoint`` as the latest checkpoint, and a copy every ``save_freq`` epochs."""
        path = self.out / LATEST
        epoch = checkpoint["epoch"]
        if self.dist.is_main:
            write_checkpoint(checkpoint, path)
            every = self.save_freq
            if checkpoint["step_in_epoch"] == 0 and every and epoch % every == 0:
                copy_atomic(path, self.out / periodic_name(epoch))
        barrier(self.dist)
        self.last_good = path
        return path

    def non_finite(self, what: str) -> NoReturn:
        """Stop the run: the weights may be ruined, so nothing is saved over the last good file."""
        if self.last_good is None:
            advice = "none, no checkpoint saved yet (lower --lr, or check the data)"
        else:
            advice = (
                f"{self.last_good} (resume from it with a lower --lr, which the resumed schedule "
                "takes, or check the data)"
            )
        raise NonFiniteLoss(f"{what}; stopped without saving. Last good checkpoint: {advice}")


def periodic_name(epoch: int) -> str:
    """The file name of the periodic copy saved after ``epoch`` epochs."""
    return f"checkpoint_ep{epoch:03d}.pth"
