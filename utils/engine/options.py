"""Command-line options, built from parent parsers shared by train.py, search.py and test.py.

Flag names follow the authors' scripts (``--data_root``, ``--config_path``, ``--num_pos``, ...) so
their commands keep working; the defaults are the paper's training recipe.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from types import MappingProxyType

import torch

from data.dataset import ProtocolSettings
from data.registry import dataset_names, get_dataset, registered_datasets
from utils.base.errors import UserError

# The EMA decay each data set's authors used, by --dataset name (each data set declares its own).
EMA_DECAY = MappingProxyType({d.name: d.ema_decay for d in registered_datasets()})


def _trial_help() -> str:
    """What --trial means for each registered data set."""
    parts = []
    for dataset in registered_datasets():
        if dataset.num_splits > 1:
            parts.append(
                f"{dataset.title}: the train/test split 1-{dataset.num_splits} of training, "
                "search and test.py (default 1; test.py: the checkpoint's)"
            )
        elif dataset.gallery_draws > 1:
            parts.append(
                f"{dataset.title}: test.py only, one gallery draw "
                f"0-{dataset.gallery_draws - 1} (default: all {dataset.gallery_draws})"
            )
    return "; ".join(parts)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already explains it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, "", False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


def data_parser() -> argparse.ArgumentParser:
    """Options every tool shares: data, image size, device and precision."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("data")
    titles = " or ".join(d.title for d in registered_datasets())
    group.add_argument("--data_root", required=True, help=f"{titles} root folder")
    group.add_argument("--dataset", choices=dataset_names(), default="sysu", help="data set")
    group.add_argument("--trial", type=int, default=None, help=_trial_help())
    group.add_argument(
        "--img_h",
        type=int,
        default=256,
        help="image height (the paper's 256x128; LLCM's authors train at 384x144)",
    )
    group.add_argument("--img_w", type=int, default=128, help="image width")
    group.add_argument(
        "--cache_dir",
        default=None,
        help="where decoded training images are cached (default: DATA_ROOT/cache, "
        "or ./cache if that is not writable)",
    )
    group = parser.add_argument_group("device")
    group.add_argument(
        "--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)"
    )
    group.add_argument(
        "--amp",
        choices=("bf16", "fp16", "none"),
        default="bf16",
        help="mixed precision on CUDA (ignored on CPU)",
    )
    group.add_argument("--test_batch", type=int, default=64, help="batch size for features")
    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--flip",
        action="store_true",
        help="flip averaging at test time: the features of each image and of its horizontal "
        "mirror are summed, then L2-normalised (results are marked as such)",
    )
    group.add_argument(
        "--rerank",
        action="store_true",
        help="k-reciprocal re-ranking (Zhong et al., CVPR 2017) of each gallery draw, from the "
        "Euclidean distances of the L2-normalised features (results are marked as such; "
        "never on by default)",
    )
    group.add_argument(
        "--k1", type=int, default=20, help="re-ranking: k of the k-reciprocal neighbour sets"
    )
    group.add_argument(
        "--k2", type=int, default=6, help="re-ranking: neighbours of the local query expansion"
    )
    group.add_argument(
        "--lambda_value",
        type=float,
        default=0.3,
        help="re-ranking: weight of the original distance against the Jaccard distance",
    )
    return parser


def checkpoint_parser(use: str) -> argparse.ArgumentParser:
    """Options of every tool that reads a trained checkpoint; ``use`` is what it does with it."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("checkpoint")
    group.add_argument("--weights", required=True, help="checkpoint file (ours or the authors')")
    group.add_argument(
        "--config_path",
        default=None,
        help="architecture (.json or the authors' config.cfg); needed for the authors' "
        "checkpoints, ours carry their architecture",
    )
    group.add_argument("--ema", action="store_true", help=f"{use} the EMA weights")
    group.add_argument(
        "--last_stride",
        type=int,
        choices=(1, 2),
        default=None,
        help="layer4 stride for the authors' checkpoints (default: the checkpoint's, else 1)",
    )
    return parser


def model_parser() -> argparse.ArgumentParser:
    """Options that build the network."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument(
        "--config_path",
        default="configs/all_shared.json",
        help="architecture: this project's JSON or the authors' config.cfg",
    )
    group.add_argument(
        "--last_stride", type=int, choices=(1, 2), default=1, help="stride of layer4"
    )
    return parser


