"""The training-image cache: keyed by what the images are, and never left half-built."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

import data.cache
from data import load_images, load_train_set
from utils import pre_process_sysu
from utils.base.errors import UserError
from utils.base.io import DiskFull

IMG = (8, 4)  # (height, width) of the cached images
CACHE = "sysu_8x4"


def _image(path: Path, seed: int) -> None:
    """Write a 12x6 random RGB PNG (lossless, so its decoded pixels depend only on the seed)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 6, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _sysu(root: Path, seed: int) -> Path:
    """A tiny SYSU-MM01 tree: training ids 1, 2 (+ val 3), two images per camera 1 and 3."""
    for cam in range(1, 7):
        (root / f"cam{cam}").mkdir(parents=True, exist_ok=True)
    for pid in (1, 2, 3, 4):
        for cam in (1, 3):
            for n in (1, 2):
                _image(root / f"cam{cam}" / f"{pid:04d}" / f"{n:04d}.png", seed + 10 * pid + n)
    (root / "exp").mkdir()
    for name, ids in (("train", "1,2"), ("val", "3"), ("test", "4")):
        (root / "exp" / f"{name}_id.txt").write_text(ids + "\n")
    return root


def _load(root: Path, cache: Path):
    return load_train_set("sysu", root, img_size=IMG, cache_dir=cache, progress=False)


