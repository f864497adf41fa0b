"""Losses: hand-computed values, label grouping independent of batch order, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from model.losses import (
    LossRecipe,
    batch_hard_triplet,
    cmmd_loss,
    cross_modality_triplet,
    euclidean_dist,
    identity_loss,
    recipe_from,
    sp_loss,
)


def points(*xs: float) -> torch.Tensor:
    """Points on the x axis of the plane, as float64 features (distances are |x_a - x_b|)."""
    return torch.tensor([[x, 0.0] for x in xs], dtype=torch.float64)


def labels(*ys: int) -> torch.Tensor:
    """An identity label tensor."""
    return torch.tensor(ys)


# --- identity loss -------------------------------------------------------------------------------


def test_identity_loss_by_hand() -> None:
    # softmax([0, ln 3]) = (1/4, 3/4).
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert identity_loss(logits, labels(1)).item() == pytest.approx(-math.log(3 / 4))
    assert identity_loss(logits, labels(0)).item() == pytest.approx(-math.log(1 / 4))
    # Label smoothing 0.1 over 2 classes: target (0.05, 0.95).
    smoothed = 0.05 * math.log(4) + 0.95 * math.log(4 / 3)
    assert identity_loss(logits, labels(1), 0.1).item() == pytest.approx(smoothed)


# --- distances and triplets ----------------------------------------------------------------------


def test_euclidean_dist_by_hand() -> None:
    a = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])
    expected = torch.tensor([[5.0, 0.0, 10.0], [0.0, 5.0, 5.0]])
    dist = euclidean_dist(a, b)
    torch.testing.assert_close(dist, expected.clamp(min=1e-6), atol=1e-5, rtol=0)
    # Zero distance is clamped to sqrt(1e-12), which keeps the gradient finite.
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    euclidean_dist(x, x.detach()).sum().backward()
    assert torch.isfinite(x.grad).all()


# Four points x = 0, 1 (id 0) and 3, 6 (id 1), anchors = candidates, margin 2.5:
#   x=0: hardest pos 1, hardest neg 3 -> 0.5     x=1: pos 1, neg 2 -> 1.5
#   x=3: hardest pos 3, hardest neg 2 -> 3.5     x=6: pos 3, neg 5 -> 0.5      mean 1.5
TRIPLET_X = (0.0, 1.0, 3.0, 6.0)
TRIPLET_Y = (0, 0, 1, 1)


def test_batch_hard_triplet_by_hand() -> None:
    feats, ys = points(*TRIPLET_X), labels(*TRIPLET_Y)
    loss = batch_hard_triplet(feats, ys, feats, ys, margin=2.5)
    assert loss.item() == pytest.approx(1.5, abs=1e-5)
    # With the paper's margin every hinge of this batch except x=3 (3 - 2 + 0.4) is inactive.
    loss = batch_hard_triplet(feats, ys, feats, ys, margin=0.4)
    assert loss.item() == pytest.approx(1.4 / 4, abs=1e-5)


def test_batch_hard_triplet_groups_by_label_not_position() -> None:
    feats, ys = points(*TRIPLET_X), labels(*TRIPLET_Y)
    expected = batch_hard_triplet(feats, ys, feats, ys, margin=2.5)
    for perm in (torch.tensor([2, 0, 3, 1]), torch.tensor([3, 2, 1, 0])):
        shuffled = batch_hard_triplet(feats[perm], ys[perm], feats[perm], ys[perm], margin=2.5)
        torch.testing.assert_close(shuffled, expected)
    # Anchors and candidates shuffled independently.
    perm_a, perm_c = torch.tensor([1, 3, 0, 2]), torch.tensor([2, 1, 3, 0])
    mixed = batch_hard_triplet(feats[perm_a], ys[perm_a], feats[perm_c], ys[perm_c], margin=2.5)
    torch.testing.assert_close(mixed, expected)


def test_batch_hard_triplet_skips_anchors_without_positive_or_negative() -> None:
    candidates, candidate_ys = points(0.0, 1.0, 3.0), labels(0, 0, 1)
    # Anchor id 5 has no positive; only the anchor at x=0.5 (pos 0.5, neg 2.5) counts.
    anchors, anchor_ys = points(0.5, 10.0), labels(0, 5)
    loss = batch_hard_triplet(anchors, anchor_ys, candidates, candidate_ys, margin=2.5)
    assert loss.item() == pytest.approx(0.5 - 2.5 + 2.5)
    # Only one label among the candidates: no anchor has a negative -> zero, still in the graph.
    anchors = points(0.5).requires_grad_()
    loss = batch_hard_triplet(anchors, labels(0), points(0.0, 1.0), labels(0, 0))
    assert loss.item() == 0.0
    loss.backward()
    assert anchors.grad is not None and torch.equal(anchors.grad, torch.zeros_like(anchors))


# V = x 0 (id 0), x 4 (id 1); I = x 1 (id 0), x 2 (id 1); margin 1.5:
#   V->I: V0 pos 1 neg 2 -> 0.5; V1 pos 2 neg 3 -> 0.5                          = 0.5
#   I->V: I0 pos 1 neg 3 -> 0;   I1 pos 2 neg 2 -> 1.5                          = 0.75
#   V->V: only self positives (~0), negatives at 4 -> 0                         = 0
#   I->I: self positives (~0), negatives at 1 -> 0.5 each                       = 0.5
def test_cross_modality_triplet_by_hand() -> None:
    v, v_ys = points(0.0, 4.0), labels(0, 1)
    i, i_ys = points(1.0, 2.0), labels(0, 1)
    full = cross_modality_triplet(v, v_ys, i, i_ys, margin=1.5)
    assert full.item() == pytest.approx((0.0 + 0.5 + 0.5 + 0.75) / 4, abs=1e-5)
    cross = cross_modality_triplet(v, v_ys, i, i_ys, margin=1.5, pairings=("vi", "iv"))
    assert cross.item() == pytest.approx((0.5 + 0.75) / 2, abs=1e-5)
    only_iv = cross_modality_triplet(v, v_ys, i, i_ys, margin=1.5, pairings=("iv",))
    assert only_iv.item() == pytest.approx(0.75, abs=1e-5)
    with pytest.raises(ValueError, match="pairing"):
        cross_modality_triplet(v, v_ys, i, i_ys, pairings=("vx",))


def test_cross_modality_triplet_is_order_independent() -> None:
    gen = torch.Generator().manual_seed(0)
    v, i = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    ys = labels(0, 0, 1, 1, 2, 2, 3, 3)
    expected = cross_modality_triplet(v, ys, i, ys)
    pv, pi = torch.randperm(8, generator=gen), torch.randperm(8, generator=gen)
    torch.testing.assert_close(cross_modality_triplet(v[pv], ys[pv], i[pi], ys[pi]), expected)


# --- SP and CMMD ---------------------------------------------------------------------------------


def test_sp_loss_by_hand() -> None:
    # G_v = diag(4, 1), rows normalised to the identity; G_i = all fours, rows normalised to
    # (1/sqrt2, 1/sqrt2). Squared differences: (1 - 1/sqrt2)^2 twice and 1/2 twice -> mean
    # 1 - 1/sqrt2, whichever half comes first.
    visible = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    infrared = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    assert sp_loss(visible, infrared).item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    assert sp_loss(infrared, visible).item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    # Halves whose Gram rows differ only in scale cost nothing.
    assert sp_loss(visible, 3.0 * visible).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="aligned"):
        sp_loss(visible, infrared[:1])


def test_sp_loss_uses_row_alignment() -> None:
    # Permuting both halves the same way permutes both Gram matrices alike: same loss.
    gen = torch.Generator().manual_seed(1)
    v, i = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    perm = torch.randperm(6, generator=gen)
    torch.testing.assert_close(sp_loss(v[perm], i[perm]), sp_loss(v, i))


# Identity 0: V = (3, 0), I = (0, 1): k(V,V) = 1, k(I,I) = 1, k(V,I) = 0            -> MMD 2
# Identity 1: V = (1, 0), (0, 2), I = (1, 0): mean k(V,V) = (1+0+0+1)/4 = 0.5,
#             k(I,I) = 1, mean k(V,I) = (1 + 0)/2 = 0.5 -> 0.5 + 1 - 1           -> MMD 0.5
# Identity 2: visible only, left out.                                          mean (2 + 0.5)/2
def cmmd_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hand-computed CMMD batch above."""
    visible = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    infrared = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    return visible, labels(0, 1, 1, 2), infrared, labels(0, 1)


