"""Adding a data set as docs/extending.md says: its sketch runs as written through train.py,
test.py and search.py; register_dataset from user code; test options a data set cannot honour
are refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

import data.dataset
import search
import test as test_script
import train
from data import DataSet, ProtocolSettings, get_dataset, register_dataset, registered_datasets
from data import registry as registry_module
from data.registry import DataSetRegistry, dataset_names
from utils.base.cli import run_cli
from utils.engine.options import data_parser

from conftest import H, W, tiny_train_argv  # isort: skip

REPO = Path(__file__).resolve().parent.parent
MARK = "<!-- run by tests/test_dataset_recipe.py -->"
RECIPE = "docs/extending.md"  # the manual's page holding the sketch


def readme_sketch() -> str:
    """The python block that follows this test's mark in docs/extending.md."""
    text = (REPO / RECIPE).read_text()
    found = re.search(re.escape(MARK) + r"\n```python\n(.*?)\n```", text, re.DOTALL)
    assert found, f"{RECIPE} has no python block after {MARK}"
    return found.group(1)


def docstring_sketch() -> str:
    """The sketch in the DataSet module docstring."""
    doc = data.dataset.__doc__ or ""
    start = doc.index("A minimal module")
    return textwrap.dedent(doc[doc.index("::\n", start) + 3 :]).strip("\n")


@pytest.fixture
def own_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[DataSetRegistry]:
    """A registry holding the shipped data sets, thrown away after the test."""
    registry = DataSetRegistry(registered_datasets())
    monkeypatch.setattr(registry_module, "DATASETS", registry)
    yield registry


def make_nightvi(root: Path, train_ids: int = 10, test_ids: int = 3) -> Path:
    """A tree in the manual sketch's layout: index files for training, camera folders for test."""
    rng = np.random.default_rng(0)

    def image(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)

    (root / "idx").mkdir(parents=True)
    for folder, index in (("train_vis", "train_vis.txt"), ("train_ir", "train_ir.txt")):
        lines = []
        for pid in range(train_ids):
            for n in range(4):
                rel = f"{folder}/{pid:04d}/{n}.jpg"
                image(root / rel)
                lines.append(f"{rel} {pid}\n")
        (root / "idx" / index).write_text("".join(lines))
    for folder in ("test_vis", "test_ir"):
        for pid in range(100, 100 + test_ids):
            for cam in (1, 2, 3):
                for n in range(2):
                    image(root / folder / f"cam{cam}" / f"{pid:04d}" / f"{n}.jpg")
    ids = ",".join(str(pid) for pid in range(100, 100 + test_ids))
    (root / "idx" / "test_id.txt").write_text(ids + "\n")
    return root


def run_sketch() -> ModuleType:
    """Execute the manual's sketch as a module of its own; return that module."""
    module = ModuleType("nightvi_from_readme")
    exec(compile(readme_sketch(), RECIPE, "exec"), module.__dict__)  # noqa: S102
    return module


def test_readme_and_docstring_show_the_same_sketch() -> None:
    assert readme_sketch() == docstring_sketch()


