"""Every ```python block of README.md runs as written, from a folder outside the checkout.

Each block runs in its own Python process whose working folder holds what the README's examples
name (``runs/sysu/checkpoint_latest.pth``, ``crops/``, synthetic ``SYSU-MM01`` and ``LLCM``),
with the checkout on ``PYTHONPATH`` as the README tells users to put it. A block preceded by a
line ``<!-- run by tests/test_NAME.py -->`` is run by that test instead, which must exist and
read README.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import build_model, load_arch
from model.checkpoint import checkpoint_header

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MARK = re.compile(r"^<!-- run by (tests/test_\w+\.py) -->$")


@dataclass(frozen=True)
class Block:
    """One ```python block: where it starts, its code, and the test that runs it (if marked)."""

    line: int
    code: str
    runner: str | None


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, each with the marker line before it, if any."""
    blocks, lines = [], text.splitlines()
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            end = lines.index("```", index + 1)
            before = [line.strip() for line in lines[:index] if line.strip()]
            marker = MARK.match(before[-1]) if before else None
            code = "\n".join(lines[index + 1 : end]) + "\n"
            blocks.append(Block(index + 1, code, marker.group(1) if marker else None))
            index = end
        index += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory: pytest.TempPathFactory, toy_sysu: Path, toy_llcm: Path) -> Path:
    """A folder outside the checkout holding what the README's examples name."""
    folder = tmp_path_factory.mktemp("user")
    arch = load_arch(REPO / "configs" / "resnet18_two_stream.json")
    torch.manual_seed(0)
    model, ema = build_model(arch, 395), build_model(arch, 395)
    header = checkpoint_header(arch, 395, 1, {"dataset": "sysu", "img_h": 64, "img_w": 32})
    (folder / "runs" / "sysu").mkdir(parents=True)
    checkpoint = {**header, "epoch": 1, "model": model.state_dict(), "ema": ema.state_dict()}
    torch.save(checkpoint, folder / "runs" / "sysu" / "checkpoint_latest.pth")
    rng = np.random.default_rng(0)
    for identity in ("0001", "0002"):
        (folder / "crops" / identity).mkdir(parents=True)
        pixels = rng.integers(0, 256, (128, 64), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "crops" / identity / "0.png")
    (folder / "SYSU-MM01").symlink_to(toy_sysu)
    (folder / "LLCM").symlink_to(toy_llcm)
    return folder


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 4
    assert any("FeatureExtractor(" in block.code for block in BLOCKS)
    assert any("model_from_checkpoint(" in block.code for block in BLOCKS)


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.runner is None], ids=lambda b: f"line{b.line}"
)
def test_block_runs_as_written(block: Block, user_folder: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=user_folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"README.md line {block.line}:\n{block.code}\n{done.stderr}"


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.runner is not None], ids=lambda b: f"line{b.line}"
)
def test_marked_block_names_a_test_that_reads_the_readme(block: Block) -> None:
    runner = REPO / str(block.runner)
    assert runner.is_file(), f"README.md line {block.line}: {block.runner} does not exist"
    assert "README.md" in runner.read_text(), f"{block.runner} does not read README.md"


def test_markers_are_found() -> None:
    text = "intro\n<!-- run by tests/test_data.py -->\n\n```python\nx = 1\n```\n```python\ny\n```\n"
    first, second = python_blocks(text)
    assert (first.line, first.code, first.runner) == (4, "x = 1\n", "tests/test_data.py")
    assert second.runner is None and second.code == "y\n"
