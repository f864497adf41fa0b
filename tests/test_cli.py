"""Every command-line entry point goes through ``run_cli``: Ctrl-C is one line and exit 130."""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from utils.base.cli import run_cli
from utils.base.errors import StopNow, UserError

REPO = Path(__file__).resolve().parent.parent
# What a user types: ``python X.py`` for the scripts, ``python -m X`` for the tools.
_SKIPPED = {".venv", "tests", ".git"}


def entry_points() -> list[str]:
    """Every file that runs as a program: a ``__main__`` block, or a package's ``__main__.py``."""
    found = []
    for path in sorted(REPO.rglob("*.py")):
        relative = path.relative_to(REPO)
        if _SKIPPED & set(relative.parts):
            continue
        if path.name == "__main__.py" or 'if __name__ == "__main__":' in path.read_text():
            found.append(relative.as_posix())
    return found


def test_entry_points_are_found() -> None:
    """The scan sees the scripts, the tools and the generator (a broken scan proves nothing)."""
    found = entry_points()
    for expected in (
        "train.py",
        "test.py",
        "search.py",
        "data/toy/__main__.py",
        "utils/pre_process_sysu.py",
        "utils/convert_arch.py",
        "utils/evaluation/heatmap.py",
    ):
        assert expected in found


@pytest.mark.parametrize("entry", entry_points())
def test_ctrl_c_is_one_line_in_every_entry_point(
    entry: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while a program reads its flags: ``error: interrupted``, exit 130, no traceback."""

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", interrupted)
    monkeypatch.setattr(sys, "argv", [entry])
    module = entry.removesuffix(".py").replace("/", ".").removesuffix(".__main__")
    with warnings.catch_warnings(), pytest.raises(SystemExit) as stop:
        # Running an already imported module again as __main__ warns; that is the point here.
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            if "/" in entry:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(REPO / entry), run_name="__main__")
        except KeyboardInterrupt:
            # Caught here: escaping, it would stop the whole test session.
            pytest.fail(f"{entry}: Ctrl-C escaped with a traceback (not run through run_cli)")
    assert stop.value.code == 128 + signal.SIGINT
    assert capsys.readouterr().err == "error: interrupted\n"


def test_run_cli_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    """0 passes through; UserError is 2 with its line; a StopNow names its signal."""

    def fails(argv: object) -> int:
        raise UserError("--flag x: expected y")

    def terminated(argv: object) -> int:
        raise StopNow(signal.SIGTERM)

    assert run_cli(lambda argv: 0) == 0
    assert run_cli(fails) == 2
    assert capsys.readouterr().err == "error: --flag x: expected y\n"
    assert run_cli(terminated) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "error: interrupted by SIGTERM\n"


def test_pre_process_sysu_ctrl_c_during_the_cache_build(toy_sysu: Path, tmp_path: Path) -> None:
    """A real SIGINT while images are decoded: one line, exit 130, no half-built cache left."""
    cache = tmp_path / "cache"
    # The process interrupts itself once the first images are being decoded, so the signal
    # arrives during the build whatever the machine's speed.
    program = (
        "import os, runpy, signal, sys\n"
        "import data.cache as cache\n"
        "decode = cache.load_images\n"
        "def interrupted(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return decode(*args, **kwargs)\n"
        "cache.load_images = interrupted\n"
        "sys.argv = ['pre_process_sysu', *sys.argv[1:]]\n"
        "runpy.run_module('utils.pre_process_sysu', run_name='__main__', alter_sys=True)\n"
    )
    argv = ["--data_root", str(toy_sysu), "--img_h", "8", "--img_w", "4", "--no_progress"]
    done = subprocess.run(
        [sys.executable, "-c", program, *argv, "--cache_dir", str(cache)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == "error: interrupted"
    assert "building" in done.stderr  # it was interrupted in the build, not before
    assert list(cache.iterdir()) == []
