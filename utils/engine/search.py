"""The architecture search as a variant of the training loop: one extra step, alphas on the side.

Every slot of a supernet mixes its shared and split BNs with ``softmax(alpha / tau)``. The
training identities are split into a weights set and an architecture set; each step trains the
network weights on a weights-set batch with the full training loss and, after ``--arch_warmup``
epochs and every ``--arch_freq`` steps, the alphas on an architecture-set batch with the
identity-agnostic cross-modality loss (the terms the loss table marks for the search). The
temperature follows the epoch.
The run writes ``arch.json`` (argmax per slot, with the final probabilities and provenance),
``log.jsonl`` with the split probabilities of every epoch, and ``search_heatmap.png``. The test
protocol is never run: the derived architecture is scored on the architecture set (infrared
queries against the visible gallery).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed
from torch import nn

from data import TrainSet
from data.registry import get_dataset
from model.arch import Arch, save_arch
from model.checkpoint import SEARCH_KEY
from model.losses import search_terms
from model.search import (
    arch_parameter_names,
    arch_parameters,
    build_supernet,
    derive_arch,
    frozen_bn_statistics,
    hard_mode,
    requires_grad,
    set_temperature,
    split_probabilities,
)
from utils.base.distributed import DistInfo
from utils.base.errors import UserError
from utils.base.modality import Modality
from utils.engine.batch import ResidentImages
from utils.engine.build import build_optimizer, build_sampler
from utils.engine.evaluation import Evaluation
from utils.engine.rundir import RUN_FILES
from utils.engine.settings import SearchSettings
from utils.engine.state import GeneratorState, LossMeter
from utils.engine.trainer import Trainer, TrainingData
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


@dataclass(frozen=True)
class SearchData(TrainingData):
    """The search's images: ``train`` (the weights set) trains the network weights,
    ``architecture`` (the other identities) the alphas."""

    architecture: TrainSet


class ArchSetEvaluation(Evaluation):
    """The search's only evaluation: the derived architecture on the architecture set."""

    def __init__(self, out: Path, dist: DistInfo, trainer: SearchTrainer) -> None:
        super().__init__(out, dist)
        self.trainer = trainer

    def evaluate(self, final: bool, epoch: int) -> dict[str, Any]:
        """``arch_set``: the derived architecture's numbers (nothing without ``--eval_arch``)."""
        if not self.trainer.search.eval_arch:
            return {}
        return {"arch_set": self.trainer.evaluate_arch()}


