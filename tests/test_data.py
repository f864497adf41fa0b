"""SYSU-MM01 and RegDB readers, the data-set interface and registry, the protocol lists, the
training set and its cache."""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data.cache
from data import (
    DataSet,
    ImageList,
    Protocol,
    ProtocolSettings,
    TrainSet,
    dataset_names,
    get_dataset,
    load_images,
    load_train_set,
    regdb_test,
    sysu_gallery,
    sysu_query,
)
from data.regdb import regdb_split
from data.registry import registered_datasets
from data.sysu import SAME_LOCATION, SYSU, sysu_train_files
from utils import pre_process_sysu
from utils.base.errors import UserError
from utils.base.modality import Modality

IMG = (8, 4)  # (height, width) of the small cached images used by these tests

# Fake SYSU tree: {pid: {cam: number of images}}. Train ids 1, 2, 3 (+ val 4); test ids 10-12.
# Identity 3 has no infrared images; test id 12 lacks cam2 and cam5.
SYSU_LAYOUT = {
    1: {1: 2, 2: 1, 3: 2, 4: 1, 5: 1, 6: 1},
    2: {1: 1, 3: 1, 6: 2},
    3: {1: 2, 4: 1},
    4: {5: 3, 3: 1},
    10: {1: 3, 2: 2, 3: 2, 4: 4, 5: 1, 6: 3},
    11: {1: 5, 2: 5, 3: 1, 4: 5, 5: 5, 6: 1},
    12: {1: 2, 3: 3, 4: 1, 6: 1},
}
TRAIN_IDS, VAL_IDS, TEST_IDS = [3, 1, 2], [4], [12, 10, 11]


def _image(path: Path, seed: int, size: tuple[int, int] = (12, 6)) -> None:
    """Write a small random RGB image (size is width, height as PIL wants it)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_sysu(root: Path, layout: dict = SYSU_LAYOUT) -> Path:
    """Write a fake SYSU-MM01 tree under ``root`` and return it."""
    seed = 0
    for pid, cams in layout.items():
        for cam, count in cams.items():
            for n in range(1, count + 1):
                seed += 1
                _image(root / f"cam{cam}" / f"{pid:04d}" / f"{n:04d}.jpg", seed)
    for cam in range(1, 7):
        (root / f"cam{cam}").mkdir(parents=True, exist_ok=True)
    (root / "exp").mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", TRAIN_IDS), ("val", VAL_IDS), ("test", TEST_IDS)):
        (root / "exp" / f"{name}_id.txt").write_text(",".join(str(i) for i in ids) + "\n")
    return root


@pytest.fixture()
def sysu(tmp_path: Path) -> Path:
    return make_sysu(tmp_path / "SYSU-MM01")


def _count(pids: list[int], cams: tuple[int, ...]) -> int:
    return sum(SYSU_LAYOUT[p].get(c, 0) for p in pids for c in cams)


# --- SYSU protocol ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["all", "indoor"])
def test_sysu_query_is_every_infrared_test_image(sysu: Path, mode: str) -> None:
    paths, pids, camids = sysu_query(sysu, mode)
    assert len(paths) == _count(TEST_IDS, (3, 6)) == 11
    assert pids.dtype == np.int64 and camids.dtype == np.int64
    assert set(camids.tolist()) == {3, 6}
    # ids ascending, then cam3 before cam6, then file names
    pairs = list(zip(pids.tolist(), camids.tolist(), strict=True))
    assert pairs == sorted(pairs)
    for path, pid, cam in zip(paths, pids, camids, strict=True):
        assert Path(path).parent == sysu / f"cam{cam}" / f"{pid:04d}"


def test_sysu_gallery_single_shot_counts_all_and_indoor(sysu: Path) -> None:
    paths, pids, camids = sysu_gallery(sysu, "all", shot=1, trial=0)
    folders = sum(1 for p in TEST_IDS for c in (1, 2, 4, 5) if c in SYSU_LAYOUT[p])
    assert len(paths) == folders == 10
    assert set(camids.tolist()) == {1, 2, 4, 5}
    paths_in, _, camids_in = sysu_gallery(sysu, "indoor", shot=1, trial=0)
    assert len(paths_in) == 5 and set(camids_in.tolist()) == {1, 2}


def test_cam3_query_and_cam2_gallery_are_listed_independently(sysu: Path) -> None:
    # The cam3 -> cam2 exclusion belongs to evaluation: the lists keep both cameras whole.
    _, _, query_cams = sysu_query(sysu, "all")
    _, _, gallery_cams = sysu_gallery(sysu, "all", shot=10)
    assert int((query_cams == 3).sum()) == _count(TEST_IDS, (3,)) == 6
    assert int((query_cams == 6).sum()) == _count(TEST_IDS, (6,)) == 5
    # shot=10 exceeds every folder here, so each folder is given whole
    assert int((gallery_cams == 2).sum()) == _count(TEST_IDS, (2,)) == 7
    assert int((gallery_cams == 1).sum()) == _count(TEST_IDS, (1,)) == 10


def _reference_gallery(root: Path, cams: tuple[int, ...], shot: int, trial: int) -> list[str]:
    """Independent re-statement of the authors' draw (os.path.join + '/', random.Random)."""
    rng = random.Random(trial)
    ids = sorted(int(t) for t in (root / "exp/test_id.txt").read_text().split(","))
    drawn = []
    for pid in ids:
        for cam in cams:
            img_dir = os.path.join(str(root), f"cam{cam}", f"{pid:04d}")
            if os.path.isdir(img_dir):
                files = sorted(img_dir + "/" + name for name in os.listdir(img_dir))
                # The authors' single-shot call was random.choice; sample(., 1) must match it.
                drawn += [rng.choice(files)] if shot == 1 else rng.sample(files, shot)
    return drawn


