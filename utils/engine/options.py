"""Command-line options: the parent parsers shared by train.py, search.py and test.py, and the
builders that turn parsed flags into typed settings (:mod:`utils.engine.settings`).

Flag names follow the authors' scripts (``--data_root``, ``--config_path``, ``--num_pos``, ...) so
their commands keep working; the defaults are the paper's training recipe. Every flag is checked
here, once, with a one-line message naming it; the data set's defaults (EMA decay, EMA
overwrite schedule, the RegDB trial of a training run) are filled in here.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from data.dataset import ProtocolSettings
from data.registry import dataset_names, get_dataset, registered_datasets
from model.losses import LOSS_TERMS, LossRecipe, recipe_from, weight_flags
from utils.base.errors import UserError
from utils.engine.build import check_data_root, select_device
from utils.engine.rerank_flags import RERANK_DEFAULTS, RERANK_HELP, check_rerank_flags
from utils.engine.rundir import run_dir
from utils.engine.settings import (
    DataSettings,
    EvalSettings,
    OptimSettings,
    SearchSettings,
    TrainSettings,
)
from utils.evaluation.rerank import RerankSettings

log = logging.getLogger(__name__)


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
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
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
    # None: not given (refused without --rerank); check_rerank_flags fills them in.
    for flag, (kind, text) in RERANK_HELP.items():
        default = RERANK_DEFAULTS[flag]
        group.add_argument(f"--{flag}", type=kind, help=f"re-ranking: {text} (default {default})")
    return parser


def checkpoint_parser(use: str) -> argparse.ArgumentParser:
    """Options of every tool that reads a trained checkpoint; ``use`` is what it does with it."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
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
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
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
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
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
    for term in LOSS_TERMS.values():
        if term.flag is not None:
            group.add_argument(f"--{term.flag}", type=float, default=term.weight, help=term.help)
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
    _run_folder_options(group)
    _bookkeeping_options(group)
    return parser


def _run_folder_options(group: argparse._ArgumentGroup) -> None:
    """The run's folder, seed and resume point."""
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


def _bookkeeping_options(group: argparse._ArgumentGroup) -> None:
    """How often the run evaluates, saves and logs, and how its steps run."""
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


# ----- from the flags to the settings ---------------------------------------------------------
def evaluation_settings(args: argparse.Namespace) -> EvalSettings:
    """The feature and ranking flags, checked (device, batch, re-ranking parameters)."""
    if args.test_batch < 1:
        raise UserError(f"--test_batch {args.test_batch}: expected a positive integer")
    check_rerank_flags(args)
    select_device(args.device)
    rerank = RerankSettings(args.k1, args.k2, args.lambda_value) if args.rerank else None
    return EvalSettings(
        device=args.device, amp=args.amp, test_batch=args.test_batch, flip=args.flip,
        rerank=rerank, mode=args.mode,
    )  # fmt: skip


def data_settings(
    args: argparse.Namespace, img_size: tuple[int, int], trial: int | None
) -> DataSettings:
    """The data flags with the image size and ``--trial`` resolved by the caller, checked."""
    height, width = img_size
    if height < 32 or width < 16:
        raise UserError(f"--img_h/--img_w {height}x{width}: expected at least 32x16")
    if not os.path.isdir(args.data_root):
        check_data_root(args.dataset, args.data_root, trial)  # names what the folder should hold
    return DataSettings(args.data_root, args.dataset, trial, height, width, args.cache_dir)


def _check_recipe(args: argparse.Namespace) -> None:
    """The batch, schedule and optimizer flags."""
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
    for flag in ("weight_decay", *weight_flags(), "margin"):
        value = getattr(args, flag)
        if not (value >= 0 and math.isfinite(value)):
            raise UserError(f"--{flag} {value}: expected a finite value >= 0")
    if not 0 <= args.label_smooth < 1:
        raise UserError(f"--label_smooth {args.label_smooth}: expected a value in [0, 1)")
    for flag in ("beta1", "beta2"):
        if not 0 <= getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected a value in [0, 1)")


def _ema(args: argparse.Namespace) -> tuple[float, int]:
    """``--ema_decay`` and ``--ema_overwrite_every``, the data set's where not given."""
    dataset = get_dataset(args.dataset)
    decay = dataset.ema_decay if args.ema_decay is None else args.ema_decay
    if not 0 <= decay < 1:
        raise UserError(f"--ema_decay {decay}: expected a value in [0, 1) (0 disables the EMA)")
    every = args.ema_overwrite_every
    if decay == 0 and every:
        raise UserError(
            f"--ema_overwrite_every {every}: takes effect only with an EMA "
            "(--ema_decay 0 disables it; drop one of the two)"
        )
    if every is not None and every < 0:
        raise UserError(f"--ema_overwrite_every {every}: expected a value >= 0 (0: never)")
    if not args.ema_overwrite:
        if every:
            raise UserError(
                f"--no-ema_overwrite contradicts --ema_overwrite_every {every} (give one of them)"
            )
        every = 0
    elif every is None:
        every = dataset.ema_overwrite_every
    return decay, every


