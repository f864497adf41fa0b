"""k-reciprocal re-ranking: vectorised == per-image loop, chunking, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.benchmark.ranking import feature_distances, rerank_reference
from utils.evaluation.rerank import euclidean_distances, rerank
from utils.metrics import rerank as public_rerank


@pytest.fixture(scope="module")
def distances() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Euclidean distances of 120 queries and 180 gallery images (random, so no ties)."""
    return feature_distances(120, 180, 32, seed=3)


@pytest.mark.parametrize(
    ("k1", "k2", "lambda_value"),
    [(20, 6, 0.3), (20, 1, 0.3), (5, 3, 0.0), (7, 6, 1.0), (3, 10, 0.5), (30, 2, 0.7)],
)
def test_vectorised_equals_loop(distances, k1: int, k2: int, lambda_value: float) -> None:
    fast = rerank(*distances, k1=k1, k2=k2, lambda_value=lambda_value)
    slow = rerank_reference(*distances, k1=k1, k2=k2, lambda_value=lambda_value)
    assert fast.shape == slow.shape == (120, 180)
    assert fast.dtype == np.float32
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-5)


def test_reranking_changes_distances_and_lambda_one_is_original(distances) -> None:
    q_g, q_q, g_g = distances
    squared = q_g.astype(np.float32) ** 2
    # Column maxima of the full squared matrix: over the query-query and query-gallery rows.
    col_max = np.maximum((q_q**2).max(axis=0), (q_g**2).max(axis=1))
    np.testing.assert_allclose(rerank(*distances, lambda_value=1.0), squared / col_max[:, None])
    # The Jaccard term is not a rescaling of the original distances: rankings change.
    reranked = rerank(*distances)
    assert (np.argsort(reranked, axis=1)[:, :5] != np.argsort(q_g, axis=1)[:, :5]).any()
    assert np.all((reranked >= 0) & (reranked <= 1 + 1e-6))


def test_larger_sizes_and_unequal_sides() -> None:
    q_g, q_q, g_g = feature_distances(300, 90, 64, seed=5)
    np.testing.assert_allclose(rerank(q_g, q_q, g_g), rerank_reference(q_g, q_q, g_g), atol=1e-5)


def test_chunked_equals_unchunked(distances) -> None:
    whole = rerank(*distances, k1=9, k2=4)
    # 600 and 5,000 elements: chunks of 2 and 16 rows (of 300 images), several per stage.
    for chunk in (600, 5000):
        np.testing.assert_allclose(
            rerank(*distances, k1=9, k2=4, chunk_elements=chunk), whole, rtol=0, atol=1e-6
        )


def test_ties_follow_a_stable_sort() -> None:
    # Distances on a coarse grid tie often; the order among equal values is by index.
    rng = np.random.default_rng(0)
    points = rng.integers(0, 3, size=(70, 4)).astype(np.float32)
    dist = euclidean_distances(points, points)
    q_g, q_q, g_g = dist[:30, 30:], dist[:30, :30], dist[30:, 30:]
    np.testing.assert_allclose(
        rerank(q_g, q_q, g_g, k1=6, k2=3), rerank_reference(q_g, q_q, g_g, k1=6, k2=3), atol=1e-5
    )


def test_inputs_of_other_types(distances) -> None:
    q_g, q_q, g_g = distances
    expected = rerank(q_g, q_q, g_g)
    as_double = rerank(*(d.astype(np.float64) for d in distances))
    np.testing.assert_allclose(as_double, expected, atol=1e-5)
    tensors = public_rerank(*(torch.from_numpy(d) for d in distances))
    np.testing.assert_array_equal(tensors, expected)


def test_tiny_problem_with_k_larger_than_images() -> None:
    q_g, q_q, g_g = feature_distances(2, 3, 8, seed=1)
    np.testing.assert_allclose(
        rerank(q_g, q_q, g_g, k1=20, k2=6), rerank_reference(q_g, q_q, g_g, k1=20, k2=6), atol=1e-5
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"q_q_dist": np.zeros((4, 4))}, r"q_q_dist has shape \(4, 4\), expected \(5, 5\)"),
        ({"g_g_dist": np.zeros((6, 7))}, r"g_g_dist has shape \(6, 7\), expected \(7, 7\)"),
        ({"q_g_dist": np.zeros(5)}, r"q_g_dist must be a 2-D distance matrix"),
        ({"q_g_dist": np.zeros((0, 7))}, r"at least one query and gallery"),
        ({"k1": 0}, r"k1 must be an integer >= 1, got 0"),
        ({"k2": 2.5}, r"k2 must be an integer >= 1, got 2.5"),
        ({"lambda_value": 1.5}, r"lambda_value must lie in \[0, 1\], got 1.5"),
        ({"chunk_elements": 0}, r"chunk_elements must be >= 1"),
    ],
)
def test_bad_input_is_rejected(change: dict, message: str) -> None:
    q_g, q_q, g_g = feature_distances(5, 7, 4)
    kwargs = {"q_g_dist": q_g, "q_q_dist": q_q, "g_g_dist": g_g, **change}
    with pytest.raises(ValueError, match=message):
        rerank(**kwargs)


def test_nan_distances_are_rejected() -> None:
    q_g, q_q, g_g = feature_distances(5, 7, 4)
    q_g[1, 2] = np.nan
    with pytest.raises(ValueError, match="q_g_dist holds NaN or infinite distances"):
        rerank(q_g, q_q, g_g)
