"""Losses of CM-NAS training and search: identity CE, batch-hard triplet, SP and CMMD.

:data:`LOSS_TERMS` is the one table of terms, from which the flags, logged names and plotted curves
come; :class:`LossRecipe` weighs and sums them (the paper's: CE + triplet + 5.0 * SP + 0.05 *
CMMD). Samples of one identity are paired by label, never by batch position, except in the
positional ``sp_loss``. A new loss is its function plus one :class:`LossTerm` (from other code:
:func:`register_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

PAIRINGS = ("vv", "ii", "vi", "iv")
FEATURES = ("pool", "bnneck", "logits")


def identity_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross entropy of classifier logits against identity labels."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def euclidean_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances (len(a), len(b)); squared distances are clamped at 1e-12."""
    squared = a.pow(2).sum(dim=1, keepdim=True) + b.pow(2).sum(dim=1).unsqueeze(0) - 2.0 * (a @ b.T)
    # The clamp keeps sqrt's gradient finite at zero distance and absorbs negative round-off.
    return squared.clamp(min=1e-12).sqrt()


def batch_hard_triplet(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    margin: float = 0.4,
) -> torch.Tensor:
    """Batch-hard triplet loss: mean(relu(hardest positive - hardest negative + margin)).

    Per anchor: the farthest candidate with its label and the nearest with another. Anchors
    lacking either are left out; if none remain the loss is a graph-connected zero.
    """
    dist = euclidean_dist(anchors, candidates)
    same = anchor_labels.view(-1, 1) == candidate_labels.view(1, -1)
    hardest_positive = dist.masked_fill(~same, float("-inf")).max(dim=1).values
    hardest_negative = dist.masked_fill(same, float("inf")).min(dim=1).values
    # Masked mean instead of boolean indexing: no host synchronisation on the GPU.
    usable = same.any(dim=1) & (~same).any(dim=1)
    hinge = torch.where(usable, F.relu(hardest_positive - hardest_negative + margin), 0.0)
    return hinge.sum() / usable.sum().clamp_min(1)


def cross_modality_triplet(
    visible_feats: torch.Tensor,
    visible_labels: torch.Tensor,
    infrared_feats: torch.Tensor,
    infrared_labels: torch.Tensor,
    margin: float = 0.4,
    pairings: Sequence[str] = PAIRINGS,
) -> torch.Tensor:
    """Mean of batch_hard_triplet over anchor -> candidate pairings ("vv", "ii", "vi", "iv";
    the architecture search uses ``("vi", "iv")``)."""
    if not pairings:
        raise ValueError("pairings must name at least one of 'vv', 'ii', 'vi', 'iv'")
    for pairing in pairings:
        if pairing not in PAIRINGS:
            raise ValueError(f"unknown pairing {pairing!r}: expected one of {PAIRINGS}")
    sets = {"v": (visible_feats, visible_labels), "i": (infrared_feats, infrared_labels)}
    losses = [batch_hard_triplet(*sets[p[0]], *sets[p[1]], margin) for p in pairings]
    return torch.stack(losses).mean()


def sp_loss(visible_feats: torch.Tensor, infrared_feats: torch.Tensor) -> torch.Tensor:
    """Correlation consistency: MSE between the row-normalised Gram matrices of the two halves
    (row k of both halves is the same identity, as the sampler aligns them)."""
    if visible_feats.shape != infrared_feats.shape:
        raise ValueError(
            f"sp_loss needs aligned halves, got {tuple(visible_feats.shape)} and "
            f"{tuple(infrared_feats.shape)}"
        )
    visible_gram = F.normalize(visible_feats @ visible_feats.T, dim=1)
    infrared_gram = F.normalize(infrared_feats @ infrared_feats.T, dim=1)
    return F.mse_loss(visible_gram, infrared_gram)


def _mean_kernel(
    left_weight: torch.Tensor,
    left: torch.Tensor,
    right_weight: torch.Tensor,
    right: torch.Tensor,
) -> torch.Tensor:
    """Per identity, the weighted mean of k(a, b) = (a.b)^2 over its left and right samples."""
    kernel = (left @ right.T).pow(2)
    return ((left_weight @ kernel) * right_weight).sum(dim=1)