class SearchTrainer(Trainer):
    """The training loop with one step replaced: weights step, then (sometimes) an alpha step."""

    kind = "search"
    script = "search.py"
    run_files = (*RUN_FILES, ARCH_FILE, HEATMAP_NAME)
    data: SearchData

    def __init__(self, search: SearchSettings, train_set: TrainSet | None = None) -> None:
        """Build the training loop, then the architecture step beside it (see :class:`Trainer`)."""
        self.search = search
        super().__init__(search.train, train_set)
        self.alphas = arch_parameters(self.model_without_ddp)
        arch_names = arch_parameter_names(self.model_without_ddp)
        self.weights = [
            p
            for name, p in self.model_without_ddp.named_parameters()
            if name not in arch_names and p.requires_grad
        ]
        self.arch_optimizer = torch.optim.Adam(
            self.alphas, lr=search.arch_lr, betas=ARCH_BETAS, weight_decay=search.arch_weight_decay
        )
        self.arch_scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.arch_loss = replace(self.loss, terms=search_terms(), pairings=ARCH_PAIRINGS)
        arch_set = self.data.architecture
        self.arch_images = ResidentImages.upload(arch_set, self.device)
        train = search.train
        stream = train.seed + _ARCH_STREAM
        self.arch_sampler = build_sampler(
            arch_set, train.batch_size, train.num_pos, stream, self.dist
        )
        self.arch_generator = torch.Generator().manual_seed(stream * 1000 + self.dist.rank)
        # Architecture-loss sums of the epoch being trained.
        self.arch_losses = LossMeter(self.device)
        self.state.register(
            SEARCH_KEY,
            {
                "arch_optimizer": self.arch_optimizer,
                "arch_scaler": self.arch_scaler,
                "arch_rng": GeneratorState(self.arch_generator),
                "arch_losses": self.arch_losses,
                # The identity split, recorded (a resume checks it, see check_data_fits).
                "arch_ids": list(arch_set.pids),
                "weight_ids": list(self.data.train.pids),
            },
        )
        # (global step, result) of the last architecture-set evaluation.
        self._arch_eval: tuple[int, dict[str, Any]] | None = None

    # ----- set-up --------------------------------------------------------------------------
    def load_architecture(self) -> None:
        """None: the architecture is derived from the supernet (see :meth:`architecture`)."""
        return None

    def build_data(self, train_set: TrainSet | None) -> SearchData:
        """Load the training set and split its identities into weights and architecture sets."""
        train = self.settings
        full = super().build_data(train_set).train
        weight_ids, arch_ids = split_identities(
            full.pids, self.search.arch_fraction, train.seed, train.batch_size // train.num_pos
        )
        # The full set is dropped on return: only the two subsets stay in memory.
        data = SearchData(full.subset(weight_ids), full.subset(arch_ids))
        for name, part in (("weights", data.train), ("architecture", data.architecture)):
            log.info(
                "%s set: %d identities, %d visible + %d infrared images",
                name,
                part.num_classes,
                len(part.visible_labels),
                len(part.infrared_labels),
            )
        return data

    def build_model(self, train_set: TrainSet) -> nn.Module:
        """The supernet, with one class per weights-set identity."""
        search = self.search
        model = build_supernet(
            search.depth,
            train_set.num_classes,
            search.train.last_stride,
            search.train.pretrained,
            search.relaxation,
            self.temperature(0),
        )
        arch_names = arch_parameter_names(model)
        if self.dist.enabled:
            # The alphas are averaged by hand in the architecture step; DDP would expect a
            # gradient for them in every weights step, where they get none.
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, sorted(arch_names)
            )
        log.info(
            "supernet: ResNet-%d, %d searchable BN slots, %s relaxation",
            search.depth,
            len(arch_names),
            search.relaxation,
        )
        return model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The weights' optimizer; the alphas are left out (they get their own Adam)."""
        arch_names = arch_parameter_names(model)
        params = model.named_parameters()
        optim = self.settings.optimizer
        return build_optimizer(params, optim, self.device, lambda n: n not in arch_names)

    def build_evaluation(self) -> Evaluation:
        """The derived architecture scored on the architecture set (the test set is never used)."""
        return ArchSetEvaluation(self.out, self.dist, self)

    def check_checkpoint(self, checkpoint: dict[str, Any], source: str) -> None:
        """Refuse a checkpoint that is not a search of this depth."""
        search = checkpoint.get(SEARCH_KEY)
        if not isinstance(search, dict):
            raise UserError(f"{source}: not a search checkpoint (resume it with train.py)")
        depth = checkpoint.get("arch", {}).get("depth")
        if depth != self.search.depth:
            raise UserError(f"{source}: the checkpoint is a ResNet-{depth} search")

    def check_data_fits(self, checkpoint: dict[str, Any], source: str) -> None:
        """Refuse a checkpoint that split the identities otherwise."""
        search = checkpoint[SEARCH_KEY]
        if list(search.get("arch_ids", [])) != list(self.data.architecture.pids):
            raise UserError(
                f"{source}: the checkpoint split the identities differently "
                "(another --seed or --arch_fraction?)"
            )

    def temperature(self, epoch: int) -> float:
        """``--tau`` (softmax), or the Gumbel temperature of ``epoch``.

        Gumbel: ``--tau_max`` until the architecture starts training, then linear down to
        ``--tau_min`` at the last epoch.
        """
        search = self.search
        if search.relaxation == "softmax":
            return search.tau
        span = max(search.train.epochs - 1 - search.arch_warmup, 1)
        progress = min(max((epoch - search.arch_warmup) / span, 0.0), 1.0)
        return search.tau_max + (search.tau_min - search.tau_max) * progress

    def architecture(self, provenance: dict[str, Any] | None = None) -> Arch:
        """The derived architecture (argmax per slot) at this epoch's temperature."""
        set_temperature(self.model_without_ddp, self.temperature(self.epoch))
        return derive_arch(self.model_without_ddp, provenance or self.provenance())

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
            "arch_ids": list(self.data.architecture.pids),
            "commit": self.env.get("commit", "unknown"),
        }
        if search.relaxation == "gumbel":
            record["tau_max"], record["tau_min"] = search.tau_max, search.tau_min
        return record

    # ----- the step ------------------------------------------------------------------------
    def training_step(
        self, visible_idx: np.ndarray, infrared_idx: np.ndarray
    ) -> dict[str, torch.Tensor]:
        """A weights step on the weights set, then, when due, an architecture step."""
        set_temperature(self.model_without_ddp, self.temperature(self.epoch))
        with requires_grad(self.alphas, False):
            terms = super().training_step(visible_idx, infrared_idx)
        search = self.search
        if self.epoch >= search.arch_warmup and (self.global_step + 1) % search.arch_freq == 0:
            self.arch_losses.add(self.architecture_step(self.epoch, self.step))
        return terms

    def architecture_step(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """One Adam step of the alphas on an architecture-set batch (network left unchanged)."""
        v_idx, i_idx = self.arch_sampler.batch(epoch, step)
        batch = self.arch_images.batch(
            v_idx, i_idx, self.device, self.arch_generator, self.channels_last
        )
        # Under DDP the plain module runs: its gradient hooks would wait for weight gradients.
        model = self.model_without_ddp if self.dist.enabled else self.model
        with requires_grad(self.weights, False), frozen_bn_statistics(self.model_without_ddp):
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

    # ----- per-epoch record and the end of the run -----------------------------------------
    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Log the split probabilities, the architecture loss and the arch-set score.

        With the temperature (also logged) the probabilities determine the alphas up to the
        shift that softmax ignores, so they are all a run needs to be plotted.
        """
        arch = self.architecture()
        probabilities = split_probabilities(self.model_without_ddp)
        record["split_probability"] = {k: round(v, 5) for k, v in probabilities.items()}
        record["tau"] = self.temperature(epoch)
        if self.arch_losses.count:
            for key, value in self.arch_losses.means().items():
                record[f"arch_{key}"] = value
            if not math.isfinite(loss := record["arch_loss"]):
                self.checkpointer.non_finite(f"architecture loss is {loss} in epoch {epoch + 1}")
        record["arch_steps"] = self.arch_losses.count
        self.arch_losses.reset()
        record["num_split"] = len(arch.split_slots())
        if self.search.eval_arch and self.dist.is_main:
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
        evaluation = self.settings.evaluation
        model = self.eval_model()
        # The live alphas decide (an EMA copy would lag); the weights are those evaluated.
        with hard_mode(model, derive_arch(self.model_without_ddp)):
            sets = {}
            for modality in (Modality.INFRARED, Modality.VISIBLE):
                name = modality.name.lower()
                pool, feat = extract_features(
                    model,
                    getattr(self.data.architecture, f"{name}_images"),
                    modality,
                    self.device,
                    evaluation.test_batch,
                    self.amp,
                    f"arch-set {name}",
                    flip=evaluation.flip,
                )
                labels = getattr(self.data.architecture, f"{name}_labels")
                sets[modality] = Features(pool, feat, np.asarray(labels))
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
        log.info(
            "search result %s: split slots: %s\n%s\narchitecture: %s\nheat map: %s",
            arch.summary(),
            ", ".join(arch.split_slots()) or "none",
            rows,
            self.out / ARCH_FILE,
            self.out / HEATMAP_NAME,
        )


def _average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Average the gradients of ``params`` over the processes (a missing one counts as zero)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    for p, value in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = value.view_as(p).clone()
