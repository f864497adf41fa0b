"""A user's module named with ``--plugin``: its data set and its loss train, resume, test, search
and plot from the shell (the checkpoint and the log remember them); a plugin that cannot be
imported is one line naming it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import test as test_script
import train
from model.losses import LOSS_TERMS
from utils import plot
from utils.base.cli import run_cli
from utils.plot import collect_series, read_log

from conftest import H, SPLIT_CONFIG, W  # isort: skip

REPO = Path(__file__).resolve().parent.parent
PLUGIN = '''
"""A user's data set (SYSU-MM01's layout under another name) and loss, registered on import."""
import torch

from data import register_dataset
from data.sysu import SYSU
from model.losses import LossTerm, register_loss


@register_dataset
class MySYSU(SYSU):
    name, title, short_title = "mysysu", "MySYSU", "MySYSU"


def spread_loss(visible: torch.Tensor, infrared: torch.Tensor) -> torch.Tensor:
    return (visible.mean(dim=0) - infrared.mean(dim=0)).pow(2).sum()


register_loss(
    LossTerm("spread", spread_loss, features="pool", labels=False, weight=0.5,
             flag="spread_lambda", help="weight of the spread loss", search=False)
)
'''
TINY = [
    "--img_h", str(H), "--img_w", str(W), "--batch_size", "8", "--num_pos", "4",
    "--pretrained", "none", "--test_batch", "64", "--max_steps", "1", "--log_freq", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the user's module ``my_sets`` (and a broken one), outside the repo."""
    folder = tmp_path_factory.mktemp("user_code")
    (folder / "my_sets.py").write_text(PLUGIN)
    (folder / "broken_sets.py").write_text('raise RuntimeError("no data here")\n')
    return folder


def shell(plugin_dir: Path, *argv: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGV`` in the repository as a user would, the plugin folder on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(plugin_dir), "OMP_NUM_THREADS": "1"}
    words = [sys.executable, *(str(word) for word in argv)]
    done = subprocess.run(words, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def plugin_run(plugin_dir: Path, toy_sysu: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of train.py on the plugin's data set with the plugin's loss, then resumed."""
    runs = tmp_path_factory.mktemp("runs")
    shell(
        plugin_dir, "train.py", "--plugin", "my_sets", "--dataset", "mysysu", "--data_root",
        toy_sysu, "--config_path", SPLIT_CONFIG, *TINY, "--epochs", "1", "--spread_lambda",
        "0.25", "--save", runs, "--note", "mine",
    )  # fmt: skip
    checkpoint = runs / "mine" / "checkpoint_latest.pth"
    # --resume alone: the checkpoint names the plugin, which is imported again.
    shell(plugin_dir, "train.py", "--resume", checkpoint, "--epochs", "2")
    return runs / "mine"


def test_a_plugin_trains_resumes_and_is_recorded(plugin_run: Path) -> None:
    saved = torch.load(plugin_run / "checkpoint_latest.pth", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2
    args = saved["args"]
    assert (args["plugin"], args["dataset"], args["spread_lambda"]) == (["my_sets"], "mysysu", 0.25)
    records = [json.loads(line) for line in (plugin_run / "log.jsonl").read_text().splitlines()]
    assert [record["loss_terms"] for record in records] == [
        ["ce", "triplet", "sp", "cmmd", "spread"]
    ] * 2
    assert all(record["spread"] >= 0 for record in records)


def test_test_py_imports_the_checkpoints_plugin(
    plugin_run: Path, plugin_dir: Path, toy_sysu: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results.json"
    weights = plugin_run / "checkpoint_latest.pth"
    shell(plugin_dir, "test.py", "--data_root", toy_sysu, "--weights", weights, "--save_json", out)
    results = json.loads(out.read_text())
    assert results["dataset"] == "mysysu" and list(results["results"]) == ["mysysu all single-shot"]


def test_plot_draws_the_plugins_loss_without_it(plugin_run: Path, plugin_dir: Path) -> None:
    assert "spread" not in LOSS_TERMS  # this process never imported the plugin
    assert "spread" in collect_series(read_log(plugin_run))["loss"]
    shell(plugin_dir, "-m", "utils.plot", plugin_run)
    assert (plugin_run / "curves.png").is_file()
    out = plugin_run / "with_plugin.png"  # not in the repository, where the command runs
    shell(plugin_dir, "-m", "utils.plot", plugin_run, "--plugin", "my_sets", "--out", out)
    assert out.is_file()


def test_the_search_hint_trains_from_the_shell(
    plugin_dir: Path, toy_sysu: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    done = shell(
        plugin_dir, "search.py", "--plugin", "my_sets", "--dataset", "mysysu", "--data_root",
        toy_sysu, "--depth", "18", *TINY, "--epochs", "2", "--arch_warmup", "1", "--save", runs,
        "--note", "search",
    )  # fmt: skip
    hint = done.stdout.splitlines()[-1].strip()
    assert "--plugin my_sets" in hint and "--dataset mysysu" in hint
    words = shlex.split(hint)
    assert words[:2] == ["python", "train.py"]
    # The printed command as given, at tiny sizes so that it runs in seconds.
    small = ["--batch_size", "8", "--pretrained", "none", "--test_batch", "64", "--epochs", "1"]
    shell(plugin_dir, *words[1:], *small, "--max_steps", "1", "--save", runs, "--note", "found")
    saved = torch.load(runs / "found" / "checkpoint_latest.pth", weights_only=True)
    assert saved["args"]["plugin"] == ["my_sets"]


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("no_such_sets", "ModuleNotFoundError: No module named 'no_such_sets'"),
        ("broken_sets", "RuntimeError: no data here"),
    ],
)
def test_a_plugin_that_cannot_be_imported_is_one_line(
    module: str,
    message: str,
    plugin_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
) -> None:
    monkeypatch.syspath_prepend(str(plugin_dir))
    line = f"--plugin {module}: cannot be imported ({message})"
    for main in (train.main, test_script.main):
        code = run_cli(main, ["--plugin", module, "--data_root", "x", "--weights", "w"])
        expect_error(code, capsys.readouterr().err, line)
    expect_error(run_cli(plot.main, ["run", "--plugin", module]), capsys.readouterr().err, line)


def test_a_recorded_plugin_that_is_gone_names_the_checkpoint(
    plugin_run: Path,
    toy_sysu: Path,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
) -> None:
    weights = plugin_run / "checkpoint_latest.pth"
    code = run_cli(test_script.main, ["--data_root", str(toy_sysu), "--weights", str(weights)])
    recorded = f"--plugin my_sets (recorded in {weights}): cannot be imported"
    expect_error(code, capsys.readouterr().err, recorded, "No module named 'my_sets'")
    code = run_cli(train.main, ["--resume", str(weights), "--epochs", "3"])
    expect_error(code, capsys.readouterr().err, recorded)
