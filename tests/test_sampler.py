"""The cross-modality P x K sampler: alignment, epoch length, determinism, ranks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data import CrossModalitySampler


def _labels(num_ids: int, seed: int, lo: int = 1, hi: int = 12) -> np.ndarray:
    """Labels 0..num_ids-1 with a random number (lo..hi) of images each, shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_ids), rng.integers(lo, hi + 1, num_ids))
    return rng.permutation(labels)


VISIBLE = _labels(30, 1)
INFRARED = _labels(30, 2)


def _identities(vis_labels: np.ndarray, vi: np.ndarray, num_pos: int) -> np.ndarray:
    return vis_labels[vi].reshape(-1, num_pos)[:, 0]


def test_batches_are_aligned_p_by_k() -> None:
    sampler = CrossModalitySampler(VISIBLE, INFRARED, batch_size=24, num_pos=4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for vi, ii in batches:
        assert vi.dtype == np.int64 and ii.dtype == np.int64
        assert vi.shape == ii.shape == (24,)
        assert vi.max() < len(VISIBLE) and ii.max() < len(INFRARED)
        np.testing.assert_array_equal(VISIBLE[vi], INFRARED[ii])
        counts = Counter(VISIBLE[vi].tolist())
        assert len(counts) == 6 and set(counts.values()) == {4}
        # identity-major: each block of num_pos positions is one identity
        blocks = VISIBLE[vi].reshape(6, 4)
        assert (blocks == blocks[:, :1]).all()


def test_images_drawn_with_replacement_and_only_paired_identities() -> None:
    visible = np.array([0, 1, 1, 1, 2, 2, 3])  # identity 0 has one visible image
    infrared = np.array([0, 0, 1, 1, 2, 4, 4])  # 3 and 4 exist in one modality only
    sampler = CrossModalitySampler(visible, infrared, batch_size=12, num_pos=4, seed=0)
    for step in range(20):
        vi, ii = sampler.batch(0, step)
        assert set(visible[vi].tolist()) == {0, 1, 2}
        np.testing.assert_array_equal(visible[vi], infrared[ii])
        block = vi[visible[vi] == 0]
        assert (block == 0).all() and len(block) == 4  # the single image, four times


def test_epoch_length() -> None:
    visible, infrared = np.repeat(np.arange(10), 10), np.repeat(np.arange(10), 5)  # 100 / 50
    assert len(CrossModalitySampler(visible, infrared, batch_size=8, num_pos=4)) == 100 // 8 + 1
    assert len(CrossModalitySampler(infrared, visible, batch_size=8, num_pos=2)) == 13
    ranked = [
        CrossModalitySampler(visible, infrared, batch_size=8, num_pos=4, rank=r, world_size=2)
        for r in range(2)
    ]
    assert [len(s) for s in ranked] == [100 // 16 + 1] * 2 == [len(list(s)) for s in ranked]
    paper = CrossModalitySampler(np.zeros(22258, int), np.zeros(11909, int), 64, 4)
    assert len(paper) == 22258 // 64 + 1 == 348


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="multiple of num_pos"):
        CrossModalitySampler(VISIBLE, INFRARED, batch_size=30, num_pos=4)
    with pytest.raises(ValueError, match="rank"):
        CrossModalitySampler(VISIBLE, INFRARED, rank=2, world_size=2)
    with pytest.raises(ValueError, match="both modalities"):
        CrossModalitySampler([0, 1], [2, 3])


def test_seed_determinism_and_epoch_regeneration() -> None:
    def epoch(sampler: CrossModalitySampler, e: int) -> list:
        sampler.set_epoch(e)
        return [np.concatenate(b) for b in sampler]

    a = CrossModalitySampler(VISIBLE, INFRARED, batch_size=16, num_pos=4, seed=11)
    b = CrossModalitySampler(VISIBLE, INFRARED, batch_size=16, num_pos=4, seed=11)
    c = CrossModalitySampler(VISIBLE, INFRARED, batch_size=16, num_pos=4, seed=12)
    first, second = epoch(a, 0), epoch(a, 1)
    np.testing.assert_array_equal(first, epoch(b, 0))
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, epoch(c, 0))
    # epoch 1 regenerated after later epochs, from a fresh object, and step by step
    epoch(a, 5)
    np.testing.assert_array_equal(second, epoch(a, 1))
    for step, expected in enumerate(second):
        np.testing.assert_array_equal(np.concatenate(b.batch(1, step)), expected)
    # resuming mid-epoch yields exactly the remaining batches
    b.set_epoch(1, start_step=3)
    np.testing.assert_array_equal([np.concatenate(x) for x in b], second[3:])


def test_ranks_get_disjoint_identities_and_equal_steps() -> None:
    world = 3
    samplers = [
        CrossModalitySampler(
            VISIBLE, INFRARED, batch_size=16, num_pos=4, seed=5, rank=r, world_size=world
        )
        for r in range(world)
    ]
    single = CrossModalitySampler(VISIBLE, INFRARED, batch_size=16, num_pos=4, seed=5)
    assert len({len(s) for s in samplers}) == 1
    for step in range(len(samplers[0])):
        ids = [set(VISIBLE[s.batch(2, step)[0]].tolist()) for s in samplers]
        assert all(len(i) == 4 for i in ids)
        assert len(set().union(*ids)) == 12  # 3 ranks x 4 identities, all distinct
        for s in samplers:
            vi, ii = s.batch(2, step)
            np.testing.assert_array_equal(VISIBLE[vi], INFRARED[ii])
    # ranks do not all follow the single-process stream of identities
    assert any(
        not np.array_equal(samplers[1].batch(0, k)[0], single.batch(0, k)[0]) for k in range(5)
    )


def test_too_few_identities_for_all_ranks() -> None:
    visible, infrared = np.repeat(np.arange(6), 3), np.repeat(np.arange(6), 2)
    samplers = [
        CrossModalitySampler(visible, infrared, 16, 4, seed=1, rank=r, world_size=2)
        for r in range(2)
    ]
    for step in range(10):
        ids = []
        for s in samplers:  # 4 per rank from only 6: distinct within each rank still
            vi, ii = s.batch(0, step)
            ids.append(set(visible[vi].tolist()))
            np.testing.assert_array_equal(visible[vi], infrared[ii])
        assert [len(i) for i in ids] == [4, 4]
        assert len(ids[0] | ids[1]) == 6  # as spread over the ranks as 6 identities allow
    tiny = CrossModalitySampler([0, 1, 1], [0, 1], batch_size=12, num_pos=2)  # P=6 > 2 ids
    vi, ii = tiny.batch(0, 0)
    counts = Counter(np.array([0, 1, 1])[vi].tolist())
    assert counts == {0: 6, 1: 6}
