"""Score a checkpoint with a data set's test protocols (this project's checkpoint or the authors').

    python test.py --dataset sysu --data_root DATA/SYSU-MM01 --weights runs/x/checkpoint_latest.pth
    python test.py --dataset regdb --data_root DATA/RegDB --trial 3 --weights ckpt.pth.tar \
        --config_path config.cfg --ema

This project's checkpoints carry their architecture, class count, image size and RegDB trial, so
``--weights`` alone rebuilds the network; the authors' need their ``config.cfg``.
SYSU: all 10 gallery draws in one run (query features extracted once), or ``--trial k``.
RegDB: both directions of the split ``--trial`` (default: the checkpoint's).

``--save_features FILE`` writes one ``.npz`` (read with ``np.load(FILE, allow_pickle=False)``):
``protocols`` (the protocol keys, e.g. ``all`` or ``v2i``/``i2v``), ``flip``, ``trials`` (the
gallery draws), and for each protocol key P: ``P_query_*`` and ``P_gallery_*`` with ``pool`` and
``bnneck`` (L2-normalised float32 features), ``pids``, ``cams``, ``modality`` and ``paths``
(unicode strings). The gallery is the union of all draws' galleries; ``P_gallery_trials`` is the
(draws, gallery images) boolean mask of the images each draw holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data import ProtocolSettings, get_dataset
from model import CMNASNet, build_model, load_arch, load_checkpoint, read_checkpoint
from model.arch import Arch, arch_from_dict
from model.checkpoint import is_authors_checkpoint, is_search_checkpoint
from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.base.io import write_atomic, write_text_atomic
from utils.base.logger import setup_logging
from utils.engine.options import (
    HelpFormatter,
    check_common,
    check_data_root,
    data_parser,
    select_device,
)

log = logging.getLogger("test")
# Image size of the paper (and of the authors' checkpoints).
DEFAULT_IMG_SIZE = (256, 128)


def get_args_parser() -> argparse.ArgumentParser:
    """The test.py parser (the authors' flag names plus a few of this project's)."""
    parser = argparse.ArgumentParser(
        description="Evaluate a checkpoint with a data set's test protocols.",
        parents=[data_parser()],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--weights", required=True, help="checkpoint file (ours or the authors')")
    parser.add_argument(
        "--config_path",
        default=None,
        help="architecture (.json or the authors' config.cfg); needed for the "
        "authors' checkpoints, ours carry their architecture",
    )
    parser.add_argument(
        "--last_stride",
        type=int,
        choices=(1, 2),
        default=None,
        help="layer4 stride for the authors' checkpoints (default 1)",
    )
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--mode", choices=("all", "indoor"), default="all", help="SYSU mode")
    parser.add_argument(
        "--shot",
        type=int,
        choices=(1, 10),
        default=1,
        help="SYSU gallery images per identity and camera",
    )
    parser.add_argument(
        "--direction",
        choices=("both", "v2i", "i2v"),
        default="both",
        help="RegDB query -> gallery direction(s)",
    )
    parser.add_argument(
        "--tvsearch",
        action="store_true",
        help="RegDB: thermal-to-visible only (same as --direction i2v)",
    )
    parser.add_argument("--save_json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--save_features",
        default=None,
        metavar="FILE",
        help="write query and gallery features, ids, cameras, modalities and paths to this "
        ".npz file (no pickle; the union of all gallery draws with a per-draw mask)",
    )
    parser.add_argument(
        "--visualize",
        type=int,
        default=0,
        metavar="K",
        help="write rank-list PNGs for K queries into rank_lists/ next to --save_json (or ./)",
    )
    # None: the checkpoint's (this project's), else the paper's 256x128. --trial names a split
    # where the data set has splits (default: the checkpoint's, else 1), otherwise a gallery draw
    # (default: all draws).
    parser.set_defaults(img_h=None, img_w=None)
    return parser


def check_output_file(path: str, flag: str) -> None:
    """Fail before any work unless ``path`` can be written (its folder exists and is writable)."""
    out = Path(path)
    folder = out.parent
    if out.is_dir():
        raise UserError(f"{flag} {out}: is a folder, expected a file name")
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UserError(f"{flag} {out}: folder {folder} {what}")
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"{flag} {out}: not writable")


def _slot_difference(given: Arch, stored: Arch) -> str:
    """The slots where two architectures differ, for error messages."""
    if given.depth != stored.depth:
        return f"ResNet-{given.depth} vs ResNet-{stored.depth}"
    differ = [name for name in stored.slots if given.slots[name] != stored.slots[name]]
    shown = ", ".join(f"{n} ({given.slots[n]} vs {stored.slots[n]})" for n in differ[:4])
    return f"{len(differ)} slot(s): {shown}{', ...' if len(differ) > 4 else ''}"


def resolve_options(args: argparse.Namespace, checkpoint: dict[str, Any]) -> None:
    """Fill image size and split (``--trial``) from the checkpoint's training options."""
    trained = checkpoint.get("args") if not is_authors_checkpoint(checkpoint) else None
    trained = trained if isinstance(trained, dict) else {}
    for flag, fallback in zip(("img_h", "img_w"), DEFAULT_IMG_SIZE, strict=True):
        if getattr(args, flag) is None:
            setattr(args, flag, int(trained.get(flag) or fallback))
    if args.img_h < 32 or args.img_w < 16:
        raise UserError(f"--img_h/--img_w {args.img_h}x{args.img_w}: expected at least 32x16")
    dataset = get_dataset(args.dataset)
    if dataset.num_splits == 1:
        return
    trained_split = trained.get("trial") if trained.get("dataset") == dataset.name else None
    if args.trial is None:
        args.trial = int(trained_split or 1)
    elif trained_split is not None and int(trained_split) != args.trial:
        log.warning(
            "%s was trained on %s trial %s; the test identities of trial %d may include "
            "its training identities",
            args.weights,
            dataset.title,
            trained_split,
            args.trial,
        )


