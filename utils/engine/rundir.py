"""The run folder's life cycle: named, checked at start-up, created only once the run begins.

Every check of a run (options, data, architecture, a ``--resume`` checkpoint) happens before the
folder is created, so a rejected run leaves nothing behind. Until then the log records wait in
memory (:class:`EarlyLog`); they open ``log.txt`` when the folder appears.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.base.errors import UserError
from utils.base.io import write_text_atomic
from utils.base.logger import setup_logging

log = logging.getLogger(__name__)

LATEST = "checkpoint_latest.pth"
# Files whose presence means a folder already holds a run.
RUN_MARKERS = ("log.jsonl", LATEST)
# What ``--overwrite`` removes of an earlier run (a variant adds its own outputs).
RUN_FILES = ("log.txt", "log.jsonl", "results.json", "results.md", "checkpoint_*.pth")


def run_dir(save: str, note: str, resume: str, default_name: str) -> Path:
    """The run folder: ``save/note``; on a resume without ``note``, the checkpoint's folder.

    Without ``note`` a new run is named ``default_name``.
    """
    if resume and not note:
        return Path(resume).parent
    return Path(save) / (note or default_name)


def is_own_folder(path: Path, resume: str | os.PathLike[str] | None) -> bool:
    """Whether ``path`` is the folder of the checkpoint being resumed."""
    return bool(resume) and path.resolve() == Path(resume).resolve().parent  # type: ignore[arg-type]


def check_run_dir(
    path: Path, resume: str | os.PathLike[str] | None = None, overwrite: bool = False
) -> None:
    """Check, without creating anything, that the run folder ``path`` can be created and used.

    A folder that already holds a run is refused, unless it is the folder of the checkpoint
    being resumed (``resume``) or ``overwrite`` is set.
    """
    flag = "--save"
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--save/--note: the run folder {path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"--save/--note: the run folder {path} is not writable")
        held = [name for name in RUN_MARKERS if (path / name).exists()]
        if held and not is_own_folder(path, resume) and not overwrite:
            hint = (
                "resume it with --resume PATH without --note"
                if resume
                else f"continue it with --resume {path / LATEST}"
            )
            raise UserError(
                f"--save/--note: the run folder {path} already holds a run "
                f"({', '.join(held)}); {hint}, choose another --note or --save, or start "
                "over with --overwrite"
            )
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(
            f"{flag} {path}: cannot create the run folder: {parent} is a file, not a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot create the run folder: {parent} is not writable")


def clear_run_dir(path: Path, patterns: Sequence[str] = RUN_FILES) -> list[str]:
    """Remove a previous run's logs, results and checkpoints from ``path``; return their names."""
    removed = []
    for pattern in patterns:
        for old in sorted(path.glob(pattern)):
            old.unlink()
            removed.append(old.name)
    return removed


def prepare_run_dir(path: Path) -> Path:
    """Create ``path`` and check it is writable, or fail with one line naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"--save {path}: cannot write the run folder ({err.strerror})") from None
    return path


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
        log.warning(
            "%s: dropped %d record(s) after epoch %d, which this run trains again",
            path,
            len(lines) - len(keep),
            last_epoch,
        )


# The key an epoch record carries while its evaluation has not finished.
PENDING = "evaluation"


def read_epoch_log(path: Path) -> list[dict[str, Any]]:
    """The records of ``log.jsonl`` (none when absent; a line torn by a crash is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def pending_evaluation(path: Path, epoch: int) -> bool:
    """Whether ``epoch``'s record in ``log.jsonl`` still waits for its evaluation."""
    return any(
        r.get("epoch") == epoch and r.get(PENDING) == "pending" for r in read_epoch_log(path)
    )


def complete_epoch_record(path: Path, epoch: int, numbers: dict[str, Any]) -> bool:
    """Merge an evaluation's ``numbers`` into ``epoch``'s record of ``log.jsonl``, atomically.

    The record loses its pending mark; returns False when the log has no record of ``epoch``
    (e.g. a run resumed into a new folder).
    """
    records = read_epoch_log(path)
    found = False
    for record in records:
        if record.get("epoch") == epoch:
            record.pop(PENDING, None)
            record.update(numbers)
            found = True
    if found:
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return found


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
