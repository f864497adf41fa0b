"""Tests of the synthetic SYSU-MM01 / RegDB / LLCM generator (the data.toy package)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import toy
from data.toy import layouts as toy_layouts
from utils.base.errors import UserError

SYSU_SMALL = {"train_ids": 3, "val_ids": 2, "test_ids": 4, "height": 64, "width": 32}
REGDB_SMALL = {"ids": 7, "images_per_id": 3, "height": 64, "width": 32}
LLCM_SMALL = {"train_ids": 5, "test_ids": 6, "images_per_camera": 2, "height": 32, "width": 16}
LLCM_NAME = re.compile(r"(\d{4})_c(\d{2})_s\d{6}_f\d+_(vis|nir)\.jpg")


@pytest.fixture(scope="module")
def sysu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SYSU-MM01 set with the default ten images per visible camera."""
    out = tmp_path_factory.mktemp("sysu") / "SYSU-MM01"
    toy.make_sysu(out, seed=0, **SYSU_SMALL)
    return out


@pytest.fixture(scope="module")
def regdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small RegDB set with an odd number of identities."""
    out = tmp_path_factory.mktemp("regdb") / "RegDB"
    toy.make_regdb(out, seed=0, **REGDB_SMALL)
    return out


@pytest.fixture(scope="module")
def llcm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LLCM set written through the command line."""
    out = tmp_path_factory.mktemp("llcm") / "LLCM"
    flags = [f"--{name}={value}" for name, value in LLCM_SMALL.items()]
    assert toy.main(["--dataset", "llcm", "--out", str(out), *flags]) == 0
    return out


def _read_ids(path: Path) -> list[int]:
    """Parse an exp/*_id.txt file: exactly one line of comma-separated integers."""
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    return [int(x) for x in lines[0].split(",")]


def _sysu_folders(root: Path) -> dict[tuple[int, int], list[Path]]:
    """Map (camera, pid) to the sorted image files of that folder."""
    folders = {}
    for cam in range(1, 7):
        for folder in (root / f"cam{cam}").iterdir():
            folders[cam, int(folder.name)] = sorted(folder.iterdir())
    return folders


def _pixels(files: list[Path]) -> np.ndarray:
    """Decode images as float RGB in [0, 1], stacked (N, H, W, 3)."""
    return np.stack([np.asarray(Image.open(f).convert("RGB"), np.float64) / 255 for f in files])


