"""Export: each modality's plain ResNet and ONNX file give the CM-NAS network's features, folded
or not; an export is all or nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from model import SHARED, SPLIT, Arch, CMNASNet, build_model, slot_names
from model.checkpoint import checkpoint_header
from model.fold import folded_network
from model.restore import model_from_checkpoint
from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.base.io import MB
from utils.export import ModalityNetwork, check_onnx, main, plain_state, write_onnx
from utils.extract import input_contract

AUTHOR_BRANCH = {"visible": "visible_bn", "infrared": "thermal_bn", "shared": "sharable_bn"}


# --------------------------------------------------------------------------------------------
# A plain ResNet in torchvision's layout, written with torch.nn only
# --------------------------------------------------------------------------------------------
def norm(channels: int, folded: bool) -> nn.Module:
    return nn.Identity() if folded else nn.BatchNorm2d(channels)


class Basic(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, folded: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=folded)
        self.bn1 = norm(planes, folded)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=folded)
        self.bn2 = norm(planes, folded)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, folded: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=folded)
        self.bn1 = norm(planes, folded)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=folded)
        self.bn2 = norm(planes, folded)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=folded)
        self.bn3 = norm(planes * 4, folded)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class PlainResNet(nn.Module):
    """ResNet (torchvision names, no fc) -> global average pooling -> BNNeck."""

    def __init__(self, depth: int, last_stride: int = 1, folded: bool = False) -> None:
        super().__init__()
        block, counts = {18: (Basic, (2, 2, 2, 2)), 50: (Bottleneck, (3, 4, 6, 3))}[depth]
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=folded)
        self.bn1 = norm(64, folded)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for stage, (count, stride) in enumerate(
            zip(counts, (1, 2, 2, last_stride), strict=True), start=1
        ):
            planes = 64 * 2 ** (stage - 1)
            blocks = []
            for index in range(count):
                step = stride if index == 0 else 1
                unit = block(inplanes, planes, step, folded)
                unit.downsample = None
                if index == 0 and (step != 1 or inplanes != planes * block.expansion):
                    unit.downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes * block.expansion, 1, step, bias=folded),
                        norm(planes * block.expansion, folded),
                    )
                blocks.append(unit)
                inplanes = planes * block.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.bnneck = nn.BatchNorm1d(inplanes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for unit in stage:
                shortcut = x if unit.downsample is None else unit.downsample(x)
                x = torch.relu(unit.residual(x) + shortcut)
        pool = x.mean(dim=(2, 3))
        return pool, self.bnneck(pool)


# --------------------------------------------------------------------------------------------
# A CM-NAS network with some split slots and distinct, non-trivial BN statistics
# --------------------------------------------------------------------------------------------
def mixed_arch(depth: int) -> Arch:
    """Every third slot split (the stem among them), the rest shared."""
    names = slot_names(depth)
    return Arch(depth, {name: SPLIT if i % 3 == 0 else SHARED for i, name in enumerate(names)})


def random_network(depth: int, seed: int, last_stride: int = 1) -> CMNASNet:
    torch.manual_seed(seed)
    model = build_model(mixed_arch(depth), num_classes=7, last_stride=last_stride)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                width = module.num_features
                module.weight.copy_(0.5 + torch.rand(width, generator=gen))
                module.bias.copy_(0.2 * torch.randn(width, generator=gen))
                module.running_mean.copy_(0.3 * torch.randn(width, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(width, generator=gen))
                module.num_batches_tracked.fill_(int(torch.randint(1, 999, (), generator=gen)))
    return model.eval()


def features(model: nn.Module, x: torch.Tensor, *modality: str) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return tuple(model.eval()(x, *modality))


def assert_close(got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...], tol: float):
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= tol, float((a - b).abs().max())


def plain_from(state: dict[str, torch.Tensor], depth: int, folded: bool, last_stride: int = 1):
    net = PlainResNet(depth, last_stride, folded)
    net.load_state_dict(state, strict=True)
    return net.eval()


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """Tiny convolutions run faster on one thread of the shared CPU."""


@pytest.fixture(scope="module")
def net18() -> CMNASNet:
    return random_network(18, seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(("folded", "tol"), [(False, 1e-5), (True, 1e-4)])
def test_plain_network_matches_each_modality(net18, images, folded: bool, tol: float) -> None:
    exported = {}
    for modality in ("visible", "infrared"):
        state = plain_state(net18, modality, fold_bn=folded)
        assert not any(key.startswith(("fc.", "classifier.")) for key in state)
        exported[modality] = features(plain_from(state, 18, folded), images)
        assert_close(exported[modality], features(net18, images, modality), tol)
    # The split slots make the two exported networks (and modalities) differ.
    assert not torch.allclose(exported["visible"][0], exported["infrared"][0], atol=1e-3)


def test_state_layout(net18) -> None:
    state = plain_state(net18, "infrared")
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    for tensor in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert f"layer2.0.downsample.1.{tensor}" in state
        assert f"bnneck.{tensor}" in state
    # A split slot gives each modality its own BN; a shared one the same BN to both.
    stem = net18.backbone.bn1
    assert stem.choice == SPLIT
    assert torch.equal(state["bn1.running_mean"], stem.infrared.running_mean)
    shared = net18.backbone.layer1[0].bn1
    assert shared.choice == SHARED
    assert torch.equal(state["layer1.0.bn1.weight"], shared.shared.weight)
    folded = plain_state(net18, "infrared", fold_bn=True)
    assert "conv1.bias" in folded and "layer1.0.conv2.bias" in folded
    backbone = [key for key in folded if not key.startswith("bnneck.")]
    assert not any(k.startswith("bn") or ".bn" in k or "downsample.1" in k for k in backbone)
    assert {key for key in folded if key.startswith("bnneck.")} == {
        f"bnneck.{t}"
        for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }


def test_resnet50_last_stride_2() -> None:
    model = random_network(50, seed=3, last_stride=2)
    x = torch.randn(1, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    for folded, tol in ((False, 1e-5), (True, 1e-4)):
        state = plain_state(model, "visible", fold_bn=folded)
        net = plain_from(state, 50, folded, last_stride=2)
        expected = features(model, x, "visible")
        # Random BN statistics through 16 bottlenecks give features of magnitude ~100: the
        # tolerance is relative to the largest one (float32 round-off grows with the values).
        scale = max(1.0, max(float(t.abs().max()) for t in expected))
        assert_close(features(net, x), expected, tol * scale)


# --------------------------------------------------------------------------------------------
# The command line: this project's checkpoints, the authors', errors
# --------------------------------------------------------------------------------------------
def save_ours(path: Path, model: CMNASNet, ema: CMNASNet) -> Path:
    header = checkpoint_header(mixed_arch(18), model.num_classes, 1, {"dataset": "sysu"})
    torch.save({**header, "epoch": 1, "model": model.state_dict(), "ema": ema.state_dict()}, path)
    return path


def save_authors(path: Path, model: CMNASNet) -> Path:
    """``model``'s weights in the authors' layout: ``module.``, three BNs per slot."""
    gen = torch.Generator().manual_seed(9)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        branch = next((p for p in parts if p in AUTHOR_BRANCH), None)
        if branch is None:
            state[f"module.{key}"] = value
            continue
        at = parts.index(branch)
        state["module." + ".".join([*parts[:at], AUTHOR_BRANCH[branch], *parts[at + 1 :]])] = value
        # The branches a slot does not use are stored too, as dead weight.
        unused = ("shared",) if branch != "shared" else ("visible", "infrared")
        for other in unused:
            dead = torch.randn(value.shape, generator=gen) if value.is_floating_point() else value
            name = [*parts[:at], AUTHOR_BRANCH[other], *parts[at + 1 :]]
            state["module." + ".".join(name)] = dead
    torch.save({"epoch": 120, "model": state, "ema": None, "optimizer": {"state": {}}}, path)
    return path


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = run_cli(main, argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("folded", [False, True])
def test_cli_exports_our_checkpoint(tmp_path, net18, images, capsys, folded: bool) -> None:
    ema = random_network(18, seed=4)
    checkpoint = save_ours(tmp_path / "checkpoint.pth", net18, ema)
    out = tmp_path / "exported" / "deeper"
    argv = ["--weights", str(checkpoint), "--out", str(out), "--ema"]
    code, _ = run([*argv, *(["--fold_bn"] if folded else [])], capsys)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "infrared.pth", "visible.pth"]
    tol = 1e-4 if folded else 1e-5
    for modality in ("visible", "infrared"):
        state = torch.load(out / f"{modality}.pth", map_location="cpu", weights_only=True)
        got = features(plain_from(state, 18, folded), images)
        assert_close(got, features(ema, images, modality), tol)
    described = json.loads((out / "export.json").read_text())
    assert described["source"] == str(checkpoint)
    assert described["ema"] is True and described["fold_bn"] is folded
    assert (described["depth"], described["last_stride"], described["feature_dim"]) == (18, 1, 512)
    assert described["files"] == {"visible": "visible.pth", "infrared": "infrared.pth"}


def test_cli_exports_authors_checkpoint(tmp_path, net18, images, capsys) -> None:
    theirs = save_authors(tmp_path / "checkpoint119.pth.tar", net18)
    config = tmp_path / "config.cfg"
    config.write_text(mixed_arch(18).to_cfg() + "\n")
    out = tmp_path / "out"
    code, err = run(["--weights", str(theirs), "--out", str(out)], capsys)
    assert code == 2
    assert err.strip() == (
        f"error: --weights {theirs}: an authors' checkpoint needs --config_path (their config.cfg)"
    )
    assert not out.exists()
    code, _ = run(
        ["--weights", str(theirs), "--config_path", str(config), "--out", str(out)], capsys
    )
    assert code == 0
    state = torch.load(out / "infrared.pth", map_location="cpu", weights_only=True)
    assert_close(
        features(plain_from(state, 18, False), images), features(net18, images, "infrared"), 1e-5
    )
    assert json.loads((out / "export.json").read_text())["source_layout"] == "authors"


def test_model_from_checkpoint_checks_the_config(tmp_path, net18) -> None:
    checkpoint = save_ours(tmp_path / "c.pth", net18, net18)
    restored = model_from_checkpoint(checkpoint)
    assert restored.arch == mixed_arch(18) and restored.num_classes == 7 and not restored.authors
    other = tmp_path / "other.cfg"
    other.write_text(Arch.uniform(18, SHARED).to_cfg() + "\n")
    with pytest.raises(Exception, match="differs from the architecture stored"):
        model_from_checkpoint(checkpoint, config_path=other)


def test_cli_errors(tmp_path, net18, capsys, read_only_folder) -> None:
    missing = tmp_path / "missing.pth"
    code, err = run(["--weights", str(missing), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.strip() == f"error: {missing}: checkpoint file not found"
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    code, err = run(["--weights", str(garbage), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not a PyTorch checkpoint" in err and err.count("\n") == 1
    checkpoint = save_ours(tmp_path / "c.pth", net18, net18)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    code, err = run(["--weights", str(checkpoint), "--out", str(a_file)], capsys)
    assert code == 2 and err.strip() == f"error: --out {a_file}: is a file, expected a folder"
    locked = read_only_folder
    code, err = run(["--weights", str(checkpoint), "--out", str(locked / "x")], capsys)
    assert code == 2 and err.startswith(f"error: --out {locked / 'x'}: not writable")
    assert not (locked / "x").exists()
    code, err = run(["--weights", str(checkpoint), "--out", str(tmp_path / "o")], capsys)
    assert code == 0 and not err.startswith("error")


# --------------------------------------------------------------------------------------------
# ONNX: each file in onnxruntime gives the PyTorch features of its modality
# --------------------------------------------------------------------------------------------
def preprocess(pixels: list[np.ndarray], contract: dict) -> np.ndarray:
    """Images prepared as export.json's ``input`` says, written from its words alone."""
    height, width = contract["img_size"]
    assert contract["channel_order"] == "RGB" and contract["value_range"] == [0.0, 1.0]
    batch = []
    for image in pixels:
        rgb = Image.fromarray(image).convert("RGB").resize((width, height), Image.LANCZOS)
        scaled = np.asarray(rgb, dtype=np.float32) / 255.0
        batch.append((scaled - contract["mean"]) / contract["std"])
    return np.stack(batch).transpose(0, 3, 1, 2).astype(np.float32)


