"""SIGINT, SIGTERM and SIGHUP as a request to stop after the current step with a resumable
checkpoint."""

from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

from utils.base.errors import StopNow
from utils.engine.checkpointer import resume_command

log = logging.getLogger(__name__)

# SIGHUP: the terminal was closed; the run saves as for SIGTERM.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# What the loop does after a stop request, by the phase it is in.
_AFTER = {
    "step": "stopping after this step with a resumable checkpoint",
    "evaluation": "the checkpoint is saved; stopping after this evaluation",
    "final evaluation": "the checkpoint is saved; finishing the final evaluation, then ending",
}


class Interrupted(Exception):
    """Raised after a stop signal once a resumable checkpoint is on disk."""

    def __init__(self, signum: int, checkpoint: Path, script: str = "train.py") -> None:
        super().__init__(
            f"stopped by {signal.Signals(signum).name}; resumable checkpoint: "
            f"{checkpoint} (continue with `{resume_command(checkpoint, script)}`)"
        )
        self.signum = signum
        self.checkpoint = checkpoint


class StopRequest:
    """Whether the run was asked to stop; inside ``with`` it listens to :data:`STOP_SIGNALS`: the
    first asks the loop to stop after its current step (or evaluation), a second stops at once."""

    def __init__(self, script: str = "train.py") -> None:
        self.signum: int | None = None
        # The tool whose command line continues the run (named in the stop message).
        self.script = script
        # What the loop is doing: "step", "evaluation" or "final evaluation" (for the message).
        self.phase = "step"
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was requested."""
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask the loop to stop after the current step (what a stop signal does)."""
        self.signum = signum

    def interrupted(self, checkpoint: Path) -> Interrupted:
        """The exception that ends the run once ``checkpoint`` is saved."""
        return Interrupted(self.signum or signal.SIGTERM, checkpoint, self.script)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise StopNow(signum)  # a second signal stops at once
        self.request(signum)
        after = _AFTER.get(self.phase, _AFTER["step"])
        log.warning("%s: %s (again: stop now)", signal.Signals(signum).name, after)

    def __enter__(self) -> StopRequest:
        for signum in STOP_SIGNALS:
            # Outside the main thread signals cannot be caught: keep the defaults there.
            with contextlib.suppress(ValueError):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
