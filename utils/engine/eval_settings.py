"""The settings of reading data and scoring features (the data, the evaluation, a checkpoint to
score, test.py's protocols and outputs), each declared once with :func:`utils.base.cli.setting`:
its default, flag, help and check. A value its check rejects is a one-line error naming the flag,
whether the settings come from a command line or from code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from data.dataset import V2I_ROLES, ProtocolSettings
from data.registry import dataset_names, get_dataset, registered_datasets
from utils.base.cli import (
    Flag,
    Option,
    check_fields,
    check_value,
    composite,
    plugin_setting,
    setting,
)
from utils.base.errors import UserError
from utils.evaluation.rerank import RerankSettings

# The --help sections, in the order train.py (search.py, test.py) list them.
DATA, DEVICE, EVALUATION, MODEL = "data", "device", "evaluation", "model"
RECIPE, RUN, SEARCH = "training recipe (defaults: the paper's)", "run", "search"
CHECKPOINT = "checkpoint"
TRAIN_GROUPS = (DATA, DEVICE, EVALUATION, MODEL, RECIPE, RUN)
MODES, STRIDES = ("all", "indoor"), (1, 2)
PROTOCOL = ProtocolSettings()  # the defaults of the test protocols

# Checks several settings share, with the words of their refusal.
AT_LEAST_0 = {"check": lambda v: v >= 0, "expected": "a value >= 0"}
POSITIVE = {"check": lambda v: v > 0, "expected": "a positive value"}
POSITIVE_INTEGER = {"check": lambda v: v >= 1, "expected": "a positive integer"}
FINITE_AT_LEAST_0 = {
    "check": lambda v: v >= 0 and math.isfinite(v),
    "expected": "a finite value >= 0",
}
IN_0_1 = {"check": lambda v: 0 <= v < 1, "expected": "a value in [0, 1)"}


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


@dataclass(frozen=True)
class DataSettings:
    """Which data set, where, which split (``--trial``), at which image size (test.py: None
    until it has read the checkpoint's)."""

    data_root: str = setting(
        MISSING, lambda: " or ".join(d.title for d in registered_datasets()) + " root folder", DATA
    )
    dataset: str = setting("sysu", "data set", DATA, choices=dataset_names)
    trial: int | None = setting(None, _trial_help, DATA)
    img_h: int = setting(
        256, "image height (the paper's 256x128; LLCM's authors train at 384x144)", DATA
    )
    img_w: int = setting(128, "image width", DATA)
    cache_dir: str | None = setting(
        None,
        "where decoded training images are cached (default: DATA_ROOT/cache, or ./cache if "
        "that is not writable)",
        DATA,
    )

    @property
    def img_size(self) -> tuple[int, int]:
        """(height, width) of the network's input."""
        return (self.img_h, self.img_w)

    @property
    def split(self) -> int:
        """The train/test split ``--trial`` selects (the data set's only one where it has one)."""
        return get_dataset(self.dataset).split_of(self.trial)


def _rerank_flags() -> list[Option]:
    """``--rerank`` and its parameters, None unless given (they take effect only with it)."""
    paper = RerankSettings()
    integer = {"check": lambda v: v >= 1, "expected": "an integer >= 1"}
    unit = {"check": lambda v: 0 <= v <= 1, "expected": "a value in [0, 1]"}
    texts = (
        ("k1", "k of the k-reciprocal neighbour sets", integer),
        ("k2", "neighbours of the local query expansion, at most --k1", integer),
        ("lambda_value", "weight of the original distance against the Jaccard distance", unit),
    )
    switch = Flag(
        "k-reciprocal re-ranking (Zhong et al., CVPR 2017) of each gallery draw, from the "
        "Euclidean distances of the L2-normalised features (results are marked as such; never "
        "on by default)",
        EVALUATION,
    )
    return [Option("rerank", False, bool, switch)] + [
        Option(
            name,
            None,
            type(getattr(paper, name)),
            Flag(f"re-ranking: {text} (default {getattr(paper, name)})", EVALUATION, **check),
        )
        for name, text, check in texts
    ]


def _rerank_of(values: Mapping[str, Any]) -> RerankSettings | None:
    """The re-ranking the flags ask for; its parameters without ``--rerank`` are refused."""
    given = {k: values[k] for k in ("k1", "k2", "lambda_value") if values.get(k) is not None}
    if given and not values["rerank"]:
        shown = ", ".join(f"--{flag} {value}" for flag, value in given.items())
        raise UserError(f"{shown}: takes effect only with --rerank (add it, or drop the flag)")
    rerank = RerankSettings(**given) if values["rerank"] else None
    if rerank is not None and "k2" in given and rerank.k2 > rerank.k1:
        raise UserError(
            f"--k2 {rerank.k2}: expected at most --k1 {rerank.k1} (the query expansion averages "
            "neighbours among the k1 nearest)"
        )
    return rerank


def rerank_of_flags(values: Mapping[str, Any]) -> RerankSettings | None:
    """The re-ranking the flag ``values`` ask for, every value checked (for the tools)."""
    for part in _rerank_flags():
        check_value(part.name, values.get(part.name), part.flag)
    return _rerank_of(values)


def _rerank_values(rerank: RerankSettings | None) -> dict[str, Any]:
    """``--rerank`` and its parameters (the paper's where it is off)."""
    return {"rerank": rerank is not None, **(rerank or RerankSettings()).as_dict()}


@dataclass(frozen=True)
class EvalSettings:
    """How features are extracted and ranked, and on which device."""

    device: str | None = setting(None, "cuda, cuda:1 or cpu (default: cuda if available)", DEVICE)
    amp: str = setting(
        "bf16", "mixed precision on CUDA (ignored on CPU)", DEVICE, choices=("bf16", "fp16", "none")
    )
    test_batch: int = setting(64, "batch size for features", DEVICE, **POSITIVE_INTEGER)
    flip: bool = setting(
        False,
        "flip averaging at test time: the features of each image and of its horizontal mirror "
        "are summed, then L2-normalised (results are marked as such)",
        EVALUATION,
    )
    # k-reciprocal re-ranking with these parameters (None: none).
    rerank: RerankSettings | None = composite(None, _rerank_flags, _rerank_of, _rerank_values)
    # SYSU's search mode of the training-time evaluation.
    mode: str = setting(
        PROTOCOL.mode, "SYSU search mode of periodic evaluation", RUN, choices=MODES
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class CheckpointSettings:
    """A trained checkpoint to read, and which of its weights (test.py and the tools)."""

    weights: str = setting(MISSING, "checkpoint file (ours or the authors')", CHECKPOINT)
    config_path: str | None = setting(
        None,
        "architecture (.json or the authors' config.cfg); needed for the authors' "
        "checkpoints, ours carry their architecture",
        CHECKPOINT,
    )
    ema: bool = setting(False, "{use} the EMA weights", CHECKPOINT)
    last_stride: int | None = setting(
        None,
        "layer4 stride for the authors' checkpoints (default: the checkpoint's, else 1)",
        CHECKPOINT,
        choices=STRIDES,
    )


# The checkpoint flags by name (the tools hand them to their FeatureExtractor).
CHECKPOINT_FLAGS = tuple(item.name for item in fields(CheckpointSettings))


@dataclass(frozen=True)
class TestSettings:
    """test.py's settings: data, evaluation, checkpoint, the protocols to run, the outputs."""

    data: DataSettings
    evaluation: EvalSettings
    checkpoint: CheckpointSettings
    mode: str = setting(PROTOCOL.mode, "SYSU mode", choices=MODES)
    shot: int = setting(
        PROTOCOL.shot, "SYSU gallery images per identity and camera", choices=(1, 10)
    )
    direction: str = setting(
        PROTOCOL.direction,
        "RegDB and LLCM query -> gallery direction(s)",
        choices=("both", "v2i", "i2v"),
    )
    v2i_roles: str = setting(
        PROTOCOL.v2i_roles,
        "LLCM visible-to-infrared: 'defined' ranks the drawn infrared gallery for every "
        "visible query; 'swapped' instead lets each drawn infrared image rank all visible "
        "images, as a widely copied test script does (reported as 'v2i roles-swapped'); "
        "'both' reports the two",
        choices=V2I_ROLES,
    )
    tvsearch: bool = setting(False, "RegDB: thermal-to-visible only (same as --direction i2v)")
    save_json: str | None = setting(None, "also write the results to this file")
    save_features: str | None = setting(
        None,
        "write query and gallery features, ids, cameras, modalities and paths to this .npz "
        "file (no pickle; the union of all gallery draws with a per-draw mask)",
        metavar="FILE",
    )
    visualize: int = setting(
        0,
        "write rank-list PNGs for K queries into rank_lists/ next to --save_json (or ./)",
        metavar="K",
        check=lambda v: v >= 0,
        expected="a number of queries >= 0",
    )
    plugin: tuple[str, ...] = plugin_setting()

    def __post_init__(self) -> None:
        check_fields(self)
