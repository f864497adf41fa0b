"""ResNet-18/34/50 backbones whose every norm layer comes from a factory.

The backbone never hard-codes its BatchNorm: each slot asks ``norm(slot_name, channels)`` for a
module taking ``(x, routing)``, so the same code builds the all-shared baseline, any split scheme
and the search supernet. Module names follow torchvision's layout (``conv1``, ``bn1``,
``layerN.M.convK``, ``layerN.M.bnK``) except the shortcut, which is ``downsample.conv`` /
``downsample.bn`` like the authors' checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from model.arch import RESNET_LAYOUT, has_downsample
from model.bn import NormFactory, Routing


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class Downsample(nn.Module):
    """Projection shortcut: 1x1 convolution and its norm slot."""

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, norm: NormFactory, prefix: str
    ) -> None:
        super().__init__()
        self.conv = _conv1x1(in_planes, out_planes, stride)
        self.bn = norm(f"{prefix}.downsample.bn", out_planes)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Project ``x`` to the block's output shape."""
        return self.bn(self.conv(x), routing)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        downsample: Downsample | None,
        norm: NormFactory,
        prefix: str,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = norm(f"{prefix}.bn1", planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm(f"{prefix}.bn2", planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Residual block forward pass."""
        identity = x if self.downsample is None else self.downsample(x, routing)
        out = self.relu(self.bn1(self.conv1(x), routing))
        out = self.bn2(self.conv2(out), routing)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck with the stride on the 3x3 convolution (ResNet-50)."""

    expansion = 4

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        downsample: Downsample | None,
        norm: NormFactory,
        prefix: str,
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = norm(f"{prefix}.bn1", planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm(f"{prefix}.bn2", planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm(f"{prefix}.bn3", planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Residual block forward pass."""
        identity = x if self.downsample is None else self.downsample(x, routing)
        out = self.relu(self.bn1(self.conv1(x), routing))
        out = self.relu(self.bn2(self.conv2(out), routing))
        out = self.bn3(self.conv3(out), routing)
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
        block_type: type[BasicBlock] | type[Bottleneck] = (
            Bottleneck if kind == "bottleneck" else BasicBlock
        )
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
                        in_planes, planes * block_type.expansion, block_stride, norm, prefix
                    )
                layer.append(block_type(in_planes, planes, block_stride, downsample, norm, prefix))
                in_planes = planes * block_type.expansion
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
