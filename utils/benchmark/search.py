"""Section ``search``: a search step against a training step."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from utils.benchmark.measure import throughput
from utils.benchmark.section import Bench, Row, Section, figure, in_memory
from utils.engine.search import SearchTrainer
from utils.engine.settings import SearchSettings
from utils.engine.trainer import Trainer

log = logging.getLogger("benchmark")


def run_search(bench: Bench) -> dict[str, Any]:
    """A search step against a training step: ``weights_step + arch_step / arch_freq``."""
    args, settings, data = bench.args, bench.settings, bench.data
    log.info("search step against training step")
    trainer = in_memory(settings, "train", data)
    # Weights steps timed alone (no architecture step is ever due); architecture steps directly.
    train = replace(settings, folder=settings.folder.parent / "search")
    search = SearchSettings(
        train, depth=args.depth, arch_warmup=0, arch_freq=10**9, eval_arch=False
    )
    searcher = SearchTrainer(search, data)

    def batch(owner: Trainer, k: int) -> tuple[np.ndarray, np.ndarray]:
        return owner.sampler.batch(*divmod(k, len(owner.sampler)))

    steps: dict[str, Callable[[int], Any]] = {
        "train": lambda k: trainer.training_step(*batch(trainer, k)),
        "weights": lambda k: searcher.training_step(*batch(searcher, k)),
        "arch": lambda k: searcher.architecture_step(*divmod(k, len(searcher.arch_sampler))),
    }
    rounds = (args.search_steps, args.search_rounds)
    seconds = {name: throughput(step, args, *rounds)["step_s"] for name, step in steps.items()}
    trainer.close_log()
    searcher.close_log()
    freq = SearchSettings(train).arch_freq
    search_step = seconds["weights"] + seconds["arch"] / freq
    return dict(
        status="measured",
        train_step_s=seconds["train"],
        search_step_s=round(search_step, 5),
        ratio=round(search_step / seconds["train"], 3),
        weights_step_s=seconds["weights"],
        arch_step_s=seconds["arch"],
        arch_freq=freq,
    )


def search_rows(doc: dict[str, Any]) -> list[Row]:
    """Seconds per search step and per training step."""
    times = (figure(doc, "search", k) for k in ("search_step_s", "train_step_s", "ratio"))
    return [("step (s): search / training", *times)]


SEARCH = Section("search", run_search, search_rows)
