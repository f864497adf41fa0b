"""Training runs keep the README's promises where a user or the machine gets in the way.

A run killed before its first checkpoint leaves a folder the same command takes again; a second
SIGTERM during a checkpoint write is the documented stop; a run that finished while this one
started is never trained over; the free-space check counts every checkpoint the run holds; a
changed ``--lr`` on resume is applied; the log records the rate each epoch trained with;
``--resume CKPT`` alone continues a run, and the command printed on a stop works when pasted.
Every run is a tiny ResNet-18 on 64x32 synthetic images.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import search
import train
from model import load_arch
from utils.base.cli import run_cli
from utils.base.lock import RunLock
from utils.engine import trainer as trainer_module
from utils.engine.build import lr_factor
from utils.engine.trainer import LATEST, Trainer

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread", "restore_determinism")


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _stop_at_step(monkeypatch: pytest.MonkeyPatch, step: int, times: int = 1) -> None:
    """SIGTERM ``times`` times during global step ``step`` (1-based) of the next run."""
    original = Trainer.training_step

    def signalled(self: Trainer, *batch: Any) -> dict[str, torch.Tensor]:
        terms = original(self, *batch)
        if self.global_step + 1 == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGTERM)
        return terms

    monkeypatch.setattr(Trainer, "training_step", signalled)


def _pasted(line: str) -> list[str]:
    """The command between backticks in ``line``, as this interpreter runs it."""
    found = re.search(r"`(python [^`]+)`", line)
    assert found, line
    words = shlex.split(found.group(1))
    return [sys.executable, *words[1:]]


# ----- item 1: killed during the first checkpoint write ---------------------------------------
def test_a_run_killed_before_its_first_checkpoint_leaves_a_folder_the_same_command_takes(
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
) -> None:
    argv = train_argv(toy_sysu, tmp_path, "first", "--test_freq", "0")

    def killed(checkpoint: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        handle.write(b"PK\x03\x04 part of a checkpoint")
        raise KeyboardInterrupt  # the process dies in the middle of its first save

    monkeypatch.setattr(torch, "save", killed)
    assert run_cli(train.main, argv) == 128 + signal.SIGINT
    monkeypatch.undo()
    run = tmp_path / "first"
    assert (run / "log.jsonl").is_file() and not list(run.glob("checkpoint*.pth"))
    capsys.readouterr()
    # The same command again: the folder holds no checkpoint, so the run starts over in it.
    assert run_cli(train.main, argv) == 0
    err = capsys.readouterr().err
    assert (
        f"a run stopped before its first checkpoint: removed log.txt, log.jsonl from {run}" in err
    )
    assert [r["epoch"] for r in _records(run)] == [1]
    assert _load(run / LATEST)["epoch"] == 1


# ----- item 2: a second SIGTERM while a step checkpoint is written ----------------------------
def test_a_second_sigterm_during_a_checkpoint_write_is_the_documented_stop(
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
) -> None:
    save = torch.save

    class SignalledWhileWriting:
        """A file whose third write brings the second SIGTERM (inside torch's zip writer)."""

        def __init__(self, handle: Any) -> None:
            self.handle, self.writes = handle, 0

        def write(self, data: bytes) -> int:
            self.writes += 1
            if self.writes == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return self.handle.write(data)

        def flush(self) -> None:
            self.handle.flush()

    def step_save(checkpoint: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        mid_epoch = isinstance(checkpoint, dict) and checkpoint.get("step_in_epoch")
        save(checkpoint, SignalledWhileWriting(handle) if mid_epoch else handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", step_save)
    _stop_at_step(monkeypatch, 3)  # the first step of epoch 2: the step checkpoint follows
    argv = train_argv(toy_sysu, tmp_path, "twice", "--epochs", "2", "--test_freq", "0")
    assert run_cli(train.main, argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "SIGTERM: stopping after this step" in err
    assert err.rstrip().splitlines()[-1] == "error: interrupted by SIGTERM"
    assert "Traceback" not in err and "unexpected pos" not in err
    monkeypatch.undo()
    run = tmp_path / "twice"
    state = _load(run / LATEST)  # the previous checkpoint, intact
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)
    assert not list(run.glob(".*.tmp"))


# ----- item 3: two runs, one folder -----------------------------------------------------------
def test_a_run_that_finished_between_the_check_and_the_lock_is_not_trained_over(
    toy_sysu: Path,
    sysu_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    run = tmp_path / "raced"
    finished = ("log.jsonl", "results.json", LATEST)
    acquire = RunLock.acquire

    def other_run_finishes_first(self: RunLock) -> RunLock:
        # Run A completes in the folder after this run's start-up check, before its lock.
        if self.folder == run and not run.exists():
            run.mkdir()
            for name in finished:
                shutil.copyfile(sysu_run / name, run / name)
        return acquire(self)

    monkeypatch.setattr(RunLock, "acquire", other_run_finishes_first)
    steps: list[int] = []
    monkeypatch.setattr(Trainer, "training_step", lambda self, *batch: steps.append(1))
    code = run_cli(train.main, train_argv(toy_sysu, tmp_path, "raced"))
    expect_error(code, capsys.readouterr().err, f"the run folder {run} already holds a run")
    assert not steps
    for name in finished:
        assert (run / name).read_bytes() == (sysu_run / name).read_bytes()


# ----- item 8: free space for every checkpoint; a full disk in torch's writer ------------------
@pytest.fixture
def free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, int | None]:
    """``free_space["bytes"] = N``: the disk of ``tmp_path`` reports N bytes free (None: real)."""
    setting: dict[str, int | None] = {"bytes": None}
    real = shutil.disk_usage

    def usage(path: Any) -> Any:
        found = real(path)
        free = setting["bytes"]
        return (
            found
            if free is None or not Path(path).is_relative_to(tmp_path)
            else found._replace(free=free)
        )

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return setting


def test_the_free_space_check_counts_every_checkpoint_the_run_holds(
    toy_sysu: Path,
    tmp_path: Path,
    free_space: dict[str, int | None],
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    free_space["bytes"] = 100_000
    need = {}
    for epochs, save_freq in ((2, 0), (2, 1), (4, 1)):
        argv = train_argv(toy_sysu, tmp_path, "full", "--epochs", str(epochs))
        code = run_cli(train.main, [*argv, "--save_freq", str(save_freq)])
        line = expect_error(code, capsys.readouterr().err, f"no space left on {tmp_path / 'full'}")
        found = re.search(r"need about (\d+) MB", line)
        assert found, line
        need[epochs, save_freq] = int(found.group(1))
    assert not (tmp_path / "full").exists()
    # The latest checkpoint and its temporary file (2), plus one per periodic copy (2, 4).
    assert need[2, 1] == pytest.approx(2 * need[2, 0], rel=0.01)
    assert need[4, 1] == pytest.approx(3 * need[2, 0], rel=0.01)


def test_a_full_disk_hidden_in_torchs_writer_error_is_the_one_line_message(
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    free_space: dict[str, int | None],
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    save = torch.save

    def disk_fills(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            free_space["bytes"] = 4096
            handle.write(b"PK\x03\x04 part of a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills)
    code = run_cli(train.main, train_argv(toy_sysu, tmp_path, "full", "--epochs", "2"))
    run = tmp_path / "full"
    expect_error(code, capsys.readouterr().err, f"no space left on {run}, need about ")
    monkeypatch.undo()
    assert _load(run / LATEST)["epoch"] == 1
    assert not list(run.glob(".*.tmp"))


def test_a_resume_counts_the_checkpoint_its_next_save_replaces(
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    free_space: dict[str, int | None],
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    trained = Trainer.training_step
    _stop_at_step(monkeypatch, 1)
    argv = train_argv(toy_sysu, tmp_path, "stopped", "--epochs", "2", "--test_freq", "0")
    assert run_cli(train.main, argv) == 128 + signal.SIGTERM
    monkeypatch.setattr(Trainer, "training_step", trained)
    run = tmp_path / "stopped"
    held = (run / LATEST).stat().st_size / 2**20
    capsys.readouterr()

    def need(args: list[str], folder: Path) -> int:
        code = run_cli(train.main, args)
        line = expect_error(code, capsys.readouterr().err, f"no space left on {folder}")
        found = re.search(r"need about (\d+) MB", line)
        assert found, line
        return int(found.group(1))

    free_space["bytes"] = 100_000
    fresh = need(train_argv(toy_sysu, tmp_path, "fresh", "--epochs", "2"), tmp_path / "fresh")
    resumed = need(["--resume", str(run / LATEST)], run)
    # A new run needs its first checkpoint and the next one's temporary file; the resumed run
    # already holds the first, which its next save replaces.
    assert fresh - resumed == pytest.approx(held, abs=1.5)
    # A disk with room for one more checkpoint, not for two: the stopped run goes on.
    free_space["bytes"] = (fresh + resumed) // 2 * 2**20
    assert run_cli(train.main, ["--resume", str(run / LATEST)]) == 0
    assert [r["epoch"] for r in _records(run)] == [1, 2]


def _stop_then_move(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], start: Path, elsewhere: Path
) -> None:
    """Train ``argv`` from the folder ``start`` until a SIGTERM at step 1, then work from the new
    folder ``elsewhere``."""
    monkeypatch.chdir(start)
    _stop_at_step(monkeypatch, 1)
    assert run_cli(train.main, argv) == 128 + signal.SIGTERM
    monkeypatch.undo()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)


def test_resume_alone_needs_no_stored_config_file_from_another_folder(
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    train_argv: Callable[..., list[str]],
) -> None:
    # The run names its architecture by a path relative to the folder it was started from.
    argv = train_argv(toy_sysu, tmp_path, "relative", "--epochs", "2", "--test_freq", "0")
    config = argv.index("--config_path") + 1
    argv[config] = str(Path(argv[config]).relative_to(REPO))
    _stop_then_move(monkeypatch, argv, REPO, tmp_path / "elsewhere")
    run = tmp_path / "relative"
    assert _load(run / LATEST)["args"]["config_path"] == argv[config]
    # The checkpoint carries the architecture: the stored relative path is not read again.
    assert run_cli(train.main, ["--resume", str(run / LATEST)]) == 0
    assert [r["epoch"] for r in _records(run)] == [1, 2]
    assert _load(run / LATEST)["arch"]["slots"] == load_arch(REPO / argv[config]).slots


def test_a_stored_relative_data_root_not_found_on_resume_is_one_line(
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    # The run names its data by a path relative to the folder it was started from.
    argv = train_argv(toy_sysu, tmp_path, "relative_root", "--epochs", "2", "--test_freq", "0")
    argv[argv.index("--data_root") + 1] = toy_sysu.name
    _stop_then_move(monkeypatch, argv, toy_sysu.parent, tmp_path / "elsewhere_root")
    run = tmp_path / "relative_root"
    assert _load(run / LATEST)["args"]["data_root"] == toy_sysu.name
    capsys.readouterr()
    code = run_cli(train.main, ["--resume", str(run / LATEST)])
    expect_error(
        code,
        capsys.readouterr().err,
        f"--data_root {toy_sysu.name}: the checkpoint recorded it relative to the folder the run "
        "started in, and it is not found from here; pass --data_root with the resume",
    )
    # Named again, the run goes on where it stopped.
    assert run_cli(train.main, ["--resume", str(run / LATEST), "--data_root", str(toy_sysu)]) == 0
    assert [r["epoch"] for r in _records(run)] == [1, 2]


# ----- item 11 and the logged learning rate ---------------------------------------------------
def test_the_log_records_the_rate_each_epoch_trained_with(
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
) -> None:
    schedule = ("--warmup_epochs", "0", "--milestones", "2", "--lr", "0.01")
    argv = train_argv(toy_sysu, tmp_path, "lr", "--epochs", "3", "--test_freq", "0", *schedule)
    assert run_cli(train.main, argv) == 0
    # Epochs 1 and 2 train at 0.01; the drop at milestone 2 applies from the third epoch on.
    assert [r["lr"] for r in _records(tmp_path / "lr")] == pytest.approx([0.01, 0.01, 0.001])
    err = capsys.readouterr().err
    assert "epoch 2/3 step 2/2: " in err and re.search(r"epoch 2/3 step 2/2: .*lr 0\.01\n", err)
    assert re.search(r"epoch 2: .*lr=0\.01,", err)


def test_a_changed_lr_on_resume_is_applied_to_the_resumed_schedule(
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
) -> None:
    argv = train_argv(toy_sysu, tmp_path, "lr", "--test_freq", "0", "--warmup_epochs", "4")
    assert run_cli(train.main, argv) == 0
    run = tmp_path / "lr"
    capsys.readouterr()
    resume = ["--resume", str(run / LATEST), "--epochs", "2", "--lr", "0.5"]
    assert run_cli(train.main, resume) == 0
    err = capsys.readouterr().err
    assert "changed options: --lr 0.01 -> 0.5" in err
    assert "--lr 0.5 applied to the resumed schedule" in err
    factor = lr_factor(1, 4, [40, 70])
    assert _records(run)[1]["lr"] == pytest.approx(0.5 * factor)
    groups = _load(run / LATEST)["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([0.05, 0.5])
    assert _load(run / LATEST)["scheduler"]["base_lrs"] == pytest.approx([0.05, 0.5])


def test_a_resumed_epoch_counts_the_time_trained_before_the_stop(
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    train_argv: Callable[..., list[str]],
) -> None:
    class SlowClock:
        """The trainer's clock: 1000 s pass between two readings."""

        def __init__(self) -> None:
            self.now = 0.0

        def time(self) -> float:
            self.now += 1000.0
            return self.now

    monkeypatch.setattr(trainer_module, "time", SlowClock())
    _stop_at_step(monkeypatch, 1)
    argv = train_argv(toy_sysu, tmp_path, "slow", "--test_freq", "0")
    assert run_cli(train.main, argv) == 128 + signal.SIGTERM
    monkeypatch.undo()
    run = tmp_path / "slow"
    assert run_cli(train.main, ["--resume", str(run / LATEST)]) == 0
    assert _records(run)[0]["time_s"] >= 1000.0


# ----- --resume alone, and the command printed on a stop -------------------------------------
def test_the_command_printed_on_a_stop_continues_the_run_when_pasted(
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    _stop_at_step(monkeypatch, 1)
    argv = train_argv(toy_sysu, tmp_path, "paste", "--test_freq", "0", "--ema_decay", "0.6")
    assert run_cli(train.main, argv) == 128 + signal.SIGTERM
    monkeypatch.undo()
    run = tmp_path / "paste"
    line = capsys.readouterr().err.rstrip().splitlines()[-1]
    assert f"`python train.py --resume {run / LATEST}`" in line
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        _pasted(line), cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "changed options" not in done.stderr
    assert [r["epoch"] for r in _records(run)] == [1]
    assert json.loads((run / "results.json").read_text())
    # Flags given beside --resume override the stored ones (a stored option that depends on
    # one given anew is not taken over); the others stay the run's.
    resume = ["--resume", str(run / LATEST), "--epochs", "2", "--no-ema_overwrite"]
    assert run_cli(train.main, resume) == 0
    assert "changed options: --ema_overwrite True -> False" in capsys.readouterr().err
    assert [r["epoch"] for r in _records(run)] == [1, 2]
    stored = _load(run / LATEST)["args"]
    assert (stored["ema_decay"], stored["ema_overwrite_every"]) == (0.6, 0)
    # The folder now holds a run: the new-run command is refused with a pasteable hint.
    code = run_cli(train.main, argv)
    line = expect_error(code, capsys.readouterr().err, "already holds a run")
    assert f"`python train.py --resume {run / LATEST}`" in line


def test_search_resume_alone_and_the_train_command_it_prints(
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
) -> None:
    argv = train_argv(toy_sysu, tmp_path, "search", "--epochs", "2", "--arch_warmup", "1")
    argv = [*argv[:4], *argv[6:], "--depth", "18", "--test_freq", "0"]  # no --config_path
    _stop_at_step(monkeypatch, 1)
    assert run_cli(search.main, argv) == 128 + signal.SIGTERM
    monkeypatch.undo()
    run = tmp_path / "search"
    line = capsys.readouterr().err.rstrip().splitlines()[-1]
    assert f"`python search.py --resume {run / LATEST}`" in line
    assert run_cli(search.main, ["--resume", str(run / LATEST)]) == 0
    out = capsys.readouterr().out
    command = out[out.index("train the architecture found with:") :].splitlines()[1].strip()
    words = shlex.split(command)
    assert words[:2] == ["python", "train.py"]
    args = train.get_args_parser().parse_args(words[2:])
    assert (args.data_root, args.dataset) == (str(toy_sysu), "sysu")
    assert (args.img_h, args.img_w) == (64, 32)
    assert load_arch(args.config_path).depth == 18 and args.config_path == str(run / "arch.json")


# ----- the all-shared baseline by default -----------------------------------------------------
def test_train_without_config_path_warns_and_titles_the_baseline(
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
) -> None:
    argv = train_argv(toy_sysu, tmp_path, "base", "--max_steps", "1", "--ema_decay", "0")
    argv = argv[:4] + argv[6:]  # no --config_path
    assert run_cli(train.main, argv) == 0
    err = capsys.readouterr().err
    assert (
        "WARNING" in err
        and "configs/all_shared.json: every BN slot is shared: this trains the all-shared "
        "baseline (no --config_path given"
        in err
    )
    title = (tmp_path / "base" / "results.md").read_text().splitlines()[0]
    assert title.startswith("all-shared baseline (every BN slot shared)")
