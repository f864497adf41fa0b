"""test.py: checkpoints alone rebuild their model, both data sets' protocols, the authors'
checkpoint layout, --save_json, and one-line refusals of bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from data import regdb_test, sysu_gallery, sysu_query
from model import SHARED, Arch, save_arch
from model.arch import arch_from_dict
from utils.base.cli import run_cli
from utils.engine.trainer import LATEST
from utils.evaluation.metrics import eval_regdb, eval_sysu, pairwise_distance, summarize

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
# By file: ``import test`` could find the standard library's test package instead.
_spec = importlib.util.spec_from_file_location("cmnas_test_cli", REPO / "test.py")
assert _spec is not None and _spec.loader is not None
test_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_cli)
# Our BN branch names and the authors'.
AUTHOR_BRANCH = {"visible": "visible_bn", "infrared": "thermal_bn", "shared": "sharable_bn"}
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def run_test(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """test.py in-process: (status, stdout, stderr)."""
    code = run_cli(test_cli.main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_rows(out: str) -> dict[str, list[str]]:
    """The printed Markdown table as {protocol: cells}."""
    rows = {}
    for line in out.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("protocol", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def table_cells(metrics: dict[str, float]) -> list[str]:
    """What the table prints for a metrics dict (mean ± std over trials when std > 0)."""
    cells = []
    for key in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP"):
        cell = f"{metrics[key]:.2f}"
        if metrics.get(f"{key}_std", 0) > 0:
            cell += f" ± {metrics[f'{key}_std']:.2f}"
        cells.append(cell)
    return cells


def to_authors_layout(state: dict[str, torch.Tensor], arch: Arch) -> dict[str, torch.Tensor]:
    """Our state dict in the authors' layout: ``module.``, three BNs per slot (unused: junk)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[-2] in AUTHOR_BRANCH:
            parts[-2] = AUTHOR_BRANCH[parts[-2]]
        out["module." + ".".join(parts)] = value.clone()
    junk = torch.Generator().manual_seed(0)
    for slot, choice in arch.slots.items():
        unused = ("visible", "infrared") if choice == SHARED else ("shared",)
        reference = f"backbone.{slot}.{'shared' if choice == SHARED else 'visible'}"
        for branch in unused:
            for name in BN_TENSORS:
                like = state[f"{reference}.{name}"]
                value = (
                    torch.randint(0, 99, like.shape, generator=junk, dtype=like.dtype)
                    if not like.is_floating_point()
                    else torch.rand(like.shape, generator=junk) * 7 + 1
                )
                out[f"module.backbone.{slot}.{AUTHOR_BRANCH[branch]}.{name}"] = value
    return out


