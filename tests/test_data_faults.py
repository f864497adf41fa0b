"""Bad data refused up front in one line, or read correctly: empty test lists, 16-bit PNGs, a
stop signal during the cache build, truncated test images, test ids listed for training, FIFOs,
byte-order marks, missing camera folders and a data root one level too high."""

from __future__ import annotations

import logging
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data.cache
import test as test_script
import train
from data import get_dataset, image_files, load_images, read_ids, read_index
from data.cache import write_cache
from data.llcm import llcm_query
from data.regdb import regdb_test
from data.sysu import sysu_query, sysu_train_files
from utils.base.cli import run_cli
from utils.base.errors import StopNow, UserError

from llcm_tree import make_llcm_tree  # isort: skip

BOM = "\ufeff"


def _copy(tree: Path, to: Path) -> Path:
    shutil.copytree(tree, to, ignore=shutil.ignore_patterns("cache"))
    return to


def _refused(main: Callable, argv: list[str], capsys, expect_error, *message: str) -> str:
    code = run_cli(main, argv)
    return expect_error(code, capsys.readouterr().err, *message)


# --- an empty test list is refused before any work -----------------------------------------------


@pytest.mark.parametrize(
    ("name", "listing", "message"),
    [
        ("sysu", "exp/test_id.txt", "lists no test ids"),
        ("regdb", "idx/test_visible_1.txt", "lists no images"),
    ],
)
def test_empty_test_list_is_refused_by_train_and_test(
    request: pytest.FixtureRequest,
    sysu_run: Path,
    regdb_runs: Path,
    tmp_path: Path,
    capsys,
    train_argv,
    expect_error,
    name: str,
    listing: str,
    message: str,
) -> None:
    root = _copy(request.getfixturevalue(f"toy_{name}"), tmp_path / name)
    (root / listing).write_text("\n")
    message = f"{root / listing}: {message}"
    readers = {
        "sysu": lambda: sysu_query(root, "all"),
        "regdb": lambda: regdb_test(root, 1, "visible"),
    }
    for call in (lambda: get_dataset(name).check_root(root, 1, ("test",)), readers[name]):
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value) == message
    runs = tmp_path / "runs"
    _refused(train.main, train_argv(root, runs, "x"), capsys, expect_error, message)
    assert not runs.exists()
    # (The trained runs are fixtures of the signature: training inside the test would leave its
    # log handler on this test's captured stderr.)
    run = sysu_run if name == "sysu" else regdb_runs / "regdb_trial1"
    weights = run / "checkpoint_latest.pth"
    argv = ["--data_root", str(root), "--dataset", name, "--weights", str(weights)]
    _refused(test_script.main, argv, capsys, expect_error, message)


# --- 16-bit PNGs --------------------------------------------------------------------------------


def test_16_bit_greyscale_png_is_scaled_to_8_bits(tmp_path: Path) -> None:
    wide = (np.arange(16 * 8, dtype=np.uint32).reshape(16, 8) * 500).astype(np.uint16)
    wide[0, 0], wide[0, 1] = 0, 65535
    path = tmp_path / "ir16.png"
    Image.fromarray(wide).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")  # a real 16-bit file
    (pixels,) = load_images([str(path)], (16, 8), progress=False)
    expected = np.rint(wide / 257.0).astype(np.uint8)
    assert (pixels == expected[..., None]).all()  # three equal channels, never all 255
    assert pixels[0, 0, 0] == 0 and pixels[0, 1, 0] == 255 and len(np.unique(pixels)) > 100


# --- a stop signal during the cache build ---------------------------------------------------------


