"""Damaged, edited and unusable checkpoints: each refused in one line naming the file and what.

A byte changed anywhere in the file (the pickled entries as well as the tensor data), weights
that are NaN or infinite or so large that the features overflow, a stored number that is not one,
and a run folder given for a checkpoint file.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from model import Arch, build_model, load_checkpoint, save_arch
from model.checkpoint import RUN_LATEST, damaged_tensors, read_checkpoint, stored_integer
from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.engine.checkpointer import LATEST

from checkpoint_files import authors_checkpoint, save_authors  # isort: skip

pytestmark = pytest.mark.usefixtures("one_thread")
DAMAGED_PICKLE = (
    "corrupt checkpoint: 1 record(s) of the file differ from the CRC-32 stored with them "
    "(data.pkl (every entry but the tensor data)); the file was damaged on disk or in a copy"
)


def set_pickled_int(data: bytes, key: str, value: int) -> bytes:
    """``data`` with the one-byte int stored under ``key`` in its pickled entries set to ``value``.

    Finds the key as pickle writes a short string (``X`` and a 4-byte length), an optional memo
    opcode, then ``K`` and the value's byte.
    """
    name = key.encode()
    pattern = re.compile(b"X" + len(name).to_bytes(4, "little") + name + rb"(?:q.|r.{4})?K", re.S)
    where = [match.end() for match in pattern.finditer(data)]
    assert len(where) == 1, (key, where)
    changed = bytearray(data)
    changed[where[0]] = value
    return bytes(changed)


@pytest.fixture
def refused(
    test_script: ModuleType,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
) -> Callable[..., str]:
    """``refused(argv, *message)``: assert test.py fails with one error line; return the line."""

    def run(argv: list[str], *message: str) -> str:
        code = run_cli(test_script.main, argv)
        captured = capsys.readouterr()
        assert not captured.out
        return expect_error(code, captured.err, *message)

    return run


def edited(run: Path, path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """The run's latest checkpoint, changed by ``edit`` and saved again at ``path``."""
    state = torch.load(run / LATEST, map_location="cpu", weights_only=True)
    edit(state)
    torch.save(state, path)
    return path


# ----- a changed byte anywhere fails ----------------------------------------------------------
@pytest.mark.parametrize(("key", "value"), [("last_stride", 2), ("epoch", 1)])
def test_changed_metadata_byte_fails_the_checksum(
    sysu_run: Path, tmp_path: Path, key: str, value: int
) -> None:
    """A stored number changed on disk (last stride, epoch) is refused, not silently used."""
    original = torch.load(sysu_run / LATEST, map_location="cpu", weights_only=True)
    assert original[key] != value
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(set_pickled_int((sysu_run / LATEST).read_bytes(), key, value))
    loaded = torch.load(damaged, map_location="cpu", weights_only=True)
    assert loaded[key] == value  # the changed byte is the stored value ...
    assert damaged_tensors(loaded) == []  # ... which the tensors' own checksums cannot see
    with pytest.raises(UserError) as info:
        read_checkpoint(damaged)
    assert str(info.value) == f"{damaged}: {DAMAGED_PICKLE}"


def test_changed_metadata_byte_refused_by_test_script(
    sysu_run: Path,
    toy_sysu: Path,
    tmp_path: Path,
    refused: Callable[..., str],
) -> None:
    """test.py scores nothing from a checkpoint whose stored last stride changed on disk."""
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(set_pickled_int((sysu_run / LATEST).read_bytes(), "last_stride", 2))
    argv = ["--data_root", str(toy_sysu), "--weights", str(damaged), "--trial", "0"]
    line = refused(argv)
    assert line == f"error: {damaged}: {DAMAGED_PICKLE}"


def test_changed_tensor_byte_of_a_file_without_our_checksums(tmp_path: Path) -> None:
    """A file without our tensor checksums (the authors') is still checked, record by record."""
    marked = torch.arange(4096, dtype=torch.float32) + 0.5
    path = tmp_path / "checkpoint119.pth.tar"
    torch.save({"epoch": 119, "model": {"w": marked}, "ema": None}, path)
    assert read_checkpoint(path)["model"]["w"].equal(marked)
    data = bytearray(path.read_bytes())
    data[data.find(marked.numpy().tobytes()) + 5000] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(UserError) as info:
        read_checkpoint(path)
    assert str(info.value) == (
        f"{path}: corrupt checkpoint: 1 record(s) of the file differ from the CRC-32 stored "
        "with them (data/0); the file was damaged on disk or in a copy"
    )