def test_cmmd_loss_by_hand() -> None:
    assert cmmd_loss(*cmmd_case()).item() == pytest.approx(1.25, abs=1e-6)


def test_cmmd_loss_is_order_independent() -> None:
    visible, v_ys, infrared, i_ys = cmmd_case()
    pv, pi = torch.tensor([3, 1, 0, 2]), torch.tensor([1, 0])
    loss = cmmd_loss(visible[pv], v_ys[pv], infrared[pi], i_ys[pi])
    assert loss.item() == pytest.approx(1.25, abs=1e-6)


def test_cmmd_loss_without_shared_identity_is_graph_zero() -> None:
    visible = torch.randn(2, 3, requires_grad=True)
    loss = cmmd_loss(visible, labels(0, 0), torch.randn(2, 3), labels(1, 1))
    assert loss.item() == 0.0
    loss.backward()
    assert visible.grad is not None


def test_cmmd_matches_per_identity_loop() -> None:
    # The vectorised estimate equals the definition computed one identity at a time.
    gen = torch.Generator().manual_seed(2)
    visible, infrared = torch.randn(12, 6, generator=gen), torch.randn(10, 6, generator=gen)
    v_ys = torch.randint(0, 4, (12,), generator=gen)
    i_ys = torch.randint(1, 5, (10,), generator=gen)
    v_n = torch.nn.functional.normalize(visible, dim=1)
    i_n = torch.nn.functional.normalize(infrared, dim=1)
    per_identity = []
    for k in sorted(set(v_ys.tolist()) & set(i_ys.tolist())):
        a, b = v_n[v_ys == k], i_n[i_ys == k]
        kvv = (a @ a.T).pow(2).mean()
        kii = (b @ b.T).pow(2).mean()
        kvi = (a @ b.T).pow(2).mean()
        per_identity.append(kvv + kii - 2 * kvi)
    expected = torch.stack(per_identity).mean()
    torch.testing.assert_close(cmmd_loss(visible, v_ys, infrared, i_ys), expected)


