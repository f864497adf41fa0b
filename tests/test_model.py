"""The CM-NAS network: ImageNet equivalence, modality routing and isolation, head, slot counts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from model import (
    SHARED,
    SPLIT,
    Arch,
    CMNASNet,
    ModalityBN,
    Routing,
    build_model,
    find_slots,
    slot_names,
)
from model.weights import load_imagenet

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# A plain reference ResNet-50 with torchvision's module names and plain BatchNorm2d.
# --------------------------------------------------------------------------------------------
class RefBottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3x3 convolution)."""

    def __init__(self, inplanes: int, planes: int, stride: int, project: bool) -> None:
        super().__init__()
        width = planes * 4
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(inplanes, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
            )
            if project
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class RefResNet50(nn.Module):
    """Plain ResNet-50 with torchvision's state-dict keys; ``last_stride`` for layer4."""

    def __init__(self, last_stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for stage, (blocks, stride) in enumerate(
            zip((3, 4, 6, 3), (1, 2, 2, last_stride), strict=True), start=1
        ):
            planes = 64 * 2 ** (stage - 1)
            layers = []
            for index in range(blocks):
                layers.append(
                    RefBottleneck(inplanes, planes, stride if index == 0 else 1, index == 0)
                )
                inplanes = planes * 4
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.fc = nn.Linear(2048, 1000)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled layer4 output (what CM-NAS calls the pool feature)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


def randomize_(module: nn.Module, generator: torch.Generator) -> None:
    """Give every conv, BN (affine and running stats) and linear layer distinctive values."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d):
                fan_in = sub.weight[0].numel()
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator))
                sub.weight.mul_((2.0 / fan_in) ** 0.5)
            elif isinstance(sub, nn.BatchNorm2d | nn.BatchNorm1d):
                n = sub.num_features
                sub.weight.copy_(0.5 + torch.rand(n, generator=generator))
                sub.bias.copy_(0.2 * torch.randn(n, generator=generator))
                sub.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                sub.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                sub.num_batches_tracked.fill_(int(torch.randint(1, 10**6, (1,))))
            elif isinstance(sub, nn.Linear):
                sub.weight.copy_(0.01 * torch.randn(sub.weight.shape, generator=generator))
                if sub.bias is not None:
                    sub.bias.copy_(0.01 * torch.randn(sub.bias.shape, generator=generator))


def images(n: int, seed: int, height: int = 64, width: int = 32) -> torch.Tensor:
    """A small batch of random images."""
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def assert_features_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Relative closeness at 1e-4 of the feature scale."""
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.fixture(scope="module")
def imagenet50(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RefResNet50]:
    """A random ResNet-50 in torchvision's layout, saved as an ImageNet file, and its module."""
    torch.manual_seed(0)
    ref = RefResNet50(last_stride=1)
    randomize_(ref, torch.Generator().manual_seed(50))
    ref.eval()
    state = ref.state_dict()
    # The file really is in torchvision's layout.
    assert "layer1.0.downsample.0.weight" in state
    assert "layer1.0.downsample.1.running_var" in state
    assert "layer4.2.bn3.num_batches_tracked" in state
    assert "fc.weight" in state and "fc.bias" in state
    path = tmp_path_factory.mktemp("imagenet") / "resnet50.pth"
    torch.save(state, path)
    return path, ref


@pytest.fixture(scope="module")
def shared50(imagenet50: tuple[Path, RefResNet50]) -> CMNASNet:
    """All-shared ResNet-50 initialised from the ImageNet file."""
    torch.manual_seed(1)
    model = build_model(Arch.uniform(50, SHARED), 10, last_stride=1, pretrained=str(imagenet50[0]))
    return model.eval()


@pytest.fixture(scope="module")
def split50(imagenet50: tuple[Path, RefResNet50]) -> CMNASNet:
    """All-split ResNet-50 initialised from the ImageNet file."""
    torch.manual_seed(2)
    model = build_model(Arch.uniform(50, SPLIT), 10, last_stride=1, pretrained=str(imagenet50[0]))
    return model.eval()


# --------------------------------------------------------------------------------------------
# ImageNet equivalence
# --------------------------------------------------------------------------------------------
def test_all_shared_resnet50_matches_plain_resnet50(
    imagenet50: tuple[Path, RefResNet50], shared50: CMNASNet
) -> None:
    """All-shared ResNet-50 + ImageNet weights = plain ResNet-50 (last stride 1) in eval mode."""
    _, ref = imagenet50
    x = images(2, seed=3)
    with torch.no_grad():
        expected = ref.features(x)
        for modality in ("visible", "infrared"):
            pool, feat = shared50(x, modality)
            assert pool.shape == (2, 2048)
            assert feat.shape == (2, 2048)
            assert_features_close(pool, expected)
        # Sharpness: another input gives other features.
        assert not torch.allclose(expected, ref.features(images(2, seed=4)), rtol=1e-2)


def test_all_split_resnet50_both_branches_from_imagenet(
    imagenet50: tuple[Path, RefResNet50], split50: CMNASNet
) -> None:
    """Each branch of every split slot starts from ImageNet: both modalities give ref features."""
    _, ref = imagenet50
    x = images(2, seed=5)
    with torch.no_grad():
        expected = ref.features(x)
        visible = split50(x, "visible")[0]
        infrared = split50(x, "infrared")[0]
    assert_features_close(visible, expected)
    assert_features_close(infrared, expected)
    torch.testing.assert_close(visible, infrared, rtol=1e-5, atol=1e-6 * float(visible.abs().max()))
    slot = split50.backbone.layer3[0].bn2
    assert isinstance(slot, ModalityBN)
    torch.testing.assert_close(slot.visible.running_var, ref.layer3[0].bn2.running_var)
    torch.testing.assert_close(slot.infrared.running_var, ref.layer3[0].bn2.running_var)
    downsample = split50.backbone.layer2[0].downsample.bn
    torch.testing.assert_close(downsample.infrared.weight, ref.layer2[0].downsample[1].weight)


def test_imagenet_fc_reported_dropped(
    imagenet50: tuple[Path, RefResNet50], split50: CMNASNet, caplog: pytest.LogCaptureFixture
) -> None:
    """The ImageNet classifier fc is not loaded: the load report lists it as dropped."""
    path, _ = imagenet50
    head_before = split50.classifier.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="model.weights"):
        report = load_imagenet(split50, str(path))
    assert sorted(report.dropped) == ["fc.bias", "fc.weight"]
    assert "dropped 2 unused" in report.describe()
    assert any("fc.weight" in record.getMessage() for record in caplog.records)
    # The head keeps its own initialisation (10 classes, not ImageNet's 1000).
    assert torch.equal(split50.classifier.weight, head_before)
    # Every backbone tensor was set: 53 slots x 2 branches x 5 tensors + 53 convs.
    assert report.mapped == 53 * 2 * 5 + 53


