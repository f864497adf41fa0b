"""Checkpoint I/O: the authors' checkpoints, ours, ImageNet files, mismatches and safe loading."""

from __future__ import annotations

import os
import pickle
import urllib.error
from pathlib import Path

import pytest
import torch

from model import SHARED, SPLIT, Arch, CMNASNet, build_model, load_arch, load_checkpoint
from model.arch import RESNET_LAYOUT
from model.checkpoint import read_checkpoint, safe_load
from utils.base.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TWO_STREAM_18 = ROOT / "configs" / "resnet18_two_stream.json"
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------------------------
# Key layouts of torchvision-style basic-block ResNets (18 and 34), as the authors' files hold them
# --------------------------------------------------------------------------------------------
def basic_resnet_layout(depth: int) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Conv weight shapes and BN widths of a basic-block ResNet, keyed by module path."""
    convs: dict[str, tuple[int, ...]] = {"conv1": (64, 3, 7, 7)}
    bns: dict[str, int] = {"bn1": 64}
    inplanes = 64
    for stage, count in enumerate(RESNET_LAYOUT[depth][1], start=1):
        planes = 64 * 2 ** (stage - 1)
        for block in range(count):
            prefix = f"layer{stage}.{block}"
            convs[f"{prefix}.conv1"] = (planes, inplanes, 3, 3)
            bns[f"{prefix}.bn1"] = planes
            convs[f"{prefix}.conv2"] = (planes, planes, 3, 3)
            bns[f"{prefix}.bn2"] = planes
            if block == 0 and stage > 1:
                convs[f"{prefix}.downsample.conv"] = (planes, inplanes, 1, 1)
                bns[f"{prefix}.downsample.bn"] = planes
            inplanes = planes
    return convs, bns


def random_bn(width: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random BN parameters and statistics (distinct on every call)."""
    return {
        "weight": 0.5 + torch.rand(width, generator=gen),
        "bias": 0.2 * torch.randn(width, generator=gen),
        "running_mean": 0.2 * torch.randn(width, generator=gen),
        "running_var": 0.5 + torch.rand(width, generator=gen),
        "num_batches_tracked": torch.randint(1, 10**6, (), generator=gen),
    }


