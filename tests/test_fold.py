"""A network folded for one modality gives that modality's features, with no BN left."""

from __future__ import annotations

import pytest
import torch
from test_export import random_network

from model import ModalityBN, find_slots
from model.fold import FoldedBN, conv_of_slot, folded_network


@pytest.mark.parametrize("depth", [18, 50])
def test_folded_network_matches_each_modality(one_thread, depth: int) -> None:
    model = random_network(depth, seed=depth)
    images = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for modality in ("visible", "infrared"):
            folded = folded_network(model, modality)
            assert not any(isinstance(m, ModalityBN) for m in folded.modules())
            assert sum(isinstance(m, FoldedBN) for m in folded.modules()) == len(find_slots(model))
            expected = model(images, modality)
            scale = max(1.0, float(expected[0].abs().max()))
            for got, want in zip(folded(images, modality), expected, strict=True):
                assert float((got - want).abs().max()) <= 1e-4 * scale
    # The original keeps its BNs and its bias-free convolutions.
    assert model.backbone.conv1.bias is None and isinstance(model.backbone.bn1, ModalityBN)


def test_conv_of_slot() -> None:
    assert conv_of_slot("bn1") == "conv1"
    assert conv_of_slot("layer2.0.bn3") == "layer2.0.conv3"
    assert conv_of_slot("layer2.0.downsample.bn") == "layer2.0.downsample.conv"