def optim_parser() -> argparse.ArgumentParser:
    """Options of the training recipe shared by train.py and search.py."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("training recipe (defaults: the paper's)")
    group.add_argument("--epochs", type=int, default=120, help="training epochs")
    group.add_argument(
        "--batch_size",
        type=int,
        default=64,
        help="images per modality per step (identities x num_pos)",
    )
    group.add_argument(
        "--num_pos", type=int, default=4, help="images per identity per modality in a batch"
    )
    group.add_argument(
        "--lr",
        type=float,
        default=0.01,
        help="learning rate of BNNeck and classifier; the backbone gets lr/10",
    )
    group.add_argument("--optim", choices=("adam", "sgd"), default="adam", help="optimizer")
    group.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    group.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    group.add_argument("--weight_decay", type=float, default=5e-4, help="weight decay")
    group.add_argument(
        "--warmup_epochs",
        type=int,
        default=10,
        help="linear warm-up from 0.01x over this many epochs",
    )
    group.add_argument(
        "--milestones",
        type=int,
        nargs="*",
        default=[40, 70],
        help="epochs where the learning rate is multiplied by 0.1",
    )
    group.add_argument("--label_smooth", type=float, default=0.0, help="CE label smoothing")
    group.add_argument("--margin", type=float, default=0.4, help="triplet margin")
    group.add_argument("--sp_lambda", type=float, default=5.0, help="weight of the SP loss")
    group.add_argument("--cmmd_lambda", type=float, default=0.05, help="weight of the CMMD loss")
    group.add_argument(
        "--ema_decay",
        type=float,
        default=None,
        help="EMA decay (default: the data set's, "
        + ", ".join(f"{d.ema_decay} {d.title}" for d in registered_datasets())
        + "; 0 disables EMA)",
    )
    group.add_argument(
        "--ema_overwrite",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="copy the EMA weights into the live model every --ema_overwrite_every epochs, as "
        "the authors' published runs did (--no-ema_overwrite: never)",
    )
    group.add_argument(
        "--ema_overwrite_every",
        type=int,
        default=None,
        help="epochs between copies of the EMA weights into the live model, independent of "
        "--test_freq (default: the data set's, "
        + ", ".join(f"{d.ema_overwrite_every} {d.title}" for d in registered_datasets())
        + "; 0: never)",
    )
    group.add_argument(
        "--pretrained",
        default="imagenet",
        help="backbone initialisation: imagenet, none, or a torchvision-layout state-dict file",
    )
    group = parser.add_argument_group("run")
    group.add_argument("--save", default="runs", help="folder holding run folders")
    group.add_argument(
        "--note",
        default="",
        help="run name (default: derived from the options; on --resume, the checkpoint's folder)",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run folder that already holds a run (its logs, results and "
        "checkpoints are removed first); without it such a folder is refused",
    )
    group.add_argument("--seed", type=int, default=0, help="random seed")
    group.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms (bit-exact resume on CPU; slower)",
    )
    group.add_argument(
        "--resume",
        default="",
        help="checkpoint to resume from (model, optimizer, EMA, schedule, step and random "
        "states); the run continues in the checkpoint's folder unless --note is given",
    )
    group.add_argument(
        "--mode",
        choices=("all", "indoor"),
        default="all",
        help="SYSU search mode of periodic evaluation",
    )
    group.add_argument(
        "--test_freq",
        type=int,
        default=10,
        help="evaluate every N epochs for monitoring (0: only at the end)",
    )
    group.add_argument("--save_freq", type=int, default=20, help="keep a checkpoint every N epochs")
    group.add_argument(
        "--log_freq",
        type=int,
        default=20,
        help="read loss values every N steps (no host sync in between)",
    )
    group.add_argument(
        "--channels_last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory format (default: on CUDA only; it slows CPU steps)",
    )
    group.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fused optimizer kernels (default: on CUDA only; --no-fused: the plain "
        "per-tensor optimizer, as the authors trained)",
    )
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument(
        "--max_steps",
        type=int,
        default=0,
        help="stop each epoch after this many steps (0: full epochs; for smoke runs)",
    )
    return parser


def select_device(name: str | None) -> torch.device:
    """``--device`` or CUDA when available, else the CPU; a bad or absent device is a user error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def check_data_root(args: argparse.Namespace, parts: Sequence[str] = ("train", "test")) -> None:
    """Fail with one line naming what is absent or broken before any work is done.

    Checks that ``--data_root`` has the data set's layout for ``parts`` ("train", "test"), parses
    its list files, and, when "test" is among ``parts``, that every test image exists and has a
    readable header (a bad test image would otherwise stop training at its first evaluation).
    """
    dataset = get_dataset(args.dataset)
    split = dataset.split_of(args.trial)
    dataset.check_root(args.data_root, split, parts)
    if "test" in parts:
        dataset.check_test_images(args.data_root, split)


