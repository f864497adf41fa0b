"""The run folder's life cycle: named, checked at start-up, created only once the run begins.

Every check of a run (options, data, architecture, a ``--resume`` checkpoint) happens before the
folder is created, so a rejected run leaves nothing behind. Until then the log records wait in
memory (:class:`EarlyLog`); they open ``log.txt`` when the folder appears.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.base.errors import UserError
from utils.base.io import write_text_atomic
from utils.base.logger import setup_logging

log = logging.getLogger(__name__)

LATEST = "checkpoint_latest.pth"
# Files whose presence means a folder already holds a run that can be continued: a checkpoint.
# A folder with logs but no checkpoint (a run killed before its first save) may be taken over.
RUN_MARKERS = (LATEST, "checkpoint_*.pth")
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


def held_run(path: Path) -> list[str]:
    """The checkpoints showing that the folder ``path`` holds a run (none: the folder is free)."""
    held = {old.name for pattern in RUN_MARKERS for old in path.glob(pattern) if old.is_file()}
    return sorted(held, key=lambda name: (name != LATEST, name))


def resume_command(checkpoint: Path, script: str) -> str:
    """The command line that continues a run from ``checkpoint`` (it takes the stored options)."""
    return shlex.join(["python", script, "--resume", str(checkpoint)])


def check_not_held(
    path: Path,
    resume: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    script: str = "train.py",
) -> None:
    """Refuse the folder ``path`` if it holds another run's checkpoints (see :func:`held_run`).

    The folder of the checkpoint being resumed (``resume``) and ``overwrite`` are allowed.
    ``script`` is the tool whose command line continues the run (named in the message).
    """
    held = held_run(path)
    if not held or is_own_folder(path, resume) or overwrite:
        return
    shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
    if resume:
        hint = "resume it with --resume PATH without --note"
    else:
        latest = path / (LATEST if LATEST in held else held[-1])
        hint = f"continue it with `{resume_command(latest, script)}`"
    raise UserError(
        f"--save/--note: the run folder {path} already holds a run ({shown}); {hint}, choose "
        "another --note or --save, or start over with --overwrite"
    )


def claim_run_dir(
    path: Path, resume: str | os.PathLike[str] | None, overwrite: bool, script: str
) -> str | None:
    """Under the run folder's lock: refuse it if another run used it meanwhile
    (:func:`check_not_held`); else say why an earlier run's files go (None: they stay).

    In a folder that is not the resumed checkpoint's, what is left is ``--overwrite``'s to
    remove, or the logs of a run stopped before its first checkpoint.
    """
    check_not_held(path, resume or None, overwrite, script)
    if is_own_folder(path, resume):
        return None
    return "--overwrite" if overwrite else "a run stopped before its first checkpoint"


def check_run_dir(
    path: Path,
    resume: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    script: str = "train.py",
) -> None:
    """Check, without creating anything, that the run folder ``path`` can be created and used.

    A folder that already holds a run is refused (see :func:`check_not_held`).
    """
    flag = "--save"
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--save/--note: the run folder {path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"--save/--note: the run folder {path} is not writable")
        check_not_held(path, resume, overwrite, script)
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
