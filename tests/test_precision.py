"""Features at bf16 and int8: the API, the commands, the int8 export's check, the refusals to
mix precisions, and the benchmark section at a tiny size."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import mixed_arch, random_network

from model.checkpoint import checkpoint_header
from utils import benchmark
from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.benchmark.registry import SECTIONS
from utils.export import main as export_main
from utils.extract import FeatureExtractor
from utils.extract import main as extract_main
from utils.gallery.cli import main as gallery_main
from utils.match import main as match_main
from utils.precision import ModalityNetwork, calibration_pixels, check_quantized, session

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
H, W = 64, 32
REPO = Path(__file__).resolve().parent.parent
SKIPPED_SECTIONS = ("fast", "features", "plain", "metrics", "rerank", "llcm", "search")


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """Tiny convolutions run faster on one thread of the shared CPU."""


def save_checkpoint(path: Path, **recorded: object) -> Path:
    """A random mixed-slot ResNet-18 (64x32) whose ``args`` record ``recorded`` too."""
    model = random_network(18, seed=21)
    header = checkpoint_header(mixed_arch(18), 7, 1, {"img_h": H, "img_w": W, **recorded})
    torch.save({**header, "model": model.state_dict()}, path)
    return path


def write_crops(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` random RGB crops (smooth enough to look like images to a network)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        small = rng.integers(0, 256, (8, 4, 3), dtype=np.uint8)
        path = folder / f"{index:03d}.png"
        Image.fromarray(small).resize((W, H), Image.BILINEAR).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A checkpoint, calibration crops, and labelled query and gallery crops."""
    folder = tmp_path_factory.mktemp("precision")
    for identity in ("a", "b"):
        write_crops(folder / "query" / identity, 3, seed=ord(identity))
        write_crops(folder / "gallery" / identity, 4, seed=ord(identity) + 100)
    write_crops(folder / "calibration", 16, seed=7)
    weights = save_checkpoint(folder / "checkpoint.pth")
    return {"folder": folder, "weights": weights, "calibration": folder / "calibration"}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum(dim=1).mean())


def test_each_precision_through_the_api(files) -> None:
    """bf16 and int8 features stay close to fp32's and say how they were made; fp32 says
    nothing new (its outputs are those of before)."""
    images = sorted((files["folder"] / "gallery").rglob("*.png"))
    fp32 = FeatureExtractor(files["weights"], device="cpu")
    expected = fp32(images, "visible")
    assert "precision" not in fp32.describe() and "calibration" not in fp32.describe()
    bf16 = FeatureExtractor(files["weights"], device="cpu", precision="bf16")
    assert cosine(bf16(images, "visible"), expected) > 0.999
    assert bf16.describe()["precision"] == "bf16" and "calibration" not in bf16.describe()
    int8 = FeatureExtractor(
        files["weights"], device="cpu", precision="int8", calibration=[files["calibration"]]
    )
    got = int8(images, "visible")
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert cosine(got, expected) > 0.98
    described = int8.describe()
    assert described["precision"] == "int8"
    assert described["calibration"].startswith("16 visible + 16 infrared images, sha256 ")
    check = int8.precision.checks["visible"]
    assert check["images"] == 16 and check["mean_cosine"] > 0.98 and check["top10_agreement"] > 0.5
    assert set(int8.precision.quantized) == {"visible"}  # the infrared network is made on use
    with pytest.raises(UserError, match=r"^--precision 'fp16': expected one of fp32, bf16, int8$"):
        FeatureExtractor(files["weights"], precision="fp16")


def test_int8_calibrates_on_the_checkpoints_data_set(tmp_path, files, toy_sysu) -> None:
    """By default int8 calibrates on the recorded data set's training images; without one at
    hand it asks for --calibration in one line."""
    weights = save_checkpoint(tmp_path / "sysu.pth", dataset="sysu", data_root=str(toy_sysu))
    extractor = FeatureExtractor(weights, precision="int8")
    calibration = extractor.precision.calibration
    assert calibration is not None and calibration.source == f"the sysu training set at {toy_sysu}"
    assert all(calibration.paths[m] for m in ("visible", "infrared"))
    assert all(str(toy_sysu) in path for path in calibration.paths["infrared"])
    moved = save_checkpoint(tmp_path / "moved.pth", dataset="sysu", data_root=str(tmp_path / "x"))
    with pytest.raises(UserError) as refused:
        FeatureExtractor(moved, precision="int8")
    assert str(refused.value) == (
        "--precision int8 needs calibration images: pass --calibration PATHS (a few hundred "
        "crops like the ones you will extract); the checkpoint's data set (sysu at "
        f"{tmp_path / 'x'}) is not at hand"
    )
    with pytest.raises(UserError, match=r"; \S+none\.pth records no data set$"):
        FeatureExtractor(save_checkpoint(tmp_path / "none.pth"), precision="int8")