def _all_files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _written_again(
    make: Callable[..., dict], tmp_path: Path, other_seed: int, sizes: dict[str, int]
) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Every file of ``make`` written again with seed 0, and with ``other_seed``."""
    make(tmp_path / "again", seed=0, **sizes)
    make(tmp_path / "other", seed=other_seed, **sizes)
    return _all_files(tmp_path / "again"), _all_files(tmp_path / "other")


def test_sysu_layout(sysu: Path) -> None:
    """Folders, file names and id files follow SYSU-MM01 exactly; every protocol is answerable."""
    assert sorted(p.name for p in sysu.iterdir()) == [f"cam{c}" for c in range(1, 7)] + ["exp"]
    assert sorted(p.name for p in (sysu / "exp").iterdir()) == [
        "test_id.txt",
        "train_id.txt",
        "val_id.txt",
    ]
    splits = {name: _read_ids(sysu / "exp" / f"{name}_id.txt") for name in ("train", "val", "test")}
    assert [len(splits[n]) for n in ("train", "val", "test")] == [3, 2, 4]
    everyone = sorted(splits["train"] + splits["val"] + splits["test"])
    assert everyone == list(range(1, 10))
    folders = _sysu_folders(sysu)
    for (cam, pid), files in folders.items():
        assert pid in everyone
        assert (sysu / f"cam{cam}" / f"{pid:04d}").is_dir()
        assert [f.name for f in files] == [f"{n:04d}.jpg" for n in range(1, len(files) + 1)]
        if cam in toy.SYSU_VISIBLE_CAMERAS:
            assert len(files) >= 10
        else:
            assert 8 <= len(files) <= 12
    for pid in everyone:
        cams = {cam for cam, p in folders if p == pid}
        assert cams & set(toy.SYSU_VISIBLE_CAMERAS) and cams & set(toy.SYSU_INFRARED_CAMERAS)
        if pid in splits["test"]:
            assert cams & {1, 2} and cams & {3, 6}
            assert 3 not in cams or 1 in cams  # a cam3 query ignores cam2 galleries
    with Image.open(folders[next(iter(folders))][0]) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (32, 64))


def test_regdb_layout(regdb: Path) -> None:
    """Visible/Thermal folders and idx files with `path label` lines, half/half splits."""
    assert sorted(p.name for p in regdb.iterdir()) == ["Thermal", "Visible", "idx"]
    expected = {
        f"{split}_{mod}_{t}.txt"
        for split in ("train", "test")
        for mod in ("visible", "thermal")
        for t in range(1, 11)
    }
    assert {p.name for p in (regdb / "idx").iterdir()} == expected
    for folder in ("Visible", "Thermal"):
        assert sorted(int(p.name) for p in (regdb / folder).iterdir()) == list(range(1, 8))
        for pid_dir in (regdb / folder).iterdir():
            assert len(list(pid_dir.glob("*.bmp"))) == 3
    splits = set()
    for trial in range(1, 11):
        ids = {}
        for split in ("train", "test"):
            per_modality = []
            for mod, folder in (("visible", "Visible"), ("thermal", "Thermal")):
                lines = (regdb / "idx" / f"{split}_{mod}_{trial}.txt").read_text().splitlines()
                pairs = []
                for line in lines:
                    path, label = line.split(" ")
                    assert re.fullmatch(rf"{folder}/\d+/[\w]+\.bmp", path)
                    assert (regdb / path).is_file()
                    pairs.append((int(path.split("/")[1]), int(label)))
                pids = sorted({pid for pid, _ in pairs})
                # Labels are 0..n-1 within the split, in ascending identity order.
                assert all(label == pids.index(pid) for pid, label in pairs)
                assert len(pairs) == 3 * len(pids)
                per_modality.append(pids)
            assert per_modality[0] == per_modality[1]
            ids[split] = set(per_modality[0])
        assert len(ids["train"]) == 3 and len(ids["test"]) == 4
        assert ids["train"].isdisjoint(ids["test"])
        assert ids["train"] | ids["test"] == set(range(1, 8))
        splits.add(frozenset(ids["train"]))
    assert len(splits) > 1  # the trials split differently


def test_sysu_deterministic_per_seed(tmp_path: Path) -> None:
    """The same seed gives byte-identical files; another seed gives different images."""
    tiny = {"train_ids": 2, "val_ids": 1, "test_ids": 2, "images_per_camera": 3}
    tiny |= {"height": 32, "width": 16}
    toy.make_sysu(tmp_path / "first", seed=0, **tiny)
    first = _all_files(tmp_path / "first")
    again, other = _written_again(toy.make_sysu, tmp_path, 7, tiny)
    assert first == again
    shared = [k for k in set(first) & set(other) if k.endswith(".jpg")]
    assert shared and all(first[k] != other[k] for k in shared)


def test_regdb_deterministic_per_seed(regdb: Path, tmp_path: Path) -> None:
    """RegDB files and splits are byte-identical for a seed and differ for another."""
    again, other = _written_again(toy.make_regdb, tmp_path, 3, REGDB_SMALL)
    assert again == _all_files(regdb)
    first, second = _all_files(regdb), other
    assert all(first[k] != second[k] for k in first if k.endswith(".bmp"))


def test_infrared_is_grey_and_visible_is_colour(sysu: Path, regdb: Path) -> None:
    """Infrared images have R == G == B exactly; visible images carry colour."""
    folders = _sysu_folders(sysu)
    for modality, cams in (("ir", toy.SYSU_INFRARED_CAMERAS), ("vis", toy.SYSU_VISIBLE_CAMERAS)):
        files = [f for (cam, _), fs in folders.items() if cam in cams for f in fs[:2]]
        pixels = _pixels(files)
        spread = np.abs(pixels[..., 0] - pixels[..., 1]) + np.abs(pixels[..., 1] - pixels[..., 2])
        if modality == "ir":
            assert spread.max() == 0
        else:
            assert spread.mean(axis=(1, 2)).min() > 0.02
    thermal = _pixels(sorted((regdb / "Thermal").rglob("*.bmp")))
    assert np.array_equal(thermal[..., 0], thermal[..., 2])
    visible = _pixels(sorted((regdb / "Visible").rglob("*.bmp")))
    assert np.abs(visible[..., 0] - visible[..., 2]).mean() > 0.02


def test_modality_statistics_differ(sysu: Path, regdb: Path) -> None:
    """Per-modality image statistics (channel means, pixel noise) differ by a clear margin."""

    def stats(files: list[Path]) -> tuple[np.ndarray, float]:
        pixels = _pixels(files)
        # Noise level: the median absolute difference of horizontally adjacent pixels.
        noise = float(np.median(np.abs(np.diff(pixels.mean(axis=3), axis=2))))
        return pixels.mean(axis=(0, 1, 2)), noise

    folders = _sysu_folders(sysu)
    pairs = [
        (
            stats(
                [f for (c, _), fs in folders.items() if c in toy.SYSU_VISIBLE_CAMERAS for f in fs]
            ),
            stats(
                [f for (c, _), fs in folders.items() if c in toy.SYSU_INFRARED_CAMERAS for f in fs]
            ),
        ),
        (
            stats(sorted((regdb / "Visible").rglob("*.bmp"))),
            stats(sorted((regdb / "Thermal").rglob("*.bmp"))),
        ),
    ]
    for (vis_mean, vis_noise), (ir_mean, ir_noise) in pairs:
        # Black-hot infrared (dark body on a bright, noisy background) is brighter on average.
        assert (ir_mean - vis_mean).min() > 0.12
        assert ir_noise > 2.5 * vis_noise  # and far noisier


def test_identities_vary_between_images(sysu: Path) -> None:
    """Images of one identity and camera are not copies of each other (pose jitter)."""
    files = _sysu_folders(sysu)[next(iter(_sysu_folders(sysu)))]
    pixels = _pixels(files[:3])
    assert np.abs(pixels[0] - pixels[1]).mean() > 0.02
    assert np.abs(pixels[1] - pixels[2]).mean() > 0.02


def test_existing_non_empty_out_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI refuses a non-empty --out with one error line and status 2, touching nothing."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert toy.main(["--dataset", "sysu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {out} exists and is not empty (pass --overwrite)\n"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_overwrite_replaces_and_empty_out_is_accepted(tmp_path: Path) -> None:
    """--overwrite swaps the old folder for the new set; an empty --out is simply filled."""
    out = tmp_path / "regdb"
    out.mkdir()
    args = ["--dataset", "regdb", "--out", str(out), "--ids", "2", "--images_per_id", "1"]
    assert toy.main([*args, "--height", "32", "--width", "16"]) == 0
    (out / "stale.txt").write_text("old")
    assert toy.main([*args, "--height", "32", "--width", "16", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Thermal", "Visible", "idx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["regdb"]  # no temp folders left


def test_bad_dataset_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown --dataset is argparse's own usage error (status 2)."""
    with pytest.raises(SystemExit) as exc:
        toy.main(["--dataset", "market", "--out", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --dataset: invalid choice: 'market'" in err


def test_unwritable_parent_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --out whose parent cannot be created or written gives one error line and status 2."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = blocker / "data"
    assert toy.main(["--dataset", "sysu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}: cannot write to its parent folder")
    assert err.count("\n") == 1


def test_bad_counts_are_user_errors(tmp_path: Path) -> None:
    """Counts and sizes the generator cannot honour raise UserError naming the flag."""
    with pytest.raises(UserError, match="--test_ids"):
        toy.make_sysu(tmp_path / "a", test_ids=0)
    with pytest.raises(UserError, match="--ids"):
        toy.make_regdb(tmp_path / "b", ids=1)
    with pytest.raises(UserError, match="--height"):
        toy.make_regdb(tmp_path / "c", height=8)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure half-way through writing leaves neither --out nor a temporary folder."""
    calls = []

    def failing_save(image: np.ndarray, path: Path) -> None:
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        Image.fromarray(image).save(path)

    monkeypatch.setattr(toy_layouts, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        toy.make_regdb(tmp_path / "regdb", ids=4, images_per_id=2, height=32, width=16)
    assert list(tmp_path.iterdir()) == []


def test_current_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out naming the folder we stand in is refused, even with --overwrite."""
    (tmp_path / "notes.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    assert toy.main(["--dataset", "regdb", "--out", ".", "--overwrite"]) == 2
    assert (
        capsys.readouterr().err == "error: --out . holds the current folder; name another folder\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _llcm_test_folders(root: Path) -> dict[tuple[str, int, int], list[str]]:
    """Map (modality, camera, pid) to the file names of each test folder."""
    folders = {}
    for modality in ("vis", "nir"):
        for cam_dir in (root / f"test_{modality}").iterdir():
            for pid_dir in cam_dir.iterdir():
                key = (modality, int(cam_dir.name.removeprefix("cam")), int(pid_dir.name))
                folders[key] = sorted(p.name for p in pid_dir.iterdir())
    return folders


def test_llcm_layout(llcm: Path) -> None:
    """Folders, camera sets (no infrared cam3), file names and disjoint train/test identities."""
    assert sorted(p.name for p in llcm.iterdir()) == ["idx", "nir", "test_nir", "test_vis", "vis"]
    assert sorted(p.name for p in (llcm / "idx").iterdir()) == [
        "test_id.txt",
        "train_nir.txt",
        "train_vis.txt",
    ]
    assert sorted(p.name for p in (llcm / "test_vis").iterdir()) == [
        f"cam{c}" for c in range(1, 10)
    ]
    nir_cams = sorted(p.name for p in (llcm / "test_nir").iterdir())
    assert nir_cams == ["cam1", "cam2", "cam4", "cam5", "cam6", "cam7", "cam8", "cam9"]
    assert tuple(int(c[3:]) for c in nir_cams) == toy.LLCM_INFRARED_CAMERAS
    test_ids = _read_ids(llcm / "idx" / "test_id.txt")
    assert test_ids == sorted(test_ids) and len(test_ids) == 6
    train_ids = {int(p.name) for modality in ("vis", "nir") for p in (llcm / modality).iterdir()}
    assert len(train_ids) == 5 and train_ids.isdisjoint(test_ids)
    assert train_ids | set(test_ids) == set(range(1, 12))
    for modality in ("vis", "nir"):
        for pid_dir in (llcm / modality).iterdir():
            for name in (p.name for p in pid_dir.iterdir()):
                match = LLCM_NAME.fullmatch(name)
                assert match and match[1] == pid_dir.name and match[3] == modality
    folders = _llcm_test_folders(llcm)
    assert {pid for _, _, pid in folders} == set(test_ids)
    for (modality, cam, pid), names in folders.items():
        assert len(names) == 2
        for name in names:
            match = LLCM_NAME.fullmatch(name)
            assert match and (int(match[1]), int(match[2]), match[3]) == (pid, cam, modality)
    for pid in test_ids:
        # Two cameras per modality: every query keeps a gallery image under another camera.
        for modality in ("vis", "nir"):
            assert len({c for m, c, p in folders if (m, p) == (modality, pid)}) >= 2
    # Camera numbers are shared across modalities: some identity has both under one number.
    both = {(c, p) for m, c, p in folders if m == "vis"} & {
        (c, p) for m, c, p in folders if m == "nir"
    }
    assert both
    with Image.open(next((llcm / "test_nir").rglob("*.jpg"))) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (16, 32))


def test_llcm_index_files(llcm: Path) -> None:
    """Every training image is listed once, as `path label`, label 0..n-1 by ascending identity."""
    train_ids = sorted(int(p.name) for p in (llcm / "vis").iterdir())
    for modality in ("vis", "nir"):
        lines = (llcm / "idx" / f"train_{modality}.txt").read_text().splitlines()
        listed = []
        for line in lines:
            path, label = line.split(" ")
            parts = path.split("/")
            assert parts[0] == modality and (llcm / path).is_file()
            assert int(label) == train_ids.index(int(parts[1]))
            listed.append(path)
        on_disk = sorted(str(p.relative_to(llcm)) for p in (llcm / modality).rglob("*.jpg"))
        assert sorted(listed) == on_disk and len(set(listed)) == len(listed)


def test_llcm_modalities_and_camera_count(llcm: Path) -> None:
    """Infrared images are grey, visible ones colour; per-folder counts follow the flag."""
    nir = _pixels(sorted((llcm / "test_nir").rglob("*.jpg")))
    assert np.abs(nir[..., 0] - nir[..., 1]).max() == 0
    vis = _pixels(sorted((llcm / "test_vis").rglob("*.jpg")))
    assert np.abs(vis[..., 0] - vis[..., 2]).mean() > 0.01
    out = llcm.parent / "bigger"
    counts = toy.make_llcm(out, seed=0, **(LLCM_SMALL | {"images_per_camera": 5}))
    sizes = {
        modality: [len(list(d.iterdir())) for d in (out / modality).iterdir()]
        for modality in ("vis", "nir")
    }
    assert min(sizes["vis"]) >= 5 * 2  # two or more cameras, five or six images each
    assert counts["visible_images"] == len(list(out.rglob("*_vis.jpg")))
    assert counts["infrared_images"] == len(list(out.rglob("*_nir.jpg")))


def test_llcm_deterministic_per_seed(llcm: Path, tmp_path: Path) -> None:
    """The same seed gives byte-identical files; another seed gives another data set."""
    again, other = _written_again(toy.make_llcm, tmp_path, 1, LLCM_SMALL)
    assert again == _all_files(llcm)
    assert other != _all_files(llcm)


def test_llcm_bad_counts_are_user_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A count the LLCM layout cannot honour is one error line naming the flag."""
    out = tmp_path / "llcm"
    assert toy.main(["--dataset", "llcm", "--out", str(out), "--test_ids", "0"]) == 2
    assert capsys.readouterr().err == "error: --test_ids 0: expected a positive integer\n"
    assert list(tmp_path.iterdir()) == []


def test_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` shows each flag's default, and it is the default of the layout it drives."""
    with pytest.raises(SystemExit) as stop:
        toy.main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for make in (toy.make_sysu, toy.make_regdb, toy.make_llcm):
        for name, parameter in inspect.signature(make).parameters.items():
            if parameter.default is inspect.Parameter.empty or isinstance(parameter.default, bool):
                continue
            shown = re.search(rf"--{name} {name.upper()} (?:(?!--).)*?\(default (\S+?)\)", text)
            assert shown and shown.group(1) == str(parameter.default), name