@pytest.fixture(scope="module")
def authors_checkpoint(sysu_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's last checkpoint in the authors' layout, next to their ``config.cfg``."""
    folder = tmp_path_factory.mktemp("authors")
    ours = torch.load(sysu_run / LATEST, map_location="cpu", weights_only=True)
    arch = arch_from_dict(ours["arch"])
    state = {
        "epoch": ours["epoch"],
        "model": to_authors_layout(ours["model"], arch),
        "ema": to_authors_layout(ours["ema"], arch),
        "optimizer": {"state": {}, "param_groups": []},
    }
    torch.save(state, folder / "checkpoint002.pth.tar")
    save_arch(arch, folder / "config.cfg")
    return folder / "checkpoint002.pth.tar"


# ----- end to end ---------------------------------------------------------------------------
def test_sysu_checkpoint_alone_all_trials_matches_training_and_json(
    sysu_run: Path, toy_sysu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "sysu.json"
    argv = ["--data_root", str(toy_sysu), "--weights", str(sysu_run / LATEST), "--ema"]
    code, out, err = run_test([*argv, "--save_json", str(out_json)], capsys)
    assert code == 0, err
    payload = json.loads(out_json.read_text())
    result = payload["results"]["sysu all single-shot"]
    assert result["trials"] == list(range(10)) and len(result["per_trial"]) == 10
    assert payload["img_size"] == [64, 32]  # from the checkpoint: no size flags given
    # The final evaluation of training scored the same EMA weights with the same protocol.
    trained = json.loads((sysu_run / "results.json").read_text())["sysu_all_ema"]
    for kind in ("pool", "bnneck"):
        assert result[kind] == trained[kind]
    # The JSON holds the numbers of the printed table.
    rows = table_rows(out)
    assert set(rows) == {"sysu all single-shot pool", "sysu all single-shot bnneck"}
    for kind in ("pool", "bnneck"):
        assert rows[f"sysu all single-shot {kind}"] == table_cells(result[kind])


def test_sysu_single_trial(
    sysu_run: Path, toy_sysu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data_root", str(toy_sysu), "--weights", str(sysu_run / LATEST), "--ema"]
    code, out, err = run_test(
        [*argv, "--trial", "3", "--save_json", str(tmp_path / "t.json")], capsys
    )
    assert code == 0, err
    result = json.loads((tmp_path / "t.json").read_text())["results"]["sysu all single-shot"]
    assert result["trials"] == [3]
    trained = json.loads((sysu_run / "results.json").read_text())["sysu_all_ema"]
    assert result["per_trial"][0] == trained["per_trial"][3]
    assert "±" not in out


def test_regdb_both_directions_on_the_checkpoints_trial(
    regdb_runs: Path, toy_regdb: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = regdb_runs / "regdb_trial2"
    out_json = tmp_path / "regdb.json"
    argv = ["--dataset", "regdb", "--data_root", str(toy_regdb), "--weights", str(run / LATEST)]
    code, out, err = run_test([*argv, "--ema", "--save_json", str(out_json)], capsys)
    assert code == 0, err
    results = json.loads(out_json.read_text())["results"]
    assert set(results) == {"regdb trial 2 v2i", "regdb trial 2 i2v"}  # trial 2: the checkpoint's
    trained = json.loads((run / "results.json").read_text())
    for direction in ("v2i", "i2v"):
        for kind in ("pool", "bnneck"):
            assert (
                results[f"regdb trial 2 {direction}"][kind]
                == trained[f"regdb_{direction}_ema"][kind]
            )
    assert set(table_rows(out)) == {f"{name} {k}" for name in results for k in ("pool", "bnneck")}


def test_authors_layout_gives_the_same_numbers(
    sysu_run: Path,
    toy_sysu: Path,
    authors_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    common = ["--data_root", str(toy_sysu), "--img_h", "64", "--img_w", "32", "--trial", "0"]
    for ema in ([], ["--ema"]):
        ours, theirs = tmp_path / "ours.json", tmp_path / "theirs.json"
        argv = [*common, *ema, "--weights", str(sysu_run / LATEST), "--save_json", str(ours)]
        assert run_test(argv, capsys)[0] == 0
        config = str(authors_checkpoint.parent / "config.cfg")
        argv = [*common, *ema, "--weights", str(authors_checkpoint), "--config_path", config]
        code, _, err = run_test([*argv, "--save_json", str(theirs)], capsys)
        assert code == 0, err
        assert "authors' layout" in err and "dropped" in err  # the unused BNs are reported
        got = json.loads(theirs.read_text())["results"]
        assert got == json.loads(ours.read_text())["results"]


def test_visualize_writes_rank_lists(
    sysu_run: Path, toy_sysu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data_root", str(toy_sysu), "--weights", str(sysu_run / LATEST), "--trial", "0"]
    code, _, err = run_test(
        [*argv, "--save_json", str(tmp_path / "r.json"), "--visualize", "2"], capsys
    )
    assert code == 0, err
    assert len(list((tmp_path / "rank_lists" / "sysu").glob("*.png"))) == 2


def test_flip_is_marked_in_table_and_json(
    sysu_run: Path, toy_sysu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data_root", str(toy_sysu), "--weights", str(sysu_run / LATEST), "--trial", "0"]
    plain, flipped = tmp_path / "plain.json", tmp_path / "flip.json"
    code, out, err = run_test([*argv, "--save_json", str(plain)], capsys)
    assert code == 0, err
    assert "(flip)" not in out and json.loads(plain.read_text())["flip"] is False
    code, out, err = run_test([*argv, "--flip", "--save_json", str(flipped)], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == f"{sysu_run / LATEST} (flip)"
    payload = json.loads(flipped.read_text())
    assert payload["flip"] is True
    assert payload["results"]["sysu all single-shot"]["flip"] is True
    assert json.loads(plain.read_text())["results"]["sysu all single-shot"]["flip"] is False


def test_rerank_is_marked_in_table_and_json(
    sysu_run: Path, toy_sysu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data_root", str(toy_sysu), "--weights", str(sysu_run / LATEST), "--trial", "2"]
    plain, reranked = tmp_path / "plain.json", tmp_path / "rerank.json"
    code, out, err = run_test([*argv, "--save_json", str(plain)], capsys)
    assert code == 0, err
    assert "re-ranked" not in out and json.loads(plain.read_text())["rerank"] is False
    flags = ["--rerank", "--k1", "6", "--k2", "2", "--lambda_value", "0.25", "--flip"]
    code, out, err = run_test([*argv, *flags, "--save_json", str(reranked)], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == f"{sysu_run / LATEST} (flip) (re-ranked k1=6 k2=2 lambda=0.25)"
    payload = json.loads(reranked.read_text())
    expected = {"k1": 6, "k2": 2, "lambda_value": 0.25}
    assert payload["rerank"] == expected
    result = payload["results"]["sysu all single-shot"]
    assert result["rerank"] == expected and result["flip"] is True
    assert json.loads(plain.read_text())["results"]["sysu all single-shot"]["rerank"] is False
    assert table_rows(out)["sysu all single-shot bnneck"] == table_cells(result["bnneck"])


def test_save_features_sysu_union_gallery_with_draw_mask(
    sysu_run: Path, toy_sysu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, out_json = tmp_path / "features.npz", tmp_path / "r.json"
    argv = ["--data_root", str(toy_sysu), "--weights", str(sysu_run / LATEST), "--ema"]
    code, _, err = run_test(
        [*argv, "--save_features", str(out), "--save_json", str(out_json)], capsys
    )
    assert code == 0, err
    saved = np.load(out, allow_pickle=False)
    assert saved["protocols"].tolist() == ["all"] and not saved["flip"]
    assert saved["trials"].tolist() == list(range(10)) and not saved["all_swap_roles"]
    query_paths = sysu_query(toy_sysu, "all")[0]
    assert saved["all_query_paths"].tolist() == query_paths
    assert saved["all_query_paths"].dtype.kind == "U"
    assert set(saved["all_query_modality"].tolist()) == {"infrared"}
    assert set(saved["all_gallery_modality"].tolist()) == {"visible"}
    assert set(saved["all_query_cams"].tolist()) == {3, 6}
    mask = saved["all_gallery_trials"]
    gallery_paths = saved["all_gallery_paths"]
    assert mask.shape == (10, gallery_paths.size) and mask.any(axis=0).all()
    for kind in ("pool", "bnneck"):
        norms = np.linalg.norm(saved[f"all_query_{kind}"], axis=1)
        np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
        assert saved[f"all_gallery_{kind}"].shape[0] == gallery_paths.size
    # The saved features reproduce the reported numbers of every draw.
    per_trial = json.loads(out_json.read_text())["results"]["sysu all single-shot"]["per_trial"]
    for draw in (0, 7):
        drawn = sysu_gallery(toy_sysu, "all", 1, draw)[0]
        rows = [gallery_paths.tolist().index(p) for p in drawn]
        assert sorted(rows) == np.flatnonzero(mask[draw]).tolist()
        for kind in ("pool", "bnneck"):
            dist = pairwise_distance(saved[f"all_query_{kind}"], saved[f"all_gallery_{kind}"][rows])
            metrics = eval_sysu(
                dist,
                saved["all_query_pids"],
                saved["all_gallery_pids"][rows],
                saved["all_query_cams"],
                saved["all_gallery_cams"][rows],
            )
            got = summarize(*metrics)
            assert got == pytest.approx(per_trial[draw][kind], abs=1e-4)


def test_save_features_regdb_both_directions(
    regdb_runs: Path, toy_regdb: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "regdb.npz"
    argv = ["--dataset", "regdb", "--data_root", str(toy_regdb)]
    argv += ["--weights", str(regdb_runs / "regdb_trial2" / LATEST), "--flip"]
    code, _, err = run_test([*argv, "--save_features", str(out)], capsys)
    assert code == 0, err
    saved = np.load(out, allow_pickle=False)
    assert saved["protocols"].tolist() == ["v2i", "i2v"] and saved["flip"]
    visible = regdb_test(toy_regdb, 2, "visible")
    assert saved["v2i_query_paths"].tolist() == visible[0]
    assert saved["i2v_gallery_paths"].tolist() == visible[0]
    assert saved["v2i_query_pids"].tolist() == visible[1].tolist()
    assert set(saved["v2i_query_modality"].tolist()) == {"visible"}
    assert saved["v2i_gallery_trials"].shape == (1, len(visible[0]))
    np.testing.assert_array_equal(saved["v2i_query_bnneck"], saved["i2v_gallery_bnneck"])
    dist = pairwise_distance(saved["i2v_query_bnneck"], saved["i2v_gallery_bnneck"])
    assert eval_regdb(dist, saved["i2v_query_pids"], saved["i2v_gallery_pids"])[1] > 0


# ----- bad input ----------------------------------------------------------------------------
def _refused(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
    *message: str,
    alone: bool = False,
) -> str:
    """Assert test.py refuses ``argv`` with one error line naming ``message``; nothing on stdout.

    ``alone``: the error is all of stderr (the refusal came before any work).
    """
    code, out, err = run_test(argv, capsys)
    assert not out
    line = expect_error(code, err, *message)
    if alone:
        assert err.strip() == line
    return line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trial", "12"], "--trial 12: SYSU gallery trials are 0-9"),
        (["--dataset", "regdb", "--trial", "11"], "--trial 11: RegDB trials are 1-10"),
        (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
        (["--test_batch", "0"], "--test_batch 0"),
        (["--visualize", "-1"], "--visualize -1"),
        (["--img_h", "8"], "--img_h/--img_w 8x32"),
        (["--rerank", "--k1", "0"], "--k1 0: expected an integer >= 1"),
        (["--k2", "-1"], "--k2 -1: expected an integer >= 1"),
        (["--rerank", "--lambda_value", "1.5"], "--lambda_value 1.5: expected a value in [0, 1]"),
        (["--lambda_value", "nan"], "--lambda_value nan: expected a value in [0, 1]"),
        (["--v2i_roles", "swapped"], "--v2i_roles swapped: SYSU-MM01 has no swapped-roles"),
        (
            ["--dataset", "regdb", "--trial", "1", "--v2i_roles", "both"],
            "--v2i_roles both: RegDB has no swapped-roles protocol",
        ),
        (
            ["--dataset", "llcm", "--direction", "i2v", "--v2i_roles", "swapped"],
            "--v2i_roles swapped: a visible-to-infrared variant, but --direction i2v",
        ),
    ],
)
def test_flag_errors(
    sysu_run: Path,
    toy_sysu: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
    extra: list[str],
    message: str,
) -> None:
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out_json = tmp_path / "r.json"
    argv = ["--data_root", str(toy_sysu), "--weights", str(sysu_run / LATEST), "--img_w", "32"]
    argv += ["--save_json", str(out_json), *extra]
    _refused(argv, capsys, expect_error, message, alone=True)
    assert not out_json.exists()


def test_bad_checkpoints_and_configs(
    sysu_run: Path,
    toy_sysu: Path,
    authors_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
) -> None:
    argv = ["--data_root", str(toy_sysu), "--save_json", str(tmp_path / "r.json")]
    missing = tmp_path / "missing.pth"
    _refused([*argv, "--weights", str(missing)], capsys, expect_error, f"{missing}: checkpoint")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((sysu_run / LATEST).read_bytes()[:50_000])
    _refused([*argv, "--weights", str(truncated)], capsys, expect_error, "truncated/corrupt")
    text = tmp_path / "text.pth"
    text.write_text("hello")
    _refused([*argv, "--weights", str(text)], capsys, expect_error, "not a PyTorch checkpoint")
    # Our checkpoint with a config that is not its architecture: the differing slots are named.
    config = str(REPO / "configs" / "resnet18_all_split.json")
    ours = [*argv, "--weights", str(sysu_run / LATEST)]
    line = _refused([*ours, "--config_path", config], capsys, expect_error, "differs from")
    assert "15 slot(s): layer2.0.downsample.bn (split vs shared)" in line
    # A tensor of the wrong shape is named with both shapes.
    state = torch.load(sysu_run / LATEST, map_location="cpu", weights_only=True)
    small = {k: state[k] for k in ("format", "version", "arch", "num_classes", "model")}
    small["model"]["bnneck.weight"] = small["model"]["bnneck.weight"][:256]
    torch.save(small, tmp_path / "small.pth")
    line = _refused([*argv, "--weights", str(tmp_path / "small.pth")], capsys, expect_error)
    assert "shape mismatch (checkpoint vs model): bnneck.weight (256,) vs (512,)" in line
    # The authors' checkpoint needs its config; one for another depth does not fit its weights.
    theirs = [*argv, "--weights", str(authors_checkpoint)]
    _refused(theirs, capsys, expect_error, "an authors' checkpoint needs --config_path")
    r50 = tmp_path / "r50.cfg"
    save_arch(Arch.uniform(50, SHARED), r50)
    line = _refused([*theirs, "--config_path", str(r50)], capsys, expect_error, "does not fit")
    assert "layer1.0.bn3" in line
    assert not (tmp_path / "r.json").exists()


def test_bad_data_and_output(
    sysu_run: Path,
    toy_sysu: Path,
    toy_regdb: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
) -> None:
    weights = ["--weights", str(sysu_run / LATEST)]
    # A RegDB folder given as SYSU-MM01: the missing entries are named.
    line = _refused(["--data_root", str(toy_regdb), *weights], capsys, expect_error, "missing")
    assert "cam1/" in line and "exp/test_id.txt" in line
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["--data_root", str(toy_sysu), *weights]
    for target, message in (
        (tmp_path / "no" / "r.json", "does not exist"),
        (blocker / "r.json", "is a file, not a folder"),
    ):
        _refused([*argv, "--save_json", str(target)], capsys, expect_error, message)
        npz = target.with_suffix(".npz")
        line = _refused([*argv, "--save_features", str(npz)], capsys, expect_error, message)
        assert line.startswith(f"error: --save_features {npz}: ")
    _refused(
        [*argv, "--save_features", str(tmp_path)], capsys, expect_error, "is a folder", alone=True
    )
    data = tmp_path / "sysu"
    shutil.copytree(toy_sysu, data, ignore=shutil.ignore_patterns("cache"))
    (data / "exp" / "test_id.txt").write_text("4;6,11,12\n")
    argv = ["--data_root", str(data), *weights, "--trial", "0"]
    _refused(argv, capsys, expect_error, f"{data / 'exp' / 'test_id.txt'}:1:", "'4;6'")
    (data / "exp" / "test_id.txt").write_text("4,6,11,12\n")
    broken = data / "cam3" / "0006" / "0002.jpg"
    broken.write_bytes(b"\xff\xd8 truncated jpeg")
    _refused(argv, capsys, expect_error, str(broken))