def random_conv(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    fan_in = shape[1] * shape[2] * shape[3]
    return torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5


def authors_checkpoint(
    arch: Arch, num_classes: int, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A state dict in the authors' layout and the same weights in this project's layout.

    Authors: ``module.`` prefix, three BNs per slot (visible_bn / thermal_bn / sharable_bn, all
    different), ``downsample.conv`` / ``downsample.bn``, head ``module.bnneck.*`` and
    ``module.classifier.weight``. Ours: ``backbone.<slot>.visible|infrared`` for split slots,
    ``backbone.<slot>.shared`` for shared ones, the same head without the prefix.
    """
    gen = torch.Generator().manual_seed(seed)
    convs, bns = basic_resnet_layout(arch.depth)
    assert sorted(bns) == sorted(arch.slots)
    theirs: dict[str, torch.Tensor] = {}
    ours: dict[str, torch.Tensor] = {}
    for name, shape in convs.items():
        weight = random_conv(shape, gen)
        theirs[f"module.backbone.{name}.weight"] = weight
        ours[f"backbone.{name}.weight"] = weight
    for slot, width in bns.items():
        branches = {which: random_bn(width, gen) for which in ("visible", "thermal", "sharable")}
        for which, tensors in branches.items():
            for tensor, value in tensors.items():
                theirs[f"module.backbone.{slot}.{which}_bn.{tensor}"] = value
        used = (
            {"visible": "visible", "infrared": "thermal"}
            if arch.slots[slot] == SPLIT
            else {"shared": "sharable"}
        )
        for branch, which in used.items():
            for tensor, value in branches[which].items():
                ours[f"backbone.{slot}.{branch}.{tensor}"] = value
    for tensor, value in random_bn(512, gen).items():
        theirs[f"module.bnneck.{tensor}"] = value
        ours[f"bnneck.{tensor}"] = value
    ours["bnneck.bias"] = theirs["module.bnneck.bias"] = torch.zeros(512)
    classifier = 0.01 * torch.randn(num_classes, 512, generator=gen)
    theirs["module.classifier.weight"] = ours["classifier.weight"] = classifier
    return theirs, ours


def torchvision_state(depth: int, seed: int, batches_tracked: bool = True) -> dict:
    """Random weights in torchvision's ResNet layout (``downsample.0/1``, ``fc``)."""
    gen = torch.Generator().manual_seed(seed)
    convs, bns = basic_resnet_layout(depth)
    state: dict[str, torch.Tensor] = {}
    for name, shape in convs.items():
        state[name.replace("downsample.conv", "downsample.0") + ".weight"] = random_conv(shape, gen)
    for name, width in bns.items():
        for tensor, value in random_bn(width, gen).items():
            if tensor != "num_batches_tracked" or batches_tracked:
                state[f"{name.replace('downsample.bn', 'downsample.1')}.{tensor}"] = value
    state["fc.weight"] = torch.randn(1000, 512, generator=gen)
    state["fc.bias"] = torch.randn(1000, generator=gen)
    return state


def save_authors(path: Path, model: dict, ema: dict | None = None) -> Path:
    """Write a checkpoint dict the way the authors' training script does."""
    torch.save({"epoch": 120, "model": model, "ema": ema, "optimizer": {"state": {}}}, path)
    return path


def save_ours(path: Path, model: dict) -> Path:
    torch.save({"format": "cmnas-checkpoint", "model": model}, path)
    return path


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 32, generator=torch.Generator().manual_seed(seed))


def outputs(model: CMNASNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Eval-mode pool and bnneck features for visible, infrared and a mixed batch."""
    model.eval()
    mixed = torch.tensor([1, 0] * (x.shape[0] // 2))
    with torch.no_grad():
        return [t for modality in ("visible", "infrared", mixed) for t in model(x, modality)]


@pytest.fixture(scope="module")
def two_stream18() -> Arch:
    arch = load_arch(TWO_STREAM_18)
    assert SPLIT in arch.slots.values() and SHARED in arch.slots.values()
    return arch


# --------------------------------------------------------------------------------------------
# The authors' checkpoints
# --------------------------------------------------------------------------------------------
def test_authors_checkpoint_equals_own_format(tmp_path: Path, two_stream18: Arch) -> None:
    """The authors' file and the same weights in our format load to identical models/outputs."""
    theirs, ours = authors_checkpoint(two_stream18, 6, seed=1)
    authors_path = save_authors(tmp_path / "checkpoint119.pth.tar", theirs)
    ours_path = save_ours(tmp_path / "ours.pth", ours)
    a = build_model(two_stream18, 6)
    b = build_model(two_stream18, 6)
    report_a = load_checkpoint(a, authors_path)
    report_b = load_checkpoint(b, ours_path)
    assert report_a.layout == "authors'" and report_b.layout == "cmnas"
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == ours.keys() == state_b.keys()
    for key, value in ours.items():
        assert torch.equal(state_a[key], value), key
        assert torch.equal(state_b[key], value), key
    x = images(4, seed=2)
    for out_a, out_b in zip(outputs(a, x), outputs(b, x), strict=True):
        assert torch.equal(out_a, out_b)
    # Sharpness: visible and infrared inputs go through different stem/layer1 BNs.
    visible, _, infrared, _, _, _ = outputs(a, x)
    assert not torch.allclose(visible, infrared)


def test_authors_branches_map_to_slots(tmp_path: Path, two_stream18: Arch) -> None:
    """Split slots take visible_bn/thermal_bn, shared slots sharable_bn; the rest is dropped."""
    theirs, _ = authors_checkpoint(two_stream18, 6, seed=3)
    path = save_authors(tmp_path / "checkpoint.pth.tar", theirs)
    model = build_model(two_stream18, 6)
    report = load_checkpoint(model, path)
    backbone = model.backbone
    assert two_stream18.slots["bn1"] == SPLIT
    assert two_stream18.slots["layer1.1.bn2"] == SPLIT
    assert two_stream18.slots["layer3.0.downsample.bn"] == SHARED
    key = "module.backbone.{}.{}_bn.{}"
    assert torch.equal(
        backbone.bn1.visible.running_mean, theirs[key.format("bn1", "visible", "running_mean")]
    )
    assert torch.equal(
        backbone.bn1.infrared.running_mean, theirs[key.format("bn1", "thermal", "running_mean")]
    )
    assert torch.equal(
        backbone.layer1[1].bn2.infrared.weight,
        theirs[key.format("layer1.1.bn2", "thermal", "weight")],
    )
    shared = backbone.layer3[0].downsample.bn.shared
    slot = "layer3.0.downsample.bn"
    assert torch.equal(shared.running_mean, theirs[key.format(slot, "sharable", "running_mean")])
    assert torch.equal(shared.running_var, theirs[key.format(slot, "sharable", "running_var")])
    assert int(shared.num_batches_tracked) == int(
        theirs[key.format(slot, "sharable", "num_batches_tracked")]
    )
    # The three branches really differ, so the checks above pick the right one.
    for which in ("visible", "thermal"):
        assert not torch.equal(
            theirs[key.format(slot, which, "running_mean")],
            theirs[key.format(slot, "sharable", "running_mean")],
        )
    # The report lists exactly the unused branches.
    expected = set()
    for name, choice in two_stream18.slots.items():
        unused = ("sharable",) if choice == SPLIT else ("visible", "thermal")
        expected |= {key.format(name, which, t) for which in unused for t in BN_TENSORS}
    assert set(report.dropped) == expected
    assert len(report.dropped) == len(expected)
    assert report.mapped == len(model.state_dict())
    assert "dropped" in report.describe()


def test_ema_weights(tmp_path: Path, two_stream18: Arch) -> None:
    """ema=True loads the checkpoint's 'ema' entry; without one it fails clearly."""
    live, _ = authors_checkpoint(two_stream18, 6, seed=4)
    ema, ema_ours = authors_checkpoint(two_stream18, 6, seed=5)
    path = save_authors(tmp_path / "with_ema.pth.tar", live, ema)
    model = build_model(two_stream18, 6)
    load_checkpoint(model, path, ema=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema_ours[key]), key
    load_checkpoint(model, path)
    assert torch.equal(model.classifier.weight, live["module.classifier.weight"])
    no_ema = save_authors(tmp_path / "no_ema.pth.tar", live, None)
    with pytest.raises(UserError, match="EMA") as info:
        load_checkpoint(model, no_ema, ema=True)
    assert str(no_ema) in str(info.value)


# --------------------------------------------------------------------------------------------
# Mismatches
# --------------------------------------------------------------------------------------------
def test_wrong_class_count_names_classifier(tmp_path: Path, two_stream18: Arch) -> None:
    """A checkpoint for another class count is refused, naming the classifier and both shapes."""
    theirs, ours = authors_checkpoint(two_stream18, 6, seed=6)
    model = build_model(two_stream18, 9)
    for path in (save_authors(tmp_path / "a.pth", theirs), save_ours(tmp_path / "o.pth", ours)):
        with pytest.raises(UserError, match="shape mismatch") as info:
            load_checkpoint(model, path)
        message = str(info.value)
        assert "classifier.weight" in message and "(6, 512)" in message and "(9, 512)" in message
        assert str(path) in message


def test_shallower_checkpoint_names_missing_slots(tmp_path: Path) -> None:
    """A ResNet-18 checkpoint does not fit a ResNet-34: the missing blocks are named."""
    arch18, arch34 = Arch.uniform(18, SPLIT), Arch.uniform(34, SPLIT)
    theirs, ours = authors_checkpoint(arch18, 4, seed=7)
    model = build_model(arch34, 4)
    for path in (save_authors(tmp_path / "a.pth", theirs), save_ours(tmp_path / "o.pth", ours)):
        with pytest.raises(UserError, match="missing weights") as info:
            load_checkpoint(model, path)
        assert "layer1.2" in str(info.value)
        assert str(path) in str(info.value)


def test_split_checkpoint_into_shared_model(tmp_path: Path) -> None:
    """Our all-split checkpoint cannot load into an all-shared model: the slots are named."""
    _, ours = authors_checkpoint(Arch.uniform(18, SPLIT), 4, seed=8)
    path = save_ours(tmp_path / "split.pth", ours)
    model = build_model(Arch.uniform(18, SHARED), 4)
    before = model.backbone.bn1.shared.running_mean.clone()
    with pytest.raises(UserError, match="missing weights for 20 part") as info:
        load_checkpoint(model, path)
    assert "backbone.bn1" in str(info.value)
    assert torch.equal(model.backbone.bn1.shared.running_mean, before)


@pytest.mark.parametrize("layout", ["ours", "authors"])
def test_deeper_checkpoint_is_refused(tmp_path: Path, layout: str) -> None:
    """A ResNet-34 checkpoint must not load into a ResNet-18 model (extra blocks ignored)."""
    theirs, ours = authors_checkpoint(Arch.uniform(34, SPLIT), 4, seed=9)
    path = (
        save_ours(tmp_path / "o.pth", ours)
        if layout == "ours"
        else save_authors(tmp_path / "a.pth", theirs)
    )
    model = build_model(Arch.uniform(18, SPLIT), 4)
    with pytest.raises(UserError, match="layer1.2"):
        load_checkpoint(model, path)


def test_not_a_training_checkpoint(tmp_path: Path) -> None:
    """A bare state dict is not a training checkpoint: refused, saying what was expected."""
    path = tmp_path / "bare.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="expected a dict with a 'model' state dict") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------
MARKER_NAME = "pwned"


class Exploit:
    """Unpickling this would run a shell command creating a marker file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.directory / MARKER_NAME}",))


class Plain:
    """An ordinary Python object: not a weight, so refused too."""

    def __init__(self) -> None:
        self.value = 3


@pytest.fixture
def good_checkpoint(tmp_path: Path, two_stream18: Arch) -> Path:
    _, ours = authors_checkpoint(two_stream18, 6, seed=10)
    return save_ours(tmp_path / "good.pth", ours)


def test_truncated_checkpoint_refused(tmp_path: Path, good_checkpoint: Path) -> None:
    """Half a checkpoint (zip or legacy format) is refused as truncated/corrupt."""
    data = good_checkpoint.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    model = build_model(load_arch(TWO_STREAM_18), 6)
    with pytest.raises(UserError, match="truncated/corrupt") as info:
        load_checkpoint(model, cut)
    assert str(cut) in str(info.value)
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {"x": torch.randn(500)}}, legacy, _use_new_zipfile_serialization=False)
    data = legacy.read_bytes()
    legacy.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated/corrupt"):
        safe_load(legacy)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        safe_load(empty)


@pytest.mark.parametrize(
    "text", ["hello world\n", "this is not a checkpoint\n", "model weights\n"], ids=["h", "t", "m"]
)
def test_text_file_refused_as_not_a_checkpoint(tmp_path: Path, text: str) -> None:
    """A text file is refused with UserError saying it is not a checkpoint (no traceback)."""
    path = tmp_path / "notes.txt"
    path.write_text(text)
    with pytest.raises(UserError, match="not a PyTorch checkpoint") as info:
        safe_load(path)
    assert str(path) in str(info.value)
    assert "pickled" not in str(info.value)


def test_text_file_never_loads(tmp_path: Path) -> None:
    """Whatever the message, a text file never loads as a checkpoint."""
    path = tmp_path / "notes.txt"
    path.write_text("model weights\n")
    with pytest.raises(UserError):
        read_checkpoint(path)


def test_missing_checkpoint(tmp_path: Path) -> None:
    """A missing file is named in a UserError."""
    path = tmp_path / "nope" / "checkpoint.pth"
    model = build_model(Arch.uniform(18, SHARED), 2)
    with pytest.raises(UserError, match="not found") as info:
        load_checkpoint(model, path)
    assert str(path) in str(info.value)
    with pytest.raises(UserError, match="not found"):
        build_model(Arch.uniform(18, SHARED), 2, pretrained=str(path))


@pytest.mark.parametrize("how", ["torch.save", "pickle", "plain-object"])
def test_pickled_objects_refused_and_never_run(tmp_path: Path, how: str) -> None:
    """A file carrying arbitrary pickled objects is refused as unsafe, and no code runs."""
    path = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save({"epoch": 1, "model": {"x": Exploit(tmp_path)}}, path)
    elif how == "pickle":
        path.write_bytes(pickle.dumps({"model": Exploit(tmp_path)}, protocol=2))
    else:
        torch.save({"model": {"conv1.weight": torch.zeros(1)}, "extra": Plain()}, path)
    model = build_model(Arch.uniform(18, SHARED), 2)
    with pytest.raises(UserError, match="refused") as info:
        load_checkpoint(model, path)
    message = str(info.value)
    assert str(path) in message
    assert "could run code" in message or "unsafe" in message
    with pytest.raises(UserError, match="refused"):
        build_model(Arch.uniform(18, SHARED), 2, pretrained=str(path))
    assert not (tmp_path / MARKER_NAME).exists()


# --------------------------------------------------------------------------------------------
# ImageNet initialisation
# --------------------------------------------------------------------------------------------
def check_imagenet_loaded(model: CMNASNet, state: dict[str, torch.Tensor]) -> None:
    """Every conv and every branch of every slot holds the ImageNet tensors."""
    backbone = model.backbone
    assert torch.equal(backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(
        backbone.layer2[0].downsample.conv.weight, state["layer2.0.downsample.0.weight"]
    )
    for branch in backbone.bn1.branches().values():
        assert torch.equal(branch.running_var, state["bn1.running_var"])
        assert torch.equal(branch.weight, state["bn1.weight"])
    for branch in backbone.layer4[0].downsample.bn.branches().values():
        assert torch.equal(branch.running_mean, state["layer4.0.downsample.1.running_mean"])


def test_pretrained_path_loads(tmp_path: Path) -> None:
    """pretrained=<path> initialises both branches from a torchvision-layout file."""
    state = torchvision_state(18, seed=11)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = build_model(Arch.uniform(18, SPLIT), 3, pretrained=str(path))
    check_imagenet_loaded(model, state)
    assert tuple(model.classifier.weight.shape) == (3, 512)


def test_pretrained_without_num_batches_tracked(tmp_path: Path) -> None:
    """An ImageNet file without num_batches_tracked (the old torchvision files) still loads."""
    state = torchvision_state(18, seed=12, batches_tracked=False)
    assert not any(key.endswith("num_batches_tracked") for key in state)
    path = tmp_path / "old.pth"
    torch.save(state, path)
    model = build_model(Arch.uniform(18, SPLIT), 3, pretrained=str(path))
    check_imagenet_loaded(model, state)


IMAGENET18 = "resnet18-f37072fd.pth"


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """Point torch's hub dir at an empty tmp dir; any download attempt is recorded and fails."""
    hub = tmp_path / "hub"
    calls: list[str] = []

    def no_network(url: str, dst: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return hub, calls


def test_imagenet_offline_names_the_file_to_place(offline_hub: tuple[Path, list[str]]) -> None:
    """With no network, 'imagenet' fails with a UserError naming where to put the file."""
    hub, calls = offline_hub
    with pytest.raises(UserError) as info:
        build_model(Arch.uniform(18, SHARED), 2, pretrained="imagenet")
    message = str(info.value)
    assert str(hub / "checkpoints" / IMAGENET18) in message
    assert f"https://download.pytorch.org/models/{IMAGENET18}" in message
    assert calls == [f"https://download.pytorch.org/models/{IMAGENET18}"]
    assert not list(hub.rglob("*.part"))


def test_imagenet_from_cache_never_downloads(offline_hub: tuple[Path, list[str]]) -> None:
    """With the file placed in the hub cache, 'imagenet' loads it without any download."""
    hub, calls = offline_hub
    state = torchvision_state(18, seed=13)
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(state, hub / "checkpoints" / IMAGENET18)
    model = build_model(Arch.uniform(18, SPLIT), 2, pretrained="imagenet")
    check_imagenet_loaded(model, state)
    assert calls == []


def test_imagenet_download_into_fresh_hub_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """First use on a fresh machine: the download lands in <hub>/checkpoints and loads."""
    hub = tmp_path / "hub"
    state = torchvision_state(18, seed=14)

    def fake_download(url: str, dst: str, *args: object, **kwargs: object) -> None:
        # Like torch.hub.download_url_to_file: write a temporary file next to dst, then move.
        partial = dst + ".123.partial"
        with open(partial, "w+b") as handle:
            torch.save(state, handle)
        os.replace(partial, dst)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = build_model(Arch.uniform(18, SPLIT), 2, pretrained="imagenet")
    check_imagenet_loaded(model, state)
    assert (hub / "checkpoints" / IMAGENET18).is_file()


def test_flipped_bytes_are_found_by_the_checksum(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint of ours whose tensor bytes changed on disk is refused, naming the file."""
    from model.checkpoint import write_checkpoint

    marked = torch.arange(4096, dtype=torch.float32) + 0.5
    state = {"format": "cmnas-checkpoint", "model": {"w": marked, "b": torch.zeros(3)}}
    path = tmp_path / "ours.pth"
    write_checkpoint(state, path)
    assert read_checkpoint(path)["model"]["w"].equal(marked)  # intact: loads
    data = bytearray(path.read_bytes())
    where = data.find(marked.numpy().tobytes())
    assert where > 0
    data[where + 5000] ^= 0x10  # one bit, in the middle of the tensor
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    with pytest.raises(UserError) as info:
        read_checkpoint(damaged)
    message = str(info.value)
    assert (
        message.startswith(f"{damaged}: corrupt checkpoint: 1 tensor(s) differ")
        and "model.w" in message
    )
    # Files without checksums (earlier versions, the authors') load as before, silently.
    old = tmp_path / "old.pth"
    torch.save(state, old)
    with caplog.at_level("WARNING"):
        assert read_checkpoint(old)["model"]["w"].equal(marked)
    assert not caplog.records
