"""The cross-modality P x K batch sampler (pure: it yields indices and keeps no dataset state)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)


class CrossModalitySampler:
    """Yield aligned (visible, infrared) index batches of P identities x K images per modality.

    ``P = batch_size // num_pos`` identities present in both modalities, without replacement, and
    ``num_pos`` images each per modality, with replacement; position k of both halves is the same
    identity. Batch (epoch, step) comes from a generator seeded with ``(seed, epoch, step)``, so
    any step regenerates exactly (resuming). Every rank draws the same P*W identities and keeps
    slice ``rank``. As with torch's DistributedSampler, call ``set_epoch`` before each epoch.
    """

    def __init__(
        self,
        visible_labels: Sequence[int] | np.ndarray,
        infrared_labels: Sequence[int] | np.ndarray,
        batch_size: int = 64,
        num_pos: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """Index the labels of both modalities; ``batch_size`` counts images per modality."""
        if num_pos < 1 or batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) and num_pos ({num_pos}) must be >= 1")
        if batch_size % num_pos != 0:
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of num_pos ({num_pos}): "
                "each identity contributes num_pos images per modality"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in 0..world_size-1 (world_size {world_size})")
        if seed < 0:
            raise ValueError(f"seed ({seed}) must be >= 0")
        self.batch_size = int(batch_size)
        self.num_pos = int(num_pos)
        self.num_ids = self.batch_size // self.num_pos
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.start_step = 0

        visible_labels = np.asarray(visible_labels, dtype=np.int64).reshape(-1)
        infrared_labels = np.asarray(infrared_labels, dtype=np.int64).reshape(-1)
        self._num_visible = len(visible_labels)
        self._num_infrared = len(infrared_labels)
        self.identities = np.intersect1d(visible_labels, infrared_labels)
        if len(self.identities) == 0:
            raise ValueError("no identity has images in both modalities")
        dropped = len(np.union1d(visible_labels, infrared_labels)) - len(self.identities)
        if dropped:
            logger.info("sampler: %d identities lack one modality and are never drawn", dropped)
        self._visible = _group(visible_labels, self.identities)
        self._infrared = _group(infrared_labels, self.identities)
        if self.num_ids > len(self.identities):
            logger.warning(
                "sampler: %d identities per batch requested but only %d exist; "
                "identities repeat within a batch",
                self.num_ids,
                len(self.identities),
            )

    def __len__(self) -> int:
        """Batches per epoch: floor(max(#visible, #infrared) / (batch_size * world_size)) + 1."""
        most = max(self._num_visible, self._num_infrared)
        return most // (self.batch_size * self.world_size) + 1

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch that ``__iter__`` yields, optionally skipping its first steps."""
        if epoch < 0 or start_step < 0:
            raise ValueError(f"epoch ({epoch}) and start_step ({start_step}) must be >= 0")
        self.epoch = int(epoch)
        self.start_step = int(start_step)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (visible_idx, infrared_idx), each int64 of shape (batch_size,)."""
        for step in range(self.start_step, len(self)):
            yield self.batch(self.epoch, step)

    def batch(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Return this rank's batch ``step`` of ``epoch`` (the same every time it is asked)."""
        rng = np.random.default_rng([self.seed, int(epoch), int(step)])
        chosen = self._draw_identities(rng)  # (world_size, P) positions into self.identities
        # Draw offsets for every rank's identities so the global batch is rank-independent.
        shape = (*chosen.shape, self.num_pos)
        visible = _pick(self._visible, chosen, rng.random(shape))
        infrared = _pick(self._infrared, chosen, rng.random(shape))
        return visible[self.rank].reshape(-1), infrared[self.rank].reshape(-1)

    def batch_identities(self, epoch: int, step: int) -> np.ndarray:
        """Return the identity labels of this rank's batch, one per group of ``num_pos``."""
        rng = np.random.default_rng([self.seed, int(epoch), int(step)])
        return self.identities[self._draw_identities(rng)[self.rank]]

    def _draw_identities(self, rng: np.random.Generator) -> np.ndarray:
        """Return (world_size, P) identity positions; distinct overall when enough exist."""
        n, p, w = len(self.identities), self.num_ids, self.world_size
        if p * w <= n:
            return rng.choice(n, size=p * w, replace=False).reshape(w, p)
        if p <= n:
            return self._spread(rng, n, p, w)
        # Fewer identities than P: every rank cycles through permutations of all of them.
        reps = -(-p // n)
        rows = [np.concatenate([rng.permutation(n) for _ in range(reps)])[:p] for _ in range(w)]
        return np.stack(rows)

    @staticmethod
    def _spread(rng: np.random.Generator, n: int, p: int, w: int) -> np.ndarray:
        """Deal P distinct identities to each of W ranks from a queue of successive permutations,
        each rank skipping those it holds: as even a spread as P*W > n allows."""
        queue: list[int] = rng.permutation(n).tolist()
        rows = []
        for _ in range(w):
            row: list[int] = []
            while len(row) < p:
                pick = next((k for k, x in enumerate(queue) if x not in row), None)
                if pick is None:
                    queue += rng.permutation(n).tolist()
                    continue
                row.append(queue.pop(pick))
            rows.append(row)
        return np.asarray(rows, dtype=np.int64)


def _group(labels: np.ndarray, identities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (indices sorted by identity, start of each identity, count of each identity)."""
    keep = np.flatnonzero(np.isin(labels, identities))
    order = keep[np.argsort(labels[keep], kind="stable")]
    starts = np.searchsorted(labels[order], identities, side="left")
    ends = np.searchsorted(labels[order], identities, side="right")
    return order.astype(np.int64), starts.astype(np.int64), (ends - starts).astype(np.int64)


def _pick(
    group: tuple[np.ndarray, np.ndarray, np.ndarray], chosen: np.ndarray, uniform: np.ndarray
) -> np.ndarray:
    """Map uniform draws in [0, 1) to images of the chosen identities (with replacement)."""
    order, starts, counts = group
    count = counts[chosen][..., None]
    offsets = np.minimum((uniform * count).astype(np.int64), count - 1)
    return order[starts[chosen][..., None] + offsets]
