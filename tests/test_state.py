"""The run state: checkpoint entries by name, the loss meter, the resume policy, the run folder."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from utils.base.errors import UserError
from utils.engine.checkpointer import RUN_FILES, clear_run_dir, freed_bytes, trim_epoch_log
from utils.engine.search import ARCH_FILE, SearchTrainer
from utils.engine.state import (
    GeneratorState,
    LossMeter,
    ProcessRandomState,
    RunState,
    check_resume_options,
)
from utils.evaluation.heatmap import HEATMAP_NAME


def _parts(seed: int) -> tuple[nn.Linear, torch.optim.Optimizer, torch.Generator]:
    """A tiny model, its optimizer after one step, and a generator, all seeded."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer, torch.Generator().manual_seed(seed)


def _state(seed: int) -> tuple[RunState, nn.Linear, torch.optim.Optimizer, torch.Generator]:
    model, optimizer, generator = _parts(seed)
    state = RunState(model=model, optimizer=optimizer, environment={"device": "cpu"})
    state.register("extra", {"rng": GeneratorState(generator), "ids": [1, 2]})
    return state, model, optimizer, generator


def test_run_state_saves_and_restores_every_entry_by_name() -> None:
    saved_state, model, optimizer, generator = _state(0)
    saved = saved_state.state_dict()
    assert set(saved) == {"model", "optimizer", "environment", "extra"}
    assert saved["extra"]["ids"] == [1, 2] and saved["environment"] == {"device": "cpu"}
    expected_draw = torch.rand(3, generator=generator)

    state, other, other_optimizer, other_generator = _state(1)
    assert not torch.equal(other.weight, model.weight)
    state.load_state_dict(saved, "--resume x")
    assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)
    moment = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(other_optimizer.state_dict()["state"][0]["exp_avg"], moment)
    assert torch.equal(torch.rand(3, generator=other_generator), expected_draw)
    with pytest.raises(ValueError, match="'extra' is already registered"):
        state.register("extra", None)


def test_random_states_are_kept_when_not_restored(caplog: pytest.LogCaptureFixture) -> None:
    saved_state, _, _, generator = _state(0)
    saved_state.register("process", ProcessRandomState())
    saved = saved_state.state_dict()
    state, _, _, other_generator = _state(1)
    state.register("process", ProcessRandomState())
    before = other_generator.get_state()
    random.seed(5)
    with caplog.at_level(logging.WARNING):
        state.load_state_dict(saved, "--resume x", restore_random=False)
    assert torch.equal(other_generator.get_state(), before)
    assert random.random() == random.Random(5).random()  # the process state stayed
    assert "random states are reseeded, not restored" in caplog.text
    # Restored: the process-wide states come back exactly.
    np.random.seed(3)
    saved = RunState(process=ProcessRandomState()).state_dict()
    want = (np.random.rand(), torch.rand(1))
    RunState(process=ProcessRandomState()).load_state_dict(saved, "x")
    assert (np.random.rand(), torch.rand(1)) == want


def test_entries_that_do_not_fit_are_one_line_errors() -> None:
    saved = _state(0)[0].state_dict()
    state = _state(1)[0]
    with pytest.raises(UserError, match="--resume x: the checkpoint has no 'optimizer' entry"):
        state.load_state_dict({k: v for k, v in saved.items() if k != "optimizer"}, "--resume x")
    wide = nn.Linear(3, 5)
    with pytest.raises(
        UserError, match=r"--resume x: shape mismatch .*weight \(2, 3\) vs \(5, 3\)"
    ):
        RunState(model=wide).load_state_dict(saved, "--resume x")
    two_groups = torch.optim.Adam([{"params": [wide.weight]}, {"params": [wide.bias]}])
    with pytest.raises(UserError, match="the saved 'optimizer' state does not fit this run"):
        RunState(optimizer=two_groups).load_state_dict(saved, "--resume x")


def test_loss_meter_sums_means_and_resumes() -> None:
    meter = LossMeter(torch.device("cpu"))
    meter.add({"loss": torch.tensor(1.0), "ce": torch.tensor(0.25)})
    meter.add({"loss": torch.tensor(3.0), "ce": torch.tensor(0.75)})
    assert meter.means() == {"loss": 2.0, "ce": 0.5} and meter.finite()
    resumed = LossMeter(torch.device("cpu"))
    resumed.load_state_dict(meter.state_dict())
    resumed.add({"loss": torch.tensor(2.0), "ce": torch.tensor(0.5)})
    assert resumed.count == 3 and resumed.means() == {"loss": 2.0, "ce": 0.5}
    resumed.add({"loss": torch.tensor(float("nan")), "ce": torch.tensor(0.5)})
    assert not resumed.finite()
    resumed.reset()
    assert resumed.means() == {} and resumed.count == 0


def test_resume_policy_refuses_fixed_options_and_names_changed_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    saved = {"dataset": "sysu", "batch_size": 8, "lr": 0.01, "epochs": 2, "seed": 0}
    now = {"dataset": "sysu", "batch_size": 8, "lr": 0.02, "epochs": 5, "seed": 0}
    with caplog.at_level(logging.WARNING):
        check_resume_options(saved, now, "--resume x")
    assert "--lr 0.01 -> 0.02" in caplog.text and "epochs" not in caplog.text
    # The test-time tools change only how the run is scored: no warning for them.
    caplog.clear()
    saved.update(flip=False, rerank=False, k1=20)
    now.update(lr=0.01, flip=True, rerank=True, k1=10)
    with caplog.at_level(logging.WARNING):
        check_resume_options(saved, now, "--resume x")
    assert caplog.text == ""
    now["batch_size"] = 12
    with pytest.raises(UserError, match="--batch_size 8; this run has --batch_size 12"):
        check_resume_options(saved, now, "--resume x")


def test_run_folder_clear_and_trim(tmp_path: Path) -> None:
    for name in ("log.txt", "checkpoint_ep001.pth", ARCH_FILE, HEATMAP_NAME, "notes.md"):
        (tmp_path / name).write_text("x")
    assert clear_run_dir(tmp_path, RUN_FILES) == ["log.txt", "checkpoint_ep001.pth"]
    assert (tmp_path / ARCH_FILE).exists()
    # A search's --overwrite also removes its architecture and heat map; never other files.
    assert sorted(clear_run_dir(tmp_path, SearchTrainer.run_files)) == sorted(
        [ARCH_FILE, HEATMAP_NAME]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["notes.md"]
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo\n{"epoch": 3}\n')
    trim_epoch_log(log, 2)
    assert log.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


def test_replacing_checkpoints_frees_only_files_without_another_link(tmp_path: Path) -> None:
    latest, copy, other = tmp_path / "latest.pth", tmp_path / "copy.pth", tmp_path / "other.pth"
    latest.write_bytes(b"x" * 100)
    os.link(latest, copy)  # a periodic copy shares the latest checkpoint's data
    other.write_bytes(b"y" * 50)
    assert freed_bytes([latest]) == 0  # the copy keeps the data
    assert freed_bytes([latest, copy]) == 100
    assert freed_bytes([latest, copy, other, tmp_path / "absent.pth"]) == 150
