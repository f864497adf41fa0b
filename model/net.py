"""The CM-NAS network: a ResNet-18/34/50 backbone whose every norm layer comes from a factory.

Each slot asks ``norm(slot_name, channels)`` for a module taking ``(x, routing)``, so one code
builds the all-shared baseline, any split scheme and the search supernet. Module names follow
torchvision's (``layerN.M.convK``, ``layerN.M.bnK``) but for the shortcut, ``downsample.conv`` /
``downsample.bn`` as in the authors' checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from model.arch import RESNET_LAYOUT, Arch, has_downsample
from model.bn import ModalityBN, NormFactory, Routing
from model.weights import load_imagenet
from utils.base.modality import Modality


class Downsample(nn.Module):
    """Projection shortcut: 1x1 convolution and its norm slot."""

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, norm: NormFactory, prefix: str
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        self.bn = norm(f"{prefix}.downsample.bn", out_planes)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Project ``x`` to the block's output shape."""
        return self.bn(self.conv(x), routing)


class Block(nn.Module):
    """A residual block: two 3x3 convolutions (``basic``, ResNet-18/34), or 1x1-3x3-1x1 with
    the stride on the 3x3 and four times the width out (``bottleneck``, ResNet-50)."""

    def __init__(
        self,
        kind: str,
        in_planes: int,
        planes: int,
        stride: int,
        downsample: Downsample | None,
        norm: NormFactory,
        prefix: str,
    ) -> None:
        super().__init__()
        # (in, out, kernel size, stride) of each convolution, followed by its norm slot.
        if kind == "bottleneck":
            convs = [(in_planes, planes, 1, 1), (planes, planes, 3, stride)]
            convs.append((planes, planes * 4, 1, 1))
        else:
            convs = [(in_planes, planes, 3, stride), (planes, planes, 3, 1)]
        for k, (cin, cout, size, step) in enumerate(convs, start=1):
            conv = nn.Conv2d(cin, cout, size, stride=step, padding=size // 2, bias=False)
            setattr(self, f"conv{k}", conv)
            setattr(self, f"bn{k}", norm(f"{prefix}.bn{k}", cout))
        self.num_convs = len(convs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Residual block forward pass."""
        identity = x if self.downsample is None else self.downsample(x, routing)
        out = x
        for k in range(1, self.num_convs + 1):
            out = getattr(self, f"bn{k}")(getattr(self, f"conv{k}")(out), routing)
            if k < self.num_convs:
                out = self.relu(out)
        return self.relu(out + identity)


class Stage(nn.ModuleList):
    """A ResNet stage (``layerN``): blocks applied in order, each given the routing."""

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Run every block of the stage."""
        for block in self:
            x = block(x, routing)
        return x


class ResNet(nn.Module):
    """ResNet feature extractor (no pooling, no classifier) with factory-built norm slots."""

    def __init__(self, depth: int, norm: NormFactory, last_stride: int = 1) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        kind, blocks = RESNET_LAYOUT[depth]
        expansion = 4 if kind == "bottleneck" else 1
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm("bn1", 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = 64
        strides = (1, 2, 2, last_stride)
        for stage, (count, stride) in enumerate(zip(blocks, strides, strict=True), start=1):
            planes = 64 * 2 ** (stage - 1)
            layer = Stage()
            for index in range(count):
                prefix = f"layer{stage}.{index}"
                block_stride = stride if index == 0 else 1
                downsample = None
                if index == 0 and has_downsample(depth, stage):
                    downsample = Downsample(
                        in_planes, planes * expansion, block_stride, norm, prefix
                    )
                layer.append(Block(kind, in_planes, planes, block_stride, downsample, norm, prefix))
                in_planes = planes * expansion
            setattr(self, f"layer{stage}", layer)
        self.out_channels = in_planes
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Return the final feature map (``out_channels`` x H/16 x W/16 at last stride 1)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x), routing)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x, routing)
        return x


class CMNASNet(nn.Module):
    """Backbone -> global average pool -> BNNeck -> bias-free classifier.

    ``model(images, modality)`` returns the pooled and BNNeck features (and in training mode the
    logits); ``modality`` names the batch's, or is a per-sample tensor or a :class:`Routing`.
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
    load_imagenet(model, pretrained)
    return model