def _later(path: Path, seconds: int = 5) -> None:
    """Move ``path``'s modification time on, as a later edit would (file clocks can be coarse)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 10**9))


def test_an_image_replaced_under_the_same_name_rebuilds_the_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _sysu(tmp_path / "sysu", 0)
    cache = tmp_path / "c"
    first = _load(root, cache)
    target = root / "cam1" / "0001" / "0001.png"
    assert first.visible_paths[0] == str(target)

    _image(target, 999)  # another picture, same name
    _later(target)
    with caplog.at_level(logging.INFO):
        second = _load(root, cache)
    assert (
        f"rebuilding cache {cache / CACHE}: 1 image files changed since it was built "
        "(first: cam1/0001/0001.png)" in caplog.text
    )
    new_pixels = load_images([str(target)], IMG, progress=False)[0]
    assert not np.array_equal(first.visible_images[0], new_pixels)
    np.testing.assert_array_equal(second.visible_images[0], new_pixels)
    np.testing.assert_array_equal(second.visible_images[1:], first.visible_images[1:])

    # A change of size alone (modification time put back) is noticed too.
    stat = target.stat()
    _image(target, 1234)
    target.write_bytes(target.read_bytes() + b"\0" * 7)  # PNG ignores trailing bytes
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        third = _load(root, cache)
    assert "1 image files changed since it was built (first: cam1/0001/0001.png)" in caplog.text
    np.testing.assert_array_equal(
        third.visible_images[0], load_images([str(target)], IMG, progress=False)[0]
    )
    assert sorted(os.listdir(cache)) == [CACHE]  # no leftovers


def test_an_image_overwritten_with_garbage_is_not_served_from_the_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _sysu(tmp_path / "sysu", 0)
    cache = tmp_path / "c"
    _load(root, cache)
    target = root / "cam3" / "0002" / "0002.png"
    target.write_bytes(np.random.default_rng(0).bytes(target.stat().st_size))
    _later(target)
    with caplog.at_level(logging.INFO), pytest.raises(UserError, match=f"{target}: cannot read"):
        _load(root, cache)
    assert "(first: cam3/0002/0002.png)" in caplog.text


def test_two_roots_with_the_same_file_names_never_share_a_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    one = _sysu(tmp_path / "one" / "sysu", 0)
    two = _sysu(tmp_path / "two" / "sysu", 500)
    cache = tmp_path / "shared-cache"  # an explicit --cache_dir given to both
    for root, other in ((one, None), (two, one), (one, two)):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            train = _load(root, cache)
        expected = load_images(train.visible_paths, IMG, progress=False)
        np.testing.assert_array_equal(train.visible_images, expected)
        if other is not None:
            assert (
                f"rebuilding cache {cache / CACHE}: built for another data root {other.resolve()}"
                in caplog.text
            )
    first, second = _load(one, cache), _load(two, cache)
    assert not np.array_equal(first.visible_images, second.visible_images)


def test_an_older_cache_format_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _sysu(tmp_path / "sysu", 0)
    cache = tmp_path / "c"
    _load(root, cache)
    meta = cache / CACHE / "meta.json"
    meta.write_text(meta.read_text().replace('"version": 2', '"version": 1'))
    with caplog.at_level(logging.INFO):
        _load(root, cache)
    assert f"rebuilding cache {cache / CACHE}: written in cache format 1, not 2" in caplog.text


# --- a full disk, a folder deleted mid-build --------------------------------------------------


class _Usage(NamedTuple):
    total: int
    used: int
    free: int


def test_too_little_free_space_is_one_line_before_any_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _sysu(tmp_path / "sysu", 0)
    cache = tmp_path / "c"
    decoded = []
    monkeypatch.setattr(data.cache, "load_images", lambda *a, **k: decoded.append(a))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(10**9, 10**9 - 4096, 4096))
    # The tool logs to this test's stderr, not through handlers earlier tests left behind.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    argv = ["--data_root", str(root), "--img_h", "8", "--img_w", "4", "--cache_dir", str(cache)]
    assert pre_process_sysu.main([*argv, "--no_progress"]) == 2
    err = capsys.readouterr().err
    # 12 images of 8x4x3 bytes, plus the margin for the meta and headers
    expected = f"no space left on {cache}, need about 16 MB (free some space and run again)"
    assert err.splitlines()[-1] == f"error: {expected}" and "Traceback" not in err
    assert decoded == [] and os.listdir(cache) == []
    with pytest.raises(DiskFull, match=f"no space left on {cache}, need about 16 MB"):
        _load(root, cache)


@pytest.mark.parametrize("where", ["reserving", "writing"])
def test_a_disk_filling_up_mid_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    root = _sysu(tmp_path / "sysu", 0)
    cache = tmp_path / "c"
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "reserving":
        real = os.posix_fallocate
        calls = []

        def fallocate(fd: int, offset: int, length: int) -> None:
            calls.append(length)
            if len(calls) == 2:  # the infrared array, after the visible one was written
                raise full
            real(fd, offset, length)

        monkeypatch.setattr(os, "posix_fallocate", fallocate)
    else:
        real_load = data.cache.load_images

        def load(paths, *args, **kwargs):
            if kwargs.get("desc") == "infrared_images":
                raise full
            return real_load(paths, *args, **kwargs)

        monkeypatch.setattr(data.cache, "load_images", load)
    with pytest.raises(DiskFull, match=f"^no space left on {cache}, need about 16 MB"):
        _load(root, cache)
    assert os.listdir(cache) == []
    monkeypatch.undo()
    train = _load(root, cache)  # once there is room, the build succeeds
    np.testing.assert_array_equal(
        train.infrared_images, load_images(train.infrared_paths, IMG, progress=False)
    )


@pytest.mark.parametrize("errno_value", [None, errno.EOPNOTSUPP])
def test_without_fallocate_the_blocks_are_reserved_by_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_value: int | None
) -> None:
    root = _sysu(tmp_path / "sysu", 0)
    if errno_value is None:
        monkeypatch.delattr(os, "posix_fallocate")
    else:

        def unsupported(*args: int) -> None:
            raise OSError(errno_value, "Operation not supported")

        monkeypatch.setattr(os, "posix_fallocate", unsupported)
    train = _load(root, tmp_path / "c")
    np.testing.assert_array_equal(
        train.visible_images, load_images(train.visible_paths, IMG, progress=False)
    )


@pytest.mark.parametrize("deleted", ["cache_dir", "staging folder"])
def test_a_cache_folder_deleted_during_the_build_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deleted: str
) -> None:
    root = _sysu(tmp_path / "sysu", 0)
    cache = tmp_path / "c"
    real = data.cache.load_images

    def load(paths, *args, **kwargs):
        out = real(paths, *args, **kwargs)
        if kwargs.get("desc") == "visible_images":
            if deleted == "cache_dir":
                shutil.rmtree(cache)
            else:
                (staging,) = cache.glob(f".{CACHE}.tmp-*")
                shutil.rmtree(staging)
        return out

    monkeypatch.setattr(data.cache, "load_images", load)
    message = (
        f"--cache_dir {cache}: the cache folder disappeared while {CACHE} was being built "
        "(deleted by another process?); run again"
    )
    with pytest.raises(UserError) as caught:
        _load(root, cache)
    assert str(caught.value) == message
    assert not cache.exists() or os.listdir(cache) == []
