"""Search a BN separation scheme (shared or split per slot) for CM-NAS on SYSU-MM01 or RegDB.

    python search.py --data_root DATA/SYSU-MM01 --dataset sysu --depth 50

The authors never released their search; this is the project's reconstruction (DESIGN section 4).
Every slot of a supernet mixes its shared and split BNs with ``softmax(alpha / tau)``. The
training identities are split into a weights set and an architecture set; each step trains the
network weights on a weights-set batch with the full training loss and, after ``--arch_warmup``
epochs and every ``--arch_freq`` steps, the alphas on an architecture-set batch with the
identity-agnostic cross-modality loss (cross-modality triplet + SP + CMMD). The run writes
``arch.json`` (argmax per slot, with the final probabilities and provenance, ready for
``train.py --config_path``), ``log.jsonl`` with the split probabilities of every epoch, and
``search_heatmap.png``. The test protocol is never run: the derived architecture is scored on
the architecture set (infrared queries against visible gallery).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data import CrossModalitySampler, TrainSet
from model.arch import Arch, arch_from_dict, save_arch
from model.search import (
    RELAXATIONS,
    arch_parameter_names,
    arch_parameters,
    build_supernet,
    derive_arch,
    hard_mode,
    set_temperature,
    split_probabilities,
)
from model.weights import read_checkpoint
from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.base.modality import Modality
from utils.engine.options import (
    HelpFormatter,
    check_data_root,
    check_training,
    data_parser,
    model_parser,
    optim_parser,
)
from utils.engine.trainer import Trainer, reid_losses, run_trainer
from utils.evaluation.evaluate import Features, autocast, extract_features, score
from utils.evaluation.heatmap import HEATMAP_NAME, heatmap_from_jsonl

log = logging.getLogger("search")

ARCH_FILE = "arch.json"
# The architecture step has no classifier for its identities: cross-modality pairings only.
ARCH_PAIRINGS = ("vi", "iv")
ARCH_BETAS = (0.5, 0.999)
# Mixed into the seeds so the identity split and the architecture batches are streams of their
# own, not copies of the weights sampler's.
_SPLIT_TAG = 0x5EA
_ARCH_STREAM = 7919


def get_args_parser() -> argparse.ArgumentParser:
    """The search.py parser: the shared parents plus the search options."""
    parser = argparse.ArgumentParser(
        description="Search the BN separation scheme of a CM-NAS network (shared/split per slot).",
        parents=[data_parser(), model_parser(), optim_parser()],
        formatter_class=HelpFormatter,
    )
    group = parser.add_argument_group("search")
    group.add_argument("--depth", type=int, choices=(18, 34, 50), default=50, help="ResNet depth")
    group.add_argument(
        "--arch_fraction",
        type=float,
        default=0.2,
        help="share of the training identities that train the architecture (disjoint from "
        "those that train the weights)",
    )
    group.add_argument(
        "--relaxation",
        choices=RELAXATIONS,
        default="softmax",
        help="mixing weights: softmax(alpha / tau) or Gumbel-softmax samples",
    )
    group.add_argument("--tau", type=float, default=1.0, help="softmax temperature (softmax)")
    group.add_argument(
        "--tau_max", type=float, default=5.0, help="Gumbel temperature at the first search epoch"
    )
    group.add_argument(
        "--tau_min", type=float, default=0.5, help="Gumbel temperature at the last epoch"
    )
    group.add_argument("--arch_lr", type=float, default=3e-3, help="Adam lr of the alphas")
    group.add_argument(
        "--arch_weight_decay", type=float, default=1e-3, help="weight decay of the alphas"
    )
    group.add_argument(
        "--arch_warmup", type=int, default=10, help="weights-only epochs before alphas train"
    )
    group.add_argument(
        "--arch_freq",
        type=int,
        default=6,
        help="one architecture step every N weight steps; a search epoch then costs about "
        "1.26x a training epoch (measure_epoch_cost, CPU; 1.32x at 4)",
    )
    group.add_argument(
        "--eval_arch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score the derived architecture on the architecture set after every epoch",
    )
    # The search builds its own supernet (--config_path is ignored) and never runs the test
    # protocol (--test_freq must stay 0).
    parser.set_defaults(epochs=40, test_freq=0, config_path=None)
    return parser


def check_search(args: argparse.Namespace) -> None:
    """Validate the search options (after the training ones)."""
    check_training(args)
    if not 0 < args.arch_fraction < 1:
        raise UserError(f"--arch_fraction {args.arch_fraction}: expected a value in (0, 1)")
    for flag in ("tau", "tau_max", "tau_min", "arch_lr"):
        if not getattr(args, flag) > 0:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected a positive value")
    if args.tau_min > args.tau_max:
        raise UserError(f"--tau_min {args.tau_min} is above --tau_max {args.tau_max}")
    if args.arch_weight_decay < 0:
        raise UserError(f"--arch_weight_decay {args.arch_weight_decay}: expected a value >= 0")
    if args.arch_freq < 1:
        raise UserError(f"--arch_freq {args.arch_freq}: expected a positive integer")
    if not 0 <= args.arch_warmup < args.epochs:
        raise UserError(
            f"--arch_warmup {args.arch_warmup}: expected 0 <= value < --epochs {args.epochs} "
            "(otherwise the architecture never trains)"
        )
    if args.test_freq:
        raise UserError(
            f"--test_freq {args.test_freq}: the search never runs the test protocol; it scores "
            "the derived architecture on the architecture set (--eval_arch)"
        )
    if args.config_path is not None:
        log.warning("--config_path %s is ignored: the search builds a supernet", args.config_path)
    if not args.note and not args.resume:  # a resume without --note stays in its folder
        trial = f"_trial{args.trial}" if args.dataset == "regdb" else ""
        args.note = f"search_{args.dataset}{trial}_r{args.depth}_{args.relaxation}_seed{args.seed}"


def split_identities(
    pids: Sequence[int], fraction: float, seed: int, min_ids: int
) -> tuple[list[int], list[int]]:
    """Split identities at random (by ``seed``) into disjoint (weights, architecture) sets.

    ``fraction`` of them (rounded, at least one) train the architecture; each set needs at least
    ``min_ids`` identities (one batch's worth), or the split is a UserError.
    """
    pids = sorted(int(p) for p in pids)
    count = len(pids)
    n_arch = min(max(round(fraction * count), 1), max(count - 1, 0))
    n_weights = count - n_arch
    if n_arch < min_ids or n_weights < min_ids:
        raise UserError(
            f"--arch_fraction {fraction:g} splits the {count} training identities into "
            f"{n_weights} for the weights and {n_arch} for the architecture; each set needs at "
            f"least --batch_size/--num_pos = {min_ids} (lower --batch_size or adjust "
            "--arch_fraction)"
        )
    order = np.random.default_rng([seed, _SPLIT_TAG]).permutation(count)
    arch = sorted(pids[i] for i in order[:n_arch])
    weights = sorted(pids[i] for i in order[n_arch:])
    return weights, arch


@contextlib.contextmanager
def requires_grad(params: Iterable[nn.Parameter], flag: bool) -> Iterator[None]:
    """Set ``requires_grad`` of ``params`` inside the block, restoring each one's flag after.

    A parameter that does not require grad gets no gradient at all, so a step cannot move it,
    and autograd skips computing it (the weight gradients of the architecture step).
    """
    params = list(params)
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(flag)
    try:
        yield
    finally:
        for p, value in zip(params, before, strict=True):
            p.requires_grad_(value)


@contextlib.contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """Normalise with batch statistics inside the block but leave the running ones untouched.

    The architecture step must not change the network: its batches come from other identities.
    """
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) and m.track_running_stats
    ]
    for bn in bns:
        bn.track_running_stats = False
    try:
        yield
    finally:
        for bn in bns:
            bn.track_running_stats = True


class SearchTrainer(Trainer):
    """The training loop with one step replaced: weights step, then (sometimes) an alpha step."""

    kind = "search"

    def __init__(self, args: argparse.Namespace) -> None:
        self._arch_eval: tuple[int, dict[str, Any]] | None = None
        self._arch_sums: dict[str, torch.Tensor] = {}
        self._arch_count = 0
        super().__init__(args)
        own_folder = args.resume and self.out.resolve() == Path(args.resume).resolve().parent
        if self.dist.is_main and getattr(args, "overwrite", False) and not own_folder:
            # The engine clears logs and checkpoints; a stale result must not survive either.
            for name in (ARCH_FILE, HEATMAP_NAME):
                (self.out / name).unlink(missing_ok=True)
        # (epoch, step in epoch) of the batch being trained; set by batches().
        self.epoch_step = (self.start_epoch, self.start_step)
        set_temperature(self.model, self.temperature(self.start_epoch))

    # ----- set-up --------------------------------------------------------------------------
    def build_data(self) -> TrainSet:
        """Load the training set and split its identities into weights and architecture sets."""
        args = self.args
        full = super().build_data()
        weight_ids, arch_ids = split_identities(
            full.pids, args.arch_fraction, args.seed, args.batch_size // args.num_pos
        )
        # The full set is dropped on return: only the two subsets stay in memory.
        self.weight_set, self.arch_set = full.subset(weight_ids), full.subset(arch_ids)
        for name, part in (("weights", self.weight_set), ("architecture", self.arch_set)):
            log.info(
                "%s set: %d identities, %d visible + %d infrared images",
                name,
                part.num_classes,
                len(part.visible_labels),
                len(part.infrared_labels),
            )
        self.arch_images = {
            "visible": torch.from_numpy(np.ascontiguousarray(self.arch_set.visible_images)),
            "infrared": torch.from_numpy(np.ascontiguousarray(self.arch_set.infrared_images)),
        }
        self.arch_labels = {
            "visible": torch.from_numpy(self.arch_set.visible_labels.astype(np.int64)),
            "infrared": torch.from_numpy(self.arch_set.infrared_labels.astype(np.int64)),
        }
        if self.device.type == "cuda":
            self.arch_images = {k: v.to(self.device) for k, v in self.arch_images.items()}
            self.arch_labels = {k: v.to(self.device) for k, v in self.arch_labels.items()}
        self.arch_sampler = CrossModalitySampler(
            self.arch_set.visible_labels,
            self.arch_set.infrared_labels,
            args.batch_size,
            args.num_pos,
            args.seed + _ARCH_STREAM,
            self.dist.rank,
            self.dist.world_size,
        )
        self.arch_generator = torch.Generator().manual_seed(
            (args.seed + _ARCH_STREAM) * 1000 + self.dist.rank
        )
        return self.weight_set

    def build_model(self) -> nn.Module:
        """The supernet, with one class per weights-set identity."""
        args = self.args
        model = build_supernet(
            args.depth,
            self.train_set.num_classes,
            args.last_stride,
            args.pretrained,
            args.relaxation,
            self.temperature(0),
        )
        self._arch_names = arch_parameter_names(model)
        self._alphas = arch_parameters(model)
        self._weights = [
            p for n, p in model.named_parameters() if n not in self._arch_names and p.requires_grad
        ]
        if self.dist.enabled:
            # The alphas are averaged by hand in the architecture step; DDP would expect a
            # gradient for them in every weights step, where they get none.
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, sorted(self._arch_names)
            )
        self.arch = derive_arch(model)
        log.info(
            "supernet: ResNet-%d, %d searchable BN slots, %s relaxation",
            args.depth,
            len(self._alphas),
            args.relaxation,
        )
        return model

    def is_weight(self, name: str) -> bool:
        """Everything but the alphas is a network weight."""
        return name not in self._arch_names

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The weights' optimizer (alphas excluded); the alphas get their own Adam."""
        args = self.args
        self.arch_optimizer = torch.optim.Adam(
            self._alphas, lr=args.arch_lr, betas=ARCH_BETAS, weight_decay=args.arch_weight_decay
        )
        self.arch_scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        return super().build_optimizer()

    def temperature(self, epoch: int) -> float:
        """``--tau`` (softmax), or the Gumbel temperature of ``epoch``.

        Gumbel: ``--tau_max`` until the architecture starts training, then linear down to
        ``--tau_min`` at the last epoch.
        """
        args = self.args
        if args.relaxation == "softmax":
            return args.tau
        span = max(args.epochs - 1 - args.arch_warmup, 1)
        progress = min(max((epoch - args.arch_warmup) / span, 0.0), 1.0)
        return args.tau_max + (args.tau_min - args.tau_max) * progress

    def provenance(self) -> dict[str, Any]:
        """Where the derived architecture comes from (stored with it)."""
        args = self.args
        record: dict[str, Any] = {
            "source": "search",
            "dataset": args.dataset,
            "trial": args.trial if args.dataset == "regdb" else None,
            "seed": args.seed,
            "epochs": args.epochs,
            "depth": args.depth,
            "relaxation": args.relaxation,
            "tau": self.model.backbone.bn1.tau,
            "arch_fraction": args.arch_fraction,
            "arch_warmup": args.arch_warmup,
            "arch_freq": args.arch_freq,
            "arch_lr": args.arch_lr,
            "arch_ids": list(self.arch_set.pids),
            "commit": self.env.get("commit", "unknown"),
        }
        if args.relaxation == "gumbel":
            record["tau_max"], record["tau_min"] = args.tau_max, args.tau_min
        return record

    # ----- steps ---------------------------------------------------------------------------
    def batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The weights batches of ``epoch``; sets the epoch's temperature and tracks the step."""
        tau = self.temperature(epoch)
        set_temperature(self.model, tau)
        if self.ema is not None:
            set_temperature(self.ema.module, tau)
        first = self.start_step if epoch == self.start_epoch else 0
        for step, pair in enumerate(super().batches(epoch), start=first):
            self.epoch_step = (epoch, step)
            yield pair

    def arch_step_due(self) -> bool:
        """Whether the current step is followed by an architecture step."""
        epoch, _ = self.epoch_step
        return epoch >= self.args.arch_warmup and (self.global_step + 1) % self.args.arch_freq == 0

    def training_step(
        self, visible_idx: np.ndarray, infrared_idx: np.ndarray
    ) -> dict[str, torch.Tensor]:
        """A weights step on the weights set, then, when due, an architecture step."""
        with requires_grad(self._alphas, False):
            terms = super().training_step(visible_idx, infrared_idx)
        if self.arch_step_due():
            arch_terms = self.architecture_step(*self.epoch_step)
            for key, value in arch_terms.items():
                self._arch_sums[key] = self._arch_sums.get(key, 0) + value.float()
            self._arch_count += 1
        return terms

    def architecture_step(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """One Adam step of the alphas on an architecture-set batch (network left unchanged)."""
        v_idx, i_idx = self.arch_sampler.batch(epoch, step)
        batch = self.make_batch(
            v_idx, i_idx, self.arch_images, self.arch_labels, self.arch_generator
        )
        # Under DDP the plain module runs: its gradient hooks would wait for weight gradients.
        net = self.model if self.dist.enabled else self.net
        with requires_grad(self._weights, False), frozen_bn_statistics(self.model):
            with autocast(self.device, self.amp):
                pool, feat = net(batch.images, batch.routing)[:2]
            terms = reid_losses(
                pool, feat, None, batch.labels, batch.n_visible, self.args, pairings=ARCH_PAIRINGS
            )
            self.arch_optimizer.zero_grad(set_to_none=True)
            self.arch_scaler.scale(terms["loss"]).backward()
        if self.dist.enabled:
            self._average_alpha_grads()
        self.arch_scaler.step(self.arch_optimizer)
        self.arch_scaler.update()
        return {k: v.detach() for k, v in terms.items()}

    def _average_alpha_grads(self) -> None:
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._alphas]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= self.dist.world_size
        for p, value in zip(self._alphas, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = value.view_as(p).clone()

    # ----- per-epoch record and the end of the run -----------------------------------------
    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Log the split probabilities, the architecture loss and the arch-set score.

        With the temperature (also logged) the probabilities determine the alphas up to the
        shift that softmax ignores, so they are all a run needs to be plotted.
        """
        probabilities = split_probabilities(self.model)
        record["split_probability"] = {k: round(v, 5) for k, v in probabilities.items()}
        record["tau"] = self.model.backbone.bn1.tau
        if self._arch_count:
            for key, value in self._arch_sums.items():
                record[f"arch_{key}"] = float(value) / self._arch_count
            if not math.isfinite(record["arch_loss"]):
                self._non_finite(f"architecture loss is {record['arch_loss']} in epoch {epoch + 1}")
        record["arch_steps"] = self._arch_count
        self._arch_sums, self._arch_count = {}, 0
        self.arch = derive_arch(self.model, self.provenance())
        record["num_split"] = len(self.arch.split_slots())
        if self.args.eval_arch and self.dist.is_main:
            result = self.evaluate_arch()
            record["arch_rank1"] = round(result["bnneck"]["rank1"], 2)
            record["arch_mAP"] = round(result["bnneck"]["mAP"], 2)
            record["arch_pool_rank1"] = round(result["pool"]["rank1"], 2)
            record["arch_pool_mAP"] = round(result["pool"]["mAP"], 2)

    def evaluate_arch(self) -> dict[str, dict[str, float]]:
        """The derived architecture's Rank-k/mAP on the architecture set (IR query, visible
        gallery), computed by the supernet in hard mode."""
        if self._arch_eval is not None and self._arch_eval[0] == self.global_step:
            return self._arch_eval[1]
        args = self.args
        model = self.eval_model()
        # The live alphas decide (an EMA copy would lag); the weights are those evaluated.
        with hard_mode(model, derive_arch(self.model)):
            sets = {}
            for modality in (Modality.INFRARED, Modality.VISIBLE):
                name = modality.name.lower()
                pool, feat = extract_features(
                    model,
                    getattr(self.arch_set, f"{name}_images"),
                    modality,
                    self.device,
                    args.test_batch,
                    self.amp,
                    f"arch-set {name}",
                    flip=args.flip,
                )
                labels = getattr(self.arch_set, f"{name}_labels")
                sets[modality] = Features(pool, feat, np.asarray(labels))
        self.model.train()
        # Standard CMC, nothing ignored: the architecture set has no camera protocol.
        result = score(sets[Modality.INFRARED], sets[Modality.VISIBLE])
        self._arch_eval = (self.global_step, result)
        return result

    def evaluate(self, final: bool) -> dict[str, Any]:
        """The search's only evaluation: the derived architecture on the architecture set."""
        if not self.args.eval_arch:
            return {}
        return {"arch_set": self.evaluate_arch()}

    def on_train_end(self, results: dict[str, Any]) -> None:
        """Write arch.json and the heat map, and log which slots the search split."""
        if not self.dist.is_main:
            return
        provenance = self.provenance()
        if self.args.eval_arch and self._arch_eval is not None:
            provenance["arch_set_result"] = self._arch_eval[1]["bnneck"]
        arch = derive_arch(self.model, provenance)
        save_arch(arch, self.out / ARCH_FILE)
        heatmap_from_jsonl(self.out)
        probabilities = arch.provenance["split_probability"]
        rows = "\n".join(
            f"  {name:<24} {choice:<6} p(split)={probabilities[name]:.3f}"
            for name, choice in arch.slots.items()
        )
        log.info(
            "search result %s: split slots: %s\n%s\narchitecture: %s\nheat map: %s",
            arch.summary(),
            ", ".join(arch.split_slots()) or "none",
            rows,
            self.out / ARCH_FILE,
            self.out / HEATMAP_NAME,
        )

    # ----- checkpoints ---------------------------------------------------------------------
    def checkpoint(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        """The training checkpoint plus the alphas' optimizer and the identity split."""
        # The header's architecture is what test.py builds: the current derived one.
        self.arch = derive_arch(self.model, self.provenance())
        state = super().checkpoint(epoch, step_in_epoch)
        state["search"] = {
            "arch_optimizer": self.arch_optimizer.state_dict(),
            "arch_scaler": self.arch_scaler.state_dict(),
            "arch_rng": self.arch_generator.get_state(),
            "arch_ids": list(self.arch_set.pids),
            "weight_ids": list(self.weight_set.pids),
            # The architecture-loss sums of a partly trained epoch (like the engine's).
            "arch_losses": {
                "sums": {k: float(v) for k, v in self._arch_sums.items()},
                "count": self._arch_count,
            },
        }
        return state

    def resume(self, path: str) -> None:
        """Resume a search: the network and alphas, both optimizers and every random state."""
        state = read_checkpoint(path)
        search = state.get("search")
        if not isinstance(search, dict):
            raise UserError(f"--resume {path}: not a search checkpoint (resume it with train.py)")
        depth = state.get("arch", {}).get("depth")
        if depth != self.args.depth:
            raise UserError(f"--resume {path}: the checkpoint is a ResNet-{depth} search")
        if list(search["arch_ids"]) != list(self.arch_set.pids):
            raise UserError(
                f"--resume {path}: the checkpoint split the identities differently "
                "(another --seed or --arch_fraction?)"
            )
        # The derived architecture moves during a search: take the checkpoint's as current.
        self.arch = arch_from_dict(state["arch"], path)
        super().resume(path)
        self.arch_optimizer.load_state_dict(search["arch_optimizer"])
        self.arch_scaler.load_state_dict(search["arch_scaler"])
        if self.dist.world_size == 1:
            self.arch_generator.set_state(search["arch_rng"])
        if self.start_step:
            partial = search.get("arch_losses") or {}
            self._arch_sums = {
                k: torch.tensor(v, device=self.device) for k, v in partial.get("sums", {}).items()
            }
            self._arch_count = int(partial.get("count", 0))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, search, and write the derived architecture."""
    args = get_args_parser().parse_args(argv)
    check_search(args)
    check_data_root(args)
    return run_trainer(SearchTrainer(args))


# ----- cost ----------------------------------------------------------------------------------
def _time_block(
    run_step: Callable[[int], dict[str, torch.Tensor]], steps: range, clock: str
) -> float:
    """Seconds per call of ``run_step(i)`` over ``steps``, waiting for the device at the end."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    started = timer()
    terms: dict[str, torch.Tensor] = {}
    for step in steps:
        terms = run_step(step)
    if terms:
        float(terms["loss"])
    return (timer() - started) / len(steps)


def measure_epoch_cost(
    data_root: str | None = None,
    depth: int = 18,
    img_size: tuple[int, int] = (128, 64),
    batch_size: int = 32,
    num_pos: int = 4,
    steps: int = 8,
    rounds: int = 4,
    arch_freq: int | None = None,
    baseline: str = "shared",
    device: str | None = None,
    clock: str = "wall",
) -> dict[str, Any]:
    """Time a training step of a plain network against the search's two kinds of step.

    A search epoch is one supernet weights step per training step plus an architecture step
    every ``arch_freq`` steps, so ``search_step_s = weights_step_s + arch_step_s / arch_freq``
    and ``ratio = search_step_s / train_step_s`` (also given for every ``arch_freq`` 1..10).
    All use the same data, batch and image size; ``baseline`` ("shared"/"split") is the trained
    network's every slot; synthetic SYSU data is generated when ``data_root`` is None. Each
    kind is timed in ``rounds`` interleaved blocks of ``steps`` steps (after one warm-up block)
    and averaged. ``clock="cpu"`` counts this process's CPU time instead of wall time: with one
    thread (``torch.set_num_threads(1)``) other programs on the machine disturb it far less.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    freq = arch_freq or get_args_parser().get_default("arch_freq")
    with tempfile.TemporaryDirectory(prefix="cmnas_cost_") as tmp:
        root = data_root
        if root is None:
            from data.toy import make_sysu

            root = str(Path(tmp) / "sysu")
            ids = 5 * (batch_size // num_pos) + 2
            make_sysu(
                root, 0, train_ids=ids - 2, val_ids=2, test_ids=2, images_per_camera=6,
                height=img_size[0], width=img_size[1],
            )  # fmt: skip
        config = Path(tmp) / "baseline.json"
        save_arch(Arch.uniform(depth, baseline), config)
        # Channels-last helps GPUs only; on a CPU it made these steps several times slower.
        on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
        common = [
            "--data_root", root, "--img_h", str(img_size[0]), "--img_w", str(img_size[1]),
            "--batch_size", str(batch_size), "--num_pos", str(num_pos), "--pretrained", "none",
            "--save", str(Path(tmp) / "runs"), "--cache_dir", str(Path(tmp) / "cache"),
            "--epochs", "2", "--log_freq", "1000",
            "--no-channels_last" if on_cpu else "--channels_last",
        ] + (["--device", device] if device else [])  # fmt: skip
        import train

        train_args = train.get_args_parser().parse_args(
            [*common, "--config_path", str(config), "--note", "train"]
        )
        check_training(train_args)
        # The weights steps are timed alone (no architecture step ever due) and the
        # architecture steps called directly.
        search_args = get_args_parser().parse_args(
            [*common, "--depth", str(depth), "--arch_warmup", "0", "--arch_freq", str(10**9),
             "--no-eval_arch", "--note", "search"]
        )  # fmt: skip
        check_search(search_args)
        trainer, searcher = Trainer(train_args), SearchTrainer(search_args)
        trainer.net.train()
        searcher.net.train()

        def batch(owner: Trainer, step: int) -> tuple[np.ndarray, np.ndarray]:
            return owner.sampler.batch(*divmod(step, len(owner.sampler)))

        kinds = {
            "train": lambda i: trainer.training_step(*batch(trainer, i)),
            "weights": lambda i: searcher.training_step(*batch(searcher, i)),
            "arch": lambda i: searcher.architecture_step(*divmod(i, len(searcher.arch_sampler))),
        }
        for run_step in kinds.values():
            _time_block(run_step, range(steps), clock)
        seconds = dict.fromkeys(kinds, 0.0)
        for round_ in range(rounds):
            block = range(steps * (round_ + 1), steps * (round_ + 2))
            # Rotate the order so a drifting machine load hits every kind alike.
            names = list(kinds)[round_ % 3 :] + list(kinds)[: round_ % 3]
            for name in names:
                seconds[name] += _time_block(kinds[name], block, clock) / rounds

    def ratio(every: int) -> float:
        return (seconds["weights"] + seconds["arch"] / every) / seconds["train"]

    result = {
        "train_step_s": seconds["train"],
        "search_step_s": seconds["weights"] + seconds["arch"] / freq,
        "ratio": ratio(freq),
        "weights_step_s": seconds["weights"],
        "arch_step_s": seconds["arch"],
        "arch_freq": freq,
        "ratio_by_arch_freq": {f: round(ratio(f), 3) for f in range(1, 11)},
        "depth": depth,
        "batch_size": batch_size,
        "img_size": list(img_size),
        "baseline": baseline,
        "clock": clock,
        "threads": torch.get_num_threads(),
        "device": str(trainer.device),
    }
    log.info("epoch cost: %s", json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