def _check_run(args: argparse.Namespace) -> None:
    """The schedule, bookkeeping and input-file flags."""
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


def loss_recipe(args: argparse.Namespace) -> LossRecipe:
    """The loss recipe of the training flags (``--label_smooth``, ``--margin``, the weights)."""
    weights = {name: getattr(args, flag) for flag, name in weight_flags().items()}
    return recipe_from(weights, label_smooth=args.label_smooth, margin=args.margin)


def training_settings(args: argparse.Namespace, kind: str = "train") -> TrainSettings:
    """The settings of train.py's flags, every flag checked (``kind`` names a new run's folder)."""
    _check_recipe(args)
    ema_decay, every = _ema(args)
    _check_run(args)
    trial = 1 if args.trial is None else args.trial
    get_dataset(args.dataset).check_trial(trial, testing=False)
    evaluation = evaluation_settings(args)
    data = data_settings(args, (args.img_h, args.img_w), trial)
    options = {**vars(args), "ema_decay": ema_decay, "ema_overwrite_every": every, "trial": trial}
    optimizer = OptimSettings(
        lr=args.lr, optim=args.optim, beta1=args.beta1, beta2=args.beta2,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        milestones=tuple(args.milestones), fused=args.fused,
    )  # fmt: skip
    return TrainSettings(
        data=data, folder=_folder(args, trial, kind), evaluation=evaluation, optimizer=optimizer,
        loss=loss_recipe(args), config_path=args.config_path,
        last_stride=args.last_stride, pretrained=args.pretrained, epochs=args.epochs,
        batch_size=args.batch_size, num_pos=args.num_pos, ema_decay=ema_decay,
        ema_overwrite_every=every, seed=args.seed, deterministic=args.deterministic,
        resume=args.resume, overwrite=args.overwrite, test_freq=args.test_freq,
        save_freq=args.save_freq, log_freq=args.log_freq, channels_last=args.channels_last,
        compile=args.compile, max_steps=args.max_steps, options=MappingProxyType(options),
    )  # fmt: skip


def _folder(args: argparse.Namespace, trial: int, kind: str) -> Path:
    """``--save/--note``; on ``--resume`` without ``--note``, the checkpoint's folder."""
    config = Path(args.config_path).stem if args.config_path else kind
    suffix = f"_trial{trial}" if get_dataset(args.dataset).num_splits > 1 else ""
    return run_dir(
        args.save, args.note, args.resume, f"{kind}_{args.dataset}{suffix}_{config}_seed{args.seed}"
    )


def search_settings(args: argparse.Namespace) -> SearchSettings:
    """The settings of search.py's flags, every flag checked."""
    # The search never overwrites (see SearchSettings): the flag contradicts it.
    if args.ema_overwrite_every:
        raise UserError(
            f"--ema_overwrite_every {args.ema_overwrite_every}: the search never copies the EMA "
            "into the supernet (it would reset the alphas)"
        )
    train = training_settings(args, kind="search")
    if not 0 < args.arch_fraction < 1:
        raise UserError(f"--arch_fraction {args.arch_fraction}: expected a value in (0, 1)")
    for flag in ("tau", "tau_max", "tau_min", "arch_lr"):
        if not getattr(args, flag) > 0:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected a positive value")
    if args.tau_min > args.tau_max:
        raise UserError(f"--tau_min {args.tau_min} is above --tau_max {args.tau_max}")
    if args.arch_weight_decay < 0:
        raise UserError(f"--arch_weight_decay {args.arch_weight_decay}: expected a value >= 0")
    if args.arch_freq < 1:
        raise UserError(f"--arch_freq {args.arch_freq}: expected a positive integer")
    if not 0 <= args.arch_warmup < args.epochs:
        raise UserError(
            f"--arch_warmup {args.arch_warmup}: expected 0 <= value < --epochs {args.epochs} "
            "(otherwise the architecture never trains)"
        )
    if args.test_freq:
        raise UserError(
            f"--test_freq {args.test_freq}: the search never runs the test protocol; it scores "
            "the derived architecture on the architecture set (--eval_arch)"
        )
    if args.config_path is not None:
        log.warning("--config_path %s is ignored: the search builds a supernet", args.config_path)
    if not args.note and not args.resume:  # a resume without --note stays in its folder
        trial = f"_trial{train.data.trial}" if get_dataset(args.dataset).num_splits > 1 else ""
        note = f"search_{args.dataset}{trial}_r{args.depth}_{args.relaxation}_seed{args.seed}"
        options = MappingProxyType({**train.options, "note": note})
        train = replace(train, folder=Path(args.save) / note, options=options)
    return SearchSettings(
        train=train, depth=args.depth, arch_fraction=args.arch_fraction,
        relaxation=args.relaxation, tau=args.tau, tau_max=args.tau_max, tau_min=args.tau_min,
        arch_lr=args.arch_lr, arch_weight_decay=args.arch_weight_decay,
        arch_warmup=args.arch_warmup, arch_freq=args.arch_freq, eval_arch=args.eval_arch,
    )  # fmt: skip
