"""Export a checkpoint as two plain ResNets, one per modality, in torchvision's layout.

    python -m utils.export --weights runs/x/checkpoint_latest.pth --out exported/
    python -m utils.export --weights checkpoint119.pth.tar --config_path config.cfg --ema \
        --out exported/ --fold_bn

Each BN slot resolves to one BatchNorm per modality (a split slot to that modality's BN, a
shared slot to the shared one), so each modality's network is a standard ResNet with the
BNNeck after global average pooling: ``DIR/visible.pth`` and ``DIR/infrared.pth`` are state
dicts with torchvision's names (``conv1``, ``bn1``, ``layerN.M.convK``/``bnK``,
``layerN.0.downsample.0``/``.1``; no ``fc``) plus ``bnneck.*``. ``--fold_bn`` folds every backbone
BN into the convolution before it (the convolutions gain a ``.bias``; the BNNeck stays, it
follows pooling). ``DIR/export.json`` records what was written. ``--onnx --precision int8``
writes the ONNX files quantized (see :mod:`utils.precision`), each checked in onnxruntime against
the fp32 network on its calibration images before it is kept (``export.json`` reports the mean
cosine of the features and the agreement of each image's 10 nearest others).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import CMNASNet, read_checkpoint
from model.fold import backbone_slots, conv_of_slot, fold, folded_network, modality_bn
from model.restore import model_from_checkpoint
from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.base.io import MB, check_out_dir, check_replaceable, folder_aside
from utils.base.logger import setup_logging
from utils.base.modality import Modality
from utils.engine.options import HelpFormatter, checkpoint_parser
from utils.extract import check_finite, image_files, input_contract
from utils.precision import (
    CALIBRATION_HELP,
    ONNX_OUTPUTS,
    Calibration,
    ModalityNetwork,
    calibration_pixels,
    check_quantized,
    choose_calibration,
    onnx_runtime,
    quantize,
    session,
    write_onnx,
)

log = logging.getLogger("export")
MODALITIES = ("visible", "infrared")
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
EXPORT_FILES = {"export.json", *(f"{m}.{kind}" for m in MODALITIES for kind in ("pth", "onnx"))}
# onnxruntime against PyTorch, relative to the features' largest value: beyond round-off.
ONNX_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportSettings:
    """What to write: BN folded or not, ONNX files too, the networks' input size, and the weights
    they come from (as errors name them)."""

    fold_bn: bool
    onnx: bool
    img_size: tuple[int, int]
    source: str
    # int8: the images each modality's ONNX file is quantized on; None: fp32.
    calibration: Calibration | None = None


def get_args_parser() -> argparse.ArgumentParser:
    """The export parser."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m utils.export",
        description="Export a checkpoint as one plain torchvision-layout ResNet per modality.",
        parents=[checkpoint_parser("export")],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", required=True, help="folder to write visible.pth, infrared.pth")
    parser.add_argument(
        "--fold_bn",
        action="store_true",
        help="fold every backbone BN into the convolution before it",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write visible.onnx and infrared.onnx (needs onnx and onnxruntime)",
    )
    parser.add_argument(
        "--precision", choices=("fp32", "int8"), default="fp32", help="of the ONNX files"
    )
    parser.add_argument("--calibration", nargs="+", metavar="PATH", help=CALIBRATION_HELP)
    return parser


def torchvision_name(name: str) -> str:
    """This project's backbone module name in torchvision's layout (``downsample.0``/``.1``)."""
    return name.replace("downsample.conv", "downsample.0").replace("downsample.bn", "downsample.1")


def plain_state(model: CMNASNet, modality: str, fold_bn: bool = False) -> dict[str, torch.Tensor]:
    """``model``'s network for ``modality`` as a torchvision-layout state dict plus ``bnneck.*``."""
    modality = Modality.parse(modality).name.lower()
    slots = backbone_slots(model)
    convs = {n: m for n, m in model.backbone.named_modules() if isinstance(m, nn.Conv2d)}
    folded_into = {conv_of_slot(slot): slot for slot in slots}
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, conv in convs.items():
            target = torchvision_name(name)
            if fold_bn and name in folded_into:
                bn = modality_bn(slots[folded_into[name]], modality)
                state[f"{target}.weight"], state[f"{target}.bias"] = fold(conv, bn)
            else:
                state[f"{target}.weight"] = conv.weight.detach().clone()
                if conv.bias is not None:
                    state[f"{target}.bias"] = conv.bias.detach().clone()
        if not fold_bn:
            for slot, module in slots.items():
                bn_state = modality_bn(module, modality).state_dict()
                for tensor in BN_TENSORS:
                    state[f"{torchvision_name(slot)}.{tensor}"] = bn_state[tensor].detach().clone()
        for tensor, value in model.bnneck.state_dict().items():
            state[f"bnneck.{tensor}"] = value.detach().clone()
    return dict(sorted(state.items()))


