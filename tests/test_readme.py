"""README.md and docs/*.md stay true to the code.

Every ```python block runs as written, in its own Python process, from a folder outside the
checkout holding what the examples name (``runs/sysu/checkpoint_latest.pth``, ``crops/``,
synthetic ``SYSU-MM01`` and ``LLCM``), with the checkout on ``PYTHONPATH`` as the manual tells
users to put it. Every command of a ```bash block that runs a script, a project module or a
shipped shell script names only flags its tool's ``--help`` lists; every ``make`` target named
exists. A block preceded by a line ``<!-- run by tests/test_NAME.py -->`` is run by that test
instead, which must exist and read the file holding the block; a bash block marked for this test
runs here, each command as written with its optional ``[...]`` parts left out. Every relative link
resolves, every file of docs/ is reached from the README, and the README stays short.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from model import build_model, load_arch
from model.arch import save_arch
from model.checkpoint import checkpoint_header

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MANUAL = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 350
MARK = re.compile(r"^<!-- run by (tests/test_\w+\.py) -->$")
THIS_TEST = "tests/test_readme.py"
SCRIPTS = ("train.py", "test.py", "search.py")
PACKAGES = ("utils", "data", "model")
FLAG = re.compile(r"^--?[A-Za-z][\w-]*")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    """One fenced block: its file, where it starts, its language, code, and marked runner."""

    file: str
    line: int
    lang: str
    code: str
    runner: str | None


def fenced_blocks(text: str, file: str = "README.md") -> list[Block]:
    """The fenced blocks of a Markdown text, each with the marker line before it, if any."""
    blocks, lines = [], text.splitlines()
    index = 0
    while index < len(lines):
        if lines[index].startswith("```"):
            end = lines.index("```", index + 1)
            before = [line.strip() for line in lines[:index] if line.strip()]
            marker = MARK.match(before[-1]) if before else None
            code = "\n".join(lines[index + 1 : end]) + "\n"
            lang = lines[index][3:].strip()
            runner = marker.group(1) if marker else None
            blocks.append(Block(file, index + 1, lang, code, runner))
            index = end
        index += 1
    return blocks


def python_blocks(text: str, file: str = "README.md") -> list[Block]:
    """The ```python blocks of a Markdown text."""
    return [block for block in fenced_blocks(text, file) if block.lang == "python"]


def manual_blocks(lang: str) -> list[Block]:
    """The ``lang`` blocks of the README and of every file of docs/."""
    found = []
    for path in MANUAL:
        name = path.relative_to(REPO).as_posix()
        found += [b for b in fenced_blocks(path.read_text(), name) if b.lang == lang]
    return found


def commands(block: Block) -> list[list[str]]:
    """The command lines of a bash block as words (continuations joined, comments dropped)."""
    joined = block.code.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def block_id(block: Block) -> str:
    """A test id naming the block's file and line."""
    return f"{block.file}:{block.line}"


BLOCKS = manual_blocks("python")
BASH = manual_blocks("bash")


# ----- the fixture: a user's folder outside the checkout ---------------------------------------
def _crops(folder: Path, rng: np.random.Generator, identities: tuple[str, ...]) -> None:
    """One grey crop per identity, in a subfolder named after it."""
    for identity in identities:
        (folder / identity).mkdir(parents=True)
        pixels = rng.integers(0, 256, (128, 64), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / identity / "0.png")


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory: pytest.TempPathFactory, toy_sysu: Path, toy_llcm: Path) -> Path:
    """A folder outside the checkout holding what the manual's examples name."""
    folder = tmp_path_factory.mktemp("user")
    arch = load_arch(REPO / "configs" / "resnet18_two_stream.json")
    torch.manual_seed(0)
    model, ema = build_model(arch, 395), build_model(arch, 395)
    header = checkpoint_header(arch, 395, 1, {"dataset": "sysu", "img_h": 64, "img_w": 32})
    (folder / "runs" / "sysu").mkdir(parents=True)
    checkpoint = {**header, "epoch": 1, "model": model.state_dict(), "ema": ema.state_dict()}
    torch.save(checkpoint, folder / "runs" / "sysu" / "checkpoint_latest.pth")
    rng = np.random.default_rng(0)
    _crops(folder / "crops", rng, ("0001", "0002"))
    _crops(folder / "ir_crops", rng, ("0001", "0002"))
    _crops(folder / "rgb_crops", rng, ("0001", "0002", "0003"))
    (folder / "more.txt").write_text("crops/0002/0.png\n")
    save_arch(load_arch(REPO / "configs" / "two_stream.json"), folder / "config.cfg")
    (folder / "SYSU-MM01").symlink_to(toy_sysu)
    (folder / "LLCM").symlink_to(toy_llcm)
    return folder


def _user_env() -> dict[str, str]:
    """The environment the manual tells users to set: the checkout on PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# ----- python blocks ---------------------------------------------------------------------------
def test_the_manual_has_python_blocks() -> None:
    assert len(BLOCKS) >= 4
    assert any(block.file == "README.md" for block in BLOCKS)
    assert any("FeatureExtractor(" in block.code for block in BLOCKS)
    assert any("model_from_checkpoint(" in block.code for block in BLOCKS)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.runner is None], ids=block_id)
def test_block_runs_as_written(block: Block, user_folder: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=user_folder,
        env=_user_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{block_id(block)}:\n{block.code}\n{done.stderr}"


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS + BASH if b.runner not in (None, THIS_TEST)], ids=block_id
)
def test_marked_block_names_a_test_that_reads_its_file(block: Block) -> None:
    runner = REPO / str(block.runner)
    assert runner.is_file(), f"{block_id(block)}: {block.runner} does not exist"
    assert block.file in runner.read_text(), f"{block.runner} does not read {block.file}"


def test_markers_are_found() -> None:
    text = "intro\n<!-- run by tests/test_data.py -->\n\n```python\nx = 1\n```\n```python\ny\n```\n"
    first, second = python_blocks(text)
    assert (first.line, first.code, first.runner) == (4, "x = 1\n", "tests/test_data.py")
    assert second.runner is None and second.code == "y\n"
    bash = "```\nlayout\n```\n```bash\nmake a \\\n  b  # two\n\nmake c\n```\n"
    (block,) = [b for b in fenced_blocks(bash) if b.lang == "bash"]
    assert commands(block) == [["make", "a", "b"], ["make", "c"]]