def onnx_features(path: Path, images: np.ndarray) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["pool", "bnneck"]
    return session.run(None, {"images": images})


def raw_images(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(80, 40, 3), (64, 32), (50, 30, 3)]
    return [rng.integers(0, 256, shapes[i % 3], dtype=np.uint8) for i in range(count)]


def assert_onnx_close(path: Path, network: CMNASNet, modality: str, contract: dict) -> None:
    images = preprocess(raw_images(3, seed=len(modality)), contract)
    got = onnx_features(path, images)
    expected = features(network, torch.from_numpy(images), modality)
    scale = max(1.0, max(float(t.abs().max()) for t in expected))
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.shape == tuple(theirs.shape)  # a batch of 3, exported with a batch of 2
        assert float(np.abs(ours - theirs.numpy()).max()) <= 1e-4 * scale


@pytest.mark.parametrize("folded", [False, True])
def test_cli_onnx_files_give_each_modality_features(tmp_path, net18, capsys, folded: bool) -> None:
    pytest.importorskip("onnxruntime")
    checkpoint = save_ours(tmp_path / "checkpoint.pth", random_network(18, seed=6), net18)
    out = tmp_path / "exported"
    argv = ["--weights", str(checkpoint), "--out", str(out), "--ema", "--onnx"]
    code, err = run([*argv, *(["--fold_bn"] if folded else [])], capsys)
    assert code == 0, err
    described = json.loads((out / "export.json").read_text())
    assert described["files"]["infrared_onnx"] == "infrared.onnx"
    assert described["onnx"]["fold_bn"] is folded and described["onnx"]["batch"] == "dynamic"
    contract = dict(described["input"])
    assert contract["img_size"] == [256, 128]  # the test checkpoint stores no size
    contract["img_size"] = [64, 32]  # tiny images: the network accepts any size
    for modality in ("visible", "infrared"):
        # The exported file takes the size it was exported at; rebuild a tiny one to compare.
        path = tmp_path / f"{modality}_small.onnx"
        network = folded_network(net18, modality) if folded else net18
        write_onnx(ModalityNetwork(network, modality), path, (64, 32))
        assert_onnx_close(path, net18, modality, contract)
    # The files written by the command: the checkpoint's size, its EMA weights.
    contract["img_size"] = described["input"]["img_size"]
    assert_onnx_close(out / "infrared.onnx", net18, "infrared", contract)