def check_onnx(
    runtime: Any, path: Path, network: nn.Module, img_size: tuple[int, int], source: str
) -> float:
    """Run ``path`` in onnxruntime against ``network`` on random images; the largest difference.

    Fails when the difference is beyond round-off (relative to the features' size), or when
    PyTorch's own features are not finite (naming ``source``, the weights, as their cause).
    """
    images = torch.randn(3, 3, *img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network.eval()(images)
    check_finite(torch.cat(expected, dim=1), source)
    got = session(runtime, path).run(list(ONNX_OUTPUTS), {"images": images.numpy()})
    scale = max(1.0, *(float(t.abs().max()) for t in expected))
    pairs = zip(got, expected, strict=True)
    worst = max(float((torch.from_numpy(g) - e).abs().max()) for g, e in pairs)
    if not worst <= ONNX_TOLERANCE * scale:
        raise UserError(f"{path.name}: onnxruntime's features differ from PyTorch's by {worst}")
    return worst


def export_files(
    folder: Path, model: CMNASNet, settings: ExportSettings, runtime: Any, checks: dict[str, Any]
) -> dict[str, str]:
    """Write the networks of both modalities into ``folder``; returns the files by kind (int8:
    each quantized file's check against fp32 goes into ``checks``)."""
    files = {}
    for modality in MODALITIES:
        state = plain_state(model, modality, settings.fold_bn)
        torch.save(state, folder / f"{modality}.pth")
        files[modality] = f"{modality}.pth"
        if settings.onnx:
            network = folded_network(model, modality) if settings.fold_bn else model
            wrapped = ModalityNetwork(network, modality)
            write_onnx(wrapped, folder / f"{modality}.onnx", settings.img_size)
            path = folder / f"{modality}.onnx"
            worst = check_onnx(runtime, path, wrapped, settings.img_size, settings.source)
            log.info("%s.onnx: onnxruntime within %.1e of PyTorch", modality, worst)
            files[f"{modality}_onnx"] = f"{modality}.onnx"
            if settings.calibration is not None:
                checks[modality] = write_int8(runtime, path, wrapped, settings)
    return files


def write_int8(runtime: Any, path: Path, network: nn.Module, settings: ExportSettings) -> dict:
    """Replace the fp32 ONNX file ``path`` by its int8 quantization, once checked against
    ``network`` (fp32) on the modality's calibration images; returns the check's figures."""
    assert settings.calibration is not None
    modality = path.stem
    pixels = calibration_pixels(settings.calibration.paths[modality], settings.img_size)
    quantized = quantize(runtime, network, settings.img_size, pixels)
    figures = check_quantized(path.name, session(runtime, quantized), network, pixels)
    path.write_bytes(quantized)
    log.info("%s: int8, against fp32 on %d calibration images: %s", path.name, len(pixels), figures)
    return figures


def space_needed(model: CMNASNet, onnx: bool) -> int:
    """Bytes the export will take: two state dicts, and two ONNX files of the same size."""
    tensors = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return (4 if onnx else 2) * tensors + MB


def write_export(out: Path, model: CMNASNet, settings: ExportSettings, description: dict) -> None:
    """Write the export in a hidden sibling folder, then swap it in for ``out`` whole.

    A failure (a full disk, a stop) leaves the previous export as it was; what a kill leaves
    is tidied by the next export to ``out``.
    """
    runtime = onnx_runtime() if settings.onnx else None
    checks: dict[str, Any] = {}
    try:
        with folder_aside(out, space_needed(model, settings.onnx)) as staging:
            description["files"] = export_files(staging, model, settings, runtime, checks)
            if checks:
                description["onnx"]["int8_check"] = checks
            (staging / "export.json").write_text(json.dumps(description, indent=2) + "\n")
    except UserError:
        raise  # a full disk, said in one line
    except (OSError, RuntimeError) as err:
        raise UserError(
            f"--out {out}: cannot write ({getattr(err, 'strerror', None) or err})"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Read the checkpoint, rebuild its network and write one plain network per modality."""
    args = get_args_parser().parse_args(argv)
    setup_logging()
    out = Path(args.out)
    check_out_dir(out)
    check_replaceable(out, EXPORT_FILES.__contains__, "an export", "an earlier export")
    if args.onnx:
        onnx_runtime()
    if args.precision == "int8" and not args.onnx:
        raise UserError("--precision int8: needs --onnx (the .pth state dicts stay fp32)")
    checkpoint = read_checkpoint(args.weights)
    restored = model_from_checkpoint(
        args.weights, checkpoint, args.config_path, args.last_stride, args.ema
    )
    model = restored.model.eval()
    source = f"{args.weights}{' (EMA)' if args.ema else ''}"
    calibration = None
    if args.precision == "int8":
        calibration = choose_calibration(args.calibration, checkpoint, args.weights, image_files)
    settings = ExportSettings(args.fold_bn, args.onnx, restored.img_size, source, calibration)
    description = {
        "source": str(args.weights),
        "source_layout": "authors" if restored.authors else "cmnas",
        "ema": args.ema,
        "fold_bn": args.fold_bn,
        "depth": restored.arch.depth,
        "last_stride": restored.last_stride,
        "feature_dim": model.feat_dim,
        "split_slots": restored.arch.split_slots(),
        "layout": "torchvision ResNet state dict without fc, plus bnneck.* "
        "(BatchNorm1d after global average pooling)",
        "input": input_contract(restored.img_size),
    }
    if args.onnx:
        description["onnx"] = {
            "input": "images: float32 (batch, 3, height, width), normalised as 'input' says",
            "outputs": {"pool": "pooled feature", "bnneck": "BNNeck feature (use this one)"},
            "batch": "dynamic",
            "fold_bn": args.fold_bn,
        }
        if calibration is not None:
            description["onnx"] |= {"precision": "int8", "calibration": calibration.describe()}
            description["onnx"]["calibration_source"] = calibration.source
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot create the folder ({err.strerror})") from None
    write_export(out, model, settings, description)
    log.info(
        "wrote %s (%s%s%s) to %s",
        ", ".join(description["files"].values()),
        restored.arch.summary(),
        ", EMA" if args.ema else "",
        ", BN folded" if args.fold_bn else "",
        out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
