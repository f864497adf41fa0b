"""train.py end to end on synthetic data, its one-line refusals of bad input, and crash safety."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import train
from model.checkpoint import write_checkpoint
from utils.base.cli import run_cli
from utils.engine import trainer as engine
from utils.engine.trainer import LATEST

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----- end to end ---------------------------------------------------------------------------
def test_sysu_run_folder_holds_logs_checkpoints_and_results(sysu_run: Path) -> None:
    names = {path.name for path in sysu_run.iterdir()}
    expected = {"log.txt", "log.jsonl", "checkpoint_latest.pth", "checkpoint_ep001.pth"}
    assert expected | {"checkpoint_ep002.pth", "results.json", "results.md"} <= names
    assert not [name for name in names if name.endswith(".tmp")]
    header = (sysu_run / "log.txt").read_text()
    for needle in ("  batch_size: 8", "  seed: 0", '"commit": ', '"torch": ', '"device": "cpu"'):
        assert needle in header
    assert "epoch 2/2 step 2/2: loss" in header
    records = _records(sysu_run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["step"] for r in records] == [2, 4]
    assert all(math.isfinite(r[k]) for r in records for k in ("loss", "ce", "triplet", "sp"))
    # Epoch 1 is a monitoring evaluation (--test_freq 1), epoch 2 the final one.
    assert all("sysu_all_bnneck_rank1" in r for r in records)
    results = json.loads((sysu_run / "results.json").read_text())
    assert results["sysu_all"]["trials"] == list(range(10))
    latest = _load(sysu_run / "checkpoint_latest.pth")
    assert (latest["epoch"], latest["step_in_epoch"], latest["global_step"]) == (2, 0, 4)
    assert latest["args"]["batch_size"] == 8 and latest["environment"]["device"] == "cpu"
    first = _load(sysu_run / "checkpoint_ep001.pth")
    assert first["epoch"] == 1
    # SYSU's schedule overwrites the live weights with the EMA every 2 epochs, after the save:
    # epoch 1's checkpoint holds live weights of their own, epoch 2's the live weights from
    # before the overwrite, marked as owing it.
    for state in (first, latest):
        assert not all(torch.equal(state["model"][k], state["ema"][k]) for k in state["model"])
    assert "ema_overwrite_pending" not in first and latest["ema_overwrite_pending"] is True
    # The final results say which weights they scored: the live model, and the EMA beside it.
    assert (results["sysu_all"]["weights"], results["sysu_all_ema"]["weights"]) == ("live", "ema")
    assert "| sysu_all bnneck (live) |" in (sysu_run / "results.md").read_text()
    mode = (sysu_run / "checkpoint_latest.pth").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_regdb_runs_evaluate_both_directions(regdb_runs: Path) -> None:
    for trial in (1, 2):
        run = regdb_runs / f"regdb_trial{trial}"
        results = json.loads((run / "results.json").read_text())
        # The live weights' results, and the EMA's beside them.
        assert set(results) == {"regdb_v2i", "regdb_i2v", "regdb_v2i_ema", "regdb_i2v_ema"}
        assert {"rank1", "mAP", "mINP"} <= set(results["regdb_v2i"]["bnneck"])
        assert _load(run / "checkpoint_latest.pth")["args"]["trial"] == trial
        assert "regdb_i2v_pool_rank1" in _records(run)[-1]


# ----- bad input: one line, status 2, nothing written ---------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch_size", "6"], "--batch_size 6 is not divisible by --num_pos 4"),
        (["--batch_size", "4"], "at least 2 identities"),
        (["--epochs", "0"], "--epochs 0: expected a positive integer"),
        (["--lr", "-1"], "--lr -1.0: expected a positive value"),
        (["--ema_decay", "1.5"], "--ema_decay 1.5: expected a value in [0, 1)"),
        (["--label_smooth", "1"], "--label_smooth 1.0"),
        (["--log_freq", "0"], "--log_freq 0"),
        (["--img_h", "16"], "--img_h/--img_w 16x32"),
        (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
        (["--device", "gpu"], "--device gpu: expected cpu, cuda or cuda:N"),
        (["--resume", "/nonexistent/ck.pth"], "--resume /nonexistent/ck.pth: checkpoint file"),
        (["--pretrained", "/nonexistent/r18.pth"], "--pretrained /nonexistent/r18.pth: file"),
    ],
)
def test_flag_errors_are_one_line_and_leave_no_run_folder(
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
    extra: list[str],
    message: str,
) -> None:
    if extra[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = run_cli(train.main, train_argv(toy_sysu, tmp_path / "runs", "bad", *extra))
    err = capsys.readouterr().err
    line = expect_error(code, err, message)
    assert err.strip() == line  # refused before anything else was logged
    assert not (tmp_path / "runs").exists()


def test_regdb_trial_out_of_range(
    toy_regdb: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    code = run_cli(train.main, train_argv(toy_regdb, tmp_path / "runs", "x", "--trial", "11"))
    expect_error(code, capsys.readouterr().err, "--trial 11: RegDB trials are 1-10")
    assert not (tmp_path / "runs").exists()


def _refuses(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
    *message: str,
) -> str:
    code = run_cli(train.main, argv)
    return expect_error(code, capsys.readouterr().err, *message)


def test_missing_and_wrong_data_roots_name_what_is_absent(
    toy_regdb: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    runs = tmp_path / "runs"
    missing = tmp_path / "nowhere"
    argv = [*train_argv(toy_regdb, runs, "x"), "--data_root", str(missing), "--dataset", "sysu"]
    _refuses(argv, capsys, expect_error, f"--data_root {missing}: folder not found", "cam1/")
    # A RegDB folder given as SYSU-MM01: every SYSU entry is named.
    argv = [*train_argv(toy_regdb, runs, "x"), "--dataset", "sysu"]
    line = _refuses(argv, capsys, expect_error, "not a SYSU-MM01 folder")
    assert "cam1/, cam2/" in line and "exp/train_id.txt" in line
    # A RegDB folder lacking trial 3's index files.
    partial = tmp_path / "regdb"
    (partial / "idx").mkdir(parents=True)
    argv = train_argv(partial, runs, "x", "--trial", "3")
    line = _refuses(argv, capsys, expect_error, "not a RegDB folder")
    assert "idx/train_visible_3.txt, idx/train_thermal_3.txt" in line
    assert not runs.exists()


def test_corrupt_image_is_named(
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    data = tmp_path / "sysu"
    shutil.copytree(toy_sysu, data, ignore=shutil.ignore_patterns("cache"))
    broken = data / "cam1" / "0003" / "0001.jpg"
    broken.write_bytes(b"not a jpeg at all")
    _refuses(train_argv(data, tmp_path / "runs", "x"), capsys, expect_error, str(broken))
    assert not (tmp_path / "runs").exists()
    assert not list((data / "cache").glob("sysu*"))  # no half-built image cache either


def test_bad_test_images_stop_training_before_the_run_folder(
    toy_sysu: Path,
    toy_regdb: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    # A RegDB test index naming an image that is not there: file and index line are named.
    regdb = tmp_path / "regdb"
    shutil.copytree(toy_regdb, regdb, ignore=shutil.ignore_patterns("cache"))
    index = regdb / "idx" / "test_visible_1.txt"
    lines = index.read_text().splitlines()
    label = lines[3].rsplit(None, 1)[1]
    lines[3] = f"Visible/{label}/missing.bmp {label}"
    index.write_text("\n".join(lines) + "\n")
    missing = regdb / "Visible" / label / "missing.bmp"
    _refuses(
        train_argv(regdb, tmp_path / "runs", "x"),
        capsys,
        expect_error,
        f"{index}:4: test image {missing} not found",
    )
    # A corrupt SYSU query image (infrared camera of a test id).
    sysu = tmp_path / "sysu"
    shutil.copytree(toy_sysu, sysu, ignore=shutil.ignore_patterns("cache"))
    test_ids = (sysu / "exp" / "test_id.txt").read_text().strip().split(",")
    queries = [
        p for i in test_ids for c in (3, 6) for p in (sysu / f"cam{c}" / f"{int(i):04d}").glob("*")
    ]
    broken = sorted(queries)[0]
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    line = _refuses(train_argv(sysu, tmp_path / "runs", "x"), capsys, expect_error, str(broken))
    assert "test image" in line
    assert not (tmp_path / "runs").exists()
    assert not list((sysu / "cache").glob("sysu*")) and not (regdb / "cache").exists()


def test_sysu_ids_without_images_stop_training(
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    sysu = tmp_path / "sysu"
    shutil.copytree(toy_sysu, sysu, ignore=shutil.ignore_patterns("cache"))
    ids = sysu / "exp" / "test_id.txt"
    ids.write_text(ids.read_text().strip() + ",901,902\n")
    _refuses(
        train_argv(sysu, tmp_path / "runs", "x"),
        capsys,
        expect_error,
        f"{ids}: 2 id(s) without any image in cam1..cam6",
        "901, 902",
    )
    assert not (tmp_path / "runs").exists()


def test_flip_is_an_option_of_every_script() -> None:
    import search

    args = train.get_args_parser().parse_args(["--data_root", "d", "--flip"])
    assert args.flip and not train.get_args_parser().parse_args(["--data_root", "d"]).flip
    assert search.get_args_parser().parse_args(["--data_root", "d", "--flip"]).flip


def test_malformed_id_and_index_files_name_file_and_line(
    toy_sysu: Path,
    toy_regdb: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    sysu = tmp_path / "sysu"
    shutil.copytree(toy_sysu, sysu, ignore=shutil.ignore_patterns("cache", "cam*"))
    for cam in range(1, 7):
        (sysu / f"cam{cam}").mkdir()
    (sysu / "exp" / "val_id.txt").write_text("2,14\n15,x3\n")
    _refuses(
        train_argv(sysu, tmp_path / "runs", "x"),
        capsys,
        expect_error,
        f"{sysu / 'exp' / 'val_id.txt'}:2: expected comma-separated integer ids, found 'x3'",
    )
    regdb = tmp_path / "regdb"
    shutil.copytree(toy_regdb, regdb, ignore=shutil.ignore_patterns("cache"))
    index = regdb / "idx" / "train_thermal_1.txt"
    lines = index.read_text().splitlines()
    lines[4] = "Thermal/4/t_0004_01.bmp four"
    index.write_text("\n".join(lines) + "\n")
    _refuses(train_argv(regdb, tmp_path / "runs", "x"), capsys, expect_error, f"{index}:5:")
    assert not (tmp_path / "runs").exists()


def test_unwritable_output_folders(
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    read_only_folder: Path,
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    argv = train_argv(toy_sysu, blocker / "runs", "x")
    _refuses(argv, capsys, expect_error, f"{blocker} is a file, not a folder")
    locked = read_only_folder
    argv = train_argv(toy_sysu, locked / "runs", "x")
    _refuses(argv, capsys, expect_error, f"{locked} is not writable")
    assert not (locked / "runs").exists() and not (blocker.parent / "runs").exists()


def test_refuses_to_overwrite_an_existing_run(
    sysu_run: Path,
    toy_sysu: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    before = (sysu_run / "log.jsonl").read_text()
    argv = train_argv(toy_sysu, sysu_run.parent, sysu_run.name)
    _refuses(argv, capsys, expect_error, "already holds a run", "--resume")
    assert (sysu_run / "log.jsonl").read_text() == before


def test_overwrite_starts_over_in_a_used_run_folder(
    toy_sysu: Path, tmp_path: Path, train_argv: Callable[..., list[str]]
) -> None:
    run = tmp_path / "again"
    run.mkdir()
    (run / "log.jsonl").write_text('{"epoch": 7, "loss": 1.0}\n')
    (run / "checkpoint_ep009.pth").write_bytes(b"stale")
    (run / "notes.md").write_text("mine")
    argv = train_argv(toy_sysu, tmp_path, "again", "--overwrite", "--max_steps", "1")
    assert run_cli(train.main, argv) == 0
    assert [r["epoch"] for r in _records(run)] == [1]
    assert not (run / "checkpoint_ep009.pth").exists()
    assert (run / "notes.md").read_text() == "mine"  # only the run's own files are removed


def test_bad_resume_checkpoints(
    sysu_run: Path,
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    good = sysu_run / "checkpoint_ep001.pth"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:100_000])
    text = tmp_path / "notes.pth"
    text.write_text("epoch 3\n")
    runs = tmp_path / "runs"
    # Resumed runs continue in the checkpoint's folder (tmp_path): nothing may appear there.
    for path, message in ((truncated, "truncated/corrupt"), (text, "not a PyTorch checkpoint")):
        argv = train_argv(toy_sysu, runs, "", "--resume", str(path))
        _refuses(argv, capsys, expect_error, str(path), message)
    all_split = str(REPO / "configs" / "resnet18_all_split.json")
    argv = train_argv(toy_sysu, runs, "new", "--resume", str(good), "--config_path", all_split)
    line = _refuses(argv, capsys, expect_error, "architecture differs from --config_path")
    assert "15 slot(s): layer2.0.downsample.bn (shared vs split)" in line
    argv = train_argv(toy_sysu, runs, "new", "--resume", str(good), "--batch_size", "12")
    _refuses(argv, capsys, expect_error, "--batch_size 8; this run has --batch_size 12")
    argv = train_argv(toy_sysu, runs, "new", "--resume", str(sysu_run / LATEST))
    _refuses(argv, capsys, expect_error, "at epoch 2, beyond --epochs 1")
    # A checkpoint whose classifier does not fit this data's identities: the shapes are named.
    state = _load(good)
    state["model"]["classifier.weight"] = state["model"]["classifier.weight"][:7]
    torch.save(state, tmp_path / "other_ids.pth")
    argv = train_argv(toy_sysu, runs, "new", "--resume", str(tmp_path / "other_ids.pth"))
    _refuses(
        argv, capsys, expect_error, "shape mismatch", "classifier.weight (7, 512) vs (10, 512)"
    )
    (tmp_path / "other_ids.pth").unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.pth", "truncated.pth"]


# ----- crash safety -------------------------------------------------------------------------
@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_write_checkpoint_failure_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    path = tmp_path / "checkpoint_latest.pth"
    write_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def broken_save(obj: object, handle: object, *args: object, **kwargs: object) -> None:
        handle.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise failure

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(type(failure)):
        write_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_sigterm_stops_cleanly_with_a_resumable_checkpoint(
    toy_sysu: Path,
    tmp_path: Path,
    train_argv: Callable[..., list[str]],
    start_training: Callable[..., tuple[subprocess.Popen[str], list[str]]],
) -> None:
    argv = train_argv(toy_sysu, tmp_path, "run", "--max_steps", "0", "--epochs", "50")
    proc, lines = start_training(argv, tmp_path)
    assert "epoch 1/50 step 1/" in lines[-1]
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    rest = proc.stderr.read()
    code = proc.wait(timeout=120)
    err = "".join(lines) + rest
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "error:" not in err
    checkpoint = tmp_path / "run" / "checkpoint_latest.pth"
    assert f"stopped by SIGTERM; resumable checkpoint: {checkpoint}" in err
    state = _load(checkpoint)
    assert state["epoch"] == 0 and 1 <= state["step_in_epoch"] < 13
    assert state["global_step"] == state["step_in_epoch"]
    assert state["epoch_losses"]["count"] == state["step_in_epoch"]
    assert not list((tmp_path / "run").glob("*.tmp"))
    # No hidden file but the run folder's lock file (emptied: no holder once the run ended).
    assert [p.name for p in (tmp_path / "run").glob(".*")] == [".lock"]
    assert (tmp_path / "run" / ".lock").read_text() == ""


def test_a_second_signal_stops_at_once(
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    train_argv: Callable[..., list[str]],
) -> None:
    step = engine.Trainer.training_step

    def impatient(self: engine.Trainer, *batch: object) -> dict[str, torch.Tensor]:
        terms = step(self, *batch)  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return terms

    monkeypatch.setattr(engine.Trainer, "training_step", impatient)
    assert run_cli(train.main, train_argv(toy_sysu, tmp_path, "twice")) == 130
    err = capsys.readouterr().err
    assert "SIGINT: stopping after this step" in err and err.rstrip().endswith("error: interrupted")
    assert "Traceback" not in err
    assert not (tmp_path / "twice" / LATEST).exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    step = engine.Trainer.training_step

    def nan_at_step_3(self: engine.Trainer, *batch: object) -> dict[str, torch.Tensor]:
        terms = step(self, *batch)  # type: ignore[arg-type]
        if self.global_step == 2:  # the first step of epoch 2
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(engine.Trainer, "training_step", nan_at_step_3)
    # Losses are read back only every 5 steps: the epoch's running sum still catches step 3.
    argv = train_argv(toy_sysu, tmp_path, "nan", "--epochs", "2", "--log_freq", "5")
    checkpoint = tmp_path / "nan" / "checkpoint_latest.pth"
    _refuses(
        argv,
        capsys,
        expect_error,
        "loss is nan in epoch 2 (at or before step 2)",
        f"Last good checkpoint: {checkpoint}",
    )
    assert _load(checkpoint)["epoch"] == 1
    assert [r["epoch"] for r in _records(tmp_path / "nan")] == [1]


def test_diverging_run_never_saves_non_finite_weights(
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    argv = train_argv(toy_sysu, tmp_path, "lr", "--lr", "1e30", "--epochs", "3")
    _refuses(argv, capsys, expect_error, "stopped without saving. Last good checkpoint: ")
    checkpoint = tmp_path / "lr" / "checkpoint_latest.pth"
    if checkpoint.exists():
        state = _load(checkpoint)
        assert all(v.isfinite().all() for v in state["model"].values() if v.is_floating_point())