def cmmd_loss(
    visible_feats: torch.Tensor,
    visible_labels: torch.Tensor,
    infrared_feats: torch.Tensor,
    infrared_labels: torch.Tensor,
) -> torch.Tensor:
    """Class-specific MMD^2 with kernel (a.b)^2 on L2-normalised features, averaged over identities.

    Per identity in both modalities: mean k(V,V) + mean k(I,I) - 2 mean k(V,I) over all pairs,
    diagonal included; with no shared identity, a graph-connected zero.
    """
    visible = F.normalize(visible_feats, dim=1)
    infrared = F.normalize(infrared_feats, dim=1)
    # One row per sample of the batch (no torch.unique: it would synchronise with the host);
    # each identity's rows are weighted by 1 / (its number of rows) so it counts once.
    labels = torch.cat([visible_labels, infrared_labels])
    visible_onehot = (labels.view(-1, 1) == visible_labels.view(1, -1)).to(visible.dtype)
    infrared_onehot = (labels.view(-1, 1) == infrared_labels.view(1, -1)).to(infrared.dtype)
    visible_count = visible_onehot.sum(dim=1)
    infrared_count = infrared_onehot.sum(dim=1)
    shared = (visible_count > 0) & (infrared_count > 0)
    multiplicity = (labels.view(-1, 1) == labels.view(1, -1)).sum(dim=1)
    row_weight = shared.to(visible.dtype) / multiplicity.to(visible.dtype)
    visible_weight = visible_onehot / visible_count.clamp_min(1).unsqueeze(1)
    infrared_weight = infrared_onehot / infrared_count.clamp_min(1).unsqueeze(1)

    mmd = (
        _mean_kernel(visible_weight, visible, visible_weight, visible)
        + _mean_kernel(infrared_weight, infrared, infrared_weight, infrared)
        - 2.0 * _mean_kernel(visible_weight, visible, infrared_weight, infrared)
    )
    return (mmd * row_weight).sum() / row_weight.sum().clamp_min(1e-12)


