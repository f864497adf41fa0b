"""test.py, utils.aggregate and the flags keep the README's promises.

test.py takes its data set from the checkpoint, warns of (and titles) another image size, prints
each table once, refuses to overwrite its checkpoint, checks the --visualize folder up front and
names a full disk; utils.aggregate never averages differently scored results and says which
std it reports; flags that cannot take effect, and abbreviated flags, are refused in one line.
"""

from __future__ import annotations

import argparse
import ast
import errno
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import train
from utils import aggregate
from utils.base.cli import run_cli
from utils.engine.trainer import LATEST

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
# By file: ``import test`` could find the standard library's test package instead.
_spec = importlib.util.spec_from_file_location("cmnas_test_promises", REPO / "test.py")
assert _spec is not None and _spec.loader is not None
test_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_cli)


def run_test(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """test.py in-process: (status, stdout, stderr)."""
    code = run_cli(test_cli.main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----- test.py ----------------------------------------------------------------------------------
def test_test_py_takes_the_checkpoints_data_set_and_prints_each_table_once(
    regdb_runs: Path, toy_regdb: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = regdb_runs / "regdb_trial1" / LATEST
    code, out, err = run_test(["--data_root", str(toy_regdb), "--weights", str(weights)], capsys)
    assert code == 0, err
    assert "| regdb trial 1 v2i bnneck |" in out and "| regdb trial 1 i2v pool |" in out
    assert out.count("| protocol |") == 1 and "| protocol |" not in err


def test_test_py_at_another_image_size_warns_and_says_so_in_the_title(
    sysu_run: Path, toy_sysu: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = sysu_run / LATEST
    argv = ["--data_root", str(toy_sysu), "--weights", str(weights), "--trial", "0"]
    code, out, err = run_test([*argv, "--img_h", "96", "--img_w", "48"], capsys)
    assert code == 0, err
    assert f"--img_h/--img_w 96x48: {weights} was trained at 64x32" in err
    assert out.splitlines()[0] == f"{weights} (at 96x48; trained at 64x32)"
    code, out, err = run_test(argv, capsys)  # its own size: no warning, the plain title
    assert code == 0, err
    assert "was trained at" not in err and out.splitlines()[0] == str(weights)


def test_test_py_outputs_never_overwrite_the_checkpoint(
    sysu_run: Path,
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
) -> None:
    weights = tmp_path / "model.pth"
    weights.write_bytes((sysu_run / LATEST).read_bytes())
    before = weights.read_bytes()
    argv = ["--data_root", str(toy_sysu), "--weights", str(weights)]
    for flag in ("--save_json", "--save_features"):
        code, out, err = run_test([*argv, flag, str(weights)], capsys)
        expect_error(code, err, f"{flag} {weights}: is the --weights checkpoint")
        assert not out
    assert weights.read_bytes() == before


def test_test_py_checks_the_visualize_folder_before_the_evaluation(
    sysu_run: Path,
    toy_sysu: Path,
    read_only_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
) -> None:
    monkeypatch.chdir(read_only_folder)
    evaluated: list[int] = []
    monkeypatch.setattr(test_cli, "run_tests", lambda *a, **k: evaluated.append(1))
    argv = ["--data_root", str(toy_sysu), "--weights", str(sysu_run / LATEST), "--visualize", "2"]
    code, _, err = run_test(argv, capsys)
    folder = Path.cwd()
    expect_error(code, err, f"--visualize: cannot write {folder / 'rank_lists'}: {folder} is not")
    assert not evaluated


def test_test_py_names_a_full_disk_when_saving_features(
    sysu_run: Path,
    toy_sysu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
) -> None:
    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    npz = tmp_path / "f.npz"
    argv = ["--data_root", str(toy_sysu), "--weights", str(sysu_run / LATEST), "--trial", "0"]
    code, _, err = run_test([*argv, "--save_features", str(npz)], capsys)
    line = expect_error(code, err, f"--save_features {npz}: no space left on {tmp_path}")
    assert "None" not in line and not list(tmp_path.glob("*.npz")) + list(tmp_path.glob(".*"))


# ----- flags that cannot take effect ----------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--k1", "5"], "--k1 5: takes effect only with --rerank"),
        (["--k2", "3", "--lambda_value", "0.5"], "--k2 3, --lambda_value 0.5: takes effect only"),
        (["--rerank", "--k1", "3", "--k2", "4"], "--k2 4: expected at most --k1 3"),
    ],
)
def test_test_py_refuses_rerank_flags_that_cannot_take_effect(
    sysu_run: Path,
    toy_sysu: Path,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
    extra: list[str],
    message: str,
) -> None:
    argv = ["--data_root", str(toy_sysu), "--weights", str(sysu_run / LATEST), *extra]
    code, out, err = run_test(argv, capsys)
    assert not out and err.strip() == expect_error(code, err, message)


def test_test_py_refuses_a_k1_larger_than_the_gallery(
    sysu_run: Path,
    toy_sysu: Path,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
) -> None:
    argv = ["--data_root", str(toy_sysu), "--weights", str(sysu_run / LATEST), "--trial", "0"]
    code, out, err = run_test([*argv, "--rerank", "--k1", "500"], capsys)
    # The toy gallery: 4 test identities x 3 visible cameras with images, one image each.
    expect_error(code, err, "--k1 500: larger than the gallery (12 images); expected at most 12")
    assert not out


def test_train_refuses_an_ema_overwrite_without_an_ema(
    capsys: pytest.CaptureFixture[str], expect_error: Callable[..., str]
) -> None:
    argv = ["--data_root", str(REPO), "--ema_decay", "0", "--ema_overwrite_every", "1"]
    code = run_cli(train.main, argv)
    expect_error(code, capsys.readouterr().err, "--ema_overwrite_every 1: takes effect only with")
    # (--ema_decay 0 alone trains: test_run_promises' baseline run uses it.)


def test_abbreviated_flags_are_refused(
    sysu_run: Path, toy_sysu: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data_root", str(toy_sysu), "--weights", str(sysu_run / LATEST)]
    with pytest.raises(SystemExit) as stopped:
        test_cli.main([*argv, "--save_feature", "f.npz"])
    assert stopped.value.code == 2
    assert "unrecognized arguments: --save_feature f.npz" in capsys.readouterr().err


def test_every_parser_of_the_project_refuses_abbreviations() -> None:
    missing = []
    for path in sorted(REPO.rglob("*.py")):
        if {".venv", "tests"} & set(path.relative_to(REPO).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (
                isinstance(node, ast.Call) and ast.unparse(node.func).endswith("ArgumentParser")
            ):
                continue
            flags = {k.arg: k.value for k in node.keywords}
            if not (
                isinstance(flags.get("allow_abbrev"), ast.Constant)
                and flags["allow_abbrev"].value is False
            ):
                missing.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not missing
    assert isinstance(train.get_args_parser(), argparse.ArgumentParser)


# ----- utils.aggregate --------------------------------------------------------------------------
def _result_file(path: Path, rank1: float, **setting: Any) -> str:
    """A test.py --save_json file of RegDB trial 1 with Rank-1 ``rank1`` (other metrics 50)."""
    metrics = {k: 50.0 for k in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")}
    metrics["rank1"] = rank1
    payload = {
        "weights": "w.pth", "ema": False, "flip": False, "rerank": False, "dataset": "regdb",
        "img_size": [256, 128], **setting,
        "results": {"regdb trial 1 v2i": {"pool": metrics, "bnneck": metrics}},
    }  # fmt: skip
    path.write_text(json.dumps(payload))
    return str(path)


def test_aggregate_keeps_differently_scored_results_apart_and_reports_the_sample_std(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rerank = {"k1": 20, "k2": 6, "lambda_value": 0.3}
    files = [
        _result_file(tmp_path / "a.json", 10.0),
        _result_file(tmp_path / "b.json", 20.0),
        _result_file(tmp_path / "c.json", 30.0),
        _result_file(tmp_path / "d.json", 90.0, flip=True),
        _result_file(tmp_path / "e.json", 70.0, rerank=rerank),
        _result_file(tmp_path / "f.json", 80.0, dataset="llcm"),
    ]
    summary = tmp_path / "summary.json"
    assert run_cli(aggregate.main, [*files, "--save_json", str(summary)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("mean ± std over runs (sample std: n - 1")
    rows = json.loads(summary.read_text())
    assert set(rows) == {
        "regdb v2i",
        "regdb v2i (flip)",
        "regdb v2i (re-ranked k1=20 k2=6 lambda_value=0.3)",
        "llcm regdb v2i",
    }
    plain = rows["regdb v2i"]
    assert (plain["runs"], plain["std"]) == (3, "sample")
    assert plain["bnneck"]["rank1"] == pytest.approx(20.0)
    assert plain["bnneck"]["rank1_std"] == pytest.approx(10.0)  # population std: 8.16
    assert "| regdb v2i (flip) bnneck (n=1) | 90.00 |" in out


def test_aggregate_refuses_a_binary_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], expect_error: Callable[..., str]
) -> None:
    binary = tmp_path / "model.pth"
    binary.write_bytes(b"PK\x03\x04\x80\xff\xfe binary")
    good = _result_file(tmp_path / "a.json", 10.0)
    code = run_cli(aggregate.main, [good, str(binary)])
    expect_error(code, capsys.readouterr().err, f"{binary}: not a test.py --save_json file")
    code = run_cli(aggregate.main, [good, str(tmp_path)])
    expect_error(code, capsys.readouterr().err, f"{tmp_path}: is a folder")
