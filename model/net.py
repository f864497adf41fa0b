"""The CM-NAS network: a modality-aware ResNet backbone with a BNNeck head."""

from __future__ import annotations

import torch
from torch import nn

from model.arch import Arch
from model.bn import ModalityBN, NormFactory, Routing, find_slots
from model.resnet import ResNet
from model.weights import load_imagenet
from utils.base.modality import Modality


class CMNASNet(nn.Module):
    """Backbone -> global average pool -> BNNeck -> bias-free classifier.

    ``model(images, modality)`` returns ``(pool_feature, bnneck_feature)`` in eval mode and
    ``(pool_feature, bnneck_feature, logits)`` in training mode. ``modality`` is
    ``"visible"``/``"infrared"`` for the whole batch, a per-sample tensor of
    :class:`~utils.base.modality.Modality` values, or a prepared :class:`~model.bn.Routing`.
    """

    def __init__(
        self, depth: int, num_classes: int, norm: NormFactory, last_stride: int = 1
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.backbone = ResNet(depth, norm, last_stride)
        feat_dim = self.backbone.out_channels
        self.feat_dim = feat_dim
        self.num_classes = num_classes
        self.bnneck = nn.BatchNorm1d(feat_dim)
        nn.init.normal_(self.bnneck.weight, 1.0, 0.01)
        nn.init.zeros_(self.bnneck.bias)
        # BNNeck shifts nothing: its bias stays at zero for the whole training.
        self.bnneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(feat_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, 0.0, 0.001)

    def slots(self) -> dict[str, nn.Module]:
        """The backbone's norm slots by slot name (e.g. ``layer1.0.bn1``), in canonical order."""
        return find_slots(self)

    def forward(
        self, images: torch.Tensor, modality: str | Modality | torch.Tensor | Routing
    ) -> tuple[torch.Tensor, ...]:
        """Compute pooled and BNNeck features (and logits in training mode)."""
        routing = Routing.of(modality, images.shape[0], images.device)
        fmap = self.backbone(images, routing)
        pool = fmap.mean(dim=(2, 3))
        feat = self.bnneck(pool)
        if not self.training:
            return pool, feat
        return pool, feat, self.classifier(feat)


def build_model(
    arch: Arch, num_classes: int, last_stride: int = 1, pretrained: str | None = None
) -> CMNASNet:
    """Build the network for ``arch``; ``pretrained`` is None, ``"imagenet"`` or a file path."""
    model = CMNASNet(
        arch.depth, num_classes, lambda name, n: ModalityBN(n, arch.slots[name]), last_stride
    )
    if pretrained is not None and str(pretrained).lower() != "none":
        load_imagenet(model, str(pretrained))
    return model