def test_commands_record_the_precision(tmp_path, files, capsys) -> None:
    """extract and match write the precision into their outputs."""
    folder, weights = files["folder"], str(files["weights"])
    out = tmp_path / "int8.npz"
    argv = ["--weights", weights, "--images", str(folder / "gallery"), "--modality", "visible"]
    argv += ["--out", str(out), "--precision", "int8", "--calibration", str(files["calibration"])]
    assert run_cli(extract_main, argv) == 0
    with np.load(out, allow_pickle=False) as saved:
        assert str(saved["precision"]) == "int8" and saved["features"].dtype == np.float32
        assert str(saved["calibration"]).startswith("16 visible + 16 infrared images")
        assert str(saved["calibration_source"]) == "--calibration"
    matches = tmp_path / "matches"
    argv = ["--weights", weights, "--out", str(matches), "--labels_from_folders", "--pictures", "0"]
    for role, modality in (("query", "infrared"), ("gallery", "visible")):
        argv += [f"--{role}", str(folder / role), f"--{role}_modality", modality]
    assert run_cli(match_main, [*argv, "--precision", "bf16"]) == 0, capsys.readouterr().err
    payload = json.loads((matches / "matches.json").read_text())
    assert payload["precision"] == "bf16" and "calibration" not in payload
    assert payload["metrics"]["mAP"] > 0
    with np.load(matches / "features.npz", allow_pickle=False) as saved:
        assert str(saved["precision"]) == "bf16"


def add_argv(index: Path, weights: Path) -> list[str]:
    """``utils.gallery add`` of visible images into ``index`` with ``weights``, images to come."""
    return ["add", "--index", str(index), "--modality", "visible", "--weights", str(weights)]


def test_a_gallery_never_mixes_precisions(tmp_path, files, capsys, expect_error) -> None:
    """An int8 index keeps its calibration, refuses fp32 features and another --precision, and
    searches its queries at int8 on the same calibration."""
    folder, index = files["folder"], tmp_path / "index"
    add = add_argv(index, files["weights"])
    images = ["--images", str(folder / "gallery" / "a")]
    calibrated = ["--precision", "int8", "--calibration", str(files["calibration"])]
    assert run_cli(gallery_main, [*add, *images, *calibrated]) == 0, capsys.readouterr().err
    header = json.loads((index / "index.json").read_text())
    assert header["settings"]["precision"] == "int8" and len(header["calibration"]["visible"]) == 16
    # More images at int8 need no --calibration: the index's own is used.
    more = ["--images", str(folder / "gallery" / "b"), "--precision", "int8"]
    assert run_cli(gallery_main, [*add, *more]) == 0, capsys.readouterr().err
    capsys.readouterr()
    code = run_cli(gallery_main, [*add, *images])
    expect_error(
        code,
        capsys.readouterr().err,
        f"--index {index} holds features made with precision 'int8', this run makes precision "
        "'fp32': use the index's settings, or another --index",
    )
    search = ["search", "--index", str(index), "--images", str(folder / "query")]
    search += ["--modality", "infrared", "--pictures", "0"]
    code = run_cli(gallery_main, [*search, "--out", str(tmp_path / "s1"), "--precision", "bf16"])
    expect_error(
        code,
        capsys.readouterr().err,
        f"--index {index} holds int8 features, --precision is bf16: search with the index's "
        "precision (leave --precision out), or build another index",
    )
    assert run_cli(gallery_main, [*search, "--out", str(tmp_path / "s2")]) == 0
    payload = json.loads((tmp_path / "s2" / "matches.json").read_text())
    assert (
        payload["precision"] == "int8"
        and payload["calibration"] == header["settings"]["calibration"]
    )
    assert len(payload["queries"]) == 6 and len(payload["queries"][0]["matches"]) == 8
    capsys.readouterr()
    assert run_cli(gallery_main, ["info", "--index", str(index)]) == 0
    assert (
        "precision: int8 (calibration: 16 visible + 16 infrared images" in capsys.readouterr().out
    )