def test_changed_record_header_fails(tmp_path: Path) -> None:
    """A changed byte in a record's own header, which torch.load reads past, is refused too."""
    path = tmp_path / "ours.pth"
    torch.save({"epoch": 1, "model": {"w": torch.ones(10)}}, path)
    data = bytearray(path.read_bytes())
    data[data.find(b"ours/data.pkl") + 6] ^= 0x01  # the first copy: the record's local header
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["epoch"] == 1  # loads as if intact
    with pytest.raises(UserError) as info:
        read_checkpoint(path)
    assert str(info.value) == f"{path}: {DAMAGED_PICKLE}"


def test_files_without_checksums_load_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """PyTorch's legacy format and files saved without CRC-32s load, and the log says so."""
    state = {"epoch": 3, "model": {"w": torch.ones(3)}}
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    monkeypatch.setattr(torch.utils.serialization.config.save, "compute_crc32", False)
    no_crc = tmp_path / "no_crc.pth"
    torch.save(state, no_crc)
    for path in (legacy, no_crc):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="model.checkpoint"):
            assert read_checkpoint(path)["epoch"] == 3
        notes = [r.getMessage() for r in caplog.records if "stores no checksums" in r.getMessage()]
        assert notes == [
            f"{path}: the file stores no checksums (PyTorch's legacy format, or saved with "
            "CRC-32s turned off): its bytes are not verified"
        ]


# ----- weights that cannot be used ------------------------------------------------------------
def test_nan_in_the_authors_weights(tmp_path: Path, two_stream18: Arch) -> None:
    """A NaN in a weight the model uses is refused, named; one in a dropped BN branch is not."""
    theirs, _ = authors_checkpoint(two_stream18, 6, seed=21)
    unused = "module.backbone.bn1.sharable_bn.running_var"  # bn1 is split: sharable_bn unused
    theirs[unused][0] = float("nan")
    path = save_authors(tmp_path / "unused_nan.pth.tar", theirs)
    report = load_checkpoint(build_model(two_stream18, 6), path)
    assert unused in report.dropped
    theirs["module.backbone.bn1.visible_bn.running_var"][1] = float("inf")
    theirs["module.classifier.weight"][0, 0] = float("nan")
    path = save_authors(tmp_path / "nan.pth.tar", theirs)
    model = build_model(two_stream18, 6)
    before = model.classifier.weight.detach().clone()
    with pytest.raises(UserError) as info:
        load_checkpoint(model, path)
    assert str(info.value) == (
        f"{path}: 2 tensor(s) hold NaN or infinity (backbone.bn1.visible.running_var, "
        "classifier.weight): weights of a run that diverged, or edited; they cannot be used"
    )
    assert torch.equal(model.classifier.weight, before)  # nothing copied


def test_nan_weights_refused_by_test_script(
    sysu_run: Path,
    toy_sysu: Path,
    two_stream18: Arch,
    tmp_path: Path,
    test_script: ModuleType,
    capsys: pytest.CaptureFixture[str],
    refused: Callable[..., str],
) -> None:
    """test.py: our checkpoint without its checksum and the authors' holding NaN, one line each."""

    def put_nan(state: dict[str, Any]) -> None:
        del state["checksum"]
        state["model"]["bnneck.weight"][3] = float("nan")

    path = edited(sysu_run, tmp_path / "nan.pth", put_nan)
    argv = ["--data_root", str(toy_sysu), "--trial", "0", "--weights"]
    line = refused([*argv, str(path)])
    assert line == (
        f"error: {path}: 1 tensor(s) hold NaN or infinity (bnneck.weight): weights of a run "
        "that diverged, or edited; they cannot be used"
    )
    # The EMA weights of the same file are finite: scored as usual.
    assert run_cli(test_script.main, [*argv, str(path), "--ema"]) == 0
    capsys.readouterr()
    theirs, _ = authors_checkpoint(two_stream18, 6, seed=22)
    theirs["module.backbone.layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    authors = save_authors(tmp_path / "checkpoint119.pth.tar", theirs)
    save_arch(two_stream18, tmp_path / "config.cfg")
    argv += [str(authors), "--config_path", str(tmp_path / "config.cfg")]
    line = refused(argv)
    assert line.startswith(
        f"error: {authors}: 1 tensor(s) hold NaN or infinity (backbone.layer2.0.conv1.weight)"
    )


def test_nan_weights_not_exported(
    sysu_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
) -> None:
    """utils.export refuses NaN weights in one line and writes no network."""
    from utils.export import main as export_main

    def put_inf(state: dict[str, Any]) -> None:
        del state["checksum"]
        state["model"]["backbone.conv1.weight"][0, 0, 0, 0] = float("inf")

    path = edited(sysu_run, tmp_path / "inf.pth", put_inf)
    out = tmp_path / "exported"
    code = run_cli(export_main, ["--weights", str(path), "--out", str(out)])
    message = f"{path}: 1 tensor(s) hold NaN or infinity (backbone.conv1.weight)"
    expect_error(code, capsys.readouterr().err, message)
    assert not list(out.glob("*.pth")) and not (out / "export.json").exists()


def test_overflowing_weights_refused_by_test_script(
    sysu_run: Path,
    toy_sysu: Path,
    tmp_path: Path,
    refused: Callable[..., str],
) -> None:
    """Finite weights so large that the features overflow: one line naming the largest."""

    def enlarge(state: dict[str, Any]) -> None:
        del state["checksum"]
        for key, value in state["model"].items():
            if key.endswith(("conv1.weight", "conv2.weight")):
                value.mul_(1e10)

    path = edited(sysu_run, tmp_path / "huge.pth", enlarge)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point())
    argv = ["--data_root", str(toy_sysu), "--weights", str(path), "--trial", "0"]
    line = refused(argv)
    assert line.startswith(
        f"error: {path}: the live weights are finite but give non-finite features (they "
        "overflow; largest: "
    )
    largest = re.findall(r"(\S+) \(max \|value\| ([0-9.e+]+)\)", line)
    assert len(largest) == 2
    for name, peak in largest:
        assert name.removeprefix("backbone.").endswith(("conv1.weight", "conv2.weight"))
        assert float(peak) == pytest.approx(float(state["model"][name].abs().max()), rel=0.05)
    assert line.endswith("): the checkpoint cannot be scored")


