"""Command-line options, built from parent parsers shared by train.py, search.py and test.py.

Flag names follow the authors' scripts (``--data_root``, ``--config_path``, ``--num_pos``, ...) so
their commands keep working; the defaults are the paper's recipe (DESIGN section 2).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from utils.errors import UserError

DATASETS = ("sysu", "regdb")
# EMA decay the authors used per data set.
EMA_DECAY = {"sysu": 0.997, "regdb": 0.968}


def data_parser() -> argparse.ArgumentParser:
    """Options every tool shares: data, image size, device and precision."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("data")
    group.add_argument("--data_root", required=True, help="SYSU-MM01 or RegDB root folder")
    group.add_argument("--dataset", choices=DATASETS, default="sysu", help="data set")
    group.add_argument(
        "--trial",
        type=int,
        default=None,
        help="RegDB split 1-10 (training/search; default 1); test: see test.py",
    )
    group.add_argument("--img_h", type=int, default=256, help="image height")
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
        help="EMA decay (default 0.997 SYSU, 0.968 RegDB; 0 disables EMA)",
    )
    group.add_argument(
        "--ema_overwrite",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="copy the EMA weights into the live model after each evaluation, "
        "as the authors' published runs did",
    )
    group.add_argument(
        "--pretrained",
        default="imagenet",
        help="backbone initialisation: imagenet, none, or a torchvision-layout state-dict file",
    )
    group = parser.add_argument_group("run")
    group.add_argument("--save", default="runs", help="folder holding run folders")
    group.add_argument("--note", default="", help="run name (default: derived from the options)")
    group.add_argument("--seed", type=int, default=0, help="random seed")
    group.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms (bit-exact resume on CPU; slower)",
    )
    group.add_argument("--resume", default="", help="checkpoint to resume from")
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
        default=True,
        help="channels-last memory format",
    )
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument(
        "--max_steps",
        type=int,
        default=0,
        help="stop each epoch after this many steps (0: full epochs; for smoke runs)",
    )
    return parser


def check_common(args: argparse.Namespace) -> None:
    """Reject flag values that are out of range or inconsistent, one line each."""
    if not os.path.isdir(args.data_root):
        raise UserError(f"--data_root {args.data_root}: folder not found")
    if args.img_h < 32 or args.img_w < 16:
        raise UserError(f"--img_h/--img_w {args.img_h}x{args.img_w}: expected at least 32x16")
    if args.test_batch < 1:
        raise UserError(f"--test_batch {args.test_batch}: expected a positive integer")
    if args.trial is not None and args.dataset == "regdb" and not 1 <= args.trial <= 10:
        raise UserError(f"--trial {args.trial}: RegDB trials are 1-10")


def check_training(args: argparse.Namespace) -> None:
    """Validate the training options (after :func:`check_common`)."""
    check_common(args)
    if args.num_pos < 1 or args.batch_size < 1:
        raise UserError("--batch_size and --num_pos must be positive")
    if args.batch_size % args.num_pos:
        raise UserError(
            f"--batch_size {args.batch_size} is not divisible by --num_pos {args.num_pos} "
            "(batch_size = identities x num_pos images per modality)"
        )
    if args.batch_size // args.num_pos < 2:
        raise UserError("--batch_size / --num_pos must be at least 2 identities (triplet loss)")
    for flag in ("epochs", "lr"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected a positive value")
    for flag in ("weight_decay", "sp_lambda", "cmmd_lambda", "margin", "label_smooth"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected a value >= 0")
    if not 0 <= args.label_smooth < 1:
        raise UserError(f"--label_smooth {args.label_smooth}: expected a value in [0, 1)")
    if args.ema_decay is None:
        args.ema_decay = EMA_DECAY[args.dataset]
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema_decay {args.ema_decay}: expected a value in [0, 1)")
    if args.warmup_epochs < 0 or any(m < 1 for m in args.milestones):
        raise UserError("--warmup_epochs must be >= 0 and --milestones positive epochs")
    for flag in ("test_freq", "save_freq", "max_steps"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected a value >= 0")
    if args.log_freq < 1:
        raise UserError(f"--log_freq {args.log_freq}: expected a positive integer")
    if args.trial is None:
        args.trial = 1
    if args.resume and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: checkpoint file not found")


def run_dir(args: argparse.Namespace, kind: str = "train") -> Path:
    """The run folder: ``--save/--note``, or a name derived from data set, config and seed."""
    name = args.note
    if not name:
        config = Path(args.config_path).stem if getattr(args, "config_path", None) else kind
        trial = f"_trial{args.trial}" if args.dataset == "regdb" else ""
        name = f"{kind}_{args.dataset}{trial}_{config}_seed{args.seed}"
    return Path(args.save) / name


def prepare_run_dir(path: Path) -> Path:
    """Create ``path`` and check it is writable, or fail with one line naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"--save {path}: cannot write the run folder ({err.strerror})") from None
    return path