def test_int8_export_is_checked_in_onnxruntime(tmp_path, files, capsys, expect_error) -> None:
    """--onnx --precision int8 writes quantized files whose features onnxruntime gives close to
    fp32's, with the check in export.json; the refusals name what to do."""
    out = tmp_path / "exported"
    argv = ["--weights", str(files["weights"]), "--out", str(out), "--fold_bn", "--onnx"]
    calibrated = ["--precision", "int8", "--calibration", str(files["calibration"])]
    assert run_cli(export_main, [*argv, *calibrated]) == 0, capsys.readouterr().err
    described = json.loads((out / "export.json").read_text())
    exported = described["onnx"]
    assert exported["precision"] == "int8" and exported["calibration_source"] == "--calibration"
    for modality in ("visible", "infrared"):
        check = exported["int8_check"][modality]
        assert check["images"] == 16 and check["mean_cosine"] > 0.98
        assert 0.5 < check["top10_agreement"] <= 1.0
        # A quarter of the fp32 weights' bytes, give or take the graph.
        assert (out / f"{modality}.onnx").stat().st_size < (
            out / f"{modality}.pth"
        ).stat().st_size / 3
    runtime = pytest.importorskip("onnxruntime")
    quantized = session(runtime, out / "visible.onnx")
    kinds = {node.op_type for node in onnx.load(str(out / "visible.onnx")).graph.node}
    assert "DequantizeLinear" in kinds and "QuantizeLinear" in kinds
    # The check refuses a quantized network of another modality's network.
    pixels = calibration_pixels([str(p) for p in sorted(files["calibration"].iterdir())], (H, W))
    other = ModalityNetwork(random_network(18, seed=99).eval(), "visible")
    with pytest.raises(UserError, match=r"^v\.onnx: int8 features' mean cosine to fp32 is "):
        check_quantized("v.onnx", quantized, other, pixels)
    capsys.readouterr()
    argv = ["--weights", str(files["weights"]), "--out", str(tmp_path / "x"), "--precision", "int8"]
    code = run_cli(export_main, argv)
    expect_error(code, capsys.readouterr().err, "--precision int8: needs --onnx")


def test_without_onnxruntime_int8_says_what_to_install(files, capsys, monkeypatch, expect_error):
    """int8 without its packages is one line naming them; fp32 and bf16 work on."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    argv = ["--weights", str(files["weights"]), "--images", str(files["calibration"])]
    argv += ["--modality", "visible", "--out", str(files["folder"] / "x.npz")]
    code = run_cli(extract_main, [*argv, "--precision", "int8"])
    expect_error(
        code,
        capsys.readouterr().err,
        "error: --precision int8 needs the package(s) onnxruntime: pip install onnx onnxruntime "
        "(fp32 and bf16 work without them)",
    )


def test_benchmark_section_at_a_tiny_size(capsys, tmp_path) -> None:
    """The precision section measures the peaks, every path's speed against its peak, and each
    precision's Rank-1 and mAP on a synthetic SYSU-MM01."""
    tiny = ["--device", "cpu", "--threads", "1", "--depth", "18", "--img_h", str(H)]
    tiny += ["--img_w", str(W), "--batch_size", "8", "--num_pos", "4", "--extractor_images", "8"]
    tiny += [
        "--extractor_batch",
        "4",
        "--extractor_rounds",
        "1",
        "--markdown",
        str(tmp_path / "b.md"),
    ]
    skipped = (*SKIPPED_SECTIONS, "extractor", "gallery")
    threads = torch.get_num_threads()
    try:
        assert benchmark.main([*tiny, "--skip", *skipped]) == 0
    finally:
        torch.set_num_threads(threads)
    section = json.loads(capsys.readouterr().out)["precision"]
    assert section["threads"] == 1 and section["img_size"] == [H, W]
    peak = section["peak_gflops"]
    assert all(peak[kind] > 0 for kind in ("fp32", "bf16", "int8"))
    speed, accuracy = section["resnet18"]["speed"], section["resnet18"]["accuracy"]
    assert speed["gflops_per_image"] > 0
    for path in ("pytorch_fp32", "folded_fp32", "bf16", "onnxruntime_fp32", "int8"):
        assert speed[path]["images_per_s"] > 0 and speed[path]["fraction_of_peak"] > 0
    assert set(speed["targets"]) == {
        "bf16_over_folded_fp32",
        "int8_over_onnxruntime_fp32",
        "folded_fp32_of_peak",
    }
    assert isinstance(speed["int8_fp32_operators"], dict)
    assert accuracy["queries"] > 0 and accuracy["folded_fp32"]["mean_cosine"] == 1.0
    for name in ("bf16", "int8"):
        assert 0 <= accuracy[name]["mAP"] <= 100 and accuracy[name]["mean_cosine"] > 0.95
    assert "| resnet18 64x32 images/s: onnxruntime_fp32 / int8 |" in (tmp_path / "b.md").read_text()