def test_readme_sketch_trains_tests_and_searches(
    own_registry: DataSetRegistry,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
    one_thread: None,
) -> None:
    assert "nightvi" not in dataset_names()
    module = run_sketch()
    assert get_dataset("nightvi").title == "NightVI" and isinstance(module.NightVI(), DataSet)
    root = make_nightvi(tmp_path / "NightVI")
    runs = tmp_path / "runs"
    argv = tiny_train_argv(root, runs, "night", "--dataset", "nightvi", "--test_freq", "1")
    assert run_cli(train.main, argv) == 0
    trained = json.loads((runs / "night" / "results.json").read_text())
    assert any(key.startswith("nightvi_i2v") for key in trained)

    weights = runs / "night" / "checkpoint_latest.pth"
    out = tmp_path / "r.json"
    argv = ["--dataset", "nightvi", "--data_root", str(root), "--weights", str(weights)]
    assert run_cli(test_script.main, [*argv, "--save_json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["nightvi i2v"] and results["nightvi i2v"]["trials"] == list(range(10))
    for flag in ("--direction v2i", "--shot 10"):
        code = run_cli(test_script.main, [*argv, *flag.split()])
        expect_error(code, capsys.readouterr().err, f"{flag}: NightVI has no ", "no test options")

    search_argv = [
        "--dataset", "nightvi", "--data_root", str(root), "--depth", "18", "--img_h", str(H),
        "--img_w", str(W), "--batch_size", "8", "--num_pos", "4", "--pretrained", "none",
        "--max_steps", "1", "--epochs", "2", "--arch_warmup", "1", "--save", str(runs),
        "--note", "night_search", "--test_batch", "64",
    ]  # fmt: skip
    assert run_cli(search.main, search_argv) == 0
    assert (runs / "night_search" / "arch.json").is_file()


def test_readme_sketch_placed_in_data_trains_and_tests_from_the_shell(tmp_path: Path) -> None:
    """The manual's in-library route, as written: the sketch saved as data/nightvi.py in a copy of
    the project and named in data/registry.py; then train.py and test.py as commands."""
    copy = tmp_path / "project"
    for package in ("data", "model", "utils"):
        shutil.copytree(
            REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    for script in ("train.py", "test.py"):
        shutil.copy2(REPO / script, copy / script)
    (copy / "data" / "nightvi.py").write_text(readme_sketch() + "\n")
    named = re.search(r"`(DATASET_MODULES = \(.*?\))`", (REPO / RECIPE).read_text())
    assert named, f"{RECIPE} does not say how data/registry.py names the module"
    registry = copy / "data" / "registry.py"
    text = registry.read_text()
    assert "DATASET_MODULES: tuple[str, ...] = ()" in text
    registry.write_text(text.replace("DATASET_MODULES: tuple[str, ...] = ()", named.group(1)))

    root = make_nightvi(tmp_path / "NightVI")
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(script: str, *argv: str) -> None:
        done = subprocess.run(
            [sys.executable, script, *argv], cwd=copy, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr

    run("train.py", *tiny_train_argv(root, runs, "night", "--dataset", "nightvi"))
    trained = json.loads((runs / "night" / "results.json").read_text())
    assert any(key.startswith("nightvi_i2v") for key in trained)
    out = tmp_path / "r.json"
    weights = runs / "night" / "checkpoint_latest.pth"
    argv = ["--dataset", "nightvi", "--data_root", str(root), "--weights", str(weights)]
    run("test.py", *argv, "--trial", "0", "--save_json", str(out))
    assert list(json.loads(out.read_text())["results"]) == ["nightvi i2v"]


def test_register_dataset_from_user_code(own_registry: DataSetRegistry) -> None:
    class Tiny(DataSet):
        name, title, short_title = "tiny", "Tiny", "Tiny"
        ema_decay, ema_overwrite_every = 0.9, 1

    assert register_dataset(Tiny) is Tiny  # usable as a class decorator
    assert dataset_names()[:3] == ("sysu", "regdb", "llcm") and dataset_names()[-1] == "tiny"
    register_dataset(Tiny())  # the same class again: nothing changes
    assert dataset_names().count("tiny") == 1
    # --dataset choices are read when a parser is built.
    assert data_parser().parse_args(["--data_root", ".", "--dataset", "tiny"]).dataset == "tiny"

    class Other(Tiny):
        pass

    with pytest.raises(ValueError, match="'tiny' is already registered by"):
        register_dataset(Other)

    class Unnamed(Tiny):
        name = "Two Words"

    with pytest.raises(ValueError, match="expected a lowercase word"):
        register_dataset(Unnamed)

    class BadOption(Tiny):
        name = "badoption"
        test_options = {"direction": ("v2i",)}  # lacks the default "both"

    with pytest.raises(ValueError, match=r"test_options\['direction'\]"):
        register_dataset(BadOption)
    registry_module.unregister_dataset("tiny")
    assert "tiny" not in dataset_names()


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        (
            "sysu",
            ProtocolSettings(direction="v2i"),
            "--direction v2i: SYSU-MM01 has no choice of direction (it offers --mode all or "
            "indoor; --shot 1 or 10)",
        ),
        (
            "llcm",
            ProtocolSettings(shot=10),
            "--shot 10: LLCM has no choice of gallery images per folder (it offers --direction "
            "v2i, i2v or both; --v2i_roles defined, swapped or both)",
        ),
        (
            "regdb",
            ProtocolSettings(mode="indoor"),
            "--mode indoor: RegDB has no search modes (it offers --direction v2i, i2v or both)",
        ),
        ("regdb", ProtocolSettings(direction="up"), "--direction 'up': expected v2i, i2v or both"),
    ],
)
def test_options_a_data_set_cannot_honour_are_refused(
    name: str, settings: ProtocolSettings, message: str
) -> None:
    from utils.base.errors import UserError

    with pytest.raises(UserError) as err:
        get_dataset(name).protocols(settings)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        ("sysu", ["--tvsearch"], "--tvsearch: SYSU-MM01 has no choice of direction"),
        ("sysu", ["--direction", "v2i"], "--direction v2i: SYSU-MM01 has no choice of direction"),
        ("sysu", ["--direction", "i2v"], "--direction i2v: SYSU-MM01 has no choice of direction"),
        ("llcm", ["--shot", "10"], "--shot 10: LLCM has no choice of gallery images per folder"),
        ("llcm", ["--mode", "indoor"], "--mode indoor: LLCM has no search modes"),
        (
            "regdb",
            ["--tvsearch", "--direction", "v2i"],
            "--tvsearch (--direction i2v) contradicts --direction v2i",
        ),
    ],
)
def test_test_py_refuses_what_the_data_set_cannot_honour(
    sysu_run: Path,
    toy_sysu: Path,
    toy_regdb: Path,
    toy_llcm: Path,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
    data: str,
    extra: list[str],
    message: str,
) -> None:
    root = {"sysu": toy_sysu, "regdb": toy_regdb, "llcm": toy_llcm}[data]
    argv = ["--data_root", str(root), "--dataset", data, "--weights"]
    argv += [str(sysu_run / "checkpoint_latest.pth"), *extra]
    line = expect_error(run_cli(test_script.main, argv), capsys.readouterr().err, message)
    assert line == f"error: {message}" or line.startswith(f"error: {message} (")


def test_train_py_refuses_a_mode_the_data_set_lacks(
    toy_regdb: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
) -> None:
    runs = tmp_path / "runs"
    argv = tiny_train_argv(toy_regdb, runs, "x", "--mode", "indoor")
    code = run_cli(train.main, argv)
    expect_error(code, capsys.readouterr().err, "--mode indoor: RegDB has no search modes")
    assert not runs.exists()
