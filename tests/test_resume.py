"""Exact resume: a run stopped anywhere and resumed ends bit-identical to an uninterrupted one.

Every run here is ``--deterministic`` on the CPU, 2 epochs of 3 steps, with a monitoring
evaluation after epoch 1 and the final one, and an EMA overwrite after each epoch (the one of
epoch 1 changes the live weights after epoch 1's checkpoint; a resume from it applies it).
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import train
from utils.base.cli import run_cli
from utils.engine.trainer import LATEST, Trainer

pytestmark = pytest.mark.usefixtures("one_thread", "restore_determinism")
RUN = ("--deterministic", "--epochs", "2", "--max_steps", "3", "--test_freq", "1",
       "--save_freq", "1", "--ema_decay", "0.6", "--ema_overwrite_every", "1")  # fmt: skip


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _records(run: Path) -> list[dict[str, Any]]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines]


def assert_same_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Weights, EMA, optimizer, schedule, counters and random states are bit-identical."""
    for part in ("model", "ema"):
        assert got[part].keys() == want[part].keys()
        for key, value in want[part].items():
            assert torch.equal(got[part][key], value), f"{part} {key}"
    for index, state in want["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(got["optimizer"]["state"][index][name], value), (index, name)
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    assert got["scheduler"] == want["scheduler"]
    for key in ("epoch", "step_in_epoch", "global_step"):
        assert got[key] == want[key], key
    assert torch.equal(got["aug_rng"], want["aug_rng"])
    assert torch.equal(got["rng"]["torch"], want["rng"]["torch"])
    assert torch.equal(got["rng"]["numpy"], want["rng"]["numpy"])
    assert got["rng"]["python"] == want["rng"]["python"]


@pytest.fixture(scope="module")
def full_run(
    toy_sysu: Path,
    tmp_path_factory: pytest.TempPathFactory,
    train_argv: Callable[..., list[str]],
) -> Path:
    """The uninterrupted reference run."""
    save = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        assert run_cli(train.main, train_argv(toy_sysu, save, "full", *RUN)) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return save / "full"


def stop_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the next run act as if SIGTERM arrived during global step ``step`` (1-based)."""
    original = Trainer.training_step

    def training_step(self: Trainer, *batch: Any) -> dict[str, torch.Tensor]:
        terms = original(self, *batch)
        if self.global_step + 1 == step:
            self.request_stop(signal.SIGTERM)
        return terms

    monkeypatch.setattr(Trainer, "training_step", training_step)


@pytest.mark.parametrize(
    ("step", "where"),
    [(2, (0, 2)), (3, (0, 3)), (4, (1, 1))],
    ids=["mid-epoch-1", "end-of-epoch-1", "after-the-ema-overwrite"],
)
def test_stopped_and_resumed_run_is_bit_identical(
    toy_sysu: Path,
    tmp_path: Path,
    full_run: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    step: int,
    where: tuple[int, int],
) -> None:
    stop_at(monkeypatch, step)
    assert run_cli(train.main, train_argv(toy_sysu, tmp_path, "cut", *RUN)) == 128 + 15
    run = tmp_path / "cut"
    assert "stopped by SIGTERM; resumable checkpoint:" in capsys.readouterr().err
    stopped = _load(run / LATEST)
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["global_step"]) == (*where, step)
    monkeypatch.undo()
    # No --note: the run continues in the checkpoint's folder and appends to its log.
    resume = ["--note", "", "--resume", str(run / LATEST)]
    assert run_cli(train.main, [*train_argv(toy_sysu, tmp_path, "cut", *RUN), *resume]) == 0
    assert (
        f"resumed from {run / LATEST} at epoch {where[0] + 1} step {where[1]}"
        in (run / "log.txt").read_text()
    )
    assert_same_state(_load(run / LATEST), _load(full_run / LATEST))
    assert_same_state(_load(run / "checkpoint_ep001.pth"), _load(full_run / "checkpoint_ep001.pth"))
    # The log of the interrupted epoch covers all its steps: the same losses as the reference.
    assert _records(run) == _records(full_run)
    want = json.loads((full_run / "results.json").read_text())
    assert json.loads((run / "results.json").read_text()) == want


def test_resume_from_a_periodic_checkpoint_trims_the_epoch_log(
    toy_sysu: Path, tmp_path: Path, full_run: Path, train_argv: Callable[..., list[str]]
) -> None:
    run = tmp_path / "copy"
    shutil.copytree(full_run, run, copy_function=shutil.copyfile)
    checkpoint = run / "checkpoint_ep001.pth"
    resume = ["--note", "", "--resume", str(checkpoint)]
    assert run_cli(train.main, [*train_argv(toy_sysu, tmp_path, "x", *RUN), *resume]) == 0
    assert _records(run) == _records(full_run)  # epoch 2's record replaced, not duplicated
    assert_same_state(_load(run / LATEST), _load(full_run / LATEST))


def test_resume_into_a_new_folder(
    toy_sysu: Path, tmp_path: Path, full_run: Path, train_argv: Callable[..., list[str]]
) -> None:
    resume = ["--resume", str(full_run / "checkpoint_ep001.pth")]
    argv = [*train_argv(toy_sysu, tmp_path, "branch", *RUN), *resume]
    assert run_cli(train.main, argv) == 0
    assert _records(tmp_path / "branch") == _records(full_run)[1:]
    assert_same_state(_load(tmp_path / "branch" / LATEST), _load(full_run / LATEST))


def test_resume_after_the_final_epoch_only_evaluates(
    toy_sysu: Path,
    tmp_path: Path,
    full_run: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
) -> None:
    run = tmp_path / "done"
    shutil.copytree(full_run, run, copy_function=shutil.copyfile)
    (run / "results.json").unlink()
    before = (run / LATEST).read_bytes()
    resume = ["--note", "", "--resume", str(run / LATEST)]
    assert run_cli(train.main, [*train_argv(toy_sysu, tmp_path, "x", *RUN), *resume]) == 0
    assert "has trained all 2 epochs: running the final evaluation only" in capsys.readouterr().err
    assert (run / LATEST).read_bytes() == before
    assert _records(run) == _records(full_run)
    want = json.loads((full_run / "results.json").read_text())
    assert json.loads((run / "results.json").read_text()) == want