# --------------------------------------------------------------------------------------------
# Modality routing and isolation
# --------------------------------------------------------------------------------------------
def bn_snapshot(model: CMNASNet) -> dict[str, torch.Tensor]:
    """Copies of every BN buffer of the backbone, by state-dict key."""
    return {
        key: value.detach().clone()
        for key, value in model.backbone.state_dict().items()
        if key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }


def branch_of(key: str) -> str:
    """The branch (visible/infrared/shared) a backbone state-dict key belongs to."""
    return key.split(".")[-2]


@pytest.fixture
def split18() -> CMNASNet:
    """A small all-split ResNet-18 with distinct random BN values per branch."""
    torch.manual_seed(18)
    model = build_model(Arch.uniform(18, SPLIT), 5)
    randomize_(model.backbone, torch.Generator().manual_seed(180))
    return model


@pytest.mark.parametrize(
    "seen,modality",
    [
        ("visible", "visible"),
        ("visible", torch.zeros(4, dtype=torch.long)),
        ("infrared", "infrared"),
        ("infrared", torch.ones(4, dtype=torch.long)),
    ],
    ids=["visible-name", "visible-tensor", "infrared-name", "infrared-tensor"],
)
def test_single_modality_batch_leaves_other_branch_untouched(
    split18: CMNASNet, seen: str, modality: str | torch.Tensor
) -> None:
    """Training on one modality updates only that modality's BNs, never the other's."""
    split18.train()
    before = bn_snapshot(split18)
    with torch.no_grad():
        split18(images(4, seed=6), modality)
    after = bn_snapshot(split18)
    other = "infrared" if seen == "visible" else "visible"
    counted = {seen: 0, other: 0}
    for key, old in before.items():
        branch = branch_of(key)
        counted[branch] += 1
        if branch == other:
            assert torch.equal(after[key], old), f"{key} changed by a {seen}-only batch"
        elif key.endswith("num_batches_tracked"):
            assert int(after[key]) == int(old) + 1, key
        else:
            assert not torch.equal(after[key], old), f"{key} not updated by a {seen} batch"
    assert counted == {seen: 20 * 3, other: 20 * 3}