def test_onnx_resnet50_split_and_shared_folded_and_not(tmp_path) -> None:
    model = random_network(50, seed=8)
    contract = input_contract((64, 32))
    for modality, folded in (("visible", True), ("infrared", False)):
        path = tmp_path / f"{modality}.onnx"
        network = folded_network(model, modality) if folded else model
        write_onnx(ModalityNetwork(network, modality), path, (64, 32))
        assert_onnx_close(path, model, modality, contract)


def test_onnx_export_in_training_mode_is_caught(tmp_path, net18) -> None:
    """A wrapper left in training mode is put in eval mode; a wrong file is refused."""
    ort = pytest.importorskip("onnxruntime")
    wrapped = ModalityNetwork(net18, "visible").train()
    write_onnx(wrapped, tmp_path / "v.onnx", (64, 32))
    assert not wrapped.training
    assert check_onnx(ort, tmp_path / "v.onnx", wrapped, (64, 32), "c.pth") < 1e-4
    other = ModalityNetwork(net18, "infrared")
    with pytest.raises(UserError, match="^v.onnx: onnxruntime's features differ from PyTorch's"):
        check_onnx(ort, tmp_path / "v.onnx", other, (64, 32), "c.pth")


def test_onnx_without_its_packages(tmp_path, net18, capsys, monkeypatch, expect_error) -> None:
    checkpoint = save_ours(tmp_path / "c.pth", net18, net18)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    out = tmp_path / "out"
    code, err = run(["--weights", str(checkpoint), "--out", str(out), "--onnx"], capsys)
    line = expect_error(code, err)
    assert line == (
        "error: --onnx needs the package(s) onnxruntime: pip install onnx onnxruntime "
        "(the .pth export works without them)"
    )
    assert not out.exists()
    code, _ = run(["--weights", str(checkpoint), "--out", str(out)], capsys)
    assert code == 0


