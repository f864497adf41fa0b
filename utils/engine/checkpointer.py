"""The checkpoint side of a training run, beside the loop: the run folder and its checkpoints.

The folder is judged once before the costly set-up (making the :class:`Checkpointer`) and created
under its lock as the run begins (:meth:`Checkpointer.open`); so a rejected run leaves nothing
behind, and until then the log records wait in memory (:class:`EarlyLog`). A checkpoint holding
a NaN or infinity is refused, naming the last good one.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
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
from utils.base.io import MB, check_free_space, copy_atomic, remove_temp_files, write_text_atomic
from utils.base.lock import LOCK_FILE, RunLock
from utils.base.logger import setup_logging
from utils.engine.settings import TrainSettings
from utils.engine.state import LossMeter, RunState

log = logging.getLogger(__name__)

LATEST = "checkpoint_latest.pth"
# What ``--overwrite`` removes of an earlier run (a variant adds its own outputs).
RUN_FILES = ("log.txt", "log.jsonl", "results.json", "results.md", "checkpoint_*.pth")


# The checkpoint entry saying that the EMA overwrite follows the save (see Trainer.train).
OVERWRITE_PENDING = "ema_overwrite_pending"
# The checkpoint entry of a mid-epoch save holding the seconds the epoch had run.
EPOCH_TIME = "epoch_time_s"


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the run stops and names its last good checkpoint."""


