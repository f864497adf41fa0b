"""Features at reduced precision: bf16 through PyTorch's autocast, int8 through onnxruntime.

``--precision fp32`` (the default) runs the network as it is. ``bf16`` runs it under
``torch.autocast`` (CPU or CUDA) with channels-last memory: convolutions and matrix products in
bfloat16 with float32 accumulation, the features returned in float32. ``int8`` exports each
modality's BN-folded network to ONNX and quantizes it with onnxruntime's static quantization:
QDQ format, int8 weights per output channel, uint8 activations with ranges calibrated (MinMax) on
a few hundred images of that modality, every operator quantized but the BNNeck (one scale per
feature after pooling, left in float32). The quantized network runs in onnxruntime on the CPU.

Why onnxruntime and not PyTorch's own int8: measured on the same network (ResNet-18, 128x64,
batch 64, 2 threads, one process), ``torch.ao.quantization``'s FX mode (x86 backend) ran 890
images/s and onnxruntime 730, both within a cosine of 0.9998 of fp32; but PyTorch's documentation
deprecates ``torch.ao.quantization`` and plans its deletion, pointing to ``torchao``'s pt2e flow,
which is another package and runs quantized convolutions through ``torch.compile`` (a C++
compiler at run time). onnxruntime's quantization is maintained, starts from the ONNX file
``utils.export --onnx`` already writes and checks, writes a file any ONNX runtime reads, and runs
convolutions on VNNI (``vpdpbusd``). Measured on the 2-core AVX-512 development CPU,
ResNet-18 at 128x64, batch 64, 2 threads (the benchmark's ``precision`` section): fp32 233
images/s in PyTorch (BN folded), 207 in onnxruntime; bf16 456 (autocast alone, without
channels-last, gained about 1.5x: channels-last is kept for that); int8 607, 2.9x onnxruntime's
fp32, with the mAP of a synthetic SYSU-MM01 within 0.1 point of fp32's.

Calibration images: ``--calibration PATHS`` (files, folders, ``.txt`` lists; all used for both
modalities, at most ``MAX_CALIBRATION`` spread evenly), or by default the training images of the
data set the checkpoint records (``dataset`` and ``data_root`` in its ``args``), 256 per
modality spread evenly, when that folder is at hand. Each quantized network is checked against
the fp32 network on its calibration images (mean cosine of the features, agreement of each image's
10 nearest others) and refused below ``MIN_COSINE``.

Every output of features at bf16 or int8 records ``precision`` (and, for int8, ``calibration``:
how many images and a SHA-256 of their contents); an output without ``precision`` holds
fp32 features, as every file written before reduced precision existed does.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data.images import read_image
from data.registry import get_dataset
from data.transforms import normalize
from utils.base.errors import UserError
from utils.base.modality import Modality

log = logging.getLogger("precision")
PRECISIONS = ("fp32", "bf16", "int8")
FP32 = "fp32"
MODALITIES = ("visible", "infrared")
ONNX_OUTPUTS = ("pool", "bnneck")
# Calibration images per modality taken from the checkpoint's data set, and at most this many of
# the user's (spread evenly): MinMax ranges settle within a few hundred images.
DATASET_CALIBRATION = 256
MAX_CALIBRATION = 1024
# A quantized network whose features' mean cosine to fp32 falls below this is not kept.
MIN_COSINE = 0.98
# Neighbours compared by the ranking agreement.
AGREEMENT_K = 10
CALIBRATION_BATCH = 32
# The flags of the commands that extract features, by FeatureExtractor's argument names.
PRECISION_FLAGS = ("precision", "calibration")
PRECISION_HELP = "fp32; bf16 (autocast); int8 (onnxruntime, calibrated): see docs/precision.md"
CALIBRATION_HELP = (
    "int8: a few hundred crops (files, folders, .txt lists) to calibrate on (default: the "
    "checkpoint's data set)"
)


def check_precision(precision: str) -> str:
    """``precision`` if it is one of ``PRECISIONS``; a one-line UserError otherwise."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return precision


def add_precision_flags(group: Any) -> None:
    """Add ``--precision`` and ``--calibration`` to a parser or argument group."""
    group.add_argument("--precision", choices=PRECISIONS, default=FP32, help=PRECISION_HELP)
    group.add_argument("--calibration", nargs="+", metavar="PATH", help=CALIBRATION_HELP)


def precision_of(described: Mapping[str, Any]) -> str:
    """The precision an output records (none recorded: fp32)."""
    return str(described.get("precision", FP32))


def onnx_runtime(flag: str = "--onnx", without: str = "the .pth export works without them") -> Any:
    """The ``onnxruntime`` module (``onnx`` checked too); one line naming any that is missing."""
    missing = []
    for package in ("onnx", "onnxruntime"):
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise UserError(
            f"{flag} needs the package(s) {' and '.join(missing)}: pip install onnx onnxruntime "
            f"({without})"
        )
    return importlib.import_module("onnxruntime")


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------
class ModalityNetwork(nn.Module):
    """One modality's network as a module of images alone: ``(pool, bnneck)`` features."""

    def __init__(self, model: nn.Module, modality: str) -> None:
        super().__init__()
        self.model = model
        self.modality = Modality.parse(modality).name.lower()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled and BNNeck features (not normalised) of normalised NCHW images."""
        pool, bnneck = self.model(images, self.modality)[:2]
        return pool, bnneck


def write_onnx(network: nn.Module, path: Path, img_size: tuple[int, int]) -> None:
    """Export ``network`` (images -> pool, bnneck) to ONNX with a dynamic batch size."""
    # A module left in training mode exports a file that runs and gives wrong features.
    network = network.eval()
    example = torch.zeros(2, 3, *img_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network,
            (example,),
            str(path),
            input_names=["images"],
            output_names=list(ONNX_OUTPUTS),
            dynamic_axes={name: {0: "batch"} for name in ("images", *ONNX_OUTPUTS)},
            dynamo=False,
        )


def session(runtime: Any, model: str | os.PathLike[str] | bytes) -> Any:
    """An onnxruntime CPU session of ``model`` on as many threads as PyTorch uses."""
    options = runtime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    source = model if isinstance(model, bytes) else str(model)
    return runtime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class SessionNetwork(nn.Module):
    """An onnxruntime session in the place of a network: ``(images, modality) -> (pool, bnneck)``
    on the images' device (the session runs on the CPU)."""

    def __init__(self, onnx_session: Any) -> None:
        super().__init__()
        self.session = onnx_session

    def forward(self, images: torch.Tensor, modality: Any = None) -> tuple[torch.Tensor, ...]:
        """The session's pooled and BNNeck features of normalised NCHW images."""
        feed = {"images": images.detach().float().cpu().contiguous().numpy()}
        outputs = self.session.run(list(ONNX_OUTPUTS), feed)
        return tuple(torch.from_numpy(output).to(images.device) for output in outputs)


# --------------------------------------------------------------------------------------------
# Calibration images
# --------------------------------------------------------------------------------------------
def spread(paths: Sequence[str], count: int) -> list[str]:
    """At most ``count`` of ``paths``, spread evenly over the list."""
    if len(paths) <= count:
        return list(paths)
    return [paths[i] for i in np.linspace(0, len(paths) - 1, count).round().astype(int)]


@dataclass(frozen=True)
class Calibration:
    """The calibration images of each modality (absolute paths) and where they come from."""

    paths: Mapping[str, tuple[str, ...]]
    source: str

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the images' contents, per modality (what quantization saw, wherever the
        files are now; a missing file is marked as such)."""
        digest = hashlib.sha256()
        for modality in MODALITIES:
            for path in self.paths[modality]:
                try:
                    content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                except OSError:
                    content = "missing"
                digest.update(f"{modality}\t{content}\n".encode())
        return digest.hexdigest()

    def describe(self) -> str:
        """How many images and their fingerprint (what outputs record and indexes compare)."""
        counts = " + ".join(f"{len(self.paths[m])} {m}" for m in MODALITIES)
        return f"{counts} images, sha256 {self.fingerprint[:16]}"

    def record(self) -> dict[str, Any]:
        """The images by modality and their source, as plain values (:func:`stored_calibration`
        reads them back)."""
        return {"source": self.source, **{m: list(self.paths[m]) for m in MODALITIES}}


def given_calibration(files: Sequence[str], source: str = "--calibration") -> Calibration:
    """The user's calibration images (absolute paths), the same for both modalities."""
    chosen = tuple(spread([os.path.abspath(path) for path in files], MAX_CALIBRATION))
    return Calibration({modality: chosen for modality in MODALITIES}, source)


def stored_calibration(record: Mapping[str, Any]) -> Calibration:
    """Calibration images as :meth:`Calibration.record` wrote them (a gallery index keeps them)."""
    try:
        paths = {m: tuple(str(p) for p in record[m]) for m in MODALITIES}
        return Calibration(paths, str(record["source"]))
    except (KeyError, TypeError):
        raise UserError("the recorded calibration images are damaged") from None


def dataset_calibration(checkpoint: Mapping[str, Any], weights: str) -> Calibration:
    """The training images of the data set ``checkpoint`` records, when its folder is at hand."""
    args = checkpoint.get("args")
    args = args if isinstance(args, Mapping) else {}
    name, root = args.get("dataset"), args.get("data_root")
    ask = "pass --calibration PATHS (a few hundred crops like the ones you will extract)"
    if not name or not root:
        raise UserError(
            f"--precision int8 needs calibration images: {ask}; {weights} records no data set"
        )
    if not os.path.isdir(str(root)):
        raise UserError(
            f"--precision int8 needs calibration images: {ask}; the checkpoint's data set "
            f"({name} at {root}) is not at hand"
        )
    try:
        dataset = get_dataset(str(name))
        files = dataset.train_files(str(root), dataset.split_of(args.get("trial")))
    except (UserError, OSError, ValueError) as err:
        raise UserError(
            f"--precision int8: cannot read the calibration images ({err}); {ask}"
        ) from None
    picked = {
        "visible": tuple(spread(files.visible_paths, DATASET_CALIBRATION)),
        "infrared": tuple(spread(files.infrared_paths, DATASET_CALIBRATION)),
    }
    return Calibration(picked, f"the {name} training set at {root}")


def calibration_pixels(paths: Sequence[str], img_size: tuple[int, int]) -> np.ndarray:
    """The readable calibration images at ``img_size`` as uint8 (N, H, W, 3)."""
    height, width = img_size
    images, unreadable = [], []
    for path in paths:
        try:
            images.append(read_image(path, (width, height)))
        except UserError as err:
            unreadable.append(str(err))
    if unreadable:
        log.warning("%d calibration image(s) skipped (first: %s)", len(unreadable), unreadable[0])
    if not images:
        raise UserError(f"--calibration: none of the {len(paths)} images could be read")
    return np.stack(images)


def batches(pixels: np.ndarray, size: int = CALIBRATION_BATCH) -> Iterator[torch.Tensor]:
    """Normalised NCHW float32 batches of uint8 images, as extraction feeds the network."""
    for start in range(0, len(pixels), size):
        yield normalize(torch.from_numpy(np.ascontiguousarray(pixels[start : start + size])))


# --------------------------------------------------------------------------------------------
# int8: quantize, check
# --------------------------------------------------------------------------------------------
def quantize(
    runtime: Any, network: nn.Module, img_size: tuple[int, int], pixels: np.ndarray
) -> bytes:
    """``network`` (images -> pool, bnneck) as a statically quantized ONNX model (QDQ, per-channel
    int8 weights, uint8 activations calibrated with MinMax on ``pixels``)."""
    import onnx
    from onnxruntime import quantization
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.feed = ({"images": batch.numpy()} for batch in batches(pixels))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feed, None)

    with tempfile.TemporaryDirectory(prefix="cmnas_int8_") as tmp:
        plain, prepared, quantized = (Path(tmp) / name for name in ("f.onnx", "p.onnx", "q.onnx"))
        write_onnx(network, plain, img_size)
        with quiet_onnxruntime():
            quant_pre_process(str(plain), str(prepared), skip_symbolic_shape=True)
            ops = {node.op_type for node in onnx.load(str(prepared)).graph.node}
            quantization.quantize_static(
                str(prepared),
                str(quantized),
                Reader(),
                quant_format=quantization.QuantFormat.QDQ,
                per_channel=True,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
                calibrate_method=quantization.CalibrationMethod.MinMax,
                op_types_to_quantize=sorted(ops - {"BatchNormalization"}),
            )
        return quantized.read_bytes()


@contextlib.contextmanager
def quiet_onnxruntime() -> Iterator[None]:
    """onnxruntime's quantization tools log through the root logger: keep their notes out."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def unit(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length."""
    return torch.nn.functional.normalize(features.float(), dim=1)


def agreement(reference: torch.Tensor, other: torch.Tensor, k: int = AGREEMENT_K) -> float:
    """Mean share of each image's ``k`` nearest other images (by unit features) found by both."""
    k = min(k, len(reference) - 1)
    if k < 1:
        return 1.0
    found = []
    for features in (unit(reference), unit(other)):
        similarity = features @ features.T
        similarity.fill_diagonal_(-float("inf"))
        found.append(similarity.topk(k, dim=1).indices.tolist())
    shared = [len(set(a) & set(b)) for a, b in zip(*found, strict=True)]
    return float(np.mean(shared)) / k


def compare_features(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Mean cosine and top-10 agreement of two precisions' features of the same images."""
    cosine = float((unit(reference) * unit(other)).sum(dim=1).mean())
    return {
        "mean_cosine": round(cosine, 6),
        "top10_agreement": round(agreement(reference, other), 4),
    }


@torch.no_grad()
def check_quantized(
    name: str, quantized: Any, network: nn.Module, pixels: np.ndarray
) -> dict[str, Any]:
    """Compare a quantized session's BNNeck features with ``network``'s (fp32) on ``pixels``;
    refuse, in one line, a quantized network whose mean cosine is below ``MIN_COSINE``."""
    network = network.eval()
    expected, got = [], []
    for batch in batches(pixels):
        expected.append(network(batch)[1])
        got.append(torch.from_numpy(quantized.run(["bnneck"], {"images": batch.numpy()})[0]))
    figures = {"images": len(pixels), **compare_features(torch.cat(expected), torch.cat(got))}
    if not figures["mean_cosine"] >= MIN_COSINE:
        raise UserError(
            f"{name}: int8 features' mean cosine to fp32 is {figures['mean_cosine']:.4f} on "
            f"{len(pixels)} calibration images (below {MIN_COSINE}): calibrate on more, or more "
            "typical, images, or use --precision bf16"
        )
    return figures


# --------------------------------------------------------------------------------------------
# A feature extractor's precision
# --------------------------------------------------------------------------------------------
class Precision:
    """How an extractor runs its fp32 networks at ``name``: ``network`` gives what to run for a
    modality, ``context`` the autocast around it, ``describe`` what outputs record."""

    def __init__(
        self, name: str, calibration: Calibration | None, img_size: tuple[int, int]
    ) -> None:
        self.name = check_precision(name)
        self.calibration = calibration
        self.img_size = img_size
        self.runtime = (
            onnx_runtime("--precision int8", "fp32 and bf16 work without them")
            if name == "int8"
            else None
        )
        self.prepared: dict[int, nn.Module] = {}
        self.checks: dict[str, dict[str, Any]] = {}
        self.quantized: dict[str, bytes] = {}  # the int8 ONNX models, by modality

    def describe(self) -> dict[str, Any]:
        """``precision`` (absent for fp32) and, for int8, ``calibration`` (compared by an index) and
        ``calibration_source``."""
        if self.name == FP32:
            return {}
        described: dict[str, Any] = {"precision": self.name}
        if self.calibration is not None:
            described["calibration"] = self.calibration.describe()
            described["calibration_source"] = self.calibration.source
        return described

    def context(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """bf16: autocast on ``device``; otherwise nothing."""
        if self.name == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def network(self, fp32: nn.Module, modality: Modality) -> nn.Module:
        """What runs ``fp32``'s work for ``modality`` at this precision (built once)."""
        if self.name == FP32:
            return fp32
        key = id(fp32) * 2 + int(modality is Modality.INFRARED)
        if key not in self.prepared:
            self.prepared[key] = self.build(fp32, modality)
        return self.prepared[key]

    def build(self, fp32: nn.Module, modality: Modality) -> nn.Module:
        """bf16: a channels-last copy (oneDNN's fast bf16 layout); int8: the quantized session."""
        if self.name == "bf16":
            return fp32.to(memory_format=torch.channels_last)
        assert self.calibration is not None
        name = modality.name.lower()
        pixels = calibration_pixels(self.calibration.paths[name], self.img_size)
        # Quantized and checked on the CPU, where onnxruntime runs it, whatever the device.
        on_cpu = fp32 if next(fp32.parameters()).is_cpu else copy.deepcopy(fp32).cpu()
        wrapped = ModalityNetwork(on_cpu, name)
        log.info("quantizing the %s network to int8 on %d calibration images", name, len(pixels))
        self.quantized[name] = quantize(self.runtime, wrapped, self.img_size, pixels)
        quantized = session(self.runtime, self.quantized[name])
        self.checks[name] = check_quantized(f"the {name} int8 network", quantized, wrapped, pixels)
        log.info("int8 %s network against fp32: %s", name, self.checks[name])
        return SessionNetwork(quantized)


Expand = Callable[[Sequence[str], str], list[tuple[str, str]]]


def choose_calibration(
    calibration: Sequence[str | os.PathLike[str]] | Mapping[str, Any] | None,
    checkpoint: Mapping[str, Any],
    weights: str,
    expand: Expand,
) -> Calibration:
    """int8's calibration images: ``calibration``'s (paths, folders and lists, expanded by
    ``expand`` into (given, absolute) paths; or a recorded calibration), else the training images
    of the data set ``checkpoint`` records."""
    if isinstance(calibration, Mapping):
        return stored_calibration(calibration)
    if calibration:
        listed = expand([str(path) for path in calibration], "--calibration")
        return given_calibration([resolved for _, resolved in listed])
    return dataset_calibration(checkpoint, weights)


def extractor_precision(
    name: str,
    calibration: Sequence[str | os.PathLike[str]] | Mapping[str, Any] | None,
    checkpoint: Mapping[str, Any],
    weights: str,
    img_size: tuple[int, int],
    expand: Expand,
) -> Precision:
    """A feature extractor's precision (int8: calibrated as :func:`choose_calibration` says)."""
    if check_precision(name) != "int8":
        if calibration:
            raise UserError(f"--calibration: only --precision int8 is calibrated (not {name})")
        return Precision(name, None, img_size)
    onnx_runtime("--precision int8", "fp32 and bf16 work without them")
    return Precision(name, choose_calibration(calibration, checkpoint, weights, expand), img_size)
