"""The four shell scripts: their refusals, and real tiny runs ending in the aggregate table.

(``train_regdb.sh`` itself runs for real in the ``regdb_runs`` fixture.)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("train_sysu.sh", "train_regdb.sh", "test_sysu.sh", "test_regdb.sh")


def run_script(name: str, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``name`` from ``cwd`` (not the repository: relative paths are the caller's)."""
    environment = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        ["bash", str(REPO / name), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


def one_error(done: subprocess.CompletedProcess, *fragments: str) -> str:
    """The script failed with status 2 and exactly one ``error:`` line on stderr."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_data_root_is_named(script: str, tmp_path: Path) -> None:
    done = run_script(script, tmp_path, DATA_ROOT=str(tmp_path / "absent"), WEIGHTS="x{trial}")
    one_error(done, f"DATA_ROOT={tmp_path / 'absent'}", "set DATA_ROOT")
    assert list(tmp_path.iterdir()) == []


def test_test_regdb_needs_a_trial_pattern_and_every_checkpoint(
    toy_regdb: Path, tmp_path: Path
) -> None:
    done = run_script("test_regdb.sh", tmp_path, DATA_ROOT=str(toy_regdb), WEIGHTS="a/b.pth")
    one_error(done, "WEIGHTS=a/b.pth has no {trial} placeholder")
    pattern = str(tmp_path / "trial{trial}.pth")
    (tmp_path / "trial1.pth").write_bytes(b"")
    done = run_script(
        "test_regdb.sh", tmp_path, DATA_ROOT=str(toy_regdb), WEIGHTS=pattern, TRIALS="1 2"
    )
    one_error(done, f"no checkpoint for trial 2 at {tmp_path / 'trial2.pth'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial1.pth"]  # nothing written


def test_test_regdb_runs_and_aggregates_trials(
    regdb_runs: Path, toy_regdb: Path, tmp_path: Path
) -> None:
    done = run_script(
        "test_regdb.sh",
        regdb_runs,  # the default WEIGHTS pattern is relative: runs/regdb_trial{trial}/...
        "--ema",
        DATA_ROOT=str(toy_regdb),
        WEIGHTS="regdb_trial{trial}/checkpoint_latest.pth",
        TRIALS="1 2",
        OUT=str(tmp_path / "out"),
    )
    assert done.returncode == 0, done.stderr
    table = done.stdout[done.stdout.index("mean ± std over runs") :].splitlines()
    assert "| regdb v2i bnneck (n=2) |" in "\n".join(table)
    assert "| regdb i2v pool (n=2) |" in "\n".join(table)
    trials = [json.loads((tmp_path / "out" / f"trial{t}.json").read_text()) for t in (1, 2)]
    assert set(trials[1]["results"]) == {"regdb trial 2 v2i", "regdb trial 2 i2v"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for direction in ("v2i", "i2v"):
        values = [
            t["results"][f"regdb trial {i} {direction}"]
            for i, t in zip((1, 2), trials, strict=True)
        ]
        for kind in ("pool", "bnneck"):
            got = summary[f"regdb {direction}"][kind]
            ranks = [v[kind]["rank1"] for v in values]
            assert got["rank1"] == pytest.approx(statistics.mean(ranks))
            assert got["rank1_std"] == pytest.approx(statistics.stdev(ranks))  # sample std
        # Trial t was trained on trial t: each score is that run's own final evaluation.
        own = json.loads((regdb_runs / "regdb_trial2" / "results.json").read_text())
        # (--ema: the EMA weights, which the final evaluation reports as regdb_<direction>_ema.)
        assert values[1]["bnneck"] == own[f"regdb_{direction}_ema"]["bnneck"]


def test_test_sysu_runs_four_protocols(sysu_run: Path, toy_sysu: Path, tmp_path: Path) -> None:
    done = run_script(
        "test_sysu.sh",
        tmp_path,
        "--trial",
        "0",
        DATA_ROOT=str(toy_sysu),
        WEIGHTS=str(sysu_run / "checkpoint_latest.pth"),
        OUT=str(tmp_path / "out"),
    )
    assert done.returncode == 0, done.stderr
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {f"{m}_shot{s}.json" for m in ("all", "indoor") for s in (1, 10)} | {
        "summary.json"
    }
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary) == {
        "sysu all single-shot",
        "sysu all multi-shot",
        "sysu indoor single-shot",
        "sysu indoor multi-shot",
    }
    assert "| sysu indoor multi-shot bnneck (n=1) |" in done.stdout
