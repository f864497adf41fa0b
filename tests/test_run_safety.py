"""Runs that can be trusted: the authors' EMA schedule, and nothing silently wrong.

The EMA overwrite follows its own schedule in the authors' order; a diverging run never saves
non-finite values; one run per folder; a full disk, a kill during an evaluation, leftover
temporary files, a second signal, SIGHUP and bad flags all end in one clear line or a complete
run. Every run is a tiny ResNet-18 on 64x32 synthetic images.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import train
from model.checkpoint import non_finite_tensors
from utils.base.cli import run_cli
from utils.engine import evaluation
from utils.engine.build import ModelEMA
from utils.engine.options import training_settings
from utils.engine.settings import TrainSettings
from utils.engine.trainer import LATEST, Trainer

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread", "restore_determinism")


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _records(run: Path) -> list[dict[str, Any]]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines]


def _parse(*argv: str) -> TrainSettings:
    parsed = train.get_args_parser().parse_args(["--data_root", str(REPO), *argv])
    return training_settings(vars(parsed))


# ----- the authors' schedule ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "overwrites"),
    [
        (["--test_freq", "0"], 2),  # SYSU's default: every 2 epochs, whatever the evaluations
        (["--test_freq", "3"], 2),
        (["--no-ema_overwrite", "--test_freq", "2"], 0),
        (["--ema_overwrite_every", "3", "--test_freq", "0"], 1),
    ],
    ids=["no-evaluation", "evaluation-every-3", "disabled", "every-3"],
)
def test_ema_overwrite_follows_its_own_schedule(
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    train_argv: Callable[..., list[str]],
    extra: list[str],
    overwrites: int,
) -> None:
    copies: list[int] = []
    copy_to = ModelEMA.copy_to

    def counted(self: ModelEMA, model: torch.nn.Module) -> None:
        copies.append(1)
        copy_to(self, model)

    monkeypatch.setattr(ModelEMA, "copy_to", counted)
    argv = train_argv(toy_sysu, tmp_path, "run", "--epochs", "4", "--max_steps", "1", *extra)
    assert run_cli(train.main, argv) == 0
    assert len(copies) == overwrites


def test_ema_overwrite_defaults_and_flag_errors(
    capsys: pytest.CaptureFixture[str], expect_error: Callable[..., str], tmp_path: Path
) -> None:
    assert _parse().ema_overwrite_every == 2  # SYSU-MM01: 60 overwrites in 120 epochs
    assert _parse("--dataset", "regdb").ema_overwrite_every == 10
    assert _parse("--no-ema_overwrite").ema_overwrite_every == 0
    assert _parse("--ema_overwrite_every", "0").ema_overwrite_every == 0
    assert _parse("--ema_overwrite_every", "5", "--test_freq", "0").ema_overwrite_every == 5
    argv = ["--data_root", str(tmp_path), "--no-ema_overwrite", "--ema_overwrite_every", "2"]
    code = run_cli(train.main, argv)
    expect_error(code, capsys.readouterr().err, "--no-ema_overwrite contradicts")
    code = run_cli(train.main, ["--data_root", str(tmp_path), "--ema_overwrite_every", "-1"])
    expect_error(code, capsys.readouterr().err, "--ema_overwrite_every -1: expected a value >= 0")


def test_overwrite_epoch_evaluates_live_then_saves_then_overwrites(
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    train_argv: Callable[..., list[str]],
) -> None:
    scored: list[dict[str, torch.Tensor]] = []
    starts: list[dict[str, torch.Tensor]] = []
    evaluate = evaluation.evaluate_training_run
    train_one_epoch = Trainer.train_one_epoch

    def evaluate_and_record(model: torch.nn.Module, *args: Any) -> dict[str, Any]:
        scored.append({k: v.clone() for k, v in model.state_dict().items()})
        return evaluate(model, *args)

    def record_start(self: Trainer, epoch: int) -> dict[str, float]:
        starts.append({k: v.clone() for k, v in self.model_without_ddp.state_dict().items()})
        return train_one_epoch(self, epoch)

    monkeypatch.setattr(evaluation, "evaluate_training_run", evaluate_and_record)
    monkeypatch.setattr(Trainer, "train_one_epoch", record_start)
    extra = ("--epochs", "2", "--test_freq", "1", "--ema_overwrite_every", "1", "--save_freq", "1")
    assert run_cli(train.main, train_argv(toy_sysu, tmp_path, "order", *extra)) == 0
    run = tmp_path / "order"
    first = _load(run / "checkpoint_ep001.pth")

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[k], b[k]) for k in b)

    # The checkpoint of an overwrite epoch: `model` the live weights, `ema` the average.
    assert not same(first["model"], first["ema"]) and first["ema_overwrite_pending"] is True
    # Epoch 1's evaluation scored the live weights, then the EMA: the two saved entries.
    assert same(scored[0], first["model"]) and same(scored[1], first["ema"])
    # Only after the save and the evaluation did the EMA replace the live weights.
    assert same(starts[1], first["ema"])
    record = _records(run)[0]
    assert "sysu_all_bnneck_rank1" in record and "sysu_all_ema_bnneck_rank1" in record
    assert "evaluation" not in record  # the pending mark is gone once the numbers are in


def test_fused_flag_chooses_the_optimizer_kernels() -> None:
    from utils.engine.build import build_optimizer

    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.register_parameter("w", torch.nn.Parameter(torch.ones(3)))
    cpu = torch.device("cpu")
    for flags, fused in (([], False), (["--fused"], True), (["--no-fused"], False)):
        optimizer = build_optimizer(model, _parse(*flags).optimizer, cpu)
        assert bool(optimizer.defaults.get("fused")) is fused, flags


# ----- non-finite values ----------------------------------------------------------------------
def test_diverging_run_saves_nothing_non_finite_and_names_the_tensors(
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    # SGD at lr 30: the loss stays finite while BN statistics and the EMA overflow.
    extra = ("--optim", "sgd", "--lr", "30", "--epochs", "8", "--test_freq", "0")
    argv = train_argv(toy_sysu, tmp_path, "diverge", *extra, "--ema_decay", "0.6")
    code = run_cli(train.main, argv)
    checkpoint = tmp_path / "diverge" / LATEST
    line = expect_error(
        code,
        capsys.readouterr().err,
        "saved tensor(s) became non-finite at the end of epoch",
        ".running_var",
        f"stopped without saving. Last good checkpoint: {checkpoint}",
    )
    assert "ema." in line or "model." in line
    assert non_finite_tensors(_load(checkpoint)) == []  # the last good one truly is


def test_non_finite_tensors_checks_buffers_ema_and_optimizer() -> None:
    state = {
        "model": {"bn.running_var": torch.tensor([1.0, float("inf")]), "n": torch.tensor(3)},
        "ema": {"w": torch.ones(2)},
        "optimizer": {"state": {0: {"exp_avg": torch.tensor([float("nan")])}}},
    }
    assert non_finite_tensors(state) == ["model.bn.running_var", "optimizer.state.0.exp_avg"]


# ----- one run per folder ---------------------------------------------------------------------
def test_a_second_run_in_a_folder_in_use_is_refused(
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
    start_training: Callable[..., tuple[subprocess.Popen[str], list[str]]],
) -> None:
    run = tmp_path / "busy"
    assert run_cli(train.main, train_argv(toy_sysu, tmp_path, "busy")) == 0
    resume = ["--note", "", "--resume", str(run / LATEST), "--max_steps", "0", "--epochs", "50"]
    first, _ = start_training([*train_argv(toy_sysu, tmp_path, "busy"), *resume], tmp_path)
    try:
        log_before = (run / "log.jsonl").read_text()
        # A second --resume of the same checkpoint (a scheduler's requeue) ...
        code = run_cli(train.main, [*train_argv(toy_sysu, tmp_path, "busy"), *resume])
        err = capsys.readouterr().err
        expect_error(code, err, f"{run}: already in use by another run (pid {first.pid} on ")
        # ... and a new run on the same --save/--note, even with --overwrite.
        code = run_cli(train.main, train_argv(toy_sysu, tmp_path, "busy", "--overwrite"))
        expect_error(code, capsys.readouterr().err, f"{run}: already in use", f"pid {first.pid}")
        assert (run / "log.jsonl").read_text() == log_before
        assert (run / LATEST).is_file()
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    assert (run / ".lock").is_file()  # kept (emptied) for the next run


# ----- full disk ------------------------------------------------------------------------------
def test_full_disk_is_found_before_training(
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    real = shutil.disk_usage

    def nearly_full(path: Any) -> Any:
        usage = real(path)
        return usage._replace(free=100_000) if Path(path).is_relative_to(tmp_path) else usage

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    steps = []
    monkeypatch.setattr(Trainer, "training_step", lambda self, *b: steps.append(1))
    code = run_cli(train.main, train_argv(toy_sysu, tmp_path, "full"))
    line = expect_error(code, capsys.readouterr().err, f"no space left on {tmp_path / 'full'}")
    assert "need about " in line and " MB" in line
    assert not steps and not (tmp_path / "full").exists()


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError(
            "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing "
            "file data/0: file write failed"
        ),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["torch-writer", "enospc"],
)
def test_full_disk_at_a_checkpoint_keeps_the_previous_one(
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
    failure: BaseException,
) -> None:
    save = torch.save
    calls = []

    def fails_the_second_time(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            handle.write(b"PK\x03\x04 part of a checkpoint")
            raise failure
        save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fails_the_second_time)
    code = run_cli(train.main, train_argv(toy_sysu, tmp_path, "full", "--epochs", "2"))
    run = tmp_path / "full"
    line = expect_error(code, capsys.readouterr().err, f"no space left on {run}, need about ")
    assert line.endswith("MB (free some space and run again)")
    monkeypatch.undo()
    assert _load(run / LATEST)["epoch"] == 1
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))


# ----- a kill during an evaluation ------------------------------------------------------------
@pytest.mark.parametrize("epoch", [1, 2], ids=["monitoring", "final"])
def test_a_kill_during_an_evaluation_loses_no_epoch_record(
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    train_argv: Callable[..., list[str]],
    epoch: int,
) -> None:
    extra = ("--deterministic", "--epochs", "2", "--test_freq", "1", "--ema_overwrite_every", "1")
    assert run_cli(train.main, train_argv(toy_sysu, tmp_path, "whole", *extra)) == 0
    evaluate = Trainer.evaluate

    def killed(self: Trainer, final: bool, at: int) -> dict[str, Any]:
        if at + 1 == epoch:
            # A second SIGTERM stops at once, in the middle of the evaluation.
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, final, at)

    monkeypatch.setattr(Trainer, "evaluate", killed)
    assert run_cli(train.main, train_argv(toy_sysu, tmp_path, "cut", *extra)) == 128 + 15
    monkeypatch.undo()
    run = tmp_path / "cut"
    assert _records(run)[-1]["evaluation"] == "pending"
    resume = ["--note", "", "--resume", str(run / LATEST)]
    assert run_cli(train.main, [*train_argv(toy_sysu, tmp_path, "cut", *extra), *resume]) == 0
    assert [r["epoch"] for r in _records(run)] == [1, 2]
    assert _records(run) == _records(tmp_path / "whole")
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert json.loads((run / "results.json").read_text()) == whole


# ----- temporary files ------------------------------------------------------------------------
def test_stale_temporary_files_are_removed_at_start(
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
) -> None:
    run = tmp_path / "tidy"
    assert run_cli(train.main, train_argv(toy_sysu, tmp_path, "tidy")) == 0
    stale = run / ".checkpoint_latest.pth.k2j4x9.tmp"
    stale.write_bytes(b"PK\x03\x04 half a checkpoint")
    resume = ["--note", "", "--resume", str(run / LATEST), "--epochs", "2"]
    assert run_cli(train.main, [*train_argv(toy_sysu, tmp_path, "tidy"), *resume]) == 0
    assert not stale.exists()
    message = f"removed 1 temporary file(s) that an interrupted write left in {run}: {stale.name}"
    assert message in capsys.readouterr().err
    # --overwrite removes them too, and keeps the lock file.
    stale.write_bytes(b"")
    assert run_cli(train.main, train_argv(toy_sysu, tmp_path, "tidy", "--overwrite")) == 0
    assert not stale.exists() and (run / ".lock").exists()


# ----- signals --------------------------------------------------------------------------------
@pytest.fixture
def signal_in_step(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """``signal_in_step(signum, times)``: send ``signum`` ``times`` during the first step."""

    def arm(signum: int, times: int) -> None:
        step = Trainer.training_step

        def signalled(self: Trainer, *batch: Any) -> dict[str, torch.Tensor]:
            terms = step(self, *batch)
            if self.global_step == 0:
                for _ in range(times):
                    os.kill(os.getpid(), signum)
            return terms

        monkeypatch.setattr(Trainer, "training_step", signalled)

    yield arm


def test_a_second_sigterm_exits_with_143(
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    signal_in_step: Callable[..., None],
) -> None:
    signal_in_step(signal.SIGTERM, 2)
    assert run_cli(train.main, train_argv(toy_sysu, tmp_path, "twice")) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "SIGTERM: stopping after this step" in err
    assert err.rstrip().endswith("error: interrupted by SIGTERM") and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_sighup_saves_like_sigterm(
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    signal_in_step: Callable[..., None],
) -> None:
    signal_in_step(signal.SIGHUP, 1)
    assert run_cli(train.main, train_argv(toy_sysu, tmp_path, "hup")) == 128 + signal.SIGHUP
    checkpoint = tmp_path / "hup" / LATEST
    assert f"stopped by SIGHUP; resumable checkpoint: {checkpoint}" in capsys.readouterr().err
    state = _load(checkpoint)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 1)


@pytest.mark.parametrize(
    ("final", "message", "code"),
    [
        (False, "SIGTERM: the checkpoint is saved; stopping after this evaluation", 143),
        (True, "SIGTERM: the checkpoint is saved; finishing the final evaluation, then ending", 0),
    ],
    ids=["monitoring", "final"],
)
def test_a_stop_during_an_evaluation_says_what_happens(
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    final: bool,
    message: str,
    code: int,
) -> None:
    evaluate = Trainer.evaluate

    def signalled(self: Trainer, is_final: bool, epoch: int) -> dict[str, Any]:
        if is_final == final:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, is_final, epoch)

    monkeypatch.setattr(Trainer, "evaluate", signalled)
    argv = train_argv(toy_sysu, tmp_path, "eval", "--epochs", "2", "--test_freq", "1")
    assert run_cli(train.main, argv) == code
    err = capsys.readouterr().err
    assert message in err and "stopping after this step" not in err
    assert [r["epoch"] for r in _records(tmp_path / "eval")] == ([1, 2] if final else [1])


# ----- flags checked before the costly work -----------------------------------------------------
def test_bad_config_and_resume_are_reported_before_the_image_cache(
    toy_sysu: Path,
    sysu_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    data = tmp_path / "sysu"
    shutil.copytree(toy_sysu, data, ignore=shutil.ignore_patterns("cache"))
    config = tmp_path / "arch.json"
    config.write_text('{"depth": 18, "slots": ')
    argv = train_argv(data, tmp_path / "runs", "x", "--config_path", str(config))
    code = run_cli(train.main, argv)
    expect_error(code, capsys.readouterr().err, str(config))
    # A checkpoint of another architecture: refused before the cache too.
    all_split = str(REPO / "configs" / "resnet18_all_split.json")
    resume = ["--resume", str(sysu_run / "checkpoint_ep001.pth"), "--config_path", all_split]
    code = run_cli(train.main, [*train_argv(data, tmp_path / "runs", "x"), *resume])
    expect_error(code, capsys.readouterr().err, "architecture differs from --config_path")
    assert not (data / "cache").exists() and not (tmp_path / "runs").exists()


# ----- which weights each score is of ---------------------------------------------------------
def test_final_results_are_test_py_scores_of_model_and_ema(
    sysu_run: Path, toy_sysu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """results.json's ``sysu_all`` is test.py on the checkpoint's `model`, ``sysu_all_ema``
    is test.py --ema; the last epoch's overwrite (pending in the file) changed neither."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cmnas_test_script", REPO / "test.py")
    assert spec is not None and spec.loader is not None
    test_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_script)
    trained = json.loads((sysu_run / "results.json").read_text())
    for flags, key in (([], "sysu_all"), (["--ema"], "sysu_all_ema")):
        out = tmp_path / f"{key}.json"
        argv = ["--data_root", str(toy_sysu), "--weights", str(sysu_run / LATEST), *flags]
        assert run_cli(test_script.main, [*argv, "--save_json", str(out)]) == 0
        (result,) = json.loads(out.read_text())["results"].values()
        assert trained[key]["weights"] == ("ema" if flags else "live")
        for kind in ("pool", "bnneck"):
            assert result[kind] == trained[key][kind], (key, kind)
    capsys.readouterr()
