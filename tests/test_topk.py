"""Blockwise exact top-k (utils.evaluation.topk): the whole matrix's ranking, a block at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.base.errors import UserError
from utils.evaluation import topk
from utils.evaluation.metrics import eval_ranking, pairwise_distance
from utils.evaluation.topk import (
    block_rows,
    feature_blocks,
    matrix_blocks,
    rank_blocks,
    rank_features,
    smallest,
    unit_rows,
)


def tied_matrix(rows: int, cols: int, seed: int) -> np.ndarray:
    """Distances with many ties (few distinct values), where only a stable order is defined."""
    return np.random.default_rng(seed).integers(0, 5, (rows, cols)).astype(np.float32)


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(
        torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1
    )


@pytest.mark.parametrize("k", [1, 3, 10, 40, 41, 100])
def test_smallest_is_the_stable_argsort(k: int) -> None:
    values = tied_matrix(23, 41, seed=k)
    values[3, [0, 5, 9]] = np.nan  # NaNs sort last, in column order
    values[4, :] = np.nan
    expected = np.argsort(values, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(smallest(values, k), expected)


@pytest.mark.parametrize("pairs", [1, 40, 97, 10**6])
def test_blocks_rank_and_score_as_the_whole_matrix(pairs: int) -> None:
    dist = tied_matrix(37, 53, seed=pairs)
    q_pids = np.random.default_rng(1).integers(0, 6, 37)
    g_pids = np.random.default_rng(2).integers(0, 8, 53)
    blocks = list(matrix_blocks(dist, pairs))
    assert all(block.size <= max(pairs, 53) for _, block in blocks)
    ranking = rank_blocks(iter(blocks), dist.shape, 7, (q_pids, g_pids))
    order = np.argsort(dist, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(ranking.indices, order)
    np.testing.assert_array_equal(ranking.distances, np.take_along_axis(dist, order, axis=1))
    cmc, m_ap, m_inp = eval_ranking(dist, q_pids, g_pids)
    assert ranking.metrics is not None
    np.testing.assert_array_equal(ranking.metrics[0], cmc)
    assert (ranking.metrics[1], ranking.metrics[2]) == (m_ap, m_inp)


def test_a_k_beyond_the_gallery_lists_it_all() -> None:
    ranking = rank_blocks(matrix_blocks(tied_matrix(4, 6, 0)), (4, 6), 10)
    assert ranking.indices.shape == (4, 6) and ranking.metrics is None


def test_one_block_gives_the_whole_products_distances_bit_for_bit() -> None:
    """With every pair in one block, the distances are those of the whole matrix product."""
    query, gallery = unit(29, 24, 0), unit(61, 24, 1)
    whole = np.sqrt(np.clip(2.0 + 2.0 * pairwise_distance(query, gallery), 0.0, None))
    ranking = rank_features(unit_rows(query), unit_rows(gallery), 61)
    np.testing.assert_array_equal(np.take_along_axis(whole, ranking.indices, 1), ranking.distances)
    np.testing.assert_array_equal(ranking.indices, np.argsort(whole, axis=1, kind="stable"))


def test_small_blocks_bound_memory_and_keep_the_distances() -> None:
    query, gallery = unit(29, 24, 0), unit(61, 24, 1)
    blocks = list(feature_blocks(query, gallery, pairs=150))
    assert [start for start, _ in blocks] == list(range(0, 29, 2))
    assert all(block.shape[0] * block.shape[1] <= 150 for _, block in blocks)
    whole = np.sqrt(np.clip(2.0 + 2.0 * pairwise_distance(query, gallery), 0.0, None))
    np.testing.assert_allclose(np.concatenate([b for _, b in blocks]), whole, atol=1e-6)
    assert block_rows(10, 10**9) == 1 and block_rows(3, 5) == 3


def test_unit_rows_normalise_exactly_and_in_place_on_request() -> None:
    features = torch.randn(50, 8) * 3
    expected = torch.nn.functional.normalize(features, dim=1)
    copy = unit_rows(features)
    assert torch.equal(copy, expected) and not torch.equal(features, expected)
    same = unit_rows(features, inplace=True)
    assert same.data_ptr() == features.data_ptr() and torch.equal(features, expected)


def test_rerank_memory_is_refused_up_front(monkeypatch, caplog) -> None:
    need = topk.rerank_bytes(2_000, 1_000_000)
    # Three matrices of 12 bytes an entry: the gallery-gallery one dominates.
    assert need > 12 * 10**12
    monkeypatch.setattr(topk, "available_memory", lambda: 64 * 2**30)
    with pytest.raises(UserError) as refused:
        topk.check_memory(need, "re-ranking 2,000 x 1,000,000 images", "--rerank")
    message = str(refused.value)
    assert message.startswith("--rerank: re-ranking 2,000 x 1,000,000 images needs about ")
    assert "64.0 GiB available" in message and "\n" not in message
    caplog.set_level("INFO")
    topk.check_memory(topk.rerank_bytes(100, 200), "re-ranking 100 x 200 images", "--rerank")
    assert "re-ranking 100 x 200 images needs about 0.3 GiB" in caplog.text


def test_available_memory_is_read_from_the_system() -> None:
    free = topk.available_memory()
    assert free is None or free > 0
