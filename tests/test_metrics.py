"""Metrics: hand-computed SYSU-MM01, RegDB and LLCM cases, and vectorised == per-query loop."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from data import ExclusionRule
from data.llcm import SAME_IDENTITY_AND_CAMERA
from utils.benchmark.ranking import eval_ranking_loop, eval_sysu_loop
from utils.evaluation.metrics import (
    eval_llcm,
    eval_ranking,
    eval_regdb,
    eval_sysu,
    pairwise_distance,
    summarize,
)

# The per-query references of LLCM and RegDB: the loop under their rules.
eval_llcm_loop = partial(eval_ranking_loop, exclusion=SAME_IDENTITY_AND_CAMERA, dedup_cmc=True)
eval_regdb_loop = eval_ranking_loop

SYSU = (eval_sysu, eval_sysu_loop)
REGDB = (eval_regdb, eval_regdb_loop)
LLCM = (eval_llcm, eval_llcm_loop)


def assert_same(got: tuple, expected: tuple) -> None:
    """Two (cmc, mAP, mINP) results agree to round-off."""
    np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-12)
    assert got[1] == pytest.approx(expected[1], abs=1e-12)
    assert got[2] == pytest.approx(expected[2], abs=1e-12)


# --- SYSU-MM01 hand-computed cases -------------------------------------------------------------
#
# Gallery (distance order for both queries): g0 = id 1 cam 2, g1 = id 2 cam 1, g2 = id 1 cam 1.
CAM_DIST = np.array([[0.1, 0.2, 0.3]])
CAM_G_PIDS = np.array([1, 2, 1])
CAM_G_CAMS = np.array([2, 1, 1])


@pytest.mark.parametrize("evaluate", SYSU)
def test_cam3_query_ignores_cam2_gallery(evaluate) -> None:
    # Kept ranking: g1 (id 2), g2 (id 1). The nearest image (cam2, right id) must not count.
    cmc, m_ap, m_inp = evaluate(CAM_DIST, [1], CAM_G_PIDS, [3], CAM_G_CAMS)
    assert cmc[0] == 0.0
    assert cmc[1] == 1.0
    assert m_ap == pytest.approx(1 / 2)
    assert m_inp == pytest.approx(1 / 2)


@pytest.mark.parametrize("evaluate", SYSU)
def test_cam6_query_keeps_cam2_gallery(evaluate) -> None:
    # Ranking g0 (id 1), g1 (id 2), g2 (id 1): hit at 1; positives at 1 and 3.
    cmc, m_ap, m_inp = evaluate(CAM_DIST, [1], CAM_G_PIDS, [6], CAM_G_CAMS)
    assert cmc[0] == 1.0
    assert m_ap == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert m_inp == pytest.approx(2 / 3)


@pytest.mark.parametrize("evaluate", SYSU)
def test_two_queries_average(evaluate) -> None:
    dist = np.vstack([CAM_DIST, CAM_DIST])
    cmc, m_ap, m_inp = evaluate(dist, [1, 1], CAM_G_PIDS, [3, 6], CAM_G_CAMS)
    np.testing.assert_allclose(cmc[:3], [0.5, 1.0, 1.0])
    assert m_ap == pytest.approx((1 / 2 + 5 / 6) / 2)
    assert m_inp == pytest.approx((1 / 2 + 2 / 3) / 2)


@pytest.mark.parametrize("evaluate", SYSU)
def test_cmc_is_identity_deduplicated(evaluate) -> None:
    # Ranked gallery ids: 2, 2, 1, 3. Distinct identities: 2, 1, 3 -> rank 2, not 3.
    dist = np.array([[0.1, 0.2, 0.3, 0.4]])
    g_pids = np.array([2, 2, 1, 3])
    cmc, m_ap, m_inp = evaluate(dist, [1], g_pids, [6], [1, 1, 1, 1])
    np.testing.assert_allclose(cmc[:3], [0.0, 1.0, 1.0])
    assert m_ap == pytest.approx(1 / 3)
    assert m_inp == pytest.approx(1 / 3)


@pytest.mark.parametrize("evaluate", SYSU)
def test_dedup_counts_only_kept_identities(evaluate) -> None:
    # Ranked: id 2 (cam2), id 3 (cam1), id 1 (cam1). A cam3 query drops id 2 entirely -> rank 2;
    # a cam6 query keeps it -> rank 3.
    dist = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    g_pids, g_cams = np.array([2, 3, 1]), np.array([2, 1, 1])
    cmc3, _, _ = evaluate(dist[:1], [1], g_pids, [3], g_cams)
    cmc6, _, _ = evaluate(dist[1:], [1], g_pids, [6], g_cams)
    np.testing.assert_allclose(cmc3[:3], [0.0, 1.0, 1.0])
    np.testing.assert_allclose(cmc6[:3], [0.0, 0.0, 1.0])


@pytest.mark.parametrize("evaluate", SYSU)
def test_map_and_minp_by_hand(evaluate) -> None:
    # Ranked matches: + - + - +  ->  AP = (1/1 + 2/3 + 3/5) / 3 = 34/45, mINP = 3/5.
    dist = np.array([[0.5, 0.1, 0.4, 0.3, 0.2]])  # ranking: g1 g4 g3 g2 g0
    g_pids = np.array([1, 1, 2, 1, 3])  # ranked ids: 1 3 1 2 1
    cmc, m_ap, m_inp = evaluate(dist, [1], g_pids, [6], [1, 4, 5, 1, 2])
    assert cmc[0] == 1.0
    assert m_ap == pytest.approx(34 / 45)
    assert m_inp == pytest.approx(3 / 5)


@pytest.mark.parametrize("evaluate", SYSU)
def test_absent_query_identity_is_skipped(evaluate) -> None:
    dist = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    base = evaluate(dist[:1], [1], CAM_G_PIDS, [6], CAM_G_CAMS)
    # Identity 9 is not in the gallery at all.
    assert_same(evaluate(dist, [1, 9], CAM_G_PIDS, [6, 6], CAM_G_CAMS), base)
    # Identity 5 exists only in cam2, which a cam3 query ignores.
    g_pids = np.array([5, 2, 1])
    with_only_cam2 = evaluate(dist, [1, 5], g_pids, [6, 3], CAM_G_CAMS)
    alone = evaluate(dist[:1], [1], g_pids, [6], CAM_G_CAMS)
    assert_same(with_only_cam2, alone)
    with pytest.raises(ValueError, match="no query identity"):
        evaluate(dist[:1], [9], CAM_G_PIDS, [6], CAM_G_CAMS)


@pytest.mark.parametrize("evaluate", SYSU)
def test_cmc_padded_when_few_identities(evaluate) -> None:
    # Two distinct identities only: the CMC is 0 at rank 1 and 1 from rank 2 through 20.
    dist = np.array([[0.1, 0.2]])
    cmc, _, _ = evaluate(dist, [1], [2, 1], [6], [1, 1])
    assert cmc.shape == (20,)
    np.testing.assert_array_equal(cmc, [0.0] + [1.0] * 19)
    cmc5, _, _ = evaluate(dist, [1], [2, 1], [6], [1, 1], max_rank=5)
    assert cmc5.shape == (5,)


@pytest.mark.parametrize("evaluate", SYSU + REGDB)
def test_ties_broken_by_gallery_index(evaluate) -> None:
    # Equal distances: the lower gallery index ranks first (a stable sort).
    extra = ([6], [1, 1]) if evaluate in SYSU else ()
    miss_first, _, _ = evaluate(np.array([[0.5, 0.5]]), [1], [2, 1], *extra)
    hit_first, _, _ = evaluate(np.array([[0.5, 0.5]]), [1], [1, 2], *extra)
    assert miss_first[0] == 0.0
    assert hit_first[0] == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_negative_zero_ties_with_zero(dtype) -> None:
    # -0.0 == 0.0, so gallery order decides: id 2 (index 0) first, then id 1.
    dist = np.array([[0.0, -0.0, 1.0]], dtype=dtype)
    for evaluate in (eval_regdb, eval_regdb_loop):
        cmc, _, _ = evaluate(dist, [1], [2, 1, 3])
        np.testing.assert_array_equal(cmc[:2], [0.0, 1.0])


# --- RegDB hand-computed cases -----------------------------------------------------------------


@pytest.mark.parametrize("evaluate", REGDB)
def test_regdb_standard_cmc(evaluate) -> None:
    # Ranked ids 2, 2, 1, 3: the standard CMC finds the first match at position 3 (no dedup).
    dist = np.array([[0.1, 0.2, 0.3, 0.4]])
    cmc, m_ap, m_inp = evaluate(dist, [1], [2, 2, 1, 3])
    np.testing.assert_allclose(cmc[:4], [0.0, 0.0, 1.0, 1.0])
    assert m_ap == pytest.approx(1 / 3)
    assert m_inp == pytest.approx(1 / 3)


@pytest.mark.parametrize("evaluate", REGDB)
def test_regdb_two_queries_and_absent(evaluate) -> None:
    # q0 (id 1): ranked ids 1 2 1 -> hit at 1, AP (1 + 2/3)/2, INP 2/3.
    # q1 (id 2): ranked ids 1 1 2 (distances reversed) -> hit at 3, AP 1/3, INP 1/3.
    # q2 (id 7): absent, skipped.
    dist = np.array([[0.1, 0.2, 0.3], [0.1, 0.3, 0.2], [0.1, 0.2, 0.3]])
    g_pids = np.array([1, 2, 1])
    cmc, m_ap, m_inp = evaluate(dist, [1, 2, 7], g_pids)
    np.testing.assert_allclose(cmc[:3], [0.5, 0.5, 1.0])
    assert m_ap == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)
    assert m_inp == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_sysu_and_regdb_differ_only_by_rules() -> None:
    # Without cam3 queries and with one image per identity, dedup changes nothing.
    rng = np.random.default_rng(3)
    dist = rng.random((12, 9))
    g_pids = np.arange(9)
    q_pids = rng.integers(0, 9, 12)
    assert_same(
        eval_sysu(dist, q_pids, g_pids, np.full(12, 6), np.ones(9, int)),
        eval_regdb(dist, q_pids, g_pids),
    )


# --- LLCM hand-computed cases ------------------------------------------------------------------
#
# Gallery in distance order: g0 = id 1 cam 4, g1 = id 2 cam 4, g2 = id 1 cam 2, g3 = id 3 cam 2,
# g4 = id 1 cam 7.
LLCM_DIST = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
LLCM_G_PIDS = np.array([1, 2, 1, 3, 1])
LLCM_G_CAMS = np.array([4, 4, 2, 2, 7])


@pytest.mark.parametrize("evaluate", LLCM)
def test_llcm_ignores_own_identity_in_own_camera(evaluate) -> None:
    # A cam4 query of id 1 drops g0 only (id 1, cam 4); g1 (id 2, cam 4) stays.
    # Kept ranking: g1 (id 2), g2 (id 1), g3 (id 3), g4 (id 1): positives at 2 and 4.
    cmc, m_ap, m_inp = evaluate(LLCM_DIST, [1], LLCM_G_PIDS, [4], LLCM_G_CAMS)
    np.testing.assert_allclose(cmc[:3], [0.0, 1.0, 1.0])
    assert m_ap == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m_inp == pytest.approx(2 / 4)
    # A cam2 query of id 1 drops g2: kept g0 (id 1), g1, g3, g4 (id 1): positives at 1 and 4.
    cmc, m_ap, m_inp = evaluate(LLCM_DIST, [1], LLCM_G_PIDS, [2], LLCM_G_CAMS)
    assert cmc[0] == 1.0
    assert m_ap == pytest.approx((1 / 1 + 2 / 4) / 2)
    assert m_inp == pytest.approx(2 / 4)


@pytest.mark.parametrize("evaluate", LLCM)
def test_llcm_cmc_is_deduplicated_and_other_identities_kept(evaluate) -> None:
    # A cam7 query of id 3 keeps everything but nothing of id 3 in cam 7 exists: ranked ids
    # 1, 2, 1, 3, 1 -> distinct 1, 2, 3: rank 3 (the standard CMC would say 4).
    cmc, m_ap, m_inp = evaluate(LLCM_DIST, [3], LLCM_G_PIDS, [7], LLCM_G_CAMS)
    np.testing.assert_allclose(cmc[:3], [0.0, 0.0, 1.0])
    assert m_ap == pytest.approx(1 / 4)
    assert m_inp == pytest.approx(1 / 4)
    # Identity 2 seen only by camera 4: a cam4 query of id 2 has nothing left and is skipped.
    two = np.vstack([LLCM_DIST, LLCM_DIST])
    assert_same(
        evaluate(two, [2, 3], LLCM_G_PIDS, [4, 7], LLCM_G_CAMS),
        evaluate(LLCM_DIST, [3], LLCM_G_PIDS, [7], LLCM_G_CAMS),
    )


def test_camera_rules_are_data() -> None:
    # eval_ranking with SYSU's table and dedup is eval_sysu; several pairs combine.
    rng = np.random.default_rng(8)
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(rng, 50, 70, 8, np.float64)
    q_pids[0], q_cams[0] = g_pids[0], 6
    rule = ExclusionRule(ignored_camera_pairs=((3, 2),))
    assert_same(
        eval_ranking(dist, q_pids, g_pids, q_cams, g_cams, rule, dedup_cmc=True),
        eval_sysu(dist, q_pids, g_pids, q_cams, g_cams),
    )
    wider = ExclusionRule(ignored_camera_pairs=((3, 2), (3, 1), (6, 5)))
    got = eval_ranking(dist, q_pids, g_pids, q_cams, g_cams, wider)
    # The reference: drop the ignored columns by hand, then rank as RegDB does, query by query.
    rows = []
    for i in range(dist.shape[0]):
        banned = {3: (2, 1), 6: (5,)}[int(q_cams[i])]
        keep = ~np.isin(g_cams, banned)
        if q_pids[i] in g_pids[keep]:
            rows.append(eval_regdb_loop(dist[i : i + 1, keep], q_pids[i : i + 1], g_pids[keep]))
    cmc = np.mean([row[0] for row in rows], axis=0)
    assert_same(got, (cmc, np.mean([r[1] for r in rows]), np.mean([r[2] for r in rows])))
    with pytest.raises(ValueError, match="camera ids"):
        eval_ranking(dist, q_pids, g_pids, exclusion=wider)


# --- vectorised == per-query loop ----------------------------------------------------------------


def random_problem(
    rng: np.random.Generator, num_query: int, num_gallery: int, num_ids: int, dtype: type
) -> tuple[np.ndarray, ...]:
    """A random SYSU-like problem; a few query identities are absent from the gallery."""
    g_pids = rng.integers(0, num_ids, num_gallery)
    q_pids = rng.integers(0, num_ids + 2, num_query)
    q_cams = rng.choice([3, 6], num_query)
    g_cams = rng.choice([1, 2, 4, 5], num_gallery)
    dist = rng.standard_normal((num_query, num_gallery)).astype(dtype)
    return dist, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize(
    ("num_query", "num_gallery", "num_ids", "dtype"),
    [
        (30, 200, 12, np.float64),  # more gallery than queries
        (120, 25, 6, np.float64),  # more queries than gallery, fewer than 20 identities
        (40, 60, 40, np.float32),  # many identities with 1-2 images each
        (1, 1, 1, np.float64),
        (64, 3, 2, np.float32),
        (400, 700, 30, np.float32),  # several query chunks
    ],
)
def test_vectorised_matches_loop(num_query, num_gallery, num_ids, dtype) -> None:
    rng = np.random.default_rng(num_query * 1000 + num_gallery)
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(
        rng, num_query, num_gallery, num_ids, dtype
    )
    present = np.isin(q_pids, g_pids)
    if not present.any():
        q_pids[0] = g_pids[0]
    if not (present & (q_cams == 6)).any():  # make sure some query always has a match
        q_cams[0], q_pids[0] = 6, g_pids[0]
    assert_same(
        eval_sysu(dist, q_pids, g_pids, q_cams, g_cams),
        eval_sysu_loop(dist, q_pids, g_pids, q_cams, g_cams),
    )
    assert_same(eval_regdb(dist, q_pids, g_pids), eval_regdb_loop(dist, q_pids, g_pids))
    _check_llcm(rng, dist, q_pids, g_pids)


def _check_llcm(
    rng: np.random.Generator, dist: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray
) -> None:
    """eval_llcm == its loop with camera numbers shared by queries and gallery (LLCM's 9)."""
    q_cams = rng.integers(1, 4, q_pids.size)  # few cameras: many same-camera matches
    g_cams = rng.integers(1, 4, g_pids.size)
    # Query 0 keeps a match under both rules below: its identity in another camera.
    q_pids[0], q_cams[0], g_cams[0] = g_pids[0], 2, 1
    assert_same(
        eval_llcm(dist, q_pids, g_pids, q_cams, g_cams),
        eval_llcm_loop(dist, q_pids, g_pids, q_cams, g_cams),
    )
    # Both kinds of rule at once, with either CMC.
    rules = ExclusionRule(ignored_camera_pairs=((1, 3),), same_identity_same_camera=True)
    for dedup in (True, False):
        assert_same(
            eval_ranking(dist, q_pids, g_pids, q_cams, g_cams, rules, dedup),
            eval_ranking_loop(dist, q_pids, g_pids, q_cams, g_cams, rules, dedup),
        )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vectorised_matches_loop_with_ties_and_inf(dtype) -> None:
    # Integer distances tie all the time; +inf means "never close". Ties follow gallery order.
    rng = np.random.default_rng(11)
    for _ in range(20):
        dist, q_pids, g_pids, q_cams, g_cams = random_problem(rng, 25, 40, 5, dtype)
        dist = np.round(dist)
        dist[rng.random(dist.shape) < 0.1] = np.inf
        q_pids[0], q_cams[0] = g_pids[0], 6
        assert_same(
            eval_sysu(dist, q_pids, g_pids, q_cams, g_cams),
            eval_sysu_loop(dist, q_pids, g_pids, q_cams, g_cams),
        )
        assert_same(eval_regdb(dist, q_pids, g_pids), eval_regdb_loop(dist, q_pids, g_pids))
        _check_llcm(rng, dist, q_pids, g_pids)


def test_torch_inputs_are_accepted() -> None:
    rng = np.random.default_rng(5)
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(rng, 20, 30, 4, np.float32)
    q_pids[0] = g_pids[0]
    expected = eval_sysu(dist, q_pids, g_pids, q_cams, g_cams)
    got = eval_sysu(*(torch.from_numpy(x) for x in (dist, q_pids, g_pids, q_cams, g_cams)))
    assert_same(got, expected)


def test_nan_distances_are_rejected() -> None:
    dist = np.array([[0.1, np.nan]])
    for evaluate in (eval_regdb, eval_regdb_loop):
        with pytest.raises(ValueError, match="NaN"):
            evaluate(dist, [1], [1, 2])


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        eval_regdb(np.zeros((2, 3)), [1, 2], [1, 2])


# --- distances, summaries, benchmark -----------------------------------------------------------


def test_pairwise_distance_is_negative_cosine() -> None:
    query = np.array([[3.0, 4.0], [1.0, 0.0]])
    gallery = np.array([[0.0, 2.0], [-1.0, 0.0]])
    # Normalised query rows: (0.6, 0.8), (1, 0); gallery rows: (0, 1), (-1, 0).
    expected = -np.array([[0.8, -0.6], [0.0, -1.0]], dtype=np.float32)
    got = pairwise_distance(query, gallery)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)
    got_torch = pairwise_distance(torch.tensor(query, requires_grad=True), torch.tensor(gallery))
    assert isinstance(got_torch, np.ndarray) and got_torch.dtype == np.float32
    np.testing.assert_allclose(got_torch, expected, atol=1e-6)
    raw = pairwise_distance(query, gallery, normalize=False)
    np.testing.assert_allclose(raw, -(query @ gallery.T), atol=1e-6)


