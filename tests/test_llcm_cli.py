"""LLCM end to end: train.py and test.py with --dataset llcm, flip, re-ranking, the swapped-roles
variant, numbers recomputed from --save_features, and bad data refused with one line."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from data import llcm_gallery, llcm_query
from utils.base.cli import run_cli
from utils.engine.trainer import LATEST
from utils.evaluation.metrics import eval_llcm, pairwise_distance, summarize
from utils.evaluation.rerank import euclidean_distances, rerank

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
# By file: ``import test`` could find the standard library's test package instead.
_spec = importlib.util.spec_from_file_location("cmnas_test_llcm", REPO / "test.py")
assert _spec is not None and _spec.loader is not None
test_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_cli)
KINDS = ("pool", "bnneck")


@pytest.fixture(scope="module")
def llcm_run(
    toy_llcm: Path, tmp_path_factory: pytest.TempPathFactory, train_argv: Callable[..., list[str]]
) -> Path:
    """Run folder of a tiny LLCM training (one epoch of two steps, final evaluation)."""
    from train import main

    save = tmp_path_factory.mktemp("runs")
    assert run_cli(main, train_argv(toy_llcm, save, "llcm", "--ema_decay", "0.6")) == 0
    return save / "llcm"


def run_test(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """test.py in-process: (status, stdout, stderr)."""
    code = run_cli(test_cli.main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_names(out: str) -> list[str]:
    """The row names of the printed Markdown table."""
    names = [line.strip("|").split("|")[0].strip() for line in out.splitlines() if line[:2] == "| "]
    return [name for name in names if name not in ("protocol", "---")]


def test_training_evaluates_both_directions_over_ten_draws(llcm_run: Path) -> None:
    results = json.loads((llcm_run / "results.json").read_text())
    # The live model (test.py) and the EMA weights (test.py --ema) are both scored.
    assert list(results) == ["llcm_v2i", "llcm_i2v", "llcm_v2i_ema", "llcm_i2v_ema"]
    for key, result in results.items():
        assert result["trials"] == list(range(10)) and len(result["per_trial"]) == 10
        assert result["flip"] is False and result["rerank"] is False
        assert result["weights"] == ("ema" if key.endswith("_ema") else "live")
    checkpoint = torch.load(llcm_run / LATEST, map_location="cpu", weights_only=False)
    assert checkpoint["args"]["dataset"] == "llcm" and checkpoint["args"]["ema_decay"] == 0.6


def test_numbers_equal_eval_llcm_from_saved_features(
    llcm_run: Path, toy_llcm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json, out_npz = tmp_path / "r.json", tmp_path / "f.npz"
    argv = ["--dataset", "llcm", "--data_root", str(toy_llcm), "--weights", str(llcm_run / LATEST)]
    argv += ["--ema", "--v2i_roles", "both"]
    code, out, err = run_test(
        [*argv, "--save_json", str(out_json), "--save_features", str(out_npz)], capsys
    )
    assert code == 0, err
    payload = json.loads(out_json.read_text())
    results = payload["results"]
    assert list(results) == ["llcm v2i", "llcm v2i roles-swapped", "llcm i2v"]
    assert table_names(out) == [f"{name} {kind}" for name in results for kind in KINDS]
    # The protocol as defined is what training evaluated (the same EMA weights).
    trained = json.loads((llcm_run / "results.json").read_text())
    for direction in ("v2i", "i2v"):
        for kind in KINDS:
            assert results[f"llcm {direction}"][kind] == trained[f"llcm_{direction}_ema"][kind]
    saved = np.load(out_npz, allow_pickle=False)
    assert saved["protocols"].tolist() == ["v2i", "v2i_roles_swapped", "i2v"]
    assert saved["v2i_query_paths"].tolist() == llcm_query(toy_llcm, "visible")[0]
    assert saved["i2v_query_paths"].tolist() == llcm_query(toy_llcm, "infrared")[0]
    assert saved["v2i_roles_swapped_swap_roles"] and not saved["v2i_swap_roles"]
    names = {"v2i": "llcm v2i", "i2v": "llcm i2v", "v2i_roles_swapped": "llcm v2i roles-swapped"}
    galleries = {"v2i": "infrared", "i2v": "visible", "v2i_roles_swapped": "infrared"}
    for key, gallery_modality in galleries.items():
        name = names[key]
        gallery_paths = saved[f"{key}_gallery_paths"].tolist()
        for draw in (0, 6):
            drawn = llcm_gallery(toy_llcm, gallery_modality, draw)[0]
            rows = [gallery_paths.index(path) for path in drawn]
            assert sorted(rows) == np.flatnonzero(saved[f"{key}_gallery_trials"][draw]).tolist()
            q = {f: saved[f"{key}_query_{f}"] for f in ("pids", "cams")}
            g = {f: saved[f"{key}_gallery_{f}"][rows] for f in ("pids", "cams")}
            for kind in KINDS:
                query = saved[f"{key}_query_{kind}"]
                gallery = saved[f"{key}_gallery_{kind}"][rows]
                if key == "v2i_roles_swapped":
                    # The reference script's arithmetic: gallery x query, evaluated as queries.
                    dist = pairwise_distance(gallery, query)
                    metrics = eval_llcm(dist, g["pids"], q["pids"], g["cams"], q["cams"])
                else:
                    dist = pairwise_distance(query, gallery)
                    metrics = eval_llcm(dist, q["pids"], g["pids"], q["cams"], g["cams"])
                expected = results[name]["per_trial"][draw][kind]
                assert summarize(*metrics) == pytest.approx(expected, abs=1e-4)


def test_flip_and_rerank_are_marked_and_rerank_is_per_draw(
    llcm_run: Path, toy_llcm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = str(llcm_run / LATEST)
    argv = ["--dataset", "llcm", "--data_root", str(toy_llcm), "--weights", weights]
    argv += ["--direction", "i2v", "--trial", "4"]
    code, out, err = run_test([*argv, "--flip"], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == f"{weights} (flip)"
    assert table_names(out) == ["llcm i2v pool", "llcm i2v bnneck"]
    out_json, out_npz = tmp_path / "r.json", tmp_path / "f.npz"
    flags = ["--rerank", "--k1", "3", "--k2", "2", "--lambda_value", "0.4"]
    code, out, err = run_test(
        [*argv, *flags, "--save_json", str(out_json), "--save_features", str(out_npz)], capsys
    )
    assert code == 0, err
    assert out.splitlines()[0] == f"{weights} (re-ranked k1=3 k2=2 lambda=0.4)"
    payload = json.loads(out_json.read_text())
    expected_marks = {"k1": 3, "k2": 2, "lambda_value": 0.4}
    assert payload["rerank"] == expected_marks and payload["flip"] is False
    result = payload["results"]["llcm i2v"]
    assert result["rerank"] == expected_marks and result["trials"] == [4]
    saved = np.load(out_npz, allow_pickle=False)
    for kind in KINDS:
        q, g = saved[f"i2v_query_{kind}"], saved[f"i2v_gallery_{kind}"]
        dist = rerank(
            euclidean_distances(q, g), euclidean_distances(q, q), euclidean_distances(g, g),
            k1=3, k2=2, lambda_value=0.4,
        )  # fmt: skip
        metrics = eval_llcm(
            dist, saved["i2v_query_pids"], saved["i2v_gallery_pids"], saved["i2v_query_cams"],
            saved["i2v_gallery_cams"],
        )  # fmt: skip
        assert summarize(*metrics) == pytest.approx(result["per_trial"][0][kind], abs=1e-4)


def test_training_with_rerank_marks_its_records(
    toy_llcm: Path,
    tmp_path: Path,
    train_argv: Callable[..., list[str]],
) -> None:
    from train import main

    argv = train_argv(
        toy_llcm, tmp_path, "r", "--rerank", "--k1", "4", "--flip", "--ema_decay", "0"
    )
    assert run_cli(main, argv) == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert list(results) == ["llcm_v2i_flip_rerank", "llcm_i2v_flip_rerank"]
    assert results["llcm_v2i_flip_rerank"]["rerank"] == {"k1": 4, "k2": 6, "lambda_value": 0.3}
    assert "| llcm_i2v_flip_rerank bnneck (live) |" in (tmp_path / "r" / "results.md").read_text()
    records = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert any("llcm_i2v_flip_rerank_bnneck_rank1" in record for record in records)


# ----- bad input ----------------------------------------------------------------------------
def _copy(toy_llcm: Path, tmp_path: Path) -> Path:
    data = tmp_path / "LLCM"
    shutil.copytree(toy_llcm, data, ignore=shutil.ignore_patterns("cache"))
    return data


def test_bad_index_files_are_refused_by_train_py(
    toy_llcm: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    train_argv: Callable[..., list[str]],
    expect_error: Callable[..., str],
) -> None:
    from train import main

    data = _copy(toy_llcm, tmp_path)
    index = data / "idx" / "train_vis.txt"
    lines = index.read_text().splitlines()
    index.write_text("\n".join([*lines[:2], "vis/0351/0351_c01_gone_rgb.jpg 0", *lines[2:]]))
    run = tmp_path / "runs"
    code = run_cli(main, train_argv(data, run, "bad"))
    expect_error(code, capsys.readouterr().err, f"{index}:3: image vis/0351/0351_c01_gone_rgb.jpg")
    index.write_text("\n".join([*lines[:1], "vis/0351/0351_c01_0_rgb.jpg zero"]))
    code = run_cli(main, train_argv(data, run, "bad"))
    expect_error(code, capsys.readouterr().err, f"{index}:2: expected 'relative/path.jpg label'")
    (data / "idx" / "train_nir.txt").unlink()
    code = run_cli(main, train_argv(data, run, "bad"))
    expect_error(code, capsys.readouterr().err, "not a LLCM folder", "missing idx/train_nir.txt")
    assert not (run / "bad").exists()


def test_bad_test_data_is_refused_by_test_py(
    llcm_run: Path,
    toy_llcm: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    expect_error: Callable[..., str],
) -> None:
    data = _copy(toy_llcm, tmp_path)
    argv = ["--dataset", "llcm", "--data_root", str(data), "--weights", str(llcm_run / LATEST)]
    ids = data / "idx" / "test_id.txt"
    ids.write_text("40,5\n12;7\n")
    code, out, err = run_test(argv, capsys)
    assert not out
    expect_error(code, err, f"{ids}:2: expected comma-separated integer ids, found '12;7'")
    ids.write_text("40,5,12\n")
    (data / "idx" / "train_nir.txt").unlink()
    code, out, err = run_test(argv, capsys)
    expect_error(code, err, "missing idx/train_nir.txt")
    shutil.rmtree(data / "test_nir")
    code, out, err = run_test(argv, capsys)
    expect_error(code, err, "missing idx/train_nir.txt, test_nir/")