# ----- bash blocks -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """A command line that runs one of the project's tools: which, and its arguments."""

    tool: str  # "train.py", a module name ("utils.match"), or a shell script ("./test_sysu.sh")
    args: tuple[str, ...]
    env: tuple[str, ...] = ()  # variables set in front of a shell script


def call_of(words: list[str]) -> Call | None:
    """The project tool a command line runs, if it runs one."""
    env = []
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        env.append(words[0].split("=", 1)[0])
        words = words[1:]
    if not words:
        return None
    head, rest = words[0], words[1:]
    if head.startswith("./") and head.endswith(".sh"):
        return Call(head, tuple(rest), tuple(env))
    if head == "torchrun":
        scripts = [i for i, word in enumerate(rest) if word in SCRIPTS]
        return Call(rest[scripts[0]], tuple(rest[scripts[0] + 1 :])) if scripts else None
    if head not in ("python", "python3") and not head.endswith("/python"):
        return None
    if rest[:1] == ["-m"] and rest[1].split(".")[0] in PACKAGES:
        return Call(rest[1], tuple(rest[2:]))
    if rest and rest[0] in SCRIPTS:
        return Call(rest[0], tuple(rest[1:]))
    return None


@cache
def help_text(tool: str, subcommand: str = "") -> str:
    """What ``python TOOL [SUBCOMMAND] --help`` prints, run in this process."""
    argv = [tool, *([subcommand] if subcommand else []), "--help"]
    out = io.StringIO()
    with (
        mock.patch.object(sys, "argv", argv),
        contextlib.redirect_stdout(out),
        warnings.catch_warnings(),
        pytest.raises(SystemExit) as stopped,
    ):
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module imported already
        if tool.endswith(".py"):
            runpy.run_path(str(REPO / tool), run_name="__main__")
        else:
            runpy.run_module(tool, run_name="__main__", alter_sys=True)
    assert stopped.value.code in (0, None), f"{' '.join(argv)} failed"
    return out.getvalue()


def known_flags(tool: str, args: tuple[str, ...]) -> set[str]:
    """The flags the tool's help lists (its subcommand's, where the first argument names one)."""
    text = help_text(tool)
    subcommands = {
        word for group in re.findall(r"\{([\w,-]+)\}", text) for word in group.split(",")
    }
    if args and args[0] in subcommands:
        text = help_text(tool, args[0])
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))


def flags_of(args: tuple[str, ...]) -> list[str]:
    """The flags among a command's arguments (optional ``[--x]`` included, ``--x=1`` cut)."""
    words = (word.strip("[]").split("=", 1)[0] for word in args)
    return [word for word in words if FLAG.match(word)]


def script_tool(script: str) -> tuple[str, str]:
    """A shipped shell script's text and the Python script its extra arguments go to."""
    text = (REPO / script).read_text()
    found = re.search(r'"\$HERE/(\w+\.py)"', text)
    assert found, f"{script} runs no Python script"
    return text, found.group(1)


CALLS = [
    (block, call)
    for block in BASH
    for words in commands(block)
    if (call := call_of(words)) is not None
]


