"""The evaluation side of a training run, beside the loop: what is scored, and its record.

An epoch's record in ``log.jsonl`` is written before its checkpoint, marked pending when an
evaluation follows, and completed with the evaluation's numbers, so that a resume can run an
evaluation a kill cut short. No model selection is made with these numbers: they monitor the run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data import ProtocolSettings, get_dataset
from model import Arch
from utils.base.cli import default_of
from utils.base.distributed import DistInfo, barrier
from utils.base.io import write_text_atomic
from utils.base.logger import append_json_line
from utils.engine.checkpointer import NonFiniteLoss
from utils.engine.settings import DataSettings, EvalSettings, TrainSettings
from utils.engine.signals import StopRequest
from utils.evaluation.evaluate import evaluate_protocols, format_table

log = logging.getLogger(__name__)

# The key an epoch record carries while its evaluation has not finished.
PENDING = "evaluation"

WEIGHTS_NOTE = (
    "live: the live model (the checkpoint's `model`, scored by test.py); "
    "ema: the EMA weights (its `ema`, test.py --ema)"
)


def evaluate_data(
    model: nn.Module,
    data: DataSettings,
    evaluation: EvalSettings,
    protocols: ProtocolSettings,
    draws: list[int],
    device: torch.device,
    keep: list[Any] | None = None,
) -> list[tuple[Any, dict[str, Any]]]:
    """The test protocols ``protocols`` select on the gallery ``draws``, scored as ``evaluation``
    says: (protocol, result) pairs (``keep`` receives each protocol's features)."""
    dataset = get_dataset(data.dataset)
    amp = evaluation.amp if device.type == "cuda" else "none"
    return evaluate_protocols(
        model,
        dataset,
        data.data_root,
        dataset.protocols(protocols),
        data.split,
        draws,
        device,
        data.img_size,
        evaluation.test_batch,
        amp,
        evaluation.flip,
        keep,
        evaluation.rerank,
    )


def evaluate_training_run(
    model: nn.Module,
    data: DataSettings,
    evaluation: EvalSettings,
    final: bool,
    device: torch.device,
) -> dict[str, Any]:
    """The training-time evaluation (every draw at the end, the first one for monitoring), keyed
    ``<data set>_<protocol key>`` with ``_flip`` and ``_rerank`` where they apply."""
    dataset = get_dataset(data.dataset)
    protocols = ProtocolSettings(mode=evaluation.mode, shot=1, direction="both")
    draws = dataset.draws_of(None) if final else dataset.draws_of(None)[:1]
    results = evaluate_data(model, data, evaluation, protocols, draws, device)
    suffix = ("_flip" if evaluation.flip else "") + ("_rerank" if evaluation.rerank else "")
    return {dataset.record_key(protocol) + suffix: result for protocol, result in results}


# What an Evaluation scores: (final, epoch) -> the results by key.
Scorer = Callable[[bool, int], dict[str, Any]]
# The results' title when every slot is shared (train.py's default architecture).
BASELINE_NOTE = "all-shared baseline (every BN slot shared)"


def baseline_note(arch: Arch, config_path: str | None) -> str:
    """:data:`BASELINE_NOTE` when ``arch`` has no split slot (also said in a warning), else ""."""
    if arch.split_slots():
        return ""
    default = config_path == default_of(TrainSettings, "config_path")
    hint = " (no --config_path given; pass a searched arch.json to train it)" if default else ""
    log.warning(
        "%s: every BN slot is shared: this trains the all-shared baseline%s", config_path, hint
    )
    return BASELINE_NOTE


class Evaluation:
    """A training-time evaluation on rank 0 (``score(final, epoch)``: the results by key after
    ``epoch`` epochs, 0-based; ``note`` heads their title) and the epoch records in ``out``."""

    def __init__(self, out: Path, dist: DistInfo, score: Scorer, note: str = "") -> None:
        self.out, self.dist = out, dist
        self.score, self.note = score, note
        self.log_file = out / "log.jsonl"

    def write_record(self, record: dict[str, Any], evaluated: bool) -> None:
        """Append an epoch's record (marked pending when an evaluation is to complete it)."""
        if self.dist.is_main:
            append_json_line(self.log_file, {**record, PENDING: "pending"} if evaluated else record)

    def pending(self, epochs_done: int) -> bool:
        """Whether the record of ``epochs_done`` epochs still waits for its evaluation (rank 0)."""
        return self.dist.is_main and any(
            r.get("epoch") == epochs_done and r.get(PENDING) == "pending" for r in self._records()
        )

    def _records(self) -> list[dict[str, Any]]:
        """The records of ``log.jsonl`` (none when absent; a line torn by a crash is skipped)."""
        if not self.log_file.is_file():
            return []
        records = []
        for line in self.log_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def _complete(self, epoch: int, numbers: dict[str, Any]) -> None:
        """Merge an evaluation's ``numbers`` into ``epoch``'s record, atomically (no record of
        it, e.g. in a run resumed into a new folder: nothing)."""
        records = self._records()
        found = False
        for record in records:
            if record.get("epoch") == epoch:
                record.pop(PENDING, None)
                record.update(numbers)
                found = True
        if found:
            write_text_atomic(self.log_file, "".join(json.dumps(r) + "\n" for r in records))

    def run(self, final: bool, epoch: int, epochs_done: int, stop: StopRequest) -> dict[str, Any]:
        """Evaluate on rank 0 (``epoch``: the epoch being trained, 0-based), log it and complete
        the record of ``epochs_done`` epochs; returns its numbers (empty on the other ranks)."""
        flat: dict[str, Any] = {}
        stop.phase = "final evaluation" if final else "evaluation"
        try:
            if self.dist.is_main:
                flat = self._record(final, epoch)
                self._complete(epochs_done, flat)
            barrier(self.dist)
        finally:
            stop.phase = "step"
        return flat

    def _record(self, final: bool, epoch: int) -> dict[str, Any]:
        """Evaluate and log a summary (the final one also to results.json/md); returns the flat
        Rank-1/mAP numbers for the epoch's record."""
        flat: dict[str, Any] = {}
        results = self.score(final, epoch)
        rows = []
        for protocol, result in results.items():
            weights = f" ({result['weights']})" if "weights" in result else ""
            for kind in ("pool", "bnneck"):
                flat[f"{protocol}_{kind}_rank1"] = round(result[kind]["rank1"], 2)
                flat[f"{protocol}_{kind}_mAP"] = round(result[kind]["mAP"], 2)
                rows.append((f"{protocol} {kind}{weights}", result[kind]))
        weights_note = WEIGHTS_NOTE if any("weights" in r for r in results.values()) else ""
        table = format_table(rows, "; ".join(note for note in (self.note, weights_note) if note))
        log.info("evaluation%s:\n%s", " (final)" if final else "", table)
        if final:
            write_text_atomic(self.out / "results.json", json.dumps(results, indent=2) + "\n")
            write_text_atomic(self.out / "results.md", table + "\n")
        return flat


def protocol_scores(
    model: nn.Module,
    ema: nn.Module | None,
    data: DataSettings,
    evaluation: EvalSettings,
    device: torch.device,
    final: bool,
    epoch: int,
) -> dict[str, Any]:
    """The test protocol after ``epoch`` (0-based) epochs scored with the live ``model`` (the
    authors' choice) and the ``ema``, whose keys end in ``_ema``; each result names its weights."""
    results: dict[str, Any] = {}
    for label, weights in (("live", model), ("ema", ema)):
        if weights is None:
            continue
        suffix = "" if label == "live" else f"_{label}"
        try:
            scored = evaluate_training_run(weights, data, evaluation, final, device)
        except ValueError as err:
            if "NaN" not in str(err):
                raise
            # Finite weights so large that the features overflow: the run diverged.
            raise NonFiniteLoss(
                f"the {label} weights give non-finite features in the evaluation after "
                f"epoch {epoch + 1}: the run diverged (its checkpoints of the last "
                "epochs are finite but useless; train again with a lower --lr)"
            ) from None
        for key, result in scored.items():
            results[key + suffix] = {"weights": label, **result}
    return results
