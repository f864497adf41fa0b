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
follows pooling). ``DIR/export.json`` records what was written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from model import CMNASNet, read_checkpoint
from model.fold import backbone_slots, conv_of_slot, fold, modality_bn
from model.restore import model_from_checkpoint
from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.base.io import write_atomic, write_text_atomic
from utils.base.logger import setup_logging
from utils.base.modality import Modality
from utils.engine.options import HelpFormatter, checkpoint_parser

log = logging.getLogger("export")
MODALITIES = ("visible", "infrared")
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def get_args_parser() -> argparse.ArgumentParser:
    """The export parser."""
    parser = argparse.ArgumentParser(
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


def check_out_dir(out: Path) -> None:
    """Fail before any work unless ``out`` is (or can be made) a writable folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, expected a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: not writable ({probe} does not allow writing)")


def main(argv: Sequence[str] | None = None) -> int:
    """Read the checkpoint, rebuild its network and write one plain network per modality."""
    args = get_args_parser().parse_args(argv)
    setup_logging()
    out = Path(args.out)
    check_out_dir(out)
    checkpoint = read_checkpoint(args.weights)
    restored = model_from_checkpoint(
        args.weights, checkpoint, args.config_path, args.last_stride, args.ema
    )
    model = restored.model.eval()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot create the folder ({err.strerror})") from None
    files = {modality: f"{modality}.pth" for modality in MODALITIES}
    written: list[Path] = []
    try:
        for modality, name in files.items():
            state = plain_state(model, modality, args.fold_bn)
            write_atomic(out / name, lambda handle, state=state: torch.save(state, handle))
            written.append(out / name)
        description = {
            "source": str(args.weights),
            "source_layout": "authors" if restored.authors else "cmnas",
            "ema": args.ema,
            "fold_bn": args.fold_bn,
            "depth": restored.arch.depth,
            "last_stride": restored.last_stride,
            "feature_dim": model.feat_dim,
            "split_slots": restored.arch.split_slots(),
            "files": files,
            "layout": "torchvision ResNet state dict without fc, plus bnneck.* "
            "(BatchNorm1d after global average pooling)",
        }
        write_text_atomic(out / "export.json", json.dumps(description, indent=2) + "\n")
    except (OSError, UserError) as err:
        # Either both networks and their description, or none of this run's files.
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(err, UserError):
            raise
        raise UserError(f"--out {out}: cannot write ({err.strerror or err})") from None
    log.info(
        "wrote %s and %s (%s%s%s) to %s",
        *files.values(),
        restored.arch.summary(),
        ", EMA" if args.ema else "",
        ", BN folded" if args.fold_bn else "",
        out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