# ----- stored numbers and folders -------------------------------------------------------------
def test_stored_image_height_not_an_integer(
    sysu_run: Path,
    toy_sysu: Path,
    tmp_path: Path,
    refused: Callable[..., str],
) -> None:
    """test.py: a checkpoint whose stored img_h is not a number is refused in one line."""
    path = edited(sysu_run, tmp_path / "img_h.pth", lambda c: c["args"].update(img_h="tall"))
    argv = ["--data_root", str(toy_sysu), "--weights", str(path), "--trial", "0"]
    line = refused(argv)
    assert line == (
        f"error: {path}: the checkpoint's stored img_h is 'tall', expected an integer (an "
        "edited checkpoint?)"
    )


def test_stored_integer_takes_what_was_taken_before() -> None:
    """Integral floats and digit strings read as before; fractions, bools and lists do not."""
    assert stored_integer(64, "img_h", "c.pth") == 64
    assert stored_integer(64.0, "img_h", "c.pth") == 64
    assert stored_integer("64", "img_h", "c.pth") == 64
    for value in (64.5, True, [64], None, "64px"):
        with pytest.raises(UserError) as info:
            stored_integer(value, "img_h", "c.pth")
        assert str(info.value).startswith(f"c.pth: the checkpoint's stored img_h is {value!r},")
    assert stored_integer(2, "last_stride", "c.pth", 1, 2) == 2
    for value, expected in ((3, "an integer in 1..2"), (0, "an integer >= 1")):
        maximum = 2 if value == 3 else None
        with pytest.raises(UserError) as info:
            stored_integer(value, "n", "c.pth", 1, maximum)
        assert str(info.value) == (
            f"c.pth: the checkpoint's stored n is {value}, expected {expected} (an edited "
            "checkpoint?)"
        )


@pytest.mark.parametrize(
    ("entry", "value", "expected"),
    [("last_stride", 3, "an integer in 1..2"), ("num_classes", 0, "an integer >= 1")],
)
def test_stored_network_numbers_out_of_range(
    sysu_run: Path,
    toy_sysu: Path,
    tmp_path: Path,
    refused: Callable[..., str],
    entry: str,
    value: int,
    expected: str,
) -> None:
    """test.py: a stored last stride or class count the network cannot have is one line."""
    path = edited(sysu_run, tmp_path / "edited.pth", lambda c: c.update({entry: value}))
    argv = ["--data_root", str(toy_sysu), "--weights", str(path), "--trial", "0"]
    assert refused(argv) == (
        f"error: {path}: the checkpoint's stored {entry} is {value}, expected {expected} (an "
        "edited checkpoint?)"
    )


def test_run_folder_given_as_weights(
    sysu_run: Path,
    toy_sysu: Path,
    tmp_path: Path,
    refused: Callable[..., str],
) -> None:
    """--weights RUN_DIR/ suggests the run's latest checkpoint when the folder holds one."""
    assert RUN_LATEST == LATEST  # the name the training engine writes
    argv = ["--data_root", str(toy_sysu), "--trial", "0", "--weights"]
    line = refused([*argv, f"{sysu_run}/"])
    assert line == (
        f"error: {sysu_run}: a folder, not a checkpoint file; did you mean {sysu_run / LATEST}?"
    )
    empty = tmp_path / "run"
    shutil.copytree(sysu_run, empty, ignore=shutil.ignore_patterns("*.pth"))
    line = refused([*argv, str(empty)])
    assert line == f"error: {empty}: a folder, not a checkpoint file"