def test_the_documented_benchmark_command_measures_precision_alone() -> None:
    """docs/precision.md's command is one the benchmark takes, running only this section."""
    text = (REPO / "docs" / "precision.md").read_text()
    block = text.split("<!-- run by tests/test_precision.py -->\n```bash\n")[1].split("```")[0]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:3] == ["python", "-m", "utils.benchmark"]
    options = benchmark.read_options(words[3:])
    assert set(options.skip) == {section.name for section in SECTIONS} - {"precision"}
    assert (options.depth, options.img_h, options.img_w) == (50, 256, 128)
    assert options.extractor_batch == 64


def test_bad_precision_flags_are_refused(files, capsys) -> None:
    """An unknown --precision is argparse's refusal, naming the choices."""
    argv = ["--weights", str(files["weights"]), "--images", str(files["calibration"])]
    argv += ["--modality", "visible", "--out", "x.npz", "--precision", "fp16"]
    with pytest.raises(SystemExit):
        extract_main(argv)
    assert "invalid choice: 'fp16' (choose from 'fp32', 'bf16', 'int8')" in capsys.readouterr().err


def test_an_fp32_index_refuses_other_precisions(tmp_path, files, capsys, expect_error) -> None:
    """An index of fp32 features (recording no precision, as before) refuses bf16 additions and
    searches at another precision; empty calibration folders are refused before any work."""
    folder, index = files["folder"], tmp_path / "index"
    add = add_argv(index, files["weights"])
    add += ["--images", str(folder / "gallery" / "a")]
    assert run_cli(gallery_main, add) == 0, capsys.readouterr().err
    assert "precision" not in json.loads((index / "index.json").read_text())["settings"]
    capsys.readouterr()
    expect_error(
        run_cli(gallery_main, [*add, "--precision", "bf16"]),
        capsys.readouterr().err,
        f"--index {index} holds features made with precision 'fp32', this run makes precision "
        "'bf16': use the index's settings, or another --index",
    )
    search = ["search", "--index", str(index), "--images", str(folder / "query"), "--modality"]
    search += ["infrared", "--out", str(tmp_path / "out"), "--precision", "int8"]
    expect_error(
        run_cli(gallery_main, search),
        capsys.readouterr().err,
        f"--index {index} holds fp32 features, --precision is int8: search with the index's "
        "precision (leave --precision out), or build another index",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"^--calibration \S+empty: no image files"):
        FeatureExtractor(files["weights"], precision="int8", calibration=[empty])
    with pytest.raises(UserError, match=r"^--calibration: only --precision int8 is calibrated "):
        FeatureExtractor(files["weights"], precision="bf16", calibration=[files["calibration"]])


def test_benchmark_scores_a_trained_checkpoint_on_its_data_set(tmp_path, toy_sysu) -> None:
    """--precision_weights: Rank-1 and mAP of each precision of a SYSU-MM01 checkpoint on the
    data set it records; another data set's checkpoint is refused in one line."""
    from utils.benchmark.precision import trained_accuracy

    weights = save_checkpoint(tmp_path / "sysu.pth", dataset="sysu", data_root=str(toy_sysu))
    found = trained_accuracy(str(weights), 8)
    assert found["ema"] is False
    scores = found["accuracy"]
    assert scores["queries"] > 0 and scores["gallery"] > 0
    assert scores["folded_fp32"]["mean_cosine"] == 1.0
    for name in ("bf16", "int8"):
        assert 0 <= scores[name]["mAP"] <= 100 and scores[name]["mean_cosine"] > 0.95
        assert scores[name]["mAP_drop"] == round(
            scores["folded_fp32"]["mAP"] - scores[name]["mAP"], 3
        )
    regdb = save_checkpoint(tmp_path / "regdb.pth", dataset="regdb", data_root=str(toy_sysu))
    with pytest.raises(
        UserError, match=r"^--precision_weights .*regdb\.pth: expected a checkpoint"
    ):
        trained_accuracy(str(regdb), 8)


def test_the_stand_in_networks_have_small_residual_branches() -> None:
    """The benchmark's random networks scale each residual block's last BN weight alone."""
    from model import Arch, build_model
    from utils.benchmark.precision import RESIDUAL_SCALE, small_residual_branches

    torch.manual_seed(0)
    model = build_model(Arch.uniform(50, "split"), num_classes=8)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    small_residual_branches(model)
    after = model.state_dict()
    scaled = {name for name in before if not torch.equal(before[name], after[name])}
    assert scaled and all(".bn3." in name and name.endswith(".weight") for name in scaled)
    assert len(scaled) == 16 * 2  # 16 bottleneck blocks, a visible and an infrared BN each
    for name in scaled:
        assert torch.allclose(after[name], before[name] * RESIDUAL_SCALE)