# --- gradients -----------------------------------------------------------------------------------


def test_every_loss_has_gradients() -> None:
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(8, 16, generator=gen, requires_grad=True)
    i = torch.randn(8, 16, generator=gen, requires_grad=True)
    logits = torch.randn(16, 4, generator=gen, requires_grad=True)
    ys = labels(0, 0, 1, 1, 2, 2, 3, 3)
    terms = {
        "ce": identity_loss(logits, torch.cat([ys, ys])),
        "triplet": cross_modality_triplet(v, ys, i, ys, margin=10.0),
        "sp": sp_loss(v, i),
        "cmmd": cmmd_loss(v, ys, i, ys),
    }
    for name, loss in terms.items():
        inputs = [logits] if name == "ce" else [v, i]
        grads = torch.autograd.grad(loss, inputs)
        for grad in grads:
            assert torch.isfinite(grad).all(), name
            assert grad.abs().sum() > 0, name


# --- the recipe ----------------------------------------------------------------------------------


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool and BNNeck features, logits and labels of 8 visible + 8 infrared samples."""
    gen = torch.Generator().manual_seed(5)
    ys = labels(0, 0, 1, 1, 2, 2, 3, 3)
    pool = torch.randn(16, 6, generator=gen)
    bnneck = torch.randn(16, 6, generator=gen)
    logits = torch.randn(16, 4, generator=gen)
    return pool, bnneck, logits, torch.cat([ys, ys])


def test_recipe_weighs_and_sums_the_paper_terms() -> None:
    pool, bnneck, logits, ys = _batch()
    recipe = recipe_from({"sp": 2.0, "cmmd": 0.5}, label_smooth=0.1, margin=0.3)
    terms = recipe(pool, bnneck, logits, ys, 8)
    want = {
        "ce": identity_loss(logits, ys, 0.1),
        "triplet": cross_modality_triplet(pool[:8], ys[:8], pool[8:], ys[8:], margin=0.3),
        "sp": 2.0 * sp_loss(bnneck[:8], bnneck[8:]),
        "cmmd": 0.5 * cmmd_loss(bnneck[:8], ys[:8], bnneck[8:], ys[8:]),
    }
    assert list(terms) == ["ce", "triplet", "sp", "cmmd", "loss"]
    for name, value in want.items():
        assert torch.equal(terms[name], value), name
    assert torch.equal(terms["loss"], want["ce"] + want["triplet"] + want["sp"] + want["cmmd"])
    paper = LossRecipe()
    assert (paper.margin, paper.weight("sp"), paper.weight("cmmd"), paper.label_smooth) == (
        0.4,
        5.0,
        0.05,
        0.0,
    )
    flags = {"label_smooth": 0.0, "margin": 0.4, "sp_lambda": 5.0, "cmmd_lambda": 0.05}
    assert paper.flags() == flags


def test_recipe_leaves_out_zero_weights_and_unnamed_terms() -> None:
    pool, bnneck, logits, ys = _batch()
    assert set(recipe_from({"sp": 0.0})(pool, bnneck, logits, ys, 8)) == {
        "ce", "triplet", "cmmd", "loss"
    }  # fmt: skip
    # The search's architecture step: no classifier, cross-modality triplet pairings only.
    arch = LossRecipe(terms=("triplet", "sp", "cmmd"), pairings=("vi", "iv"))
    terms = arch(pool, bnneck, None, ys, 8)
    assert list(terms) == ["triplet", "sp", "cmmd", "loss"]
    cross = cross_modality_triplet(pool[:8], ys[:8], pool[8:], ys[8:], 0.4, ("vi", "iv"))
    assert torch.equal(terms["triplet"], cross)
    with pytest.raises(ValueError, match="'ce' term needs classifier logits"):
        LossRecipe()(pool, bnneck, None, ys, 8)
    with pytest.raises(ValueError, match="unknown loss term"):
        LossRecipe(terms=("center",))(pool, bnneck, logits, ys, 8)
