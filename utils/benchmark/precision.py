"""Section ``precision``: features at fp32, bf16 and int8: the machine's peak, speed, accuracy.

1. ``peak``: this machine's own arithmetic limit: the best GFLOP/s of a large (2048^3) matrix
   product in fp32 and bf16 (PyTorch) and int8 (PyTorch's ``_int_mm`` and onnxruntime's
   ``MatMulInteger``, uint8 x int8 as quantized convolutions run), and of a large 3x3 convolution
   in fp32 and bf16 (oneDNN's convolutions can outrun its matrix products); per precision the
   fastest counts, on the benchmark's threads, measured before and after the paths (the better
   of the two: other programs' load lowers a peak).
2. ``speed``: images/s of each extraction path of :class:`FeatureExtractor` on random images,
   batch ``--extractor_batch``, best of ``--extractor_rounds`` passes over ``--extractor_images``
   images (the paths take turns within each round), at ``--img_h`` x ``--img_w``, for ResNet-18
   and ``--depth`` (when it is another): the checkpoint's network in PyTorch fp32, BN folded (the
   default), bf16 (autocast), the folded network in onnxruntime fp32, and int8 (onnxruntime,
   quantized). Each path's GFLOP/s (images/s
   times the network's FLOPs per image, its convolutions' and linear layers') as a fraction of
   the peak of its arithmetic, and the targets (int8 2x and bf16 1.5x the fp32 images/s of the
   same runtime, fp32 70% of the fp32 peak) met or not; for int8, the operators left in float32
   (not between a dequantize and a quantize) say where the time goes when 2x is not reached.
3. ``accuracy``: each precision's features scored with SYSU-MM01's all-search single-shot protocol
   (gallery draw 0) on a synthetic SYSU-MM01 (``data.toy``) of ``--extractor_images // 8`` test
   identities (4 to 32): Rank-1 and mAP side by side, and the mean cosine of each precision's
   features to fp32's (target: mAP within 0.5 points of fp32). The networks are initialised at
   random (seeded) with their BN statistics measured on the synthetic training images, not
   trained: the figures compare precisions, not the method. int8 is calibrated on the synthetic
   training set, as the checkpoint records it (the default of ``--precision int8``).
"""

from __future__ import annotations

import importlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.images import read_image
from data.sysu import sysu_gallery, sysu_query, sysu_train_files
from data.toy import make_sysu
from data.transforms import normalize
from model import Arch, build_model, read_checkpoint
from model.checkpoint import checkpoint_header
from model.net import Block
from utils.base.errors import UserError
from utils.base.modality import Modality
from utils.benchmark.extractor import best_of, onnx_features
from utils.benchmark.section import Bench, Row, Section
from utils.evaluation.metrics import eval_sysu, summarize
from utils.extract import FeatureExtractor
from utils.precision import ModalityNetwork, compare_features, session, spread, write_onnx

log = logging.getLogger("benchmark")
PEAK_SIZE = 2048
# The peak's convolution: batch, channels, height, width of a ResNet layer3 3x3 convolution at
# 256x128 (last stride 1), batch 16.
PEAK_CONV = (16, 256, 16, 8)
MODALITY = Modality.INFRARED
PATHS = ("pytorch_fp32", "folded_fp32", "bf16", "onnxruntime_fp32", "int8")
# Training images per modality that set a random network's BN statistics.
BN_IMAGES = 64
# The random networks' residual branches, scaled as a trained ResNet's (small_residual_branches).
RESIDUAL_SCALE = 0.1
# Each PyTorch path's (precision, BNs folded); the paths whose features are scored.
EXTRACTORS = {
    "pytorch_fp32": ("fp32", False),
    "folded_fp32": ("fp32", True),
    "bf16": ("bf16", True),
    "int8": ("int8", True),
}
SCORED = ("folded_fp32", "bf16", "int8")
# The arithmetic each path runs on (its peak), and the path its speed-up is measured against.
ARITHMETIC = {"pytorch_fp32": "fp32", "folded_fp32": "fp32", "bf16": "bf16"}
ARITHMETIC |= {"onnxruntime_fp32": "fp32", "int8": "int8"}
TARGETS = {"bf16": ("folded_fp32", 1.5), "int8": ("onnxruntime_fp32", 2.0)}
FP32_OF_PEAK = 0.7
QDQ = {"QuantizeLinear", "DequantizeLinear"}