@dataclass(frozen=True)
class LossTerm:
    """One term of the training loss.

    ``function`` takes ``(visible, visible_labels, infrared, infrared_labels)`` of the
    ``features`` ("pool" or "bnneck"), ``(visible, infrared)`` without ``labels``, or the batch's
    logits and labels. ``flag`` sets the weight from the command line (None: fixed); ``search``:
    the architecture step uses it too; ``settings`` makes keyword arguments from the recipe.
    """

    name: str
    function: Callable[..., torch.Tensor]
    features: str = "bnneck"
    labels: bool = True
    weight: float = 1.0
    flag: str | None = None
    help: str = ""
    search: bool = True
    settings: Callable[[LossRecipe], Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ValueError(f"loss term {self.name!r}: features must be one of {FEATURES}")
        if self.features == "logits" and self.search:
            raise ValueError(f"loss term {self.name!r}: the architecture step has no logits")

    def __call__(
        self,
        recipe: LossRecipe,
        features: Mapping[str, torch.Tensor | None],
        labels: torch.Tensor,
        n_visible: int,
    ) -> torch.Tensor:
        """The unweighted term on a batch whose first ``n_visible`` samples are visible."""
        options = self.settings(recipe) if self.settings is not None else {}
        values = features[self.features]
        if values is None:
            raise ValueError(
                f"the {self.name!r} term needs classifier logits (leave it out of terms without)"
            )
        if self.features == "logits":
            inputs = (values.float(), labels) if self.labels else (values.float(),)
            return self.function(*inputs, **options)
        visible, infrared, n = values[:n_visible], values[n_visible:], n_visible
        if self.labels:
            return self.function(visible, labels[:n], infrared, labels[n:], **options)
        return self.function(visible, infrared, **options)


def _identity_settings(recipe: LossRecipe) -> Mapping[str, Any]:
    return {"label_smoothing": recipe.label_smooth}


def _triplet_settings(recipe: LossRecipe) -> Mapping[str, Any]:
    return {"margin": recipe.margin, "pairings": recipe.pairings}


# Every term of the training loss, in the order they are summed. Triplet runs on the pooled
# features, SP and CMMD on the BNNeck features (the paper's choice).
LOSS_TERMS: dict[str, LossTerm] = {
    term.name: term
    for term in (
        LossTerm("ce", identity_loss, "logits", search=False, settings=_identity_settings),
        LossTerm("triplet", cross_modality_triplet, "pool", settings=_triplet_settings),
        LossTerm(
            "sp", sp_loss, labels=False, weight=5.0, flag="sp_lambda", help="weight of the SP loss"
        ),
        LossTerm(
            "cmmd", cmmd_loss, weight=0.05, flag="cmmd_lambda", help="weight of the CMMD loss"
        ),
    )
}


def register_loss(term: LossTerm) -> LossTerm:
    """Add ``term`` to :data:`LOSS_TERMS` (summed after the others); returns it."""
    if term.name in LOSS_TERMS or term.name == "loss":
        raise ValueError(f"a loss term named {term.name!r} exists already")
    if term.flag is not None and term.flag in weight_flags():
        raise ValueError(f"loss term {term.name!r}: flag --{term.flag} is taken")
    LOSS_TERMS[term.name] = term
    return term


def weight_flags() -> dict[str, str]:
    """The command-line flag of each term weight that has one: flag -> term name."""
    return {term.flag: name for name, term in LOSS_TERMS.items() if term.flag is not None}


def search_terms() -> tuple[str, ...]:
    """The terms the search's architecture step uses."""
    return tuple(name for name, term in LOSS_TERMS.items() if term.search)


def _default_weights() -> Mapping[str, float]:
    return MappingProxyType({name: term.weight for name, term in LOSS_TERMS.items()})


@dataclass(frozen=True)
class LossRecipe:
    """The loss terms a step uses and their weights by name (the table's for those not named);
    the defaults are the paper's recipe."""

    weights: Mapping[str, float] = field(default_factory=_default_weights)
    label_smooth: float = 0.0
    margin: float = 0.4
    # Anchor -> candidate modality pairings of the triplet loss.
    pairings: tuple[str, ...] = PAIRINGS
    terms: tuple[str, ...] = field(default_factory=lambda: tuple(LOSS_TERMS))

    def weight(self, name: str) -> float:
        """The weight of term ``name``."""
        return self.weights.get(name, LOSS_TERMS[name].weight)

    def flags(self) -> dict[str, float]:
        """The recipe by command-line flag: ``--label_smooth``, ``--margin`` and each weight."""
        by_flag = {flag: self.weight(name) for flag, name in weight_flags().items()}
        return {"label_smooth": self.label_smooth, "margin": self.margin, **by_flag}

    def __call__(
        self,
        pool: torch.Tensor,
        bnneck: torch.Tensor,
        logits: torch.Tensor | None,
        labels: torch.Tensor,
        n_visible: int,
    ) -> dict[str, torch.Tensor]:
        """The weighted terms named in ``terms`` (those of weight 0 left out) and their sum under
        ``"loss"``, on a batch whose first ``n_visible`` samples are visible."""
        unknown = [name for name in self.terms if name not in LOSS_TERMS]
        if unknown:
            raise ValueError(f"unknown loss term(s) {unknown}: expected some of {list(LOSS_TERMS)}")
        features = {"pool": pool.float(), "bnneck": bnneck.float(), "logits": logits}
        out: dict[str, torch.Tensor] = {}
        for name in self.terms:
            weight = self.weight(name)
            if weight > 0:
                loss = LOSS_TERMS[name](self, features, labels, n_visible)
                out[name] = loss if weight == 1.0 else weight * loss
        out["loss"] = sum(out.values())  # type: ignore[assignment]
        return out


def recipe_from(
    weights: Mapping[str, float], label_smooth: float = 0.0, margin: float = 0.4
) -> LossRecipe:
    """The recipe with the given term weights (by term name; the others the table's)."""
    unknown = sorted(set(weights) - set(LOSS_TERMS))
    if unknown:
        raise ValueError(f"unknown loss term(s) {unknown}: expected some of {list(LOSS_TERMS)}")
    merged = {name: float(weights.get(name, term.weight)) for name, term in LOSS_TERMS.items()}
    return LossRecipe(MappingProxyType(merged), label_smooth, margin)
