"""Typed settings: each declared once (its flag, default, check), built once from the flags, the
data set's defaults, a setting added in one place reaching every layer, and a run built from
settings alone (no command line), whose log handlers are closed at its end."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch

import search
import test as test_script
import train
from data import get_dataset
from utils.base.cli import build, run_cli, setting
from utils.base.errors import UserError
from utils.engine import options as options_module
from utils.engine.options import search_settings, training_settings
from utils.engine.settings import (
    AT_LEAST_0,
    RECIPE,
    DataSettings,
    EvalSettings,
    OptimSettings,
    SearchSettings,
    TrainSettings,
)
from utils.engine.trainer import LATEST, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent


def _train_flags(*extra: str) -> TrainSettings:
    parsed = train.get_args_parser().parse_args(["--data_root", str(REPO), *extra])
    return training_settings(vars(parsed))


def test_settings_defaults_are_the_flags_defaults() -> None:
    """Settings built in code (the benchmark's way) mean what the same run's flags mean."""
    parsed = vars(train.get_args_parser().parse_args(["--data_root", "x"]))
    built = TrainSettings(DataSettings("x"), Path("run"))
    assert build(TrainSettings, parsed, folder=Path("run")) == built
    # Resolved from the data set, and the re-ranking parameters recorded with their defaults.
    resolved = {"ema_decay": built.ema, "ema_overwrite_every": 2, "k1": 20, "k2": 6}
    assert built.flags() == {**parsed, **resolved, "lambda_value": 0.3}
    searched = vars(search.get_args_parser().parse_args(["--data_root", "x"]))
    for item in fields(SearchSettings):
        if item.name != "train":
            assert getattr(SearchSettings(built), item.name) == searched[item.name], item.name
    assert EvalSettings().rerank is None and not parsed["rerank"]
    assert OptimSettings().milestones == (40, 70)


@pytest.mark.parametrize("dataset", ["sysu", "regdb"])
def test_the_data_sets_ema_defaults_are_resolved_in_the_settings(dataset: str) -> None:
    expected = get_dataset(dataset)
    built = TrainSettings(DataSettings("x", dataset), Path("run"))
    assert (built.ema, built.overwrite_every) == (expected.ema_decay, expected.ema_overwrite_every)
    parsed = _train_flags("--dataset", dataset)
    assert (parsed.ema, parsed.overwrite_every) == (built.ema, built.overwrite_every)
    # The checkpoint's `args` record the resolved values, as before the settings existed.
    assert parsed.flags()["ema_decay"] == built.ema and parsed.flags()["trial"] == 1
    assert _train_flags("--ema_decay", "0.5", "--no-ema_overwrite").overwrite_every == 0


def test_training_settings_keep_the_flags_and_name_the_run_folder() -> None:
    settings = _train_flags("--save", "out", "--seed", "3", "--milestones", "5", "--flip")
    assert settings.folder == Path("out/train_sysu_all_shared_seed3")
    assert settings.optimizer.milestones == (5,) and settings.evaluation.flip
    flags = settings.flags()
    dests = [a.dest for a in train.get_args_parser()._actions if a.dest != "help"]  # noqa: SLF001
    assert list(flags) == dests  # every flag, in the parser's order
    assert flags["milestones"] == [5] and flags["flip"] and flags["save"] == "out"
    resumed = _train_flags("--resume", str(REPO / "README.md"))
    assert resumed.folder == REPO  # a resume without --note continues in the checkpoint's folder
    # Built in code, the settings describe themselves by flag name.
    built = TrainSettings(DataSettings("x"), Path("run"), batch_size=8).flags()
    assert built["batch_size"] == 8 and built["img_h"] == 256 and list(built) == dests


def test_search_settings_never_overwrite_and_name_their_run() -> None:
    argv = ["--data_root", str(REPO), "--depth", "18", "--seed", "2"]
    settings = search_settings(vars(search.get_args_parser().parse_args(argv)))
    flags = settings.train.flags()
    assert settings.train.overwrite_every == flags["ema_overwrite_every"] == 0
    assert flags["note"] == "search_sysu_r18_softmax_seed2" and flags["depth"] == 18
    assert settings.train.folder == Path("runs/search_sysu_r18_softmax_seed2")
    regdb = TrainSettings(DataSettings("x", "regdb"), Path("run"))
    assert regdb.overwrite_every == 10 and SearchSettings(regdb).train.overwrite_every == 0
    with pytest.raises(UserError, match="the search never copies the EMA into the supernet"):
        parsed = search.get_args_parser().parse_args([*argv, "--ema_overwrite_every", "2"])
        search_settings(vars(parsed))


@pytest.mark.parametrize("script", ["train", "test"])
def test_the_image_size_is_checked_with_one_message(
    script: str,
    sysu_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
) -> None:
    argv = ["--data_root", str(tmp_path), "--img_h", "16", "--img_w", "8"]
    if script == "test":
        argv += ["--weights", str(sysu_run / "checkpoint_latest.pth")]
    code = run_cli(train.main if script == "train" else test_script.main, argv)
    expect_error(code, capsys.readouterr().err, "--img_h/--img_w 16x8: expected at least 32x16")


def test_a_run_built_from_settings_trains_and_closes_its_log(
    toy_sysu: Path, tmp_path: Path
) -> None:
    """No command line: settings in code, a Trainer, train(); the log handlers go at the end."""
    settings = TrainSettings(
        DataSettings(str(toy_sysu), "sysu", 1, 64, 32, str(tmp_path / "cache")),
        tmp_path / "run",
        evaluation=EvalSettings("cpu", "none", 64),
        config_path=str(REPO / "configs/resnet18_two_stream.json"),
        pretrained="none",
        epochs=1,
        batch_size=8,
        max_steps=1,
    )
    trainer = Trainer(settings)
    results = trainer.train()
    assert "sysu_all_bnneck_rank1" in results
    assert (tmp_path / "run" / "log.txt").read_text().count("epoch 1/1 step 1/1") == 1
    root = logging.getLogger()
    assert not [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    logging.getLogger("after").warning("this line stays out of the finished run's log.txt")
    assert "stays out" not in (tmp_path / "run" / "log.txt").read_text()
    # The checkpoint's `args` hold the settings by flag name, for test.py and a resume.
    saved = torch.load(tmp_path / "run" / LATEST, map_location="cpu", weights_only=True)["args"]
    assert saved["img_h"] == 64 and saved["batch_size"] == 8 and saved["trial"] == 1


@dataclass(frozen=True)
class ClippedSettings(TrainSettings):
    """train.py's settings with one more, declared in this one place."""

    grad_clip: float = setting(0.0, "clip the gradient norm here (0: never)", RECIPE, **AT_LEAST_0)


def test_a_setting_declared_once_reaches_parser_settings_checkpoint_and_help(
    monkeypatch: pytest.MonkeyPatch,
    toy_sysu: Path,
    tmp_path: Path,
    train_argv: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
) -> None:
    monkeypatch.setattr(options_module, "TrainSettings", ClippedSettings)
    parser = train.get_args_parser()
    assert parser.parse_args(["--data_root", "x"]).grad_clip == 0.0
    text = " ".join(parser.format_help().split())
    assert "--grad_clip GRAD_CLIP clip the gradient norm here (0: never)" in text
    assert text.index("--pretrained PRETRAINED") < text.index("--grad_clip G") < text.index("run:")
    argv = train_argv(toy_sysu, tmp_path, "clip", "--epochs", "2", "--max_steps", "1")
    settings = training_settings(vars(parser.parse_args([*argv, "--grad_clip", "2.5"])))
    assert isinstance(settings, ClippedSettings) and settings.grad_clip == 2.5
    code = run_cli(train.main, [*argv, "--grad_clip", "-1"])
    expect_error(code, capsys.readouterr().err, "--grad_clip -1.0: expected a value >= 0")

    assert run_cli(train.main, [*argv, "--grad_clip", "2.5", "--epochs", "1"]) == 0
    checkpoint = tmp_path / "clip" / LATEST
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)["args"]
    assert stored["grad_clip"] == 2.5 and list(stored) == list(settings.flags())
    # --resume alone takes the stored value over as the flag's default.
    assert run_cli(train.main, ["--resume", str(checkpoint), "--epochs", "2"]) == 0
    resumed = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["args"]["grad_clip"] == 2.5