def test_mixed_batch_is_routed_per_sample(split18: CMNASNet) -> None:
    """In eval mode each sample of an arbitrarily ordered batch gets its own modality's output."""
    split18.eval()
    x = images(6, seed=7)
    codes = torch.tensor([1, 0, 0, 1, 0, 1])
    with torch.no_grad():
        pool, feat = split18(x, codes)
        for i, code in enumerate(codes.tolist()):
            name = "visible" if code == 0 else "infrared"
            alone_pool, alone_feat = split18(x[i : i + 1], name)
            assert_features_close(pool[i : i + 1], alone_pool)
            assert_features_close(feat[i : i + 1], alone_feat)
        # Sharpness: the two modalities really give different outputs for the same image.
        assert not torch.allclose(split18(x[:1], "visible")[0], split18(x[:1], "infrared")[0])


def test_halves_and_index_layouts_agree(split18: CMNASNet) -> None:
    """[v, v, v, i, i, i] (halves) and a shuffled order (index) give the same per-sample results.

    In training mode too: each BN normalises exactly its modality's samples, so the outputs
    and the updated running statistics match.
    """
    x = images(6, seed=8)
    halves = torch.tensor([0, 0, 0, 1, 1, 1])
    assert Routing.of(halves, 6).halves == 3
    order = torch.tensor([3, 0, 4, 1, 5, 2])  # i v i v i v
    shuffled = halves[order]
    routing = Routing.of(shuffled, 6)
    assert routing.halves is None and routing.visible_index is not None
    assert torch.equal(routing.visible_index, torch.nonzero(shuffled == 0).flatten())
    assert torch.equal(routing.infrared_index, torch.nonzero(shuffled == 1).flatten())

    split18.eval()
    with torch.no_grad():
        pool_h = split18(x, halves)[0]
        pool_s = split18(x[order], shuffled)[0]
    torch.testing.assert_close(pool_s, pool_h[order], rtol=1e-5, atol=1e-5)

    state = {k: v.clone() for k, v in split18.state_dict().items()}
    split18.train()
    with torch.no_grad():
        pool_h = split18(x, halves)[0]
        stats_h = bn_snapshot(split18)
        split18.load_state_dict(state)
        pool_s = split18(x[order], shuffled)[0]
        stats_s = bn_snapshot(split18)
    torch.testing.assert_close(pool_s, pool_h[order], rtol=1e-4, atol=1e-5)
    for key, value in stats_h.items():
        torch.testing.assert_close(stats_s[key], value, rtol=1e-4, atol=1e-6)