def gflops_of(seconds: float, size: int = PEAK_SIZE) -> float:
    """GFLOP/s of one ``size``^3 matrix product taking ``seconds``."""
    return round(2 * size**3 / seconds / 1e9, 1)


def onnx_int8_matmul(runtime: Any, size: int) -> Any:
    """An onnxruntime session of one uint8 x int8 ``MatMulInteger``."""
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size]),
        helper.make_tensor_value_info("b", TensorProto.INT8, [size, size]),
    ]
    output = helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])
    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    graph = helper.make_graph([node], "matmul", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return session(runtime, model.SerializeToString())


def measure_peak(rounds: int) -> dict[str, Any]:
    """The best GFLOP/s of a large matrix product in fp32, bf16 and int8, and of a large 3x3
    convolution in fp32 and bf16; per precision, the faster of its measures."""
    rng = torch.Generator().manual_seed(0)
    a, b = (torch.randn(PEAK_SIZE, PEAK_SIZE, generator=rng) for _ in range(2))
    maps = torch.randn(*PEAK_CONV, generator=rng)
    kernels = torch.randn(PEAK_CONV[1], PEAK_CONV[1], 3, 3, generator=rng)
    conv_flops = 2 * maps.numel() * kernels[0].numel()
    peak: dict[str, Any] = {"size": PEAK_SIZE, "conv": list(PEAK_CONV)}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = a.to(dtype), b.to(dtype)
        peak[f"{name}_matmul"] = gflops_of(best_of(rounds + 1, lambda x=x, y=y: x @ y)[1])
        # Channels-last for bf16, as its extraction path runs.
        layout = torch.channels_last if dtype == torch.bfloat16 else torch.contiguous_format
        x, y = maps.to(dtype).to(memory_format=layout), kernels.to(dtype)
        seconds = best_of(rounds + 1, lambda x=x, y=y: torch.nn.functional.conv2d(x, y, padding=1))
        peak[f"{name}_conv"] = round(conv_flops / seconds[1] / 1e9, 1)
        peak[name] = max(peak[f"{name}_matmul"], peak[f"{name}_conv"])
    ints = [torch.randint(-128, 128, (PEAK_SIZE,) * 2, generator=rng).to(torch.int8) for _ in "ab"]
    try:
        peak["int8_torch"] = gflops_of(best_of(rounds + 1, lambda: torch._int_mm(*ints))[1])
    except RuntimeError as err:
        peak["int8_torch"] = f"unavailable ({str(err).splitlines()[0]})"
    try:
        runtime = importlib.import_module("onnxruntime")
        matmul = onnx_int8_matmul(runtime, PEAK_SIZE)
        feed = {"a": (ints[0].numpy().view(np.uint8)), "b": ints[1].numpy()}
        peak["int8_onnxruntime"] = gflops_of(best_of(rounds + 1, lambda: matmul.run(None, feed))[1])
    except ImportError:
        peak["int8_onnxruntime"] = "onnxruntime not installed"
    measured = [v for k, v in peak.items() if k.startswith("int8_") and isinstance(v, float)]
    peak["int8"] = max(measured) if measured else None
    return peak


def network_gflops(model: torch.nn.Module, img_size: tuple[int, int]) -> float:
    """GFLOPs of one image through ``model``'s convolutions and linear layers (a multiply-add
    counts two; the rest is a rounding error beside them)."""
    flops = []

    def count(layer: torch.nn.Module, _: Any, output: torch.Tensor) -> None:
        weight = layer.weight  # (out, in / groups, kh, kw) or (out, in)
        flops.append(2 * output.numel() * weight[0].numel())

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    hooks = [layer.register_forward_hook(count) for layer in layers]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, *img_size), MODALITY)
    for hook in hooks:
        hook.remove()
    return round(sum(flops) / 1e9, 3)


def fp32_operators(model: Any) -> dict[str, int]:
    """The operators of a QDQ model that run in float32: all but those whose inputs come from a
    DequantizeLinear and whose outputs go only to QuantizeLinear (onnxruntime fuses those into
    integer kernels)."""
    nodes, outputs = model.graph.node, {output.name for output in model.graph.output}
    dequantized = {
        out for node in nodes if node.op_type == "DequantizeLinear" for out in node.output
    }
    consumers: dict[str, set[str]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    counts: dict[str, int] = {}
    for node in nodes:
        fed = bool(dequantized & set(node.input))
        requantized = all(
            out not in outputs and consumers.get(out) == {"QuantizeLinear"} for out in node.output
        )
        if node.op_type not in QDQ and not (fed and requantized):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def synthetic_sysu(folder: Path, args: Any) -> Path:
    """A synthetic SYSU-MM01 at the benchmark's image size (``--extractor_images // 8`` test
    identities, 4 to 32)."""
    test_ids = min(32, max(4, args.extractor_images // 8))
    # 32 training identities: about 200 infrared images, int8's default calibration set.
    sizes = {"train_ids": 32, "val_ids": 2, "test_ids": test_ids, "images_per_camera": 4}
    make_sysu(folder, args.seed, **sizes, height=args.img_h, width=args.img_w)
    return folder


def small_residual_branches(model: torch.nn.Module) -> None:
    """Scale the last BN of every residual block by ``RESIDUAL_SCALE``, as trained ResNets have
    them (zero-gamma initialisation starts them at 0).

    With the random initialisation's scale, ResNet-50's residual branches pile up: pooled
    features of different images then share most of their length, the BNNeck removes that
    shared part, and what is left is small enough for int8's rounding to swamp (mean cosine to
    fp32 0.68 at 256x128, measured; 0.98 with the branches scaled to 0.1). A trained network
    does not behave like that; this stand-in should not either.
    """
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, Block):
                for norm in getattr(block, f"bn{block.num_convs}").modules():
                    if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
                        norm.weight.mul_(RESIDUAL_SCALE)


def random_checkpoint(folder: Path, depth: int, root: Path, args: Any) -> Path:
    """A seeded random network of ``depth`` with BN statistics of the synthetic training images,
    saved as a checkpoint that records the synthetic data set (int8's default calibration)."""
    torch.manual_seed(args.seed)
    arch = Arch.uniform(depth, "split")
    model = build_model(arch, num_classes=8)
    small_residual_branches(model)
    recorded = {"img_h": args.img_h, "img_w": args.img_w, "dataset": "sysu", "data_root": str(root)}
    header = checkpoint_header(arch, 8, 1, recorded)
    # BN statistics: a cumulative average over the training images of each modality.
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    files = sysu_train_files(root)
    height, width = args.img_h, args.img_w
    with torch.no_grad():
        for modality, paths in ((Modality.VISIBLE, files[0]), (Modality.INFRARED, files[2])):
            chosen = spread(paths, BN_IMAGES)
            pixels = np.stack([read_image(path, (width, height)) for path in chosen])
            for batch in torch.from_numpy(pixels).split(args.extractor_batch):
                model(normalize(batch), modality)
    weights = folder / f"resnet{depth}.pth"
    torch.save({**header, "model": model.eval().state_dict()}, weights)
    return weights


def extractors(
    weights: str | Path, batch: int, names: tuple[str, ...] = tuple(EXTRACTORS), ema: bool = False
) -> dict[str, FeatureExtractor]:
    """The extractor of each PyTorch path ``names`` (onnxruntime fp32 is measured apart)."""
    made = {}
    for name in names:
        precision, fold_bn = EXTRACTORS[name]
        made[name] = FeatureExtractor(
            weights, ema=ema, device="cpu", batch_size=batch, fold_bn=fold_bn, precision=precision
        )
    return made


def measure_speed(made: dict[str, FeatureExtractor], folder: Path, args: Any) -> dict[str, Any]:
    """Images/s and GFLOP/s of every path, the paths taking turns in each round (a machine's
    changing load then weighs on all of them alike); the fastest round of each counts."""
    rng = np.random.default_rng(args.seed)
    shape = (args.extractor_images, args.img_h, args.img_w, 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    folded = made["folded_fp32"]
    network = ModalityNetwork(folded.networks[MODALITY], MODALITY.name.lower())
    write_onnx(network, folder / "fp32.onnx", folded.img_size)
    onnx = session(importlib.import_module("onnxruntime"), folder / "fp32.onnx")
    runs = {name: (lambda e=e: e.features_of_pixels(pixels, MODALITY)) for name, e in made.items()}
    runs["onnxruntime_fp32"] = lambda: onnx_features(onnx, pixels, args.extractor_batch)
    gflops = network_gflops(folded.networks[MODALITY], folded.img_size)
    speed: dict[str, Any] = {"gflops_per_image": gflops, "batch_size": args.extractor_batch}
    for name in PATHS:
        runs[name]()  # warm-up (int8: quantizes the network)
    seconds = {name: float("inf") for name in PATHS}
    for _ in range(args.extractor_rounds):
        for name in PATHS:
            seconds[name] = min(seconds[name], best_of(1, runs[name])[1])
    for name in PATHS:
        rate = len(pixels) / seconds[name]
        speed[name] = {"images_per_s": round(rate, 2), "gflop_per_s": round(rate * gflops, 1)}
    quantized = made["int8"].precision.quantized.get(MODALITY.name.lower())
    if quantized is not None:
        speed["int8_fp32_operators"] = fp32_operators(
            importlib.import_module("onnx").load_from_string(quantized)
        )
    return speed


def against_peak(speed: dict[str, Any], peak: dict[str, Any]) -> None:
    """Add each path's fraction of its arithmetic's peak, and the targets, to ``speed``."""
    for name in PATHS:
        limit = peak.get(ARITHMETIC[name])
        fraction = speed[name]["gflop_per_s"] / limit if limit else None
        speed[name]["fraction_of_peak"] = None if fraction is None else round(fraction, 3)
    speed["targets"] = targets(speed)


def targets(speed: dict[str, Any]) -> dict[str, Any]:
    """Each speed target, its figure and whether it is met."""
    found = {}
    for name, (base, times) in TARGETS.items():
        ratio = speed[name]["images_per_s"] / speed[base]["images_per_s"]
        found[f"{name}_over_{base}"] = {
            "ratio": round(ratio, 3),
            "target": times,
            "met": ratio >= times,
        }
    fraction = speed["folded_fp32"]["fraction_of_peak"]
    met = fraction is not None and fraction >= FP32_OF_PEAK
    found["folded_fp32_of_peak"] = {"fraction": fraction, "target": FP32_OF_PEAK, "met": met}
    return found


def measure_accuracy(made: dict[str, FeatureExtractor], root: Path) -> dict[str, Any]:
    """Rank-1 and mAP of each precision on SYSU all-search single-shot (draw 0); mean cosine
    and top-10 agreement of each precision's features to fp32's."""
    q_paths, q_pids, q_cams = sysu_query(root, "all")
    g_paths, g_pids, g_cams = sysu_gallery(root, "all", 1, 0)
    features = {}
    for name in SCORED:
        extractor = made[name]
        features[name] = (extractor(q_paths, "infrared"), extractor(g_paths, "visible"))
    scores: dict[str, Any] = {"queries": len(q_paths), "gallery": len(g_paths)}
    reference = torch.cat(features["folded_fp32"])
    for name, (query, gallery) in features.items():
        metrics = summarize(
            *eval_sysu(-(query @ gallery.T).numpy(), q_pids, g_pids, q_cams, g_cams)
        )
        scores[name] = {key: round(metrics[key], 2) for key in ("rank1", "mAP")}
        scores[name] |= compare_features(reference, torch.cat((query, gallery)))
    for name in ("bf16", "int8"):
        scores[name]["mAP_drop"] = round(scores["folded_fp32"]["mAP"] - scores[name]["mAP"], 3)
    return scores


def trained_accuracy(weights: str, batch: int) -> dict[str, Any]:
    """Rank-1 and mAP of each precision of a trained SYSU-MM01 checkpoint (its EMA weights when
    it holds them) on the data set its ``args`` record."""
    checkpoint = read_checkpoint(weights)
    recorded = checkpoint.get("args") or {}
    if recorded.get("dataset") != "sysu" or not recorded.get("data_root"):
        raise UserError(
            f"--precision_weights {weights}: expected a checkpoint trained on SYSU-MM01 "
            "(its args record dataset 'sysu' and its data_root)"
        )
    ema = checkpoint.get("ema") is not None
    made = extractors(weights, batch, SCORED, ema)
    scores = measure_accuracy(made, Path(recorded["data_root"]))
    return {"weights": weights, "ema": ema, "accuracy": scores}


def run_precision(bench: Bench) -> dict[str, Any]:
    """Peak, then speed and accuracy of each depth (ResNet-18 and ``--depth``)."""
    args = bench.args
    first = measure_peak(args.extractor_rounds)
    doc: dict[str, Any] = {"threads": torch.get_num_threads()}
    doc |= {"img_size": [args.img_h, args.img_w], "device": "cpu"}
    with tempfile.TemporaryDirectory(prefix="cmnas_precision_") as tmp:
        root = synthetic_sysu(Path(tmp) / "sysu", args)
        for depth in sorted({18, args.depth}):
            log.info("precision: ResNet-%d", depth)
            weights = random_checkpoint(Path(tmp), depth, root, args)
            made = extractors(weights, args.extractor_batch)
            speed = measure_speed(made, Path(tmp), args)
            doc[f"resnet{depth}"] = {"speed": speed, "accuracy": measure_accuracy(made, root)}
    if args.precision_weights:
        doc["trained"] = trained_accuracy(args.precision_weights, args.extractor_batch)
    # Measured before and after, the better of each: other programs' load lowers a peak.
    last = measure_peak(args.extractor_rounds)
    peak = {k: v if not isinstance(v, float) else max(v, last[k]) for k, v in first.items()}
    peak["int8"] = max(first["int8"] or 0, last["int8"] or 0) or None
    log.info("precision: peak GFLOP/s %s", peak)
    for key in [k for k in doc if k.startswith("resnet")]:
        against_peak(doc[key]["speed"], peak)
    return {"peak_gflops": peak, **doc}


def precision_rows(doc: dict[str, Any]) -> list[Row]:
    """Per depth: images/s fp32 against bf16 and int8, and mAP at each precision."""
    section = doc.get("precision", {})
    rows: list[Row] = []
    for key in sorted(k for k in section if k.startswith("resnet")):
        speed, scores = section[key]["speed"], section[key]["accuracy"]
        rate = {name: speed[name]["images_per_s"] for name in PATHS}
        size = "x".join(str(v) for v in section["img_size"])
        for name, (base, _) in TARGETS.items():
            what = f"{key} {size} images/s: {base} / {name}"
            rows.append((what, rate[base], rate[name], rate[name] / rate[base]))
        fp32 = scores["folded_fp32"]["mAP"]
        for name in ("bf16", "int8"):
            rows.append((f"{key} synthetic SYSU mAP: fp32 / {name}", fp32, scores[name]["mAP"], ""))
    if "trained" in section:
        scores = section["trained"]["accuracy"]
        fp32 = scores["folded_fp32"]["mAP"]
        for name in ("bf16", "int8"):
            what = f"trained checkpoint SYSU mAP: fp32 / {name}"
            rows.append((what, fp32, scores[name]["mAP"], ""))
    return rows


PRECISION = Section("precision", run_precision, precision_rows)