def check_common(args: argparse.Namespace) -> None:
    """Reject flag values that are out of range or inconsistent, one line each.

    Only cheap checks: the data set's layout is checked by :func:`check_data_root` where the
    data is read.
    """
    get_dataset(args.dataset).check_trial(args.trial, testing=False)
    if args.img_h is not None and args.img_w is not None and (args.img_h < 32 or args.img_w < 16):
        raise UserError(f"--img_h/--img_w {args.img_h}x{args.img_w}: expected at least 32x16")
    if args.test_batch < 1:
        raise UserError(f"--test_batch {args.test_batch}: expected a positive integer")
    for flag in ("k1", "k2"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected an integer >= 1")
    if not 0 <= args.lambda_value <= 1:
        raise UserError(f"--lambda_value {args.lambda_value}: expected a value in [0, 1]")
    select_device(args.device)
    if not os.path.isdir(args.data_root):
        check_data_root(args)  # names what the folder should hold


def resolve_ema_overwrite(args: argparse.Namespace) -> None:
    """Fill ``--ema_overwrite_every`` (the data set's default; 0 under --no-ema_overwrite)."""
    every = args.ema_overwrite_every
    if every is not None and every < 0:
        raise UserError(f"--ema_overwrite_every {every}: expected a value >= 0 (0: never)")
    if not args.ema_overwrite:
        if every:
            raise UserError(
                f"--no-ema_overwrite contradicts --ema_overwrite_every {every} (give one of them)"
            )
        args.ema_overwrite_every = 0
    elif every is None:
        args.ema_overwrite_every = get_dataset(args.dataset).ema_overwrite_every


def check_training(args: argparse.Namespace) -> None:
    """Validate the training options (calls :func:`check_common`); fills data-set defaults."""
    if args.num_pos < 1 or args.batch_size < 1:
        raise UserError(
            f"--batch_size {args.batch_size} / --num_pos {args.num_pos}: expected positive values"
        )
    if args.batch_size % args.num_pos:
        raise UserError(
            f"--batch_size {args.batch_size} is not divisible by --num_pos {args.num_pos} "
            "(batch_size = identities x num_pos images per modality)"
        )
    if args.batch_size // args.num_pos < 2:
        raise UserError(
            f"--batch_size {args.batch_size} / --num_pos {args.num_pos}: a batch needs at least "
            "2 identities (triplet loss)"
        )
    if args.epochs < 1:
        raise UserError(f"--epochs {args.epochs}: expected a positive integer")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr {args.lr}: expected a positive value")
    for flag in ("weight_decay", "sp_lambda", "cmmd_lambda", "margin"):
        value = getattr(args, flag)
        if not (value >= 0 and math.isfinite(value)):
            raise UserError(f"--{flag} {value}: expected a finite value >= 0")
    if not 0 <= args.label_smooth < 1:
        raise UserError(f"--label_smooth {args.label_smooth}: expected a value in [0, 1)")
    for flag in ("beta1", "beta2"):
        if not 0 <= getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected a value in [0, 1)")
    if args.ema_decay is None:
        args.ema_decay = get_dataset(args.dataset).ema_decay
    if not 0 <= args.ema_decay < 1:
        raise UserError(
            f"--ema_decay {args.ema_decay}: expected a value in [0, 1) (0 disables the EMA)"
        )
    resolve_ema_overwrite(args)
    if args.warmup_epochs < 0:
        raise UserError(f"--warmup_epochs {args.warmup_epochs}: expected a value >= 0")
    if any(m < 1 for m in args.milestones):
        raise UserError(f"--milestones {args.milestones}: expected positive epoch numbers")
    for flag in ("test_freq", "save_freq", "max_steps"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected a value >= 0")
    if args.log_freq < 1:
        raise UserError(f"--log_freq {args.log_freq}: expected a positive integer")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: expected a value >= 0")
    if args.img_h is None or args.img_w is None:
        raise UserError("--img_h and --img_w are required for training")
    if args.trial is None:
        args.trial = 1
    get_dataset(args.dataset).check_settings(ProtocolSettings(mode=args.mode))
    pretrained = str(args.pretrained)
    if pretrained.lower() not in ("imagenet", "none") and not os.path.isfile(pretrained):
        raise UserError(
            f"--pretrained {pretrained}: file not found (expected imagenet, none or a "
            "torchvision-layout ResNet state-dict file)"
        )
    if args.resume and not os.path.isfile(args.resume):
        what = "is a folder, not a file" if os.path.isdir(args.resume) else "file not found"
        raise UserError(f"--resume {args.resume}: checkpoint {what}")
    check_common(args)
