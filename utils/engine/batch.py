"""Training batches: uint8 images kept where the steps read them, augmented in batch there."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data import TrainSet, augment_batch
from model import Routing


@dataclass
class Batch:
    """One cross-modality step: images (visible half first), labels and routing."""

    images: torch.Tensor
    labels: torch.Tensor
    routing: Routing
    n_visible: int


def _index_tensor(index: np.ndarray, device: torch.device) -> torch.Tensor:
    """Indices on ``device`` without a host synchronisation (pinned, non-blocking on CUDA)."""
    tensor = torch.from_numpy(index)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@dataclass
class ResidentImages:
    """A training set's uint8 images and labels by modality, on the GPU when there is one, and
    how its batches are made: on ``device``, augmented with ``generator``, maybe channels-last."""

    images: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    device: torch.device
    generator: torch.Generator
    channels_last: bool

    @classmethod
    def upload(
        cls,
        train_set: TrainSet,
        device: torch.device,
        generator: torch.Generator,
        channels_last: bool,
    ) -> ResidentImages:
        """Move ``train_set`` where the steps read it (the device itself when it is a GPU)."""
        images = {
            "visible": torch.from_numpy(np.ascontiguousarray(train_set.visible_images)),
            "infrared": torch.from_numpy(np.ascontiguousarray(train_set.infrared_images)),
        }
        labels = {
            "visible": torch.from_numpy(train_set.visible_labels.astype(np.int64)),
            "infrared": torch.from_numpy(train_set.infrared_labels.astype(np.int64)),
        }
        if device.type == "cuda":
            images = {k: v.to(device) for k, v in images.items()}
            labels = {k: v.to(device) for k, v in labels.items()}
        return cls(images, labels, device, generator, channels_last)

    def batch(self, visible_idx: np.ndarray, infrared_idx: np.ndarray) -> Batch:
        """Gather, augment and stack one step's images, visible half first."""
        device = self.device
        store = self.images["visible"].device
        v_idx = _index_tensor(visible_idx, store)
        i_idx = _index_tensor(infrared_idx, store)
        raw = torch.cat(
            [
                self.images["visible"].index_select(0, v_idx),
                self.images["infrared"].index_select(0, i_idx),
            ]
        )
        raw = raw.to(device, non_blocking=True)
        x = augment_batch(raw, self.generator)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.cat(
            [
                self.labels["visible"].index_select(0, v_idx),
                self.labels["infrared"].index_select(0, i_idx),
            ]
        ).to(device, non_blocking=True)
        n = len(visible_idx)
        return Batch(x, y, Routing.from_halves(n, len(infrared_idx)), n)
