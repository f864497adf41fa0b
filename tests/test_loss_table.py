"""The loss table: one entry gives a term its flag and check, its place in training, its name in
``log.jsonl`` and its curve in ``curves.png``; the manual's recipe runs as written."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import train
from model.losses import LOSS_TERMS, LossRecipe, LossTerm, recipe_from, register_loss, search_terms
from utils.base.cli import run_cli
from utils.engine.options import loss_recipe, optim_parser
from utils.engine.settings import DataSettings, TrainSettings
from utils.plot import collect_series, plot_run, read_log

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPE = Path(__file__).resolve().parent.parent / "docs" / "extending.md"
SHIPPED = ("ce", "triplet", "sp", "cmmd")


@pytest.fixture
def loss_table() -> Iterator[dict[str, LossTerm]]:
    """The loss table, restored to its shipped terms afterwards."""
    shipped = dict(LOSS_TERMS)
    yield LOSS_TERMS
    LOSS_TERMS.clear()
    LOSS_TERMS.update(shipped)


def unit_loss(visible: torch.Tensor, infrared: torch.Tensor) -> torch.Tensor:
    """1 on every batch (so its logged value is its weight), still part of the graph."""
    return (visible.sum() + infrared.sum()) * 0.0 + 1.0


def _batch() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    ys = torch.tensor([0, 0, 1, 1])
    pool, bnneck = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    return pool, bnneck, torch.randn(8, 3, generator=gen), torch.cat([ys, ys])


def test_shipped_table_gives_the_flags_and_the_recipe() -> None:
    """The paper's terms in summing order; weight flags with their defaults, help and checks."""
    assert tuple(LOSS_TERMS) == SHIPPED
    assert search_terms() == ("triplet", "sp", "cmmd")
    parser = optim_parser()
    defaults = parser.parse_args([])
    assert (defaults.sp_lambda, defaults.cmmd_lambda) == (5.0, 0.05)
    text = " ".join(parser.format_help().split())
    assert "--sp_lambda SP_LAMBDA weight of the SP loss" in text
    assert "--cmmd_lambda CMMD_LAMBDA weight of the CMMD loss" in text
    args = parser.parse_args(["--sp_lambda", "2", "--margin", "0.3", "--label_smooth", "0.1"])
    recipe = loss_recipe(args)
    assert recipe == recipe_from({"sp": 2.0}, label_smooth=0.1, margin=0.3)
    assert recipe.flags() == {
        "label_smooth": 0.1, "margin": 0.3, "sp_lambda": 2.0, "cmmd_lambda": 0.05
    }  # fmt: skip
    # Settings built in code describe their recipe by the same flags, with the same defaults.
    built = TrainSettings(DataSettings("x"), Path("run")).flags()
    paper = LossRecipe().flags()
    assert {flag: built[flag] for flag in paper} == {f: getattr(defaults, f) for f in paper}
    with pytest.raises(ValueError, match=r"unknown loss term\(s\) \['centre'\]"):
        recipe_from({"centre": 1.0})


def test_table_refuses_clashes(loss_table: dict[str, LossTerm]) -> None:
    """A name or flag already taken, or logits for the architecture step, is refused."""
    with pytest.raises(ValueError, match="'sp' exists already"):
        register_loss(LossTerm("sp", unit_loss, labels=False))
    with pytest.raises(ValueError, match="flag --cmmd_lambda is taken"):
        register_loss(LossTerm("other", unit_loss, labels=False, flag="cmmd_lambda"))
    with pytest.raises(ValueError, match="the architecture step has no logits"):
        LossTerm("logit_norm", unit_loss, features="logits", labels=False)
    with pytest.raises(ValueError, match="features must be one of"):
        LossTerm("x", unit_loss, features="pooled")
    assert tuple(loss_table) == SHIPPED


