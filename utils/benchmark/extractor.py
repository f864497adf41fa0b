"""Section ``extractor``: images/s of ``utils.extract.FeatureExtractor`` on image files.

At the demo's (64x32) and the paper's (256x128) sizes, on JPEG crops at 1.5 times that size:
decoding and resizing apart from the network, and the network as stored (``fold_bn=False``), with
BN folded for one modality (the extractor's default) and folded in onnxruntime (when installed).
Each path's features are compared with the unfolded network's. Best of ``--extractor_rounds``.
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data.transforms import normalize
from model import build_model
from model.checkpoint import checkpoint_header
from utils.base.modality import Modality
from utils.benchmark.measure import best_of
from utils.benchmark.section import Bench, Row, Section, figure
from utils.export import ModalityNetwork, write_onnx
from utils.extract import FeatureExtractor

# (name, height, width): the demo's and the paper's image sizes.
SIZES = (("demo", 64, 32), ("paper", 256, 128))
MODALITY = Modality.INFRARED


def write_crops(folder: Path, count: int, height: int, width: int, seed: int) -> list[str]:
    """``count`` random JPEG crops of 1.5 times (height, width), as a camera's crops might be."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 256, (height * 3 // 2, width * 3 // 2, 3), dtype=np.uint8)
        path = folder / f"{index:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def onnx_features(session: Any, pixels: np.ndarray, batch: int) -> torch.Tensor:
    """L2-normalised BNNeck features of uint8 images from an ONNX session, batch by batch."""
    rows = []
    for start in range(0, len(pixels), batch):
        images = normalize(torch.from_numpy(pixels[start : start + batch])).contiguous()
        rows.append(torch.from_numpy(session.run(["bnneck"], {"images": images.numpy()})[0]))
    return torch.nn.functional.normalize(torch.cat(rows), dim=1)


def measure_size(bench: Bench, folder: Path, height: int, width: int) -> dict[str, Any]:
    """The figures of one image size."""
    args = bench.args
    model = build_model(bench.arch, num_classes=8).eval()
    header = checkpoint_header(bench.arch, 8, 1, {"img_h": height, "img_w": width})
    folder.mkdir(parents=True)
    weights = folder / "checkpoint.pth"
    torch.save({**header, "model": model.state_dict()}, weights)
    batch = args.extractor_batch
    extractor = FeatureExtractor(weights, device=bench.device, batch_size=batch, fold_bn=False)
    folded = FeatureExtractor(weights, device=bench.device, batch_size=batch)
    paths = write_crops(folder / "crops", args.extractor_images, height, width, args.seed)
    rounds, count = args.extractor_rounds, len(paths)
    (pixels, _, _), decode_s = best_of(rounds, lambda: extractor.decode(paths))
    expected, network_s = best_of(rounds, lambda: extractor.features_of_pixels(pixels, MODALITY))
    got, folded_s = best_of(rounds, lambda: folded.features_of_pixels(pixels, MODALITY))
    figures: dict[str, Any] = {
        "images": count,
        "decode_images_per_s": round(count / decode_s, 2),
        "network_images_per_s": round(count / network_s, 2),
        "folded_images_per_s": round(count / folded_s, 2),
        "folded_max_abs_diff": float((got - expected).abs().max()),
    }
    try:
        runtime = importlib.import_module("onnxruntime")
    except ImportError:
        return figures | {"onnx": "onnxruntime not installed"}
    network = ModalityNetwork(folded.networks[MODALITY], MODALITY.name.lower())
    write_onnx(network, folder / "m.onnx", (height, width))
    session = runtime.InferenceSession(str(folder / "m.onnx"), providers=["CPUExecutionProvider"])
    got, onnx_s = best_of(rounds, lambda: onnx_features(session, pixels, batch))
    figures["onnx_images_per_s"] = round(count / onnx_s, 2)
    figures["onnx_max_abs_diff"] = float((got - expected).abs().max())
    return figures


def run_extractor(bench: Bench) -> dict[str, Any]:
    """Measure every size (the network and ONNX on the CPU, whatever ``--device`` says)."""
    doc: dict[str, Any] = {
        "batch_size": bench.args.extractor_batch,
        "depth": bench.args.depth,
        "threads": torch.get_num_threads(),
        "device": str(bench.device),
    }
    with tempfile.TemporaryDirectory(prefix="cmnas_extractor_") as tmp:
        for name, height, width in SIZES:
            figures = measure_size(bench, Path(tmp) / name, height, width)
            doc[name] = {"img_size": [height, width], **figures}
    return doc


def extractor_rows(doc: dict[str, Any]) -> list[Row]:
    """Images/s per size: decoding, network, BN folded, ONNX."""
    rows: list[Row] = []
    for name, height, width in SIZES:
        part = figure(doc, "extractor", name) or {}
        what = f"extractor {height}x{width} images/s"
        network, folded = part.get("network_images_per_s"), part.get("folded_images_per_s")
        ratio = folded / network if network and folded else None
        rows.append((f"{what}: network / BN folded", network, folded, ratio))
        decode, onnx = part.get("decode_images_per_s"), part.get("onnx_images_per_s")
        rows.append((f"{what}: decoding / ONNX", decode, onnx, ""))
    return rows


EXTRACTOR = Section("extractor", run_extractor, extractor_rows)