@pytest.mark.parametrize("trial", [0, 1, 7])
def test_sysu_gallery_reproduces_the_authors_draw(tmp_path: Path, trial: int) -> None:
    # Plenty of images per folder (> 21 too, where sample() switches algorithm).
    layout = {pid: {c: 4 + (pid * c) % 25 for c in (1, 2, 3, 4, 5)} for pid in (5, 6, 9)}
    layout[6].pop(4)
    root = make_sysu(tmp_path / "s", layout)
    (root / "exp/test_id.txt").write_text("9,5,6")
    for mode, cams, shot in [("all", (1, 2, 4, 5), 1), ("indoor", (1, 2), 1), ("all", None, 3)]:
        cams = cams or (1, 2, 4, 5)
        paths, pids, camids = sysu_gallery(root, mode, shot=shot, trial=trial)
        assert paths == _reference_gallery(root, cams, shot, trial)
        assert [f"cam{c}/{p:04d}" for p, c in zip(pids, camids, strict=True)] == [
            "/".join(Path(p).parts[-3:-1]) for p in paths
        ]
    other, _, _ = sysu_gallery(root, "all", shot=1, trial=trial + 1)
    assert other != sysu_gallery(root, "all", shot=1, trial=trial)[0]


def test_sysu_gallery_small_folder_gives_all_without_a_draw(
    sysu: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        paths, _, _ = sysu_gallery(sysu, "indoor", shot=2, trial=3)
    assert len(paths) == 10 and "fewer than shot" not in caplog.text  # every folder has >= 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        paths, _, _ = sysu_gallery(sysu, "all", shot=3, trial=4)
    for folder in ("cam2/0010", "cam5/0010", "cam1/0012", "cam4/0012"):
        assert f"{folder} has" in caplog.text
    assert "cam1/0010" not in caplog.text
    # Reference: small folders give everything sorted and take no draw from the generator.
    rng, expected = random.Random(4), []
    for pid in sorted(TEST_IDS):
        for cam in (1, 2, 4, 5):
            folder = sysu / f"cam{cam}" / f"{pid:04d}"
            files = sorted(str(f) for f in folder.glob("*.jpg"))
            expected += files if len(files) < 3 else rng.sample(files, 3)
    assert paths == expected and len(paths) == 24


def test_sysu_bad_mode_and_shot(sysu: Path) -> None:
    with pytest.raises(UserError, match="'outdoor'"):
        sysu_query(sysu, "outdoor")
    with pytest.raises(UserError, match="--shot"):
        sysu_gallery(sysu, "all", shot=0)


def test_sysu_root_check_names_missing_entries(tmp_path: Path) -> None:
    root = make_sysu(tmp_path / "s", {1: {1: 1}})
    (root / "exp/train_id.txt").unlink()
    (root / "cam3").rmdir()
    with pytest.raises(UserError) as info:
        SYSU().check_layout(root)
    message = str(info.value)
    assert str(root) in message and "not a SYSU-MM01 folder" in message
    assert "exp/train_id.txt" in message and "cam3/" in message
    assert "val_id" not in message and "cam4" not in message
    with pytest.raises(UserError, match="folder not found"):
        sysu_query(tmp_path / "nowhere", "all")


def test_malformed_id_file_names_file_and_line(sysu: Path) -> None:
    (sysu / "exp/test_id.txt").write_text("10,11\n12,x13\n")
    with pytest.raises(UserError, match=r"test_id\.txt:2: .*'x13'"):
        sysu_gallery(sysu, "all")


# --- training set and cache ------------------------------------------------------------------


def test_sysu_train_set_skips_one_modality_identity(
    sysu: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        ts = load_train_set("sysu", sysu, img_size=IMG, cache_dir=tmp_path / "c", progress=False)
    assert "identity 3 has no infrared" in caplog.text
    assert ts.pids == [1, 2, 4] and ts.num_classes == 3
    assert ts.visible_images.shape == (_count([1, 2, 4], (1, 2, 4, 5)), *IMG, 3)
    assert ts.infrared_images.shape == (_count([1, 2, 4], (3, 6)), *IMG, 3)
    assert ts.visible_images.dtype == np.uint8 and ts.visible_labels.dtype == np.int64
    expected = [0] * 5 + [1] + [2] * 3  # ids ascending, cams in order
    assert ts.visible_labels.tolist() == expected
    assert ts.infrared_labels.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert "/cam1/0001/0001.jpg" in ts.visible_paths[0]
    # cached pixels are the LANCZOS resize of the file
    np.testing.assert_array_equal(
        ts.infrared_images[3], load_images([ts.infrared_paths[3]], IMG)[0]
    )


def test_cache_is_reused_then_rebuilt_on_size_or_file_change(
    sysu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "c"
    first = load_train_set("sysu", sysu, img_size=IMG, cache_dir=cache, progress=False)
    npy = cache / "sysu_8x4" / "visible_images.npy"
    stamp = npy.stat().st_mtime_ns
    calls = []
    real = data.cache.load_images

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(data.cache, "load_images", counting)
    again = load_train_set("sysu", sysu, img_size=IMG, cache_dir=cache, progress=False, mmap=True)
    assert calls == [] and npy.stat().st_mtime_ns == stamp
    assert isinstance(again.visible_images, np.memmap)
    np.testing.assert_array_equal(first.visible_images, again.visible_images)

    bigger = load_train_set("sysu", sysu, img_size=(10, 6), cache_dir=cache, progress=False)
    assert bigger.visible_images.shape[1:] == (10, 6, 3) and len(calls) == 2
    assert (cache / "sysu_10x6" / "meta.json").is_file()

    # Same number of files, different list: only the hash can tell.
    (sysu / "cam3" / "0001" / "0002.jpg").unlink()
    _image(sysu / "cam6" / "0004" / "0001.jpg", 99)
    changed = load_train_set("sysu", sysu, img_size=IMG, cache_dir=cache, progress=False)
    assert len(calls) == 4 and changed.infrared_labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert changed.infrared_paths[-1].endswith("cam6/0004/0001.jpg")
    assert sorted(os.listdir(cache)) == ["sysu_10x6", "sysu_8x4"]  # no leftovers


def test_interrupted_build_leaves_no_cache(
    sysu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "c"
    real = data.cache.load_images

    def interrupted(paths, *args, **kwargs):
        if "infrared" in kwargs.get("desc", ""):
            raise KeyboardInterrupt
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(data.cache, "load_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_train_set("sysu", sysu, img_size=IMG, cache_dir=cache, progress=False)
    assert os.listdir(cache) == []


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    root.mkdir()
    assert data.cache.default_cache_dir(root) == root / "cache"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    assert data.cache.default_cache_dir(root).resolve() == (tmp_path / "cache").resolve()


def test_corrupt_image_names_the_file(sysu: Path, tmp_path: Path) -> None:
    bad = sysu / "cam3" / "0002" / "0001.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=re.escape(str(bad))):
        load_images([str(bad)], IMG, progress=False)
    with pytest.raises(UserError, match=re.escape(str(bad))):
        load_train_set("sysu", sysu, img_size=IMG, cache_dir=tmp_path / "c", progress=False)
    assert os.listdir(tmp_path / "c") == []


def test_load_images_converts_to_rgb_and_resizes(tmp_path: Path) -> None:
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((6, 3), 77, dtype=np.uint8)).save(gray)
    out = load_images([str(gray)], (4, 2), progress=False)
    assert out.shape == (1, 4, 2, 3) and out.dtype == np.uint8 and (out == 77).all()


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--dataset 'market'"):
        load_train_set("market", tmp_path)


def test_subset_relabels_ascending() -> None:
    labels_v, labels_i = np.array([0, 1, 2, 2, 1]), np.array([2, 0, 1])
    ts = TrainSet(
        visible_images=np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1).repeat(3, 3),
        visible_labels=labels_v,
        infrared_images=np.arange(3, dtype=np.uint8).reshape(3, 1, 1, 1).repeat(3, 3),
        infrared_labels=labels_i,
        pids=[7, 20, 31],
        visible_paths=[f"v{i}" for i in range(5)],
        infrared_paths=[f"i{i}" for i in range(3)],
    )
    sub = ts.subset([31, 7])
    assert sub.pids == [7, 31] and sub.num_classes == 2
    assert sub.visible_labels.tolist() == [0, 1, 1] and sub.visible_paths == ["v0", "v2", "v3"]
    assert sub.visible_images[:, 0, 0, 0].tolist() == [0, 2, 3]
    assert sub.infrared_labels.tolist() == [1, 0] and sub.infrared_paths == ["i0", "i1"]
    with pytest.raises(ValueError, match="99"):
        ts.subset([99])


# --- RegDB -----------------------------------------------------------------------------------


def make_regdb(root: Path, trial: int = 1) -> Path:
    """Write a fake RegDB tree: 3 train ids (labels 5, 0, 9), 2 test ids, 2 images each."""
    idx = root / "idx"
    idx.mkdir(parents=True, exist_ok=True)
    seed = 100
    for split, labels in (("train", [5, 0, 9]), ("test", [1, 3])):
        for modality, folder in (("visible", "Visible"), ("thermal", "Thermal")):
            lines = []
            for label in labels:
                for n in range(2):
                    rel = f"{folder}/{label}/img_{n}.bmp"
                    seed += 1
                    _image(root / rel, seed)
                    lines.append(f"{rel} {label}")
            (idx / f"{split}_{modality}_{trial}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_regdb_split_and_test_lists(tmp_path: Path) -> None:
    root = make_regdb(tmp_path / "RegDB", trial=2)
    paths, labels = regdb_split(root, 2, "train", "thermal")
    assert paths[0] == os.path.join(str(root), "Thermal/5/img_0.bmp")
    assert labels.tolist() == [5, 5, 0, 0, 9, 9] and labels.dtype == np.int64
    paths, pids = regdb_test(root, 2, Modality.VISIBLE)
    assert len(paths) == 4 and pids.tolist() == [1, 1, 3, 3] and "Visible/3" in paths[2]
    with pytest.raises(UserError, match="--trial 11: RegDB trials are 1-10"):
        regdb_test(root, 11, "visible")
    with pytest.raises(UserError, match=r"missing idx/test_visible_1\.txt"):
        regdb_test(root, 1, "visible")


def test_regdb_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    root = make_regdb(tmp_path / "RegDB")
    path = root / "idx" / "train_visible_1.txt"
    lines = path.read_text().splitlines()
    lines[2] = "Visible/0/img_0.bmp zero"
    path.write_text("\n".join(lines))
    with pytest.raises(UserError, match=re.escape(f"{path}:3: expected 'relative/path.bmp label'")):
        regdb_split(root, 1, "train", "visible")


def test_regdb_train_set_relabels_and_caches_per_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_regdb(tmp_path / "RegDB", trial=3)
    ts = load_train_set("regdb", root, img_size=IMG, trial=3, progress=False)
    assert ts.pids == [0, 5, 9]
    assert ts.visible_labels.tolist() == [1, 1, 0, 0, 2, 2]
    assert ts.infrared_images.shape == (6, *IMG, 3)
    assert (root / "cache" / "regdb_trial3_8x4" / "meta.json").is_file()
    monkeypatch.setattr(data.cache, "load_images", None)  # a rebuild would crash
    again = load_train_set("regdb", root, img_size=IMG, trial=3, progress=False)
    np.testing.assert_array_equal(again.infrared_images, ts.infrared_images)
    with pytest.raises(UserError, match="--trial 0"):
        load_train_set("regdb", root, trial=0)


# --- the data-set interface and registry ---------------------------------------------------------


def test_registry_names_and_lookup() -> None:
    # The shipped data sets come first; others may be registered after them.
    assert dataset_names()[:3] == ("sysu", "regdb", "llcm")
    assert get_dataset(" SYSU ").title == "SYSU-MM01" and get_dataset("regdb").title == "RegDB"
    assert get_dataset("LLCM").title == "LLCM"
    with pytest.raises(UserError, match="--dataset 'llcm2': expected one of sysu, regdb, llcm"):
        get_dataset("llcm2")


@pytest.mark.parametrize("dataset", registered_datasets(), ids=lambda d: d.name)
def test_every_data_set_fills_the_contract(dataset: DataSet) -> None:
    for attribute in ("name", "title", "short_title", "ema_decay", "ema_overwrite_every"):
        assert getattr(dataset, attribute) not in (None, "")
    assert 0 < dataset.ema_decay < 1 and dataset.ema_overwrite_every >= 1
    assert dataset.num_splits >= 1 and dataset.gallery_draws >= 1
    assert dataset.expected_files(1, ("train", "test"))
    protocols = dataset.protocols(ProtocolSettings())
    assert protocols and all(isinstance(p, Protocol) for p in protocols)
    assert len({p.name for p in protocols}) == len(protocols)


def test_per_data_set_defaults_live_with_the_data_set() -> None:
    sysu, regdb = get_dataset("sysu"), get_dataset("regdb")
    assert (sysu.ema_decay, sysu.ema_overwrite_every) == (0.997, 2)
    assert (regdb.ema_decay, regdb.ema_overwrite_every) == (0.968, 10)
    # --trial: a RegDB split (1..10, in training and test), a SYSU gallery draw (test only).
    assert (regdb.num_splits, regdb.gallery_draws) == (10, 1)
    assert (sysu.num_splits, sysu.gallery_draws) == (1, 10)
    assert regdb.split_of(None) == 1 and regdb.split_of(4) == 4 and regdb.draws_of(4) == [0]
    assert sysu.split_of(4) == 1 and sysu.draws_of(4) == [4]
    assert sysu.draws_of(None) == list(range(10))
    assert sysu.cache_name(1) == "sysu" and regdb.cache_name(3) == "regdb_trial3"
    with pytest.raises(UserError, match="--trial 10: SYSU gallery trials are 0-9"):
        sysu.check_trial(10, testing=True)
    sysu.check_trial(10, testing=False)  # training ignores --trial on SYSU-MM01
    with pytest.raises(UserError, match="--trial 0: RegDB trials are 1-10"):
        regdb.check_trial(0, testing=False)


def _same_list(got: ImageList, expected: tuple, modality: Modality) -> None:
    assert got.paths == expected[0] and got.modality == modality
    np.testing.assert_array_equal(got.pids, expected[1])
    if len(expected) > 2:
        np.testing.assert_array_equal(got.cams, expected[2])


def test_sysu_protocols_are_the_authors_lists(sysu: Path) -> None:
    dataset = get_dataset("sysu")
    root = str(sysu)
    (single,) = dataset.protocols(ProtocolSettings(mode="all", shot=1))
    (multi,) = dataset.protocols(ProtocolSettings(mode="indoor", shot=10))
    assert (single.name, single.key, multi.name, multi.key) == (
        "all single-shot",
        "all",
        "indoor multi-shot",
        "indoor",
    )
    for protocol, mode, shot in ((single, "all", 1), (multi, "indoor", 10)):
        assert protocol.exclusion == SAME_LOCATION and protocol.dedup_cmc
        assert SAME_LOCATION.ignored_camera_pairs == ((3, 2),)
        _same_list(protocol.query(root, 1), sysu_query(sysu, mode), Modality.INFRARED)
        for draw in (0, 3):
            _same_list(
                protocol.gallery(root, 1, draw),
                sysu_gallery(sysu, mode, shot, draw),
                Modality.VISIBLE,
            )
    assert dataset.result_name(single, 1) == "sysu all single-shot"
    assert dataset.record_key(single) == "sysu_all" and dataset.rank_list_folder(single) == "sysu"
    assert dataset.train_files(root, 1) == sysu_train_files(sysu)


def test_regdb_protocols_are_both_directions(tmp_path: Path) -> None:
    root = make_regdb(tmp_path / "RegDB", trial=2)
    dataset = get_dataset("regdb")
    v2i, i2v = dataset.protocols(ProtocolSettings(direction="both"))
    assert [p.name for p in (v2i, i2v)] == ["v2i", "i2v"]
    assert [p.name for p in dataset.protocols(ProtocolSettings(direction="i2v"))] == ["i2v"]
    visible, thermal = regdb_test(root, 2, "visible"), regdb_test(root, 2, "thermal")
    for protocol, query, gallery, modality in (
        (v2i, visible, thermal, Modality.VISIBLE),
        (i2v, thermal, visible, Modality.INFRARED),
    ):
        assert not protocol.exclusion.needs_cameras and not protocol.dedup_cmc
        _same_list(protocol.query(str(root), 2), query, modality)
        _same_list(protocol.gallery(str(root), 2, 5), gallery, Modality(1 - modality))
    assert dataset.result_name(v2i, 2) == "regdb trial 2 v2i"
    assert dataset.record_key(i2v) == "regdb_i2v"
    with pytest.raises(UserError, match="--direction 'up'"):
        dataset.protocols(ProtocolSettings(direction="up"))


def test_sysu_ids_without_images_are_named(tmp_path: Path) -> None:
    # Ids 13 and 14 are listed but have no image in any camera (a partly extracted data set).
    root = make_sysu(tmp_path / "s")
    (root / "exp/test_id.txt").write_text("12,10,14,11,13\n")
    test_file = root / "exp" / "test_id.txt"
    message = (
        f"{test_file}: 2 id(s) without any image in cam1..cam6 (partly extracted data set?): 13, 14"
    )
    for call in (
        lambda: sysu_query(root, "all"),
        lambda: sysu_gallery(root, "all"),
        lambda: get_dataset("sysu").check_root(root, 1, ("test",)),
    ):
        with pytest.raises(UserError, match=re.escape(message)):
            call()
    get_dataset("sysu").check_root(root, 1, ("train",))  # the training ids are complete
    load_train_set("sysu", root, img_size=IMG, progress=False)
    (root / "exp/val_id.txt").write_text("4,77\n")
    with pytest.raises(UserError, match=re.escape(f"{root / 'exp' / 'val_id.txt'}: 1 id(s)")):
        load_train_set("sysu", root, img_size=IMG, progress=False)
    # An empty folder is no better than none.
    (root / "exp/val_id.txt").write_text("4\n")
    (root / "cam1" / "0099").mkdir()
    (root / "exp/train_id.txt").write_text("3,1,2,99\n")
    with pytest.raises(UserError, match="99"):
        get_dataset("sysu").check_root(root, 1, ("train",))


def test_test_images_are_checked_by_header(tmp_path: Path) -> None:
    sysu = make_sysu(tmp_path / "s")
    dataset = get_dataset("sysu")
    assert dataset.check_test_images(sysu) == _count(TEST_IDS, (1, 2, 3, 4, 5, 6))
    broken = sysu / "cam2" / "0011" / "0003.jpg"
    broken.write_bytes(b"GIF89a not really")
    with pytest.raises(UserError, match=re.escape(f"test image {broken} is not a readable image")):
        dataset.check_test_images(sysu)
    regdb = make_regdb(tmp_path / "RegDB")
    assert get_dataset("regdb").check_test_images(regdb, 1) == 8
    index = regdb / "idx" / "test_thermal_1.txt"
    lines = index.read_text().splitlines()
    lines[2] = "Thermal/3/gone.bmp 3"
    index.write_text("\n".join(lines) + "\n")
    missing = os.path.join(str(regdb), "Thermal/3/gone.bmp")
    with pytest.raises(UserError, match=re.escape(f"{index}:3: test image {missing} not found")):
        get_dataset("regdb").check_test_images(regdb, 1)


# --- pre_process_sysu CLI --------------------------------------------------------------------


def test_pre_process_sysu_cli(
    sysu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = pre_process_sysu.main(["--data_root", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: --data_root ") and "folder not found" in err
    assert err.count("\n") == 1
    cache = tmp_path / "c"
    argv = ["--data_root", str(sysu), "--img_h", "8", "--img_w", "4", "--cache_dir", str(cache)]
    assert pre_process_sysu.main([*argv, "--no_progress"]) == 0
    assert (cache / "sysu_8x4" / "visible_images.npy").is_file()
