"""Fixtures shared by the train.py / test.py / resume / script tests.

Tiny synthetic SYSU-MM01, RegDB and LLCM data sets are written once per session, and tiny command
lines (64x32 images) keep every run to a couple of ResNet-18 steps.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from model.arch import SHARED, SPLIT, Arch, load_arch

H, W = 64, 32
REPO = Path(__file__).resolve().parent.parent
SPLIT_CONFIG = REPO / "configs" / "resnet18_two_stream.json"  # split and shared slots


@pytest.fixture(scope="session")
def toy_sysu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SYSU-MM01: 10 training identities (8 + 2 val), 4 test identities."""
    from data.toy import make_sysu

    root = tmp_path_factory.mktemp("toy") / "sysu"
    make_sysu(root, 0, train_ids=8, val_ids=2, test_ids=4, images_per_camera=3, height=H, width=W)
    return root


@pytest.fixture(scope="session")
def toy_regdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny RegDB: 12 identities (6 train + 6 test per trial), 4 images per modality."""
    from data.toy import make_regdb

    root = tmp_path_factory.mktemp("toy") / "regdb"
    make_regdb(root, 0, ids=12, images_per_id=4, height=H, width=W)
    return root


@pytest.fixture(scope="session")
def toy_llcm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLCM in its real layout: 2 training identities, 3 test identities."""
    from llcm_tree import make_llcm_tree

    return make_llcm_tree(tmp_path_factory.mktemp("toy") / "llcm")


def tiny_train_argv(data: Path, save: Path, note: str, *extra: str) -> list[str]:
    """A train.py command line for a tiny CPU run (ResNet-18, 64x32, 2 steps per epoch)."""
    if (data / "test_vis").is_dir():
        dataset = "llcm"
    else:
        dataset = "regdb" if (data / "idx").is_dir() else "sysu"
    return [
        "--data_root", str(data), "--dataset", dataset, "--config_path", str(SPLIT_CONFIG),
        "--img_h", str(H), "--img_w", str(W), "--batch_size", "8", "--num_pos", "4",
        "--pretrained", "none", "--test_batch", "64", "--max_steps", "2", "--epochs", "1",
        "--log_freq", "1", "--save", str(save), "--note", note, *extra,
    ]  # fmt: skip


def start_training_process(argv: list[str], cwd: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """Start train.py in another process; return it, and its stderr so far, once a step ran."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *argv],
        cwd=cwd,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        lines.append(line)
        if " step 1/" in line:
            return proc, lines
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError("".join(lines))


@pytest.fixture(scope="session")
def start_training() -> Callable[[list[str], Path], tuple[subprocess.Popen[str], list[str]]]:
    """:func:`start_training_process`, for tests that stop or race a real training process."""
    return start_training_process


@pytest.fixture
def read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder nobody may write to, as a user sees it also when the tests run as root."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the permission check see what a user would
        real_access = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda path, mode, **kw: (
                not (mode & os.W_OK and Path(path) == locked) and real_access(path, mode, **kw)
            ),
        )
    yield locked
    locked.chmod(0o755)


@pytest.fixture(scope="session")
def train_argv() -> Callable[..., list[str]]:
    """``train_argv(data, save, note, *extra)``: see :func:`tiny_train_argv`."""
    return tiny_train_argv


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: tiny tensors gain nothing from more on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    """Undo ``--deterministic`` (a process-wide torch setting) after a test."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="session")
def sysu_run(toy_sysu: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folder of a tiny 2-epoch SYSU training (EMA, evaluation and a checkpoint per epoch)."""
    from train import main
    from utils.base.cli import run_cli

    save = tmp_path_factory.mktemp("runs")
    argv = tiny_train_argv(
        toy_sysu, save, "sysu", "--epochs", "2", "--save_freq", "1", "--test_freq", "1",
        "--ema_decay", "0.6",
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_cli(main, argv) == 0
    finally:
        torch.set_num_threads(threads)
    return save / "sysu"


@pytest.fixture(scope="session")
def regdb_runs(toy_regdb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``SAVE`` of ``train_regdb.sh`` run for real on trials 1 and 2 (``regdb_trial<t>``)."""
    save = tmp_path_factory.mktemp("runs")
    flags = tiny_train_argv(toy_regdb, save, "unused")
    flags = flags[flags.index("--img_h") : flags.index("--save")]  # the size/steps flags
    env = {
        **os.environ,
        "DATA_ROOT": str(toy_regdb),
        "SAVE": str(save),
        "TRIALS": "1 2",
        "CONFIG": str(SPLIT_CONFIG),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", str(REPO / "train_regdb.sh"), *flags],
        env=env,
        cwd=save,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return save


def check_error(code: int, err: str, *fragments: str) -> str:
    """Assert a user error: status 2, no traceback, one ``error:`` line, last; return it."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert err.rstrip().splitlines()[-1] == lines[0], err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def expect_error() -> Callable[..., str]:
    """``expect_error(code, stderr, *fragments)``: see :func:`check_error`."""
    return check_error


@pytest.fixture(scope="module")
def two_stream18() -> Arch:
    """The ResNet-18 architecture with split and shared slots (configs/resnet18_two_stream.json)."""
    arch = load_arch(SPLIT_CONFIG)
    assert SPLIT in arch.slots.values() and SHARED in arch.slots.values()
    return arch


@pytest.fixture(scope="session")
def test_script() -> ModuleType:
    """The ``test.py`` script as a module, loaded by file (``import test`` is the stdlib's)."""
    spec = importlib.util.spec_from_file_location("cmnas_test_script", REPO / "test.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
