"""The authors' style of input pipeline, kept as the baseline of ``python -m utils.benchmark``.

Every image is augmented on its own on the CPU, in DataLoader worker processes
(:func:`~data.transforms.augment_one`, the same distribution as the batched GPU version), and a
step receives float NCHW tensors that still have to be copied to the device. Item ``k`` of a
batch is the pair (visible image ``k``, infrared image ``k``) of a
:class:`~data.sampler.CrossModalitySampler` batch, as in the authors' paired data set.

    dataset = PairedImages(visible_images, visible_labels, infrared_images, infrared_labels)
    loader = plain_loader(dataset, sampler, workers=4, num_batches=100)
    for visible, infrared, visible_labels, infrared_labels in loader:
        images = torch.cat([visible, infrared]).to(device)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from data.sampler import CrossModalitySampler
from data.transforms import augment_one

PairItem = tuple[torch.Tensor, torch.Tensor, int, int]


class PairedImages(Dataset):
    """uint8 NHWC images of both modalities; item ``(v, i)`` is both images augmented.

    Random numbers come from a NumPy generator per process: in a worker it is seeded from the
    worker's own seed (different in every worker and every epoch), in the main process from
    ``seed``.
    """

    def __init__(
        self,
        visible_images: np.ndarray,
        visible_labels: np.ndarray,
        infrared_images: np.ndarray,
        infrared_labels: np.ndarray,
        seed: int = 0,
    ) -> None:
        """Keep references to the arrays (worker processes share them copy-on-write)."""
        if len(visible_images) != len(visible_labels) or len(infrared_images) != len(
            infrared_labels
        ):
            raise ValueError("each modality needs one label per image")
        self.visible_images = visible_images
        self.visible_labels = np.asarray(visible_labels, dtype=np.int64)
        self.infrared_images = infrared_images
        self.infrared_labels = np.asarray(infrared_labels, dtype=np.int64)
        self.seed = int(seed)
        self._rng: np.random.Generator | None = None
        self._rng_owner: int | None = None

    def __len__(self) -> int:
        """Number of visible images (the authors' convention; items are index pairs)."""
        return len(self.visible_images)

    def rng(self) -> np.random.Generator:
        """This process's generator, created on first use in every worker."""
        info = get_worker_info()
        owner = -1 if info is None else info.seed
        if self._rng is None or self._rng_owner != owner:
            seed = [self.seed] if info is None else [self.seed, info.seed]
            self._rng = np.random.default_rng(seed)
            self._rng_owner = owner
        return self._rng

    def __getitem__(self, pair: tuple[int, int]) -> PairItem:
        """Augment visible image ``pair[0]`` and infrared image ``pair[1]``; add their labels."""
        visible, infrared = pair
        rng = self.rng()
        return (
            augment_one(self.visible_images[visible], rng),
            augment_one(self.infrared_images[infrared], rng),
            int(self.visible_labels[visible]),
            int(self.infrared_labels[infrared]),
        )


class PairedBatchSampler:
    """Turn the cross-modality sampler's (visible, infrared) batches into lists of index pairs.

    Yields ``num_batches`` batches (default: one epoch of ``sampler``), going on into the next
    epochs when more are asked for; batch ``b`` counted from ``epoch`` is always the same.
    """

    def __init__(
        self, sampler: CrossModalitySampler, num_batches: int | None = None, epoch: int = 0
    ) -> None:
        """Wrap ``sampler``; ``num_batches`` None means one epoch."""
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches ({num_batches}) must be >= 0")
        self.sampler = sampler
        self.num_batches = num_batches
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at ``epoch`` of the wrapped sampler."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per iteration."""
        return len(self.sampler) if self.num_batches is None else self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Yield each batch as ``[(visible_idx, infrared_idx), ...]`` (position k = identity)."""
        per_epoch = len(self.sampler)
        for position in range(len(self)):
            epoch, step = divmod(position, per_epoch)
            visible, infrared = self.sampler.batch(self.epoch + epoch, step)
            yield list(zip(visible.tolist(), infrared.tolist(), strict=True))


def plain_loader(
    dataset: PairedImages,
    sampler: CrossModalitySampler,
    workers: int = 4,
    num_batches: int | None = None,
    pin_memory: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader yielding (visible, infrared, visible_labels, infrared_labels) batches.

    ``visible``/``infrared`` are float (B, 3, H, W) tensors in NCHW layout on the CPU.
    """
    return DataLoader(
        dataset,
        batch_sampler=PairedBatchSampler(sampler, num_batches),
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )
