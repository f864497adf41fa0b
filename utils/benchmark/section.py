"""What a benchmark section is, and what the sections share while they run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from data.trainset import TrainSet
from model import Arch
from utils.benchmark.setup import in_memory
from utils.engine.settings import TrainSettings
from utils.engine.trainer import Trainer

# A row of the Markdown table: what is measured, the fast and plain figures, their ratio.
Row = tuple[str, Any, Any, Any]


@dataclass
class Bench:
    """The run's options, device, architecture, training set and train.py's settings."""

    # The benchmark's settings (utils.benchmark.options.BenchSettings, whose module imports
    # every section).
    args: Any
    device: torch.device
    arch: Arch
    data: TrainSet
    settings: TrainSettings
    shared_trainer: Trainer | None = field(default=None, repr=False)

    def trainer(self) -> Trainer:
        """The fast path's Trainer, built on first use and shared by the sections asking for it."""
        if self.shared_trainer is None:
            self.shared_trainer = in_memory(self.settings, "fast", self.data)
        return self.shared_trainer

    def release_trainer(self) -> None:
        """Drop the shared Trainer (its memory must not count in later sections' peaks)."""
        if self.shared_trainer is not None:
            self.shared_trainer.close_log()
        self.shared_trainer = None


def no_rows(doc: dict[str, Any]) -> list[Row]:
    """A section without a line in the Markdown table."""
    return []


@dataclass(frozen=True)
class Section:
    """One part of the JSON document: its name, how to measure it, its Markdown rows.

    ``uses_trainer``: the section runs on :meth:`Bench.trainer`, which lives until the last such
    section has run.
    """

    name: str
    run: Callable[[Bench], dict[str, Any]]
    rows: Callable[[dict[str, Any]], list[Row]] = no_rows
    uses_trainer: bool = False


def figure(doc: dict[str, Any], section: str, key: str) -> Any:
    """``doc[section][key]``, or None where the section was skipped."""
    return doc.get(section, {}).get(key)
