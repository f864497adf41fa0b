"""The own-images tools keep their promises: outputs never destroy inputs, a results folder is
replaced whole (never a mix of two runs, whatever stops the run), non-finite features are named
as the weights' doing, and every mistake is one line naming its cause.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import mixed_arch, random_network, save_ours
from test_extract import write_crops
from test_match import crop_set, labelled_crops, match_argv
from torch import nn

from model.checkpoint import checkpoint_header
from utils import export, match
from utils.base.cli import run_cli
from utils.base.errors import StopNow, UserError
from utils.base.io import folder_aside, remove_leftovers
from utils.extract import FeatureExtractor
from utils.extract import main as extract_main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """Tiny convolutions run faster on one thread of the shared CPU."""


def dead_pid() -> int:
    """The process id of a process that has ended."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def listing(folder: Path) -> dict[str, str]:
    """Every file under ``folder``, hidden ones included: relative path -> its text (``.txt``)
    or its size and modification time."""
    return {
        str(p.relative_to(folder)): p.read_text()
        if p.suffix == ".txt"
        else f"{p.stat().st_size} {p.stat().st_mtime_ns}"
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def overflowing_checkpoint(path: Path) -> Path:
    """A 64x32 checkpoint whose weights are finite but make every activation overflow."""
    model = random_network(18, seed=3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.mul_(1e6)
    args = {"dataset": "sysu", "img_h": 64, "img_w": 32}
    header = checkpoint_header(mixed_arch(18), 7, 1, args)
    torch.save({**header, "epoch": 1, "model": model.state_dict(), "ema": None}, path)
    return path


# --------------------------------------------------------------------------------------------
# A folder written aside and swapped in whole (utils.base.io)
# --------------------------------------------------------------------------------------------
def earlier(folder: Path) -> Path:
    folder.mkdir()
    (folder / "a.txt").write_text("old")
    (folder / "only_old.txt").write_text("old")
    return folder


def test_folder_aside_replaces_the_folder_whole_or_not_at_all(tmp_path: Path) -> None:
    out = earlier(tmp_path / "out")
    with pytest.raises(RuntimeError, match="half way"), folder_aside(out) as folder:
        (folder / "a.txt").write_text("new")
        raise RuntimeError("half way")
    assert listing(out) == {"a.txt": "old", "only_old.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with folder_aside(out) as folder:
        (folder / "a.txt").write_text("new")
        assert listing(out) == {"a.txt": "old", "only_old.txt": "old"}  # not yet
    assert listing(out) == {"a.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigterm_while_writing_aside_keeps_the_earlier_folder(tmp_path: Path) -> None:
    out = earlier(tmp_path / "out")
    with pytest.raises(StopNow) as stopped, folder_aside(out) as folder:
        (folder / "a.txt").write_text("new")
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.signum == signal.SIGTERM
    assert listing(out) == {"a.txt": "old", "only_old.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the block


def killed_writer(out: Path, kill_at: str) -> str:
    """Python source that swaps a new ``out`` in and is killed -9 at ``kill_at``: while writing,
    between the two renames of the swap without an atomic exchange, or after the exchange."""
    return f"""
import os, shutil, signal
from pathlib import Path
from utils.base import io
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
renames = []
def replace(src, dst):
    renames.append(dst)
    if len(renames) == 2:
        die()
    os.rename(src, dst)
if {kill_at!r} == "between renames":
    io._exchange = lambda src, dst: False
    io.os.replace = replace
if {kill_at!r} == "after the exchange":
    io.shutil.rmtree = die
with io.folder_aside(Path({str(out)!r})) as folder:
    (folder / "a.txt").write_text("new")
    if {kill_at!r} == "while writing":
        die()
"""


@pytest.mark.parametrize(
    ("kill_at", "kinds", "out_then"),
    [
        ("while writing", ["tmp"], {"a.txt": "old", "only_old.txt": "old"}),
        # Where the system cannot swap two folders in one step, the one moment --out is absent.
        ("between renames", ["old", "tmp"], None),
        ("after the exchange", ["tmp"], {"a.txt": "new"}),  # the earlier folder is left aside
    ],
)
def test_a_kill_9_is_tidied_by_the_next_run(
    tmp_path: Path, kill_at: str, kinds: list[str], out_then: dict[str, str] | None
) -> None:
    out = earlier(tmp_path / "out")
    source = killed_writer(out, kill_at)
    done = subprocess.run([sys.executable, "-c", source], cwd=REPO, capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "out")
    assert [name.split("-")[0] for name in left] == [f".out.{kind}" for kind in kinds]
    if out_then is None:
        assert not out.exists()
    else:
        assert listing(out) == out_then
    # The next run (here just its tidying) puts a set-aside folder back and removes the rest.
    assert remove_leftovers(out) == left
    assert listing(out) == (out_then or {"a.txt": "old", "only_old.txt": "old"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_live_processes_and_other_hosts_are_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "osig"
    host = socket.gethostname()
    dead = dead_pid()
    names = [
        f".osig.tmp-{dead}-0a1b2c3d",  # an earlier version's name: no host
        f".osig.tmp-{host}-{dead}-0a1b2c3d",
        f".osig.tmp-{host}-{os.getpid()}-0a1b2c3d",  # alive: ours
        f".osig.tmp-another-host-{dead}-0a1b2c3d",
        ".osig.notes",
    ]
    for name in names:
        (tmp_path / name).mkdir()
    assert remove_leftovers(out) == sorted(names[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


# --------------------------------------------------------------------------------------------
# python -m utils.extract and the extractor
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return crop_set(tmp_path_factory.mktemp("crops"))


@pytest.fixture(scope="module")
def weights(crops: dict[str, Path]) -> Path:
    return crops["weights"]


@pytest.fixture(scope="module")
def extractor(weights: Path) -> FeatureExtractor:
    return FeatureExtractor(weights, batch_size=4)


def test_extract_never_writes_over_an_input(
    tmp_path: Path, weights: Path, capsys, expect_error: Callable[..., str]
) -> None:
    images = write_crops(tmp_path / "crops", 2)
    own = tmp_path / "model.pth"
    own.write_bytes(weights.read_bytes())
    (tmp_path / "link.npz").symlink_to(own)
    (tmp_path / "image_link.npz").symlink_to(images[1])
    before = {path: path.read_bytes() for path in [own, *images]}
    argv = ["--weights", str(own), "--modality", "visible", "--images", str(tmp_path / "crops")]
    for out, what in (
        (own, "is the --weights checkpoint"),
        (tmp_path / "link.npz", "is the --weights checkpoint"),
        (images[0], f"is the input image {images[0]}"),
        (tmp_path / "image_link.npz", f"is the input image {images[1]}"),
    ):
        code = run_cli(extract_main, [*argv, "--out", str(out)])
        line = expect_error(code, capsys.readouterr().err, f"--out {out}: {what}")
        assert line.endswith("(it would be overwritten); choose another file name")
    assert {path: path.read_bytes() for path in before} == before


def test_overflowing_weights_are_named_by_extract_match_and_the_onnx_check(
    tmp_path: Path, crops, capsys, expect_error: Callable[..., str]
) -> None:
    bad = overflowing_checkpoint(tmp_path / "overflow.pth")
    finite = "the network's features are not finite (NaN or infinity): these weights overflow"
    argv = ["--weights", str(bad), "--modality", "infrared", "--images", str(crops["infrared"])]
    code = run_cli(extract_main, [*argv, "--out", str(tmp_path / "f.npz")])
    expect_error(code, capsys.readouterr().err, f"{bad}: {finite}")
    out = tmp_path / "matches"
    argv = match_argv(crops, out)
    argv[argv.index("--weights") + 1] = str(bad)
    code = run_cli(match.main, argv)
    expect_error(code, capsys.readouterr().err, f"{bad}: {finite}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overflow.pth"]
    pytest.importorskip("onnxruntime")
    code = run_cli(export.main, ["--weights", str(bad), "--out", str(out), "--onnx"])
    line = expect_error(code, capsys.readouterr().err, f"{bad}: {finite}")
    assert "onnxruntime" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overflow.pth"]


def test_extract_names_unreadable_images_follows_links_and_drops_a_stale_list(
    tmp_path: Path, weights: Path, capsys, expect_error: Callable[..., str]
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.png", "b.jpg", "c.png", "d.png"):
        (broken / name).write_bytes(b"not an image")
    out = tmp_path / "features.npz"
    argv = ["--weights", str(weights), "--modality", "visible", "--out", str(out)]
    code = run_cli(extract_main, [*argv, "--images", str(broken)])
    line = expect_error(code, capsys.readouterr().err, "--images: none of the 4 images could be")
    assert f"({broken / 'a.png'}: cannot read image (" in line and line.endswith("; and 1 more)")
    assert f"{broken / 'c.png'}: cannot read image" in line and "d.png" not in line
    # A linked subfolder is searched; a link back up is not followed round and round.
    write_crops(tmp_path / "elsewhere", 2)
    folder = tmp_path / "crops"
    write_crops(folder, 1)
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (folder / "linked" / "0000" / "loop").symlink_to(folder, target_is_directory=True)
    out.with_suffix(".skipped.txt").write_text("an earlier run's list\n")
    assert run_cli(extract_main, [*argv, "--images", str(folder)]) == 0
    with np.load(out, allow_pickle=False) as data:
        listed = [Path(p).relative_to(folder).as_posix() for p in data["paths"]]
    assert listed == ["0000/0.png", "linked/0000/0.png", "linked/0000/1.png"]
    assert not out.with_suffix(".skipped.txt").exists()  # every image was read this time


def test_extractor_refuses_what_is_not_an_image_or_a_modality(
    extractor: FeatureExtractor, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match="^weights None: expected the path of a checkpoint file$"):
        FeatureExtractor(None)  # type: ignore[arg-type]
    image = np.zeros((8, 4, 3), dtype=np.uint8)
    with pytest.raises(UserError, match="^modality None: expected 'visible' or 'infrared'$"):
        extractor([image], modality=None)  # type: ignore[arg-type]
    empty = np.zeros((0, 0, 3), dtype=np.uint8)
    with pytest.raises(UserError, match=r"^images\[1\]: an empty image \(0x0 pixels\)$"):
        extractor([image, empty], "visible")
    with pytest.raises(UserError, match=r"^images\[0\]: an empty image \(0x5 pixels\)$"):
        extractor([Image.new("RGB", (0, 5))], "visible")


def test_a_very_large_image_is_one_warning_of_ours(
    extractor: FeatureExtractor, tmp_path: Path, monkeypatch, caplog
) -> None:
    path = tmp_path / "large.png"
    Image.fromarray(np.full((64, 32, 3), 90, dtype=np.uint8)).save(path)
    expected = extractor([path], "visible")
    # 2048 pixels: over this limit PIL warns (as of a decompression bomb), under twice it decodes.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = extractor([path], "visible")
    assert not caught and torch.equal(got, expected)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: over 1500 pixels, a possible decompression bomb; decoded anyway"
    ]


# --------------------------------------------------------------------------------------------
# python -m utils.match
# --------------------------------------------------------------------------------------------
def test_a_second_match_replaces_the_first_whole(tmp_path: Path, crops, capsys) -> None:
    out = tmp_path / "matches"
    extra = ("--labels_from_folders", "--pictures", "4", "--per_page", "2")
    assert run_cli(match.main, match_argv(crops, out, *extra)) == 0
    first = sorted(p.name for p in out.iterdir())
    assert {"metrics.json", "page2.html", "skipped.txt"} <= set(first)
    (out / ".rank_lists.tmp-1-0a1b2c3d").mkdir()  # an earlier version's leftover
    # The second run: unlabelled, one page, a gallery without the broken image.
    gallery = tmp_path / "gallery"
    labelled_crops(gallery, ["0001", "0002"], 2, grey=False, seed=5)
    argv = match_argv(crops, out, "--pictures", "3")
    argv[argv.index("--gallery") + 1] = str(gallery)
    assert run_cli(match.main, argv) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "features.npz", "index.html", "matches.csv", "matches.json", "rank_lists",
    ]  # fmt: skip
    assert len(list((out / "rank_lists").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery", "matches"]


@pytest.mark.parametrize(("stop", "status"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_match_stopped_while_drawing_keeps_the_earlier_results(
    tmp_path: Path, crops, capsys, monkeypatch, stop: str, status: int
) -> None:
    out = tmp_path / "matches"
    assert run_cli(match.main, match_argv(crops, out, "--pictures", "2")) == 0
    before = listing(out)
    drawn = []
    draw = match.draw_rank_list

    def stopped_after_one(*args, **kwargs) -> Image.Image:
        if drawn:
            os.kill(os.getpid(), getattr(signal, stop))
        drawn.append(1)
        return draw(*args, **kwargs)

    monkeypatch.setattr(match, "draw_rank_list", stopped_after_one)
    code = run_cli(match.main, match_argv(crops, out, "--labels_from_folders", "--pictures", "4"))
    said = {"SIGINT": "error: interrupted", "SIGTERM": "error: interrupted by SIGTERM"}[stop]
    assert code == status and capsys.readouterr().err.strip().endswith(said)
    assert len(drawn) == 1 and listing(out) == before  # stopped at the second picture
    assert sorted(p.name for p in tmp_path.iterdir()) == ["matches"]


def test_match_after_a_kill_9_removes_what_it_left(tmp_path: Path, crops, capsys) -> None:
    out = earlier(tmp_path / "matches")
    (out / "only_old.txt").unlink()
    (out / "a.txt").rename(out / "metrics.json")
    half = tmp_path / f".matches.tmp-{socket.gethostname()}-{dead_pid()}-0a1b2c3d"
    (half / "rank_lists").mkdir(parents=True)
    assert run_cli(match.main, match_argv(crops, out, "--pictures", "1")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["matches"]
    assert not (out / "metrics.json").exists()


def test_match_refuses_an_out_that_would_search_or_destroy_inputs(
    tmp_path: Path, crops, capsys, monkeypatch, expect_error: Callable[..., str]
) -> None:
    def refused(out: Path, *fragments: str) -> str:
        code = run_cli(match.main, match_argv(crops, out))
        return expect_error(code, capsys.readouterr().err, f"--out {out}: ", *fragments)

    infrared = crops["infrared"]
    inside = "(a later run would search its pictures); expected a folder outside it"
    refused(infrared, f"inside the --query folder {infrared} {inside}")
    refused(infrared / "matches", f"inside the --query folder {infrared}")
    link = tmp_path / "link"
    link.symlink_to(crops["visible"], target_is_directory=True)
    refused(link / "matches", f"inside the --gallery folder {crops['visible']}")
    refused(infrared.parent, "holds the --weights checkpoint (it would be deleted)")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused(mine, "holds other files than utils.match's results (notes.txt); expected a new")
    monkeypatch.chdir(mine)
    refused(mine.parent, "holds the current folder; name another folder")
    assert (mine / "notes.txt").read_text() == "keep me"


def test_match_warns_of_shared_images_and_checks_the_rerank_flags(
    tmp_path: Path, crops, capsys, expect_error: Callable[..., str]
) -> None:
    out = tmp_path / "matches"
    same = match_argv(crops, out, "--pictures", "0")
    same[same.index("--gallery") + 1] = str(crops["infrared"])
    assert run_cli(match.main, same) == 0
    err = capsys.readouterr().err
    assert "--query and --gallery share 6 of the 6 query images: each of them is matched" in err
    for extra, message in (
        (["--k1", "5"], "--k1 5: takes effect only with --rerank"),
        (["--rerank", "--k1", "3", "--k2", "4"], "--k2 4: expected at most --k1 3"),
        (
            ["--rerank", "--k1", "9"],
            "--k1 9: larger than the gallery (8 images); expected at most 8",
        ),
    ):
        code = run_cli(match.main, match_argv(crops, out, *extra))
        expect_error(code, capsys.readouterr().err, message)
    settings = json.loads((out / "matches.json").read_text())
    assert settings["rerank"] is False  # the refused runs left the earlier results


# --------------------------------------------------------------------------------------------
# python -m utils.export
# --------------------------------------------------------------------------------------------
def test_export_after_kills_puts_back_or_removes_what_they_left(tmp_path: Path, capsys) -> None:
    net = random_network(18, seed=1)
    checkpoint = save_ours(tmp_path / "c.pth", net, net)
    out = tmp_path / "osig"
    host, dead = socket.gethostname(), dead_pid()
    # Killed between the two renames of a swap: the earlier export set aside, --out absent.
    aside = tmp_path / f".osig.old-{host}-{dead}-0a1b2c3d"
    aside.mkdir()
    (aside / "export.json").write_text('{"fold_bn": true}\n')
    half = tmp_path / f".osig.tmp-{host}-{dead}-1a2b3c4d"
    half.mkdir()
    (half / "visible.onnx").write_bytes(b"half of a network")
    assert run_cli(export.main, ["--weights", str(checkpoint), "--out", str(out)]) == 0
    assert "restored" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth", "osig"]
    assert json.loads((out / "export.json").read_text())["fold_bn"] is False
