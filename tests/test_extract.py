"""The feature extractor and ``python -m utils.extract``: test.py's features for any image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import mixed_arch, random_network, save_authors

import test as test_script
from model.checkpoint import checkpoint_header
from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.extract import FeatureExtractor, image_files, input_contract
from utils.extract import main as extract_main

H, W = 64, 32


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """Tiny convolutions run faster on one thread of the shared CPU."""


def save_checkpoint(path: Path, dataset: str, trial: int = 1) -> Path:
    """This project's checkpoint of a random mixed-slot ResNet-18 (64x32) with a distinct EMA."""
    args = {"dataset": dataset, "img_h": H, "img_w": W, "trial": trial}
    header = checkpoint_header(mixed_arch(18), 7, 1, args)
    model, ema = random_network(18, seed=11), random_network(18, seed=12)
    torch.save({**header, "epoch": 2, "model": model.state_dict(), "ema": ema.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    config = folder / "config.cfg"
    config.write_text(mixed_arch(18).to_cfg() + "\n")
    return {
        **{name: save_checkpoint(folder / f"{name}.pth", name) for name in ("sysu", "regdb")},
        "llcm": save_checkpoint(folder / "llcm.pth", "llcm"),
        "authors": save_authors(folder / "checkpoint.pth.tar", random_network(18, seed=13)),
        "config": config,
    }


def saved_features(tmp_path: Path, argv: list[str], capsys) -> dict[str, np.ndarray]:
    out = tmp_path / "test_features.npz"
    code = run_cli(test_script.main, [*argv, "--test_batch", "16", "--save_features", str(out)])
    assert code == 0, capsys.readouterr().err
    with np.load(out, allow_pickle=False) as data:
        return dict(data)


@pytest.mark.parametrize(
    ("dataset", "weights"),
    [
        ("sysu", "live"),
        ("sysu", "ema"),
        ("regdb", "ema"),
        ("regdb", "authors"),
        ("llcm", "live"),
        ("llcm", "authors"),
    ],
)
def test_features_equal_test_py(
    request, tmp_path, capsys, checkpoints, dataset: str, weights: str
) -> None:
    root = request.getfixturevalue(f"toy_{dataset}")
    checkpoint = checkpoints["authors" if weights == "authors" else dataset]
    flags = ["--weights", str(checkpoint)]
    flags += ["--config_path", str(checkpoints["config"])] if weights == "authors" else []
    flags += ["--ema"] if weights == "ema" else []
    expected = saved_features(
        tmp_path, ["--dataset", dataset, "--data_root", str(root), "--trial", "1", *flags], capsys
    )
    extractor = FeatureExtractor(
        checkpoint,
        checkpoints["config"] if weights == "authors" else None,
        ema=weights == "ema",
        batch_size=5,
    )
    # The authors' checkpoints carry no image size: the paper's, as test.py uses.
    assert extractor.img_size == ((256, 128) if weights == "authors" else (H, W))
    compared = 0
    for key in expected["protocols"]:
        for role in ("query", "gallery"):
            paths = list(expected[f"{key}_{role}_paths"])
            modality = str(expected[f"{key}_{role}_modality"][0])
            got = extractor(paths, modality=modality)
            assert got.dtype == torch.float32 and got.shape == (len(paths), 512)
            want = torch.from_numpy(expected[f"{key}_{role}_bnneck"])
            assert float((got - want).abs().max()) <= 1e-5
            compared += len(paths)
    assert compared >= 20


def test_pool_and_flip_equal_test_py(tmp_path, capsys, checkpoints, toy_regdb) -> None:
    argv = ["--dataset", "regdb", "--data_root", str(toy_regdb), "--weights"]
    expected = saved_features(tmp_path, [*argv, str(checkpoints["regdb"]), "--flip"], capsys)
    paths = list(expected["v2i_query_paths"])
    flipped = FeatureExtractor(checkpoints["regdb"], feature="pool", flip=True)(paths, "visible")
    want = torch.from_numpy(expected["v2i_query_pool"])
    assert float((flipped - want).abs().max()) <= 1e-5
    plain = FeatureExtractor(checkpoints["regdb"], feature="pool")(paths, "visible")
    assert float((plain - want).abs().max()) > 1e-3  # flip changes the features


@pytest.fixture(scope="module")
def extractor(checkpoints) -> FeatureExtractor:
    return FeatureExtractor(checkpoints["sysu"], batch_size=2)


def test_paths_pil_images_and_arrays_give_the_same_features(tmp_path, extractor) -> None:
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (80, 40, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (70, 30), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    palette = Image.fromarray(colour).convert("P")
    palette.save(tmp_path / "palette.png")
    from_paths = extractor([tmp_path / "colour.png", str(tmp_path / "grey.png")], "infrared")
    mixed = extractor([Image.fromarray(colour), grey], modality="infrared")
    assert torch.equal(from_paths, mixed)
    # A grey image is three equal channels; a palette image its RGB colours.
    three = extractor([np.repeat(grey[:, :, None], 3, axis=2)], "infrared")
    assert float((three[0] - from_paths[1]).abs().max()) <= 1e-6  # batch size 1 vs 2
    palette_features = extractor(tmp_path / "palette.png", "infrared")
    assert torch.equal(palette_features, extractor(palette, "infrared"))
    # The rows are L2-normalised; the modality picks the split BNs; per-image modalities.
    assert torch.allclose(from_paths.norm(dim=1), torch.ones(2))
    visible = extractor([colour, grey], "visible")
    assert float((visible - from_paths).abs().max()) > 1e-3
    per_image = extractor([colour, grey], modality=["visible", "infrared"])
    # Batches of one image each here: equal up to the round-off of another batch size.
    assert float((per_image - torch.stack([visible[0], from_paths[1]])).abs().max()) <= 1e-6
    assert extractor([], "visible").shape == (0, 512)


def test_unreadable_files_raise_or_are_skipped(tmp_path, extractor) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.full((64, 32, 3), 90, dtype=np.uint8)).save(good)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a JPEG")
    missing = tmp_path / "missing.png"
    with pytest.raises(UserError, match=f"^{corrupt}: cannot read image"):
        extractor([good, corrupt], "infrared")
    result = extractor([missing, good, corrupt, good], "infrared", on_error="skip")
    assert result.kept == [1, 3] and sorted(result.skipped) == [0, 2]
    assert result.skipped[0].startswith(f"{missing}: cannot read image")
    assert result.features.shape == (2, 512)
    assert torch.equal(result.features[0], extractor([good], "infrared")[0])


def test_bad_arguments(checkpoints, extractor) -> None:
    image = np.zeros((8, 4, 3), dtype=np.uint8)
    with pytest.raises(UserError, match="^modality 'rgb': expected 'visible' or 'infrared'$"):
        extractor([image], modality="rgb")
    with pytest.raises(UserError, match="^modality: 1 values for 2 images$"):
        extractor([image, image], modality=["visible"])
    with pytest.raises(TypeError, match=r"images\[1\]: expected a uint8 array .* float32"):
        extractor([image, image.astype(np.float32)], "visible")
    with pytest.raises(UserError, match="^on_error 'ignore': expected 'raise' or 'skip'$"):
        extractor([image], "visible", on_error="ignore")
    with pytest.raises(UserError, match="^feature 'neck': expected one of pool, bnneck$"):
        FeatureExtractor(checkpoints["sysu"], feature="neck")
    with pytest.raises(UserError, match="an authors' checkpoint needs --config_path"):
        FeatureExtractor(checkpoints["authors"])


# --------------------------------------------------------------------------------------------
# python -m utils.extract
# --------------------------------------------------------------------------------------------
def write_crops(folder: Path, count: int, grey: bool = False) -> list[Path]:
    rng = np.random.default_rng(count)
    paths = []
    for index in range(count):
        shape = (64, 32) if grey else (64, 32, 3)
        path = folder / f"{index // 2:04d}" / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_cli_writes_features_and_lists_skipped(tmp_path, capsys, checkpoints, extractor) -> None:
    crops = write_crops(tmp_path / "crops", 5, grey=True)
    (tmp_path / "crops" / "0000" / "broken.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "crops" / "notes.md").write_text("not an image")
    listed = tmp_path / "more.txt"
    listed.write_text("crops/0001/2.png\n\n")
    out = tmp_path / "features.npz"
    argv = ["--weights", str(checkpoints["sysu"]), "--modality", "infrared", "--out", str(out)]
    code = run_cli(extract_main, [*argv, "--images", str(tmp_path / "crops"), str(listed)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "1 unreadable image(s) skipped" in err and "broken.png" in err
    with np.load(out, allow_pickle=False) as data:
        saved = dict(data)
    given = [str(tmp_path / "crops" / "0000" / "0.png"), str(tmp_path / "crops" / "0000" / "1.png")]
    assert list(saved["paths"][:2]) == given
    assert saved["paths"][-1] == str(tmp_path / "crops/0001/2.png")
    assert list(saved["resolved_paths"]) == [str(p.resolve()) for p in [*crops, crops[2]]]
    assert list(saved["modality"]) == ["infrared"] * 6
    assert saved["features"].shape == (6, 512) and saved["features"].dtype == np.float32
    expected = extractor([*crops, crops[2]], "infrared").numpy()
    assert np.abs(saved["features"] - expected).max() <= 1e-6
    assert (str(saved["checkpoint"]), str(saved["weights"]), bool(saved["ema"])) == (
        str(checkpoints["sysu"]),
        "live",
        False,
    )
    assert str(saved["feature"]) == "bnneck" and not bool(saved["flip"])
    assert list(saved["img_size"]) == [H, W] and list(saved["mean"]) == [0.485, 0.456, 0.406]
    assert str(saved["channel_order"]) == "RGB" and list(saved["value_range"]) == [0.0, 1.0]
    skipped = (tmp_path / "features.skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(str(tmp_path / "crops/0000/broken.png"))


def test_image_files_order_and_contract(tmp_path) -> None:
    write_crops(tmp_path / "b", 3)
    found = image_files([str(tmp_path / "b")], "--images")
    assert [Path(given).relative_to(tmp_path).as_posix() for given, _ in found] == [
        "b/0000/0.png",
        "b/0000/1.png",
        "b/0001/2.png",
    ]
    contract = input_contract((256, 128))
    assert contract["img_size"] == [256, 128] and contract["std"] == [0.229, 0.224, 0.225]


def test_cli_errors(tmp_path, capsys, checkpoints, expect_error: Callable[..., str]) -> None:
    crops = tmp_path / "crops"
    write_crops(crops, 2)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    weights = ["--weights", str(checkpoints["sysu"]), "--modality", "visible"]
    out = ["--out", str(tmp_path / "f.npz")]

    def refused(argv: list[str], *fragments: str) -> str:
        code = run_cli(extract_main, argv)
        return expect_error(code, capsys.readouterr().err, *fragments)

    refused([*weights, *out, "--images", str(empty)], f"--images {empty}: no image files (")
    refused([*weights, *out, "--images", str(crops), "--batch_size", "0"], "--batch_size 0: ")
    refused([*weights, *out, "--images", str(tmp_path / "nope")], "nope: no such file or folder")
    empty_list = tmp_path / "empty.txt"
    empty_list.write_text("\n")
    refused([*weights, *out, "--images", str(empty_list)], "the list names no image")
    no_folder = tmp_path / "missing" / "f.npz"
    line = refused([*weights, "--out", str(no_folder), "--images", str(crops)])
    assert line == f"error: --out {no_folder}: folder {no_folder.parent} does not exist"
    # The image paths are checked before the checkpoint is read.
    line = refused(
        ["--weights", str(garbage), "--modality", "visible", *out, "--images", str(empty)]
    )
    assert "no image files" in line
    refused(["--weights", str(garbage), "--modality", "visible", *out, "--images", str(crops)],
            "not a PyTorch checkpoint")  # fmt: skip
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    refused([*weights, *out, "--images", str(broken)], "--images: none of the 1 images")
    assert not (tmp_path / "f.npz").exists()


def test_16_bit_infrared_images_are_scaled_as_in_training(tmp_path, extractor) -> None:
    wide = (np.arange(64 * 32, dtype=np.uint16).reshape(64, 32) * 30).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    with Image.open(tmp_path / "wide.png") as image:
        assert image.mode.startswith("I")  # a 16-bit greyscale file
        from_pil = extractor([image], "infrared")
    eight_bit = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
    expected = extractor([eight_bit], "infrared")
    assert torch.equal(extractor([tmp_path / "wide.png"], "infrared"), expected)
    assert torch.equal(from_pil, expected)