def build_from_checkpoint(
    args: argparse.Namespace, checkpoint: dict[str, Any] | None = None
) -> tuple[CMNASNet, dict[str, Any]]:
    """Rebuild the network a checkpoint was trained with and load its weights."""
    if checkpoint is None:
        checkpoint = read_checkpoint(args.weights)
    if is_authors_checkpoint(checkpoint):
        if not args.config_path:
            raise UserError(
                f"--weights {args.weights}: an authors' checkpoint needs "
                "--config_path (their config.cfg)"
            )
        arch = load_arch(args.config_path)
        classifier = checkpoint["model"].get("module.classifier.weight")
        if not isinstance(classifier, torch.Tensor) or classifier.dim() != 2:
            raise UserError(f"--weights {args.weights}: no module.classifier.weight matrix")
        num_classes, last_stride = int(classifier.shape[0]), args.last_stride or 1
    else:
        if is_search_checkpoint(checkpoint):
            raise UserError(
                f"--weights {args.weights}: a search checkpoint (a supernet); train its "
                "arch.json with train.py and test that checkpoint"
            )
        for key in ("arch", "num_classes"):
            if key not in checkpoint:
                raise UserError(f"--weights {args.weights}: checkpoint has no '{key}' entry")
        arch = arch_from_dict(checkpoint["arch"], f"{args.weights} (architecture)")
        if args.config_path:
            given = load_arch(args.config_path)
            if given.slots != arch.slots:
                raise UserError(
                    f"--config_path {args.config_path} differs from the architecture stored in "
                    f"{args.weights} in {_slot_difference(given, arch)} (config vs checkpoint); "
                    "leave --config_path out for this project's checkpoints"
                )
        num_classes = int(checkpoint["num_classes"])
        last_stride = args.last_stride or int(checkpoint.get("last_stride", 1))
    model = build_model(arch, num_classes, last_stride)
    load_checkpoint(model, checkpoint, ema=args.ema, source=args.weights)
    log.info("model: %s, %d classes, last stride %d", arch.summary(), num_classes, last_stride)
    return model, checkpoint


def run_tests(
    args: argparse.Namespace,
    model: CMNASNet,
    device: torch.device,
    keep: list[Any] | None = None,
) -> tuple[dict[str, Any], list[tuple[str, dict[str, float]]]]:
    """Run the protocols the options select; returns the results and the table rows.

    ``keep``, when given, receives each protocol's features (``ProtocolFeatures``).
    """
    from utils.evaluation.evaluate import FEATURES, evaluate_protocols

    dataset = get_dataset(args.dataset)
    direction = "i2v" if args.tvsearch else args.direction
    protocols = dataset.protocols(ProtocolSettings(args.mode, args.shot, direction))
    split = dataset.split_of(args.trial)
    evaluated = evaluate_protocols(
        model,
        dataset,
        args.data_root,
        protocols,
        split,
        dataset.draws_of(args.trial),
        device,
        (args.img_h, args.img_w),
        args.test_batch,
        args.amp if device.type == "cuda" else "none",
        args.flip,
        keep,
    )
    results = {dataset.result_name(protocol, split): result for protocol, result in evaluated}
    rows = [
        (f"{name} {kind}", result[kind]) for name, result in results.items() for kind in FEATURES
    ]
    return results, rows