def test_mixed_training_batch_normalises_each_modality_alone(split18: CMNASNet) -> None:
    """Training mode: in a mixed batch the visible samples see only visible batch statistics."""
    x = images(6, seed=9)
    codes = torch.tensor([1, 0, 0, 1, 0, 1])
    visible = codes == 0
    state = {k: v.clone() for k, v in split18.state_dict().items()}
    split18.train()
    with torch.no_grad():
        mixed = split18(x, codes)[0]
        mixed_stats = bn_snapshot(split18)
        split18.load_state_dict(state)
        alone = split18(x[visible], "visible")[0]
        alone_stats = bn_snapshot(split18)
    torch.testing.assert_close(mixed[visible], alone, rtol=1e-4, atol=1e-5)
    for key, value in alone_stats.items():
        if branch_of(key) == "visible":
            torch.testing.assert_close(mixed_stats[key], value, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Outputs, strides, head
# --------------------------------------------------------------------------------------------
def test_train_and_eval_outputs() -> None:
    """Training returns (pool, bnneck, logits); eval returns (pool, bnneck)."""
    torch.manual_seed(3)
    model = build_model(Arch.uniform(18, SHARED), 7)
    x = images(3, seed=10)
    model.train()
    out = model(x, "visible")
    assert isinstance(out, tuple) and len(out) == 3
    pool, feat, logits = out
    assert pool.shape == (3, 512) and feat.shape == (3, 512) and logits.shape == (3, 7)
    assert logits.requires_grad
    torch.testing.assert_close(logits, feat @ model.classifier.weight.t())
    model.eval()
    with torch.no_grad():
        out = model(x, "infrared")
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == (3, 512) and out[1].shape == (3, 512)
    # bnneck = BatchNorm1d(pool) with running stats in eval.
    bn = model.bnneck
    expected = (out[0] - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight
    torch.testing.assert_close(out[1], expected + bn.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("last_stride,size", [(1, (16, 8)), (2, (8, 4))])
def test_last_stride_sets_feature_map_size(last_stride: int, size: tuple[int, int]) -> None:
    """A 256x128 image gives a 16x8 map at last stride 1 and 8x4 at last stride 2."""
    model = build_model(Arch.uniform(18, SPLIT), 3, last_stride=last_stride).eval()
    with torch.no_grad():
        fmap = model.backbone(torch.zeros(1, 3, 256, 128), Routing.of("visible", 1))
    assert tuple(fmap.shape) == (1, 512, *size)
    assert model.backbone.layer4[0].conv1.stride == (last_stride, last_stride)


def test_bnneck_and_classifier_init(shared50: CMNASNet) -> None:
    """BNNeck: weight ~ N(1, 0.01), bias 0 and frozen; classifier: no bias, weight ~ N(0, 1e-3)."""
    bn = shared50.bnneck
    assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == 2048
    assert torch.count_nonzero(bn.bias) == 0
    assert bn.bias.requires_grad is False
    assert bn.weight.requires_grad is True
    weight = bn.weight.detach()
    assert abs(float(weight.mean()) - 1.0) < 0.002
    assert 0.008 < float(weight.std()) < 0.012
    classifier = shared50.classifier
    assert isinstance(classifier, nn.Linear)
    assert classifier.bias is None
    assert tuple(classifier.weight.shape) == (10, 2048)
    w = classifier.weight.detach()
    assert abs(float(w.mean())) < 5e-5
    assert 0.00095 < float(w.std()) < 0.00105
    # The frozen bias stays zero through an optimiser step.
    model = build_model(Arch.uniform(18, SHARED), 4).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    _, _, logits = model(images(2, seed=11), "visible")
    logits.sum().backward()
    optimizer.step()
    assert torch.count_nonzero(model.bnneck.bias) == 0


def count_bn2d(model: nn.Module) -> int:
    return sum(isinstance(module, nn.BatchNorm2d) for module in model.modules())


def test_bn_module_counts(shared50: CMNASNet, split50: CMNASNet) -> None:
    """Shared slots build one BatchNorm2d, split slots exactly two (53 vs 106 for ResNet-50)."""
    assert count_bn2d(shared50) == 53
    assert count_bn2d(split50) == 106
    for slot in find_slots(shared50).values():
        assert list(slot.branches()) == ["shared"]
    for slot in find_slots(split50).values():
        assert sorted(slot.branches()) == ["infrared", "visible"]


def test_mixed_architecture_builds_what_it_says() -> None:
    """A two-stream arch builds two BNs for each split slot and one for each shared slot."""
    from model import load_arch

    arch = load_arch(ROOT / "configs" / "resnet18_two_stream.json")
    model = build_model(arch, 3)
    slots = find_slots(model)
    assert set(slots) == set(arch.slots)
    for name, choice in arch.slots.items():
        expected = ["infrared", "visible"] if choice == SPLIT else ["shared"]
        assert sorted(slots[name].branches()) == expected, name
    assert count_bn2d(model) == 20 + len(arch.split_slots())


@pytest.mark.parametrize("depth,count", [(50, 53), (34, 36), (18, 20)])
def test_slot_names_match_built_model(
    depth: int, count: int, shared50: CMNASNet, split50: CMNASNet
) -> None:
    """slot_names has 53/36/20 names, exactly the norm slots the built model has."""
    names = slot_names(depth)
    assert len(names) == count
    models = [shared50, split50] if depth == 50 else [build_model(Arch.uniform(depth, SPLIT), 2)]
    for model in models:
        assert sorted(find_slots(model)) == sorted(names)
        assert len(find_slots(model)) == count
        # One finder for every caller, in the canonical (.cfg) order, from model or backbone.
        assert list(find_slots(model)) == names == list(find_slots(model.backbone))
