"""The architecture search as a variant of the training loop: the supernet as its model, an
architecture step beside the weights step, the alphas' optimizer in its state.

The training identities are split into a weights set and an architecture set. After
``--arch_warmup`` epochs, every ``--arch_freq`` steps the alphas train on an architecture-set
batch with the identity-agnostic cross-modality loss. The test protocol is never run: the derived
architecture is scored on the architecture set (infrared queries against the visible gallery).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.distributed
from torch import nn

from data import TrainSet
from data.registry import get_dataset
from model import search as supernet
from model.arch import Arch, save_arch
from model.checkpoint import SEARCH_KEY
from model.losses import search_terms
from utils.base.errors import UserError
from utils.base.modality import Modality
from utils.engine.build import ResidentImages, build_sampler
from utils.engine.checkpointer import RUN_FILES
from utils.engine.settings import SearchSettings
from utils.engine.state import GeneratorState, LossMeter
from utils.engine.trainer import Trainer
from utils.evaluation.evaluate import Features, autocast, extract_features, score
from utils.evaluation.heatmap import HEATMAP_NAME, heatmap_from_jsonl

log = logging.getLogger(__name__)

ARCH_FILE = "arch.json"
# The architecture step's identities are unknown to the classifier (its loss terms are those the
# loss table marks for the search: no CE), and only the cross-modality triplet pairings judge how
# well the slots bridge the modalities.
ARCH_PAIRINGS = ("vi", "iv")
ARCH_BETAS = (0.5, 0.999)
# Mixed into the seeds so the identity split and the architecture batches are streams of their
# own, not copies of the weights sampler's.
_SPLIT_TAG = 0x5EA
_ARCH_STREAM = 7919


def split_identities(
    pids: Sequence[int], fraction: float, seed: int, min_ids: int
) -> tuple[list[int], list[int]]:
    """Split identities at random (by ``seed``) into disjoint (weights, architecture) sets,
    ``fraction`` of them (rounded, at least one) for the architecture, ``min_ids`` at least each."""
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


class SearchTrainer(Trainer):
    """The training loop with the supernet as its model, the alphas' optimizer in its state and
    one step extended: the weights step, then (sometimes) an architecture step."""

    script = "search.py"
    run_files = (*RUN_FILES, ARCH_FILE, HEATMAP_NAME)

    def __init__(self, search: SearchSettings, train_set: TrainSet | None = None) -> None:
        self.search = search
        # (global step, result) of the last architecture-set evaluation.
        self._arch_eval: tuple[int, dict[str, Any]] | None = None
        super().__init__(search.train, train_set)

    def load_architecture(self, resumed: dict[str, Any] | None) -> None:
        """None: the architecture is derived from the supernet (see :meth:`architecture`); a
        resumed checkpoint must be a search of this depth."""
        if resumed is None:
            return
        source = f"--resume {self.settings.resume}"
        if not isinstance(resumed.get(SEARCH_KEY), dict):
            raise UserError(f"{source}: not a search checkpoint (resume it with train.py)")
        depth = resumed.get("arch", {}).get("depth")
        if depth != self.search.depth:
            raise UserError(f"{source}: the checkpoint is a ResNet-{depth} search")

    def training_set(self, train_set: TrainSet) -> TrainSet:
        """The weights set; the other identities, the architecture set, train the alphas (a
        resumed checkpoint must have split them alike)."""
        train = self.settings
        min_ids = train.batch_size // train.num_pos
        weight_ids, arch_ids = split_identities(
            train_set.pids, self.search.arch_fraction, train.seed, min_ids
        )
        resumed = self.resume_checkpoint
        if resumed is not None and list(resumed[SEARCH_KEY].get("arch_ids", [])) != arch_ids:
            raise UserError(
                f"--resume {train.resume}: the checkpoint split the identities differently "
                "(another --seed or --arch_fraction?)"
            )
        # The full set is dropped on return: only the two subsets stay in memory.
        weights, self.arch_set = train_set.subset(weight_ids), train_set.subset(arch_ids)
        for name, part in (("weights", weights), ("architecture", self.arch_set)):
            counts = (part.num_classes, len(part.visible_labels), len(part.infrared_labels))
            log.info("%s set: %d identities, %d visible + %d infrared images", name, *counts)
        return weights

    def build_model(self, classes: int, pretrained: str | None) -> nn.Module:
        """The supernet, with ``classes`` identities (the weights set's)."""
        search, stride = self.search, self.settings.last_stride
        tau = self.temperature(0)
        return supernet.build_supernet(
            search.depth, classes, stride, pretrained, search.relaxation, tau
        )

    def extra_state(self) -> dict[str, Any]:
        """The architecture step's parts, and the checkpoint entry that saves them."""
        search, train, model = self.search, self.settings, self.model_without_ddp
        self.alphas = supernet.arch_parameters(model)
        what = "supernet: ResNet-%d, %d searchable BN slots, %s relaxation"
        log.info(what, search.depth, len(self.alphas), search.relaxation)
        # The network weights: what the weights' optimizer trains (all but the alphas).
        self.weights = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.arch_optimizer = torch.optim.Adam(
            self.alphas, lr=search.arch_lr, betas=ARCH_BETAS, weight_decay=search.arch_weight_decay
        )
        self.arch_scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.arch_loss = replace(train.loss, terms=search_terms(), pairings=ARCH_PAIRINGS)
        stream = train.seed + _ARCH_STREAM
        self.arch_sampler = build_sampler(self.arch_set, train, stream, self.dist)
        generator = torch.Generator().manual_seed(stream * 1000 + self.dist.rank)
        self.arch_images = ResidentImages.upload(
            self.arch_set, self.device, generator, self.channels_last
        )
        # Architecture-loss sums of the epoch being trained.
        self.arch_losses = LossMeter(self.device)
        saved = {
            "arch_optimizer": self.arch_optimizer,
            "arch_scaler": self.arch_scaler,
            "arch_rng": GeneratorState(generator),
            "arch_losses": self.arch_losses,
            # The identity split, recorded (a resume checks it, see training_set).
            "arch_ids": list(self.arch_set.pids),
            "weight_ids": list(self.train_set.pids),
        }
        return {SEARCH_KEY: saved}

    def evaluate(self, final: bool, epoch: int) -> dict[str, Any]:
        """``arch_set``: the derived architecture scored on the architecture set (the test set is
        never used; nothing without ``--eval_arch``)."""
        return {"arch_set": self.evaluate_arch()} if self.search.eval_arch else {}

    def temperature(self, epoch: int) -> float:
        """``--tau`` (softmax), or the Gumbel temperature of ``epoch``: ``--tau_max`` until the
        architecture trains, then linear down to ``--tau_min`` at the last epoch."""
        search = self.search
        if search.relaxation == "softmax":
            return search.tau
        span = max(search.train.epochs - 1 - search.arch_warmup, 1)
        progress = min(max((epoch - search.arch_warmup) / span, 0.0), 1.0)
        return search.tau_max + (search.tau_min - search.tau_max) * progress

    def architecture(self, provenance: dict[str, Any] | None = None) -> Arch:
        """The derived architecture (argmax per slot) at this epoch's temperature."""
        supernet.set_temperature(self.model_without_ddp, self.temperature(self.epoch))
        return supernet.derive_arch(self.model_without_ddp, provenance or self.provenance())

    def provenance(self) -> dict[str, Any]:
        """Where the derived architecture comes from (stored with it)."""
        search, train = self.search, self.search.train
        dataset = train.data.dataset
        record: dict[str, Any] = {
            "source": "search",
            "dataset": dataset,
            "trial": train.data.trial if get_dataset(dataset).num_splits > 1 else None,
            "seed": train.seed,
            "epochs": train.epochs,
            "depth": search.depth,
            "relaxation": search.relaxation,
            "tau": self.temperature(self.epoch),
            "arch_fraction": search.arch_fraction,
            "arch_warmup": search.arch_warmup,
            "arch_freq": search.arch_freq,
            "arch_lr": search.arch_lr,
            "arch_ids": list(self.arch_set.pids),
            "commit": self.env.get("commit", "unknown"),
        }
        if search.relaxation == "gumbel":
            record["tau_max"], record["tau_min"] = search.tau_max, search.tau_min
        return record

    def training_step(
        self, visible_idx: np.ndarray, infrared_idx: np.ndarray
    ) -> dict[str, torch.Tensor]:
        """A weights step on the weights set, then, when due, an architecture step."""
        supernet.set_temperature(self.model_without_ddp, self.temperature(self.epoch))
        with supernet.requires_grad(self.alphas, False):
            terms = super().training_step(visible_idx, infrared_idx)
        search = self.search
        if self.epoch >= search.arch_warmup and (self.global_step + 1) % search.arch_freq == 0:
            self.arch_losses.add(self.architecture_step(self.epoch, self.step))
        return terms

    def architecture_step(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """One Adam step of the alphas on an architecture-set batch (network left unchanged)."""
        batch = self.arch_images.batch(*self.arch_sampler.batch(epoch, step))
        # Under DDP the plain module runs: its gradient hooks would wait for weight gradients.
        model = self.model_without_ddp if self.dist.enabled else self.model
        frozen = supernet.frozen_bn_statistics(self.model_without_ddp)
        with supernet.requires_grad(self.weights, False), frozen:
            with autocast(self.device, self.amp):
                pool, feat = model(batch.images, batch.routing)[:2]
            terms = self.arch_loss(pool, feat, None, batch.labels, batch.n_visible)
            self.arch_optimizer.zero_grad(set_to_none=True)
            self.arch_scaler.scale(terms["loss"]).backward()
        if self.dist.enabled:
            _average_gradients(self.alphas, self.dist.world_size)
        self.arch_scaler.step(self.arch_optimizer)
        self.arch_scaler.update()
        return {k: v.detach() for k, v in terms.items()}

    def epoch_record(self, epoch: int) -> dict[str, Any]:
        """The split probabilities and temperature (which fix the alphas up to softmax's shift),
        the architecture loss and the arch-set score of ``epoch``."""
        arch = self.architecture()
        probabilities = supernet.split_probabilities(self.model_without_ddp)
        record: dict[str, Any] = {
            "split_probability": {k: round(v, 5) for k, v in probabilities.items()},
            "tau": self.temperature(epoch),
        }
        if self.arch_losses.count:
            record |= {f"arch_{key}": value for key, value in self.arch_losses.means().items()}
            if not math.isfinite(loss := record["arch_loss"]):
                self.checkpointer.non_finite(f"architecture loss is {loss} in epoch {epoch + 1}")
        record["arch_steps"] = self.arch_losses.count
        self.arch_losses.reset()
        record["num_split"] = len(arch.split_slots())
        if self.search.eval_arch and self.dist.is_main:
            result = self.evaluate_arch()
            for kind, prefix in (("bnneck", "arch_"), ("pool", "arch_pool_")):
                record[f"{prefix}rank1"] = round(result[kind]["rank1"], 2)
                record[f"{prefix}mAP"] = round(result[kind]["mAP"], 2)
        return record

    def evaluate_arch(self) -> dict[str, dict[str, float]]:
        """The derived architecture's Rank-k/mAP on the architecture set (IR query, visible
        gallery), computed by the supernet in hard mode."""
        if self._arch_eval is not None and self._arch_eval[0] == self.global_step:
            return self._arch_eval[1]
        batch, flip = self.settings.evaluation.test_batch, self.settings.evaluation.flip
        model = self.ema.module if self.ema is not None else self.model_without_ddp
        sets = {}
        # The live alphas decide (an EMA copy would lag); the weights are those evaluated.
        with supernet.hard_mode(model, supernet.derive_arch(self.model_without_ddp)):
            for modality in (Modality.INFRARED, Modality.VISIBLE):
                name = modality.name.lower()
                images = getattr(self.arch_set, f"{name}_images")
                labels = np.asarray(getattr(self.arch_set, f"{name}_labels"))
                what = (modality, self.device, batch, self.amp, f"arch-set {name}")
                features = extract_features(model, images, *what, flip=flip)
                sets[modality] = Features(*features, labels)
        self.model.train()
        # Standard CMC, nothing ignored: the architecture set has no camera protocol.
        result = score(sets[Modality.INFRARED], sets[Modality.VISIBLE])
        self._arch_eval = (self.global_step, result)
        return result

    def on_train_end(self, results: dict[str, Any]) -> None:
        """Write arch.json and the heat map, and log which slots the search split."""
        if not self.dist.is_main:
            return
        provenance = self.provenance()
        if self.search.eval_arch and self._arch_eval is not None:
            provenance["arch_set_result"] = self._arch_eval[1]["bnneck"]
        arch = self.architecture(provenance)
        save_arch(arch, self.out / ARCH_FILE)
        heatmap_from_jsonl(self.out)
        probabilities = arch.provenance["split_probability"]
        rows = "\n".join(
            f"  {name:<24} {choice:<6} p(split)={probabilities[name]:.3f}"
            for name, choice in arch.slots.items()
        )
        split, files = ", ".join(arch.split_slots()) or "none", (ARCH_FILE, HEATMAP_NAME)
        what = "search result %s: split slots: %s\n%s\narchitecture: %s\nheat map: %s"
        log.info(what, arch.summary(), split, rows, *(self.out / name for name in files))


def _average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Average the gradients of ``params`` over the processes (a missing one counts as zero)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    for p, value in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = value.view_as(p).clone()
