"""The run state: what a checkpoint holds besides its header, and the rules for resuming it.

An entry of :class:`RunState` is an object with ``state_dict()``/``load_state_dict()``, an
``nn.Module`` (loaded so that a mismatch names the parts that do not fit), a dict of entries, or
a plain value saved to describe the run and never loaded back. Random states are per process:
rank 0's under their entry names and, in a multi-process run, every rank's under
:data:`RANDOM_BY_RANK`.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from data.registry import get_dataset
from model.arch import Arch, arch_from_dict, load_arch
from model.checkpoint import is_resumable, plain, read_checkpoint
from model.weights import load_state
from utils.base.errors import UserError
from utils.engine.settings import TrainSettings

log = logging.getLogger(__name__)

# Options a resumed run must share with its checkpoint: they fix the data, the batches and the
# model, so a change would silently continue a different run.
RESUME_FIXED = ("dataset", "img_h", "img_w", "batch_size", "num_pos", "last_stride", "seed")
# Options that may change on a resume without comment (paths, bookkeeping, evaluation).
RESUME_FREE = frozenset(
    ("data_root", "cache_dir", "save", "note", "resume", "overwrite", "device", "test_batch")
    + ("log_freq", "save_freq", "test_freq", "epochs", "compile", "channels_last", "eval_arch")
    + ("mode", "flip", "rerank", "k1", "k2", "lambda_value")
)


class ProcessRandomState:
    """The process-wide random states (Python, NumPy, torch) as a checkpoint entry."""

    def state_dict(self) -> dict[str, Any]:
        """Python, NumPy and torch (CPU and CUDA) states as weights-only-loadable values."""
        np_state, (version, internal, gauss) = np.random.get_state(), random.getstate()
        state: dict[str, Any] = {
            "python": list(internal) + [gauss],
            "python_version": version,
            "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "numpy_pos": int(np_state[2]),
            "numpy_gauss": [int(np_state[3]), float(np_state[4])],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        python, gauss = state["python"], state["numpy_gauss"]
        random.setstate((state["python_version"], tuple(python[:-1]), python[-1]))
        numpy = state["numpy"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", numpy, state["numpy_pos"], gauss[0], gauss[1]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class GeneratorState:
    """A ``torch.Generator`` (e.g. the augmentation's) as a checkpoint entry."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> torch.Tensor:
        """The generator's state."""
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        """Continue the generator where it was saved."""
        self.generator.set_state(state)


_RANDOM = (ProcessRandomState, GeneratorState)


class LossMeter:
    """Per-term loss sums over the steps of an epoch, kept on the device (reading one back
    synchronises, so the loop does it only at its log points and the epoch's end)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, terms: Mapping[str, torch.Tensor]) -> None:
        """Add one step's terms."""
        for key, value in terms.items():
            self.sums[key] = self.sums[key] + value.float() if key in self.sums else value.float()
        self.count += 1

    def means(self) -> dict[str, float]:
        """The mean of each term over the steps added so far."""
        return {key: float(value) / max(self.count, 1) for key, value in self.sums.items()}

    def finite(self) -> bool:
        """Whether every sum is finite (a non-finite step makes its epoch's sum non-finite)."""
        return all(math.isfinite(float(value)) for value in self.sums.values())

    def reset(self) -> None:
        """Start a new epoch."""
        self.sums, self.count = {}, 0

    def state_dict(self) -> dict[str, Any]:
        """The sums as floats and the step count."""
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from saved sums (an empty state starts from zero)."""
        self.sums = {
            key: torch.tensor(value, device=self.device)
            for key, value in state.get("sums", {}).items()
        }
        self.count = int(state.get("count", 0))


# The checkpoint entry holding every rank's random states (a list, one per rank).
RANDOM_BY_RANK = "random_by_rank"


class RunState:
    """The checkpoint entries of a run by name; in a ``distributed`` run the random states of
    every rank are gathered on saving."""

    def __init__(self, distributed: bool = False, **entries: Any) -> None:
        self.entries: dict[str, Any] = dict(entries)
        self.distributed = distributed

    def register(self, name: str, entry: Any) -> None:
        """Add an entry that checkpoints save and a resume restores (e.g. a variant's optimizer)."""
        if name in self.entries:
            raise ValueError(f"checkpoint entry {name!r} is already registered")
        self.entries[name] = entry

    def state_dict(self) -> dict[str, Any]:
        """Every entry's saved form, by name (and, distributed, every rank's random states: then
        every rank must call this, a collective)."""
        state = {name: _save(entry) for name, entry in self.entries.items()}
        if self.distributed:
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, _random_part(self.entries, state))
            state[RANDOM_BY_RANK] = gathered
        return state

    def load_state_dict(
        self,
        checkpoint: Mapping[str, Any],
        source: str,
        restore_random: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """Restore every entry from ``checkpoint`` (``source`` names it in errors); random states
        unless not ``restore_random``, each rank its own when saved for as many processes."""
        if restore_random and world_size > 1:
            by_rank = checkpoint.get(RANDOM_BY_RANK)
            if isinstance(by_rank, list) and len(by_rank) == world_size:
                checkpoint = _merge(checkpoint, by_rank[rank])
            else:
                saved = f"{len(by_rank)} process(es)" if isinstance(by_rank, list) else "rank 0"
                what = (
                    "%s holds the random states of %s, not of these %d: random states are "
                    "reseeded, not restored"
                )
                log.warning(what, source, saved, world_size)
                restore_random = False
        elif not restore_random:
            log.warning("random states are reseeded, not restored")
        for name, entry in self.entries.items():
            _load(name, entry, checkpoint.get(name), source, restore_random)


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s values put in, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _random_part(entries: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, Any]:
    """The saved states of the random entries among ``entries`` (nested dicts kept)."""
    part: dict[str, Any] = {}
    for name, entry in entries.items():
        if isinstance(entry, Mapping):
            inner = _random_part(entry, saved[name])
            if inner:
                part[name] = inner
        elif isinstance(entry, _RANDOM):
            part[name] = saved[name]
    return part


def _save(entry: Any) -> Any:
    if isinstance(entry, Mapping):
        return {key: _save(value) for key, value in entry.items()}
    if hasattr(entry, "state_dict"):
        return entry.state_dict()
    return plain(entry)


def _load(name: str, entry: Any, saved: Any, source: str, restore_random: bool) -> None:
    if isinstance(entry, Mapping):
        saved = saved if isinstance(saved, Mapping) else {}
        for key, value in entry.items():
            _load(f"{name}.{key}", value, saved.get(key), source, restore_random)
        return
    if not hasattr(entry, "load_state_dict"):
        return  # a plain value describes the run; it is not restored
    if isinstance(entry, _RANDOM) and not restore_random:
        return
    if saved is None:
        raise UserError(f"{source}: the checkpoint has no '{name}' entry")
    if isinstance(entry, nn.Module):
        load_state(entry, saved, source if name == "model" else f"{source} ({name})")
        return
    try:
        entry.load_state_dict(saved)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"{source}: the saved '{name}' state does not fit this run ({first})"
        ) from None


def check_resume_options(
    saved: Mapping[str, Any] | None, options: Mapping[str, Any], source: str
) -> None:
    """Refuse a resume that changes the data or batches; warn of every other changed option
    (``saved`` and ``options``: the checkpoint's and this run's, by flag name)."""
    saved = saved or {}
    now = {key: plain(value) for key, value in options.items()}
    split = get_dataset(options["dataset"]).num_splits > 1
    fixed = list(RESUME_FIXED) + (["trial"] if split else [])
    wrong = [key for key in fixed if key in saved and saved[key] != now.get(key)]
    if wrong:
        used = ", ".join(f"--{k} {saved[k]}" for k in wrong)
        has = ", ".join(f"--{k} {now.get(k)}" for k in wrong)
        raise UserError(
            f"{source}: the checkpoint's run used {used}; this run has {has} "
            "(a resumed run must keep them)"
        )
    changed = [
        f"--{key} {saved[key]} -> {now[key]}"
        for key in sorted(saved)
        if key in now and key not in RESUME_FREE and saved[key] != now[key]
    ]
    if changed:
        log.warning("%s with changed options: %s", source, ", ".join(changed))


def read_resume_checkpoint(settings: TrainSettings) -> dict[str, Any] | None:
    """The ``--resume`` checkpoint, read and checked against the run of ``settings``: format,
    options, ``--epochs``, ``--ema_decay``; None without ``--resume``."""
    path, epochs, ema_decay = settings.resume, settings.epochs, settings.ema
    if not path:
        return None
    source = f"--resume {path}"
    checkpoint = read_checkpoint(path)
    if not is_resumable(checkpoint):
        raise UserError(
            f"{source}: not a resumable checkpoint of this project (test.py reads the "
            "authors' checkpoints; they cannot be resumed)"
        )
    check_resume_options(checkpoint.get("args"), settings.flags(), source)
    epoch = int(checkpoint["epoch"])
    if epoch > epochs:
        raise UserError(f"{source}: the checkpoint is at epoch {epoch}, beyond --epochs {epochs}")
    if ema_decay > 0 and not checkpoint.get("ema"):
        raise UserError(
            f"{source}: the checkpoint has no EMA weights but --ema_decay is "
            f"{ema_decay} (resume with --ema_decay 0)"
        )
    if ema_decay == 0 and checkpoint.get("ema"):
        log.warning("%s: --ema_decay 0 drops the checkpoint's EMA weights", source)
    return checkpoint


def run_architecture(
    config_path: str | None, resumed: Mapping[str, Any] | None, source: str
) -> Arch:
    """The architecture a run trains: ``config_path``'s; on a resume (``resumed``, read from
    ``source``) the checkpoint's own when the path is the one its run was started with (a resume
    never needs that file again), else the file's, refused if it is not the checkpoint's."""
    if resumed is not None and config_path == (resumed.get("args") or {}).get("config_path"):
        return arch_from_dict(resumed["arch"], source)
    arch = load_arch(config_path)
    saved = (resumed or {}).get("arch", {}).get("slots", {})
    slots = arch.slots
    if resumed is None or saved == slots:
        return arch
    differ = [name for name in slots if saved.get(name) != slots[name]]
    differ += [name for name in saved if name not in slots]
    shown = ", ".join(
        f"{n} ({saved.get(n, 'absent')} vs {slots.get(n, 'absent')})" for n in differ[:4]
    )
    raise UserError(
        f"{source}: the checkpoint's architecture differs from --config_path {config_path} in "
        f"{len(differ)} slot(s): {shown}{', ...' if len(differ) > 4 else ''} (checkpoint vs config)"
    )