def test_the_commands_are_found() -> None:
    tools = {call.tool for _, call in CALLS}
    assert {"train.py", "test.py", "search.py", "utils.match", "./train_sysu.sh"} <= tools
    assert call_of(["torchrun", "--nproc_per_node", "4", "train.py", "--seed", "1"]) == Call(
        "train.py", ("--seed", "1")
    )
    assert call_of(["A=1", "./x.sh", "--ema"]) == Call("./x.sh", ("--ema",), ("A",))
    assert call_of(["python", "my_script.py"]) is None
    assert flags_of(("[--flip]", "--k1=3", "x", "-1", "[--topk", "10]")) == [
        "--flip",
        "--k1",
        "--topk",
    ]


@pytest.mark.parametrize(
    ("block", "call"), CALLS, ids=[f"{block_id(b)}:{c.tool}" for b, c in CALLS]
)
def test_commands_name_only_flags_their_tool_knows(block: Block, call: Call) -> None:
    tool = call.tool
    if tool.endswith(".sh"):
        text, tool = script_tool(tool)
        unread = [name for name in call.env if not re.search(rf"\$\{{?{name}\b", text)]
        assert not unread, f"{block_id(block)}: {call.tool} does not read {unread}"
    unknown = [flag for flag in flags_of(call.args) if flag not in known_flags(tool, call.args)]
    assert not unknown, f"{block_id(block)}: {tool} has no {unknown}"


def test_a_misspelt_flag_is_caught() -> None:
    assert "--ema" in known_flags("test.py", ())
    assert "--emma" not in known_flags("test.py", ())
    assert "--query" in known_flags("utils.match", ())


def make_targets() -> set[str]:
    """The targets the Makefile defines."""
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+):(?!=)", text, re.M))


def test_every_make_target_named_exists() -> None:
    named = [
        (block_id(block), word)
        for block in BASH
        for words in commands(block)
        if words[0] == "make"
        for word in words[1:]
        if not word.startswith("-") and "=" not in word
    ]
    assert {"demo", "test"} <= {word for _, word in named}
    missing = [(where, word) for where, word in named if word not in make_targets()]
    assert not missing, f"no such make target: {missing}"


@pytest.mark.parametrize("block", [b for b in BASH if b.runner == THIS_TEST], ids=block_id)
def test_bash_block_runs_as_written(block: Block, user_folder: Path) -> None:
    for words in commands(block):
        assert words[0] == "python", f"{block_id(block)}: runs only python commands"
        argv = [sys.executable, *(w for w in words[1:] if not (w.startswith("[") or "]" in w))]
        done = subprocess.run(
            argv, cwd=user_folder, env=_user_env(), capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{block_id(block)}: {shlex.join(words)}\n{done.stderr}"


# ----- links and size --------------------------------------------------------------------------
def unfenced(text: str) -> str:
    """The text without its fenced blocks."""
    kept, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            kept.append(line)
    return "\n".join(kept)


def prose(text: str) -> str:
    """The text without fenced blocks and inline code (where links are not links)."""
    return re.sub(r"(`+).+?\1", "", unfenced(text), flags=re.S)


def anchors(path: Path) -> set[str]:
    """The heading anchors of a Markdown file, as GitHub derives them."""
    headings = re.findall(r"^#+\s+(.*)$", unfenced(path.read_text()), re.M)
    slugs = (re.sub(r"[^\w\- ]", "", heading.strip().lower()) for heading in headings)
    return {slug.replace(" ", "-") for slug in slugs}


def relative_links(path: Path) -> list[str]:
    """The links of a Markdown file that point into the checkout."""
    links = LINK.findall(prose(path.read_text()))
    return [link for link in links if not re.match(r"^[a-z]+:", link)]


@pytest.mark.parametrize("path", MANUAL, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(path: Path) -> None:
    broken = []
    for link in relative_links(path):
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        found = file.exists() and (not anchor or file.suffix == ".md" and anchor in anchors(file))
        if not found:
            broken.append(link)
    assert not broken, f"{path.relative_to(REPO)}: broken links {broken}"


def test_link_checks_see_what_a_reader_sees(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A `b` c's\n[x](#a-b-cs) `[y](z)`\n```\n[w](v)\n# not a heading\n```\n")
    assert anchors(page) == {"a-b-cs"} and relative_links(page) == ["#a-b-cs"]


def test_every_doc_is_reached_from_the_readme() -> None:
    reached, todo = {README}, [README]
    while todo:
        page = todo.pop()
        for link in relative_links(page):
            target = (page.parent / link.partition("#")[0]).resolve()
            if target.suffix == ".md" and target.is_file() and target not in reached:
                reached.add(target)
                todo.append(target)
    unreached = [p.relative_to(REPO).as_posix() for p in MANUAL if p.resolve() not in reached]
    assert not unreached, f"not linked from README.md: {unreached}"


def test_the_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md: {lines} lines (at most {README_MAX_LINES})"