def checkpoint_size(network: nn.Module, has_ema: bool, adam: bool) -> int:
    """About the bytes of one checkpoint of ``network`` (may be on the meta device): weights,
    EMA and the optimizer's state (two tensors per trained weight for Adam, one for SGD)."""
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
    """The run folder of ``settings`` and the checkpoints written there (``script``: the tool
    that continues the run; ``run_files``: what ``--overwrite`` removes of an earlier run)."""

    def __init__(
        self,
        settings: TrainSettings,
        dist: DistInfo,
        script: str,
        run_files: Sequence[str],
        network: nn.Module,
        resumed: dict[str, Any] | None,
    ) -> None:
        """Judge the run folder before the costly set-up, writing nothing: refused if it cannot
        be created, holds another run, is locked by a run going on, or its disk lacks room for the
        checkpoints of ``network`` (the latest, its next temporary file, the periodic copies
        still to come after ``resumed``)."""
        out = self.out = settings.folder
        self.resume, self.overwrite = settings.resume, settings.overwrite
        self.save_freq, self.last_stride = settings.save_freq, settings.last_stride
        self.flags = settings.flags()
        self.dist, self.script, self.run_files = dist, script, run_files
        self.lock = RunLock(out)
        # The last checkpoint known to hold finite weights (named when the run diverges).
        self.last_good: Path | None = None
        self._check_folder()
        if not dist.is_main:
            return
        if (out / LOCK_FILE).exists():
            RunLock(out).acquire().release()
        first, every = int(resumed["epoch"]) if resumed else 0, self.save_freq
        saved = [e for e in range(first + 1, settings.epochs + 1) if every and e % every == 0]
        copies = [out / periodic_name(epoch) for epoch in saved]
        if self.overwrite and not self._own_folder():
            replaced = list(out.glob("checkpoint_*.pth"))
        else:
            replaced = [out / LATEST, *copies]
        one = checkpoint_size(network, settings.ema > 0, settings.optimizer.optim == "adam")
        check_free_space(out, (2 + len(copies)) * one - freed_bytes(replaced))

    def _own_folder(self) -> bool:
        """Whether the run folder is the folder of the checkpoint being resumed."""
        return bool(self.resume) and self.out.resolve() == Path(self.resume).resolve().parent

    def _check_not_held(self) -> None:
        """Refuse the folder if it holds another run's checkpoints (not the resumed one's, and
        not under ``--overwrite``)."""
        path = self.out
        held = {old.name for old in path.glob("checkpoint_*.pth") if old.is_file()}
        if not held or self._own_folder() or self.overwrite:
            return
        held = sorted(held, key=lambda name: (name != LATEST, name))
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        if self.resume:
            hint = "resume it with --resume PATH without --note"
        else:
            latest = path / (LATEST if LATEST in held else held[-1])
            hint = f"continue it with `{resume_command(latest, self.script)}`"
        raise UserError(
            f"--save/--note: the run folder {path} already holds a run ({shown}); {hint}, choose "
            "another --note or --save, or start over with --overwrite"
        )

    def _check_folder(self) -> None:
        """Check, without creating anything, that the run folder can be created and used."""
        path = self.out
        if path.exists():
            if not path.is_dir():
                raise UserError(f"--save/--note: the run folder {path} is a file, not a folder")
            if not os.access(path, os.W_OK | os.X_OK):
                raise UserError(f"--save/--note: the run folder {path} is not writable")
            self._check_not_held()
            return
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        problem = "is a file, not a folder" if not parent.is_dir() else "is not writable"
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"--save {path}: cannot create the run folder: {parent} {problem}")

    def open(self, resumed_at: int) -> None:
        """Lock (for the run's life), judge again, create and tidy the run folder as the run
        begins; a run resumed after ``resumed_at`` epochs drops later records from log.jsonl."""
        if self.dist.is_main:
            self.lock.acquire()
            self._check_not_held()
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                probe = self.out / ".write_test"
                probe.write_text("")
                probe.unlink()
            except OSError as err:
                raise UserError(
                    f"--save {self.out}: cannot write the run folder ({err.strerror})"
                ) from None
            why = "--overwrite" if self.overwrite else "a run stopped before its first checkpoint"
            removed = [] if self._own_folder() else clear_run_dir(self.out, self.run_files)
            if removed:
                log.warning("%s: removed %s from %s", why, ", ".join(removed), self.out)
            stale = remove_temp_files(self.out)
            if stale:
                what = "removed %d temporary file(s) that an interrupted write left in %s: %s"
                log.warning(what, len(stale), self.out, ", ".join(stale))
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
        what = "resumed from %s at epoch %d step %d (global step %d); run folder %s"
        log.info(what, path, point.epoch + 1, point.step_in_epoch, point.global_step, self.out)
        return point

    def assemble(
        self, arch: Arch, classes: int, state: RunState, losses: LossMeter, point: RunPoint
    ) -> dict[str, Any]:
        """The checkpoint of the run at ``point`` (the network of ``arch`` with ``classes``
        identities); a non-finite tensor in it stops the run before anything is written.

        A mid-epoch checkpoint holds the epoch's loss sums and time so far, so that its log
        record covers every step after a resume.
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
            where = f"the end of epoch {point.epoch}"
            if point.step_in_epoch:
                where = f"epoch {point.epoch + 1} step {point.step_in_epoch}"
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


def resume_command(checkpoint: Path, script: str) -> str:
    """The command line that continues a run from ``checkpoint`` (it takes the stored options)."""
    return shlex.join(["python", script, "--resume", str(checkpoint)])


def clear_run_dir(path: Path, patterns: Sequence[str] = RUN_FILES) -> list[str]:
    """Remove a previous run's logs, results and checkpoints from ``path``; return their names."""
    removed = []
    for pattern in patterns:
        for old in sorted(path.glob(pattern)):
            old.unlink()
            removed.append(old.name)
    return removed


def trim_epoch_log(path: Path, last_epoch: int) -> None:
    """Drop the records of ``log.jsonl`` after ``last_epoch``: a resumed run trains them again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            epoch = int(json.loads(line).get("epoch", 0))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            continue  # e.g. a line torn by a crash
        if epoch <= last_epoch:
            keep.append(line)
    if len(keep) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in keep))
        what = "%s: dropped %d record(s) after epoch %d, which this run trains again"
        log.warning(what, path, len(lines) - len(keep), last_epoch)


class EarlyLog(logging.Handler):
    """Logs to stderr at once and keeps the records until the run folder's ``log.txt`` opens."""

    def __init__(self, rank: int) -> None:
        super().__init__(logging.DEBUG)
        self.rank = rank
        self.records: list[logging.LogRecord] = []
        setup_logging(None, rank)
        logging.getLogger().addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        """Keep ``record`` for ``log.txt``."""
        self.records.append(record)

    def open(self, log_file: Path) -> None:
        """Log to ``log_file`` from now on (appending on a resume), the kept records first."""
        setup_logging(log_file, self.rank)  # also removes this handler
        files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
        for record in self.records:
            for handler in files:
                if record.levelno >= handler.level:
                    handler.handle(record)
        self.records.clear()