def write_rank_lists(args: argparse.Namespace, kept: list[Any]) -> None:
    """Rank-list pictures of ``--visualize`` queries for each evaluated protocol."""
    from utils.evaluation.visualize import save_rank_lists

    dataset = get_dataset(args.dataset)
    root = Path(args.save_json).parent if args.save_json else Path(".")
    for features in kept:
        protocol = features.protocol
        save_rank_lists(
            features.query,
            features.gallery_of(0),
            root / "rank_lists" / dataset.rank_list_folder(protocol),
            args.visualize,
            query_label=features.query.modality.name.lower(),
            gallery_label=features.gallery.modality.name.lower(),
            exclusion=protocol.exclusion,
        )


def feature_arrays(kept: list[Any], flip: bool) -> dict[str, np.ndarray]:
    """The arrays of ``--save_features``: see the module docstring for the names."""
    from utils.evaluation.evaluate import FEATURES

    arrays: dict[str, np.ndarray] = {
        "protocols": np.asarray([f.protocol.key for f in kept], dtype=np.str_),
        "flip": np.asarray(flip),
        "trials": np.asarray(kept[0].draws if kept else [], dtype=np.int64),
    }
    for features in kept:
        key = features.protocol.key
        for role in ("query", "gallery"):
            part = getattr(features, role)
            prefix = f"{key}_{role}_"
            for kind in FEATURES:
                arrays[prefix + kind] = part.get(kind).detach().float().cpu().numpy()
            arrays[prefix + "pids"] = np.asarray(part.pids, dtype=np.int64)
            arrays[prefix + "cams"] = np.asarray(part.camids, dtype=np.int64)
            arrays[prefix + "modality"] = np.asarray(
                [part.modality.name.lower()] * len(part.pids), dtype=np.str_
            )
            arrays[prefix + "paths"] = np.asarray(part.paths, dtype=np.str_).reshape(-1)
        arrays[f"{key}_gallery_trials"] = features.membership()
    return arrays


def save_features(path: str, kept: list[Any], flip: bool) -> None:
    """Write ``--save_features`` atomically (never half a file)."""
    arrays = feature_arrays(kept, flip)
    try:
        write_atomic(path, lambda handle: np.savez(handle, **arrays))
    except OSError as err:
        raise UserError(f"--save_features {path}: cannot write ({err.strerror})") from None


def _write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` through a temporary file and a rename (never half a file)."""
    try:
        write_text_atomic(path, json.dumps(payload, indent=2) + "\n")
    except OSError as err:
        raise UserError(f"--save_json {path}: cannot write ({err.strerror})") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, rebuild the model from its checkpoint, evaluate and report."""
    args = get_args_parser().parse_args(argv)
    setup_logging()
    check_common(args)
    get_dataset(args.dataset).check_trial(args.trial, testing=True)
    if args.visualize < 0:
        raise UserError(f"--visualize {args.visualize}: expected a number of queries >= 0")
    if args.save_json:
        check_output_file(args.save_json, "--save_json")
    if args.save_features:
        check_output_file(args.save_features, "--save_features")
    device = select_device(args.device)
    checkpoint = read_checkpoint(args.weights)
    resolve_options(args, checkpoint)
    check_data_root(args, parts=("test",))
    model, _ = build_from_checkpoint(args, checkpoint)
    model.to(device).eval()
    kept: list[Any] | None = [] if args.visualize or args.save_features else None
    results, rows = run_tests(args, model, device, kept)
    table = format_results(rows, args)
    log.info("results:\n%s", table)
    sys.stdout.write(table + "\n")
    if args.save_json:
        payload = {
            "weights": args.weights,
            "ema": args.ema,
            "flip": args.flip,
            "dataset": args.dataset,
            "img_size": [args.img_h, args.img_w],
            "results": results,
        }
        _write_json(args.save_json, payload)
        log.info("wrote %s", args.save_json)
    if args.save_features:
        save_features(args.save_features, kept or [], args.flip)
        log.info("wrote %s", args.save_features)
    if args.visualize:
        write_rank_lists(args, kept or [])
    return 0


def format_results(rows: list[tuple[str, dict[str, float]]], args: argparse.Namespace) -> str:
    """The printed table, titled with the weights it scored and how (EMA, flip averaging)."""
    from utils.evaluation.evaluate import format_table

    marks = (" (EMA)" if args.ema else "") + (" (flip)" if args.flip else "")
    return format_table(rows, title=f"{args.weights}{marks}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