@pytest.fixture
def refused(
    toy_regdb: Path,
    tmp_path: Path,
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
) -> Callable[..., str]:
    """``refused(fragment, *flags)``: train.py stops in one line holding ``fragment``, no run."""

    def check(fragment: str, *flags: str) -> str:
        argv = train_argv(toy_regdb, tmp_path, "bad", "--trial", "1", *flags)
        line = expect_error(run_cli(train.main, argv), capsys.readouterr().err, fragment)
        assert not (tmp_path / "bad").exists()
        return line

    return check


def test_weight_flags_are_checked(refused: Callable[..., str]) -> None:
    """A negative or non-finite weight is one line naming its flag."""
    refused("--sp_lambda -1.0: expected a finite value >= 0", "--sp_lambda", "-1")
    refused("--cmmd_lambda nan: expected a finite value >= 0", "--cmmd_lambda", "nan")


def test_a_term_added_in_a_test_trains_logs_and_plots(
    loss_table: dict[str, LossTerm],
    refused: Callable[..., str],
    toy_regdb: Path,
    tmp_path: Path,
    train_argv: Callable[..., list[str]],
) -> None:
    """One entry: a flag with its check, a term of the recipe, a key of log.jsonl, a curve."""
    register_loss(
        LossTerm("unit", unit_loss, features="pool", labels=False, weight=0.25,
                 flag="unit_lambda", help="weight of the unit loss", search=False)
    )  # fmt: skip
    parser = optim_parser()
    assert parser.parse_args([]).unit_lambda == 0.25
    assert "weight of the unit loss" in parser.format_help()
    assert search_terms() == ("triplet", "sp", "cmmd")
    pool, bnneck, logits, ys = _batch()
    assert list(LossRecipe()(pool, bnneck, logits, ys, 4)) == [*SHIPPED, "unit", "loss"]

    refused("--unit_lambda -2.0: expected a finite value >= 0", "--unit_lambda", "-2")
    argv = train_argv(toy_regdb, tmp_path, "run", "--trial", "1", "--unit_lambda", "0.5")
    assert run_cli(train.main, [*argv, "--epochs", "2", "--test_freq", "0"]) == 0
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [record["unit"] for record in records] == [0.5, 0.5]  # the flag's weight times 1

    series = collect_series(read_log(run))["loss"]
    assert list(series) == ["total", *SHIPPED, "unit"]
    assert series["unit"] == [(1.0, 0.5), (2.0, 0.5)]
    with_term = plot_run(run, tmp_path / "with.png").read_bytes()
    del loss_table["unit"]  # a key the table does not know is not a loss curve
    assert "unit" not in collect_series(read_log(run))["loss"]
    assert plot_run(run, tmp_path / "without.png").read_bytes() != with_term


def readme_recipe() -> str:
    """The Python block of the "Adding a loss" section of docs/extending.md."""
    section = RECIPE.read_text().split("## Adding a loss\n", 1)[1].split("\n## ", 1)[0]
    marker = r"<!-- run by tests/test_loss_table.py -->\n```python\n(.*?)```"
    marked = re.search(marker, section, re.S)
    assert marked is not None, "docs/extending.md: no marked Python block under 'Adding a loss'"
    return marked.group(1)


def test_readme_recipe_runs_as_written(loss_table: dict[str, LossTerm]) -> None:
    """The manual's block adds its term, flag and weight; the recipe computes it."""
    code = readme_recipe()
    assert code.count("def ") == 1 and code.count("LossTerm(") == 1  # one function, one entry
    namespace: dict[str, object] = {}
    exec(compile(code, str(RECIPE), "exec"), namespace)  # the manual's own code
    term = loss_table["center"]
    assert (term.flag, term.weight, term.search) == ("center_lambda", 0.1, False)
    assert optim_parser().parse_args(["--center_lambda", "0.3"]).center_lambda == 0.3
    pool, bnneck, logits, ys = _batch()
    terms = recipe_from({"center": 0.3})(pool, bnneck, logits, ys, 4)
    function = namespace["center_loss"]
    expected = function(bnneck[:4], ys[:4], bnneck[4:], ys[4:])  # type: ignore[operator]
    assert torch.isfinite(expected) and torch.equal(terms["center"], 0.3 * expected)
    assert "center" not in search_terms()