# --------------------------------------------------------------------------------------------
# All or nothing: a full disk, a failure between files, non-finite weights
# --------------------------------------------------------------------------------------------
def export_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failure_between_files_keeps_the_previous_export(
    tmp_path, net18, capsys, monkeypatch, expect_error
) -> None:
    checkpoint = save_ours(tmp_path / "c.pth", net18, net18)
    out = tmp_path / "exported"
    code, _ = run(["--weights", str(checkpoint), "--out", str(out), "--fold_bn"], capsys)
    assert code == 0
    before = export_bytes(out)
    save, real_usage, failed = torch.save, shutil.disk_usage, []

    def fails_the_second_time(obj, handle, *args, **kwargs) -> None:
        if failed or not str(handle).endswith("infrared.pth"):
            return save(obj, handle, *args, **kwargs)
        Path(handle).write_bytes(b"PK\x03\x04 part of a network")
        failed.append(handle)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    def full_once_failed(path):
        usage = real_usage(path)
        return usage._replace(free=4096) if failed else usage

    monkeypatch.setattr(torch, "save", fails_the_second_time)
    monkeypatch.setattr(shutil, "disk_usage", full_once_failed)
    code, err = run(["--weights", str(checkpoint), "--out", str(out)], capsys)
    line = expect_error(code, err, f"no space left on {tmp_path}, need about ")
    assert line.endswith(" MB (free some space and run again)") and "unexpected pos" not in err
    assert failed and export_bytes(out) == before
    assert json.loads((out / "export.json").read_text())["fold_bn"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth", "exported"]


@pytest.fixture
def small_filesystem(tmp_path) -> Iterator[Path]:
    """A real 48 MB file system (tmpfs), where the system lets the tests mount one."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a small file system here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_is_one_line_and_keeps_the_previous_export(
    small_filesystem, tmp_path, net18, capsys, expect_error
) -> None:
    checkpoint = save_ours(tmp_path / "c.pth", net18, net18)
    out = small_filesystem / "exported"
    out.mkdir()
    (out / "export.json").write_text('{"fold_bn": true}\n')
    (out / "visible.pth").write_bytes(b"an earlier export")
    filler = small_filesystem / "filler"
    filler.write_bytes(bytes(20 * MB))
    code, err = run(["--weights", str(checkpoint), "--out", str(out)], capsys)
    line = expect_error(code, err, f"no space left on {small_filesystem}, need about ")
    assert "unexpected pos" not in err and line.endswith("MB (free some space and run again)")
    assert (out / "visible.pth").read_bytes() == b"an earlier export"
    assert sorted(p.name for p in small_filesystem.iterdir()) == ["exported", "filler"]


def test_non_finite_weights_are_refused(tmp_path, capsys, expect_error) -> None:
    broken = random_network(18, seed=2)
    with torch.no_grad():
        broken.backbone.layer1[0].bn1.shared.running_var[3] = float("nan")
        broken.bnneck.weight[0] = float("inf")
    checkpoint = save_ours(tmp_path / "c.pth", broken, broken)
    out = tmp_path / "out"
    code, err = run(["--weights", str(checkpoint), "--out", str(out)], capsys)
    line = expect_error(code, err, f"{checkpoint}: 2 tensor(s) hold NaN or infinity")
    assert "backbone.layer1.0.bn1.shared.running_var" in line and "bnneck.weight" in line
    assert not out.exists()


def test_out_holding_other_files_is_refused(tmp_path, net18, capsys, expect_error) -> None:
    checkpoint = save_ours(tmp_path / "c.pth", net18, net18)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, err = run(["--weights", str(checkpoint), "--out", str(out)], capsys)
    expect_error(code, err, f"--out {out}: holds other files than an export (notes.txt)")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