def test_summarize_reports_percentages() -> None:
    cmc = np.linspace(0.5, 1.0, 20)
    out = summarize(cmc, 0.25, 0.125)
    assert out == pytest.approx(
        {
            "rank1": 50.0,
            "rank5": 100 * cmc[4],
            "rank10": 100 * cmc[9],
            "rank20": 100.0,
            "mAP": 25.0,
            "mINP": 12.5,
        }
    )
    assert set(summarize(cmc[:5], 0.0, 0.0)) == {"rank1", "rank5", "mAP", "mINP"}


RULES = {
    "none": ExclusionRule(),
    "camera pair": ExclusionRule(ignored_camera_pairs=((3, 2),)),
    "same identity and camera": ExclusionRule(same_identity_same_camera=True),
    "both": ExclusionRule(ignored_camera_pairs=((1, 3), (3, 2)), same_identity_same_camera=True),
}


@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
@pytest.mark.parametrize("ties", [False, True])
def test_every_rule_and_cmc_kind_matches_loop(rule: ExclusionRule, dedup: bool, ties: bool) -> None:
    """Vectorised == loop exactly for each kind of rule, either CMC, random or tie-heavy."""
    rng = np.random.default_rng(17 + 2 * ties + dedup)
    for dtype in (np.float32, np.float64):
        dist, q_pids, g_pids, _, _ = random_problem(rng, 60, 80, 7, dtype)
        q_cams, g_cams = rng.integers(1, 4, 60), rng.integers(1, 4, 80)
        if ties:
            dist = np.round(dist)
            dist[rng.random(dist.shape) < 0.1] = np.inf
        q_pids[0], q_cams[0], g_cams[0] = g_pids[0], 2, 1
        got = eval_ranking(dist, q_pids, g_pids, q_cams, g_cams, rule, dedup)
        expected = eval_ranking_loop(dist, q_pids, g_pids, q_cams, g_cams, rule, dedup)
        np.testing.assert_array_equal(got[0], expected[0])
        assert got[1:] == pytest.approx(expected[1:], abs=1e-12)