def test_sigterm_during_cache_build_removes_the_partial_cache(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "sysu_8x4"

    def build(folder: Path) -> None:
        (folder / "visible_images.npy").write_bytes(bytes(1024))
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StopNow) as stop:
        write_cache(target, {"version": 2}, build)
    assert stop.value.signum == signal.SIGTERM
    assert os.listdir(tmp_path / "cache") == []  # neither the cache nor its temporary folder
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_during_the_cache_build_of_train_py_is_one_line_and_exit_143(
    toy_sysu: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, train_argv
) -> None:
    real = data.cache.load_images

    def terminated(paths, *args, **kwargs):
        if "infrared" in kwargs.get("desc", ""):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(data.cache, "load_images", terminated)
    cache = tmp_path / "c"
    argv = train_argv(toy_sysu, tmp_path / "runs", "x", "--cache_dir", str(cache))
    assert run_cli(train.main, argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "error: interrupted by SIGTERM"
    assert "Traceback" not in err
    assert os.listdir(cache) == []


# --- truncated test images ------------------------------------------------------------------------


def test_truncated_test_jpeg_is_refused_up_front(
    toy_sysu: Path, tmp_path: Path, capsys, train_argv, expect_error
) -> None:
    root = _copy(toy_sysu, tmp_path / "sysu")
    victim = Path(sysu_query(root, "all")[0][0])
    content = victim.read_bytes()
    victim.write_bytes(content[: int(len(content) * 0.7)])
    with Image.open(victim) as image:
        assert image.size[0] > 0  # the header alone still reads
    message = f"test image {victim} is not a readable image (image file is truncated"
    with pytest.raises(UserError) as err:
        get_dataset("sysu").check_test_images(root)
    assert str(err.value).startswith(message)
    runs = tmp_path / "runs"
    _refused(train.main, train_argv(root, runs, "x"), capsys, expect_error, message)
    assert not runs.exists()


# --- a test identity also listed for training ---------------------------------------------------


def test_test_id_listed_for_training_is_warned_about(
    toy_sysu: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _copy(toy_sysu, tmp_path / "sysu")
    sysu = get_dataset("sysu")
    with caplog.at_level(logging.WARNING):
        sysu.check_root(root)
    assert "also listed for training" not in caplog.text
    test_ids = sorted(read_ids(root / "exp" / "test_id.txt"))
    val = root / "exp" / "val_id.txt"
    val.write_text(val.read_text().strip() + f",{test_ids[1]}\n")
    with caplog.at_level(logging.WARNING):
        sysu.check_root(root)
    assert (
        f"{root / 'exp' / 'test_id.txt'}: 1 test id(s) also listed for training in "
        f"exp/train_id.txt or exp/val_id.txt (their scores are not a test on unseen people): "
        f"{test_ids[1]}"
    ) in caplog.text


# --- only regular files are images ----------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_fifo_named_like_an_image_is_not_an_image(toy_sysu: Path, tmp_path: Path) -> None:
    root = _copy(toy_sysu, tmp_path / "sysu")
    before = sysu_train_files(root)
    folder = Path(before[0][0]).parent
    fifo = folder / "9999.jpg"
    os.mkfifo(fifo)
    # Listing, the training lists and the cache build never open it (opening would block).
    assert str(fifo) not in image_files(folder) and sysu_train_files(root) == before
    with pytest.raises(UserError, match=f"^{fifo}: cannot read image \\(is not a regular file\\)$"):
        load_images([str(fifo)], (8, 4), progress=False)
    # An index file naming a FIFO: the up-front checks name it.
    regdb = tmp_path / "regdb"
    (regdb / "idx").mkdir(parents=True)
    os.mkfifo(regdb / "pipe.bmp")
    (regdb / "idx" / "list.txt").write_text("pipe.bmp 1\n")
    with pytest.raises(UserError, match=r"list\.txt:1: image pipe\.bmp is not a regular file$"):
        read_index(regdb, "idx/list.txt", check_images=True)


# --- byte-order marks -----------------------------------------------------------------------------


def test_byte_order_mark_in_list_files_is_accepted(toy_regdb: Path, tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text(BOM + "3,1\n2\n", encoding="utf-8")
    assert read_ids(ids) == [3, 1, 2]
    root = _copy(toy_regdb, tmp_path / "regdb")
    expected = regdb_test(root, 1, "thermal")
    index = root / "idx" / "test_thermal_1.txt"
    index.write_text(BOM + index.read_text(), encoding="utf-8")
    paths, pids = regdb_test(root, 1, "thermal")
    assert paths == expected[0] and pids.tolist() == expected[1].tolist()
    # Malformed lines are still named without an invisible character.
    ids.write_text(BOM + "x\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        read_ids(ids)
    assert str(err.value) == f"{ids}:1: expected comma-separated integer ids, found 'x'"


# --- layouts ---------------------------------------------------------------------------------


def test_llcm_root_missing_a_camera_folder_is_refused(tmp_path: Path) -> None:
    root = make_llcm_tree(tmp_path / "LLCM")
    llcm = get_dataset("llcm")
    llcm.check_root(root)
    before = llcm_query(root, "infrared")
    shutil.rmtree(root / "test_nir" / "cam4")  # with its images: the protocol would change
    message = f"--data_root {root}: not a LLCM folder (--dataset llcm): missing test_nir/cam4/"
    for call in (lambda: llcm.check_root(root), lambda: llcm_query(root, "infrared")):
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value) == message
    assert len(before[0]) > 0


def test_data_root_one_level_too_high_names_the_subfolder(
    toy_sysu: Path, tmp_path: Path, capsys, train_argv, expect_error
) -> None:
    parent = tmp_path / "datasets"
    root = _copy(toy_sysu, parent / "SYSU-MM01")
    (parent / "notes").mkdir()
    with pytest.raises(UserError) as err:
        get_dataset("sysu").check_root(parent)
    assert str(err.value).endswith(f"; {root} holds them (--data_root {root}?)")
    runs = tmp_path / "runs"
    line = _refused(train.main, train_argv(parent, runs, "x"), capsys, expect_error)
    assert line.startswith(f"error: --data_root {parent}: not a SYSU-MM01 folder")
    assert line.endswith(f"(--data_root {root}?)")
    # Without such a subfolder the line only names what is missing.
    shutil.rmtree(root / "exp")
    with pytest.raises(UserError) as err:
        get_dataset("sysu").check_root(parent)
    assert "holds them" not in str(err.value)
