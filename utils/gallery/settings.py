"""What an index's features depend on: recorded in its header, checked whenever it is used.

The checkpoint is identified by the SHA-256 of the weights the network runs with (every tensor of
the rebuilt network's state, live or EMA as chosen, with the architecture and layer4's stride),
not by the file's path or bytes: a checkpoint copied or moved elsewhere, or saved again without
its optimizer state, gives the same features and is accepted; the same path holding a later
epoch, the other weights (live/EMA) or another architecture file gives other features and is
refused. Features at bf16 or int8 record their ``precision`` (and int8 its ``calibration``
images' fingerprint), compared like the rest: an index never mixes precisions; an index without
``precision`` holds fp32 features.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

from utils.base.errors import UserError
from utils.extract import FeatureExtractor
from utils.precision import FP32, precision_of

# The feature settings an index records and compares, by FeatureExtractor.describe()'s names;
# a new setting of the extractor that changes the features is one more name here. The names of
# ``OPTIONAL`` are recorded only where the extractor describes them (fp32 describes none).
COMPARED = ("weights", "feature", "flip", "img_size", "resize", "channel_order")
COMPARED += ("value_range", "mean", "std", "precision", "calibration")
OPTIONAL = {"precision": FP32, "calibration": None}


def weights_sha256(extractor: FeatureExtractor) -> str:
    """SHA-256 of the weights ``extractor`` runs with, its architecture and last stride."""
    restored = extractor.restored
    digest = hashlib.sha256()
    digest.update(f"{restored.arch.depth} {restored.arch.to_cfg()} {restored.last_stride}".encode())
    for key, tensor in sorted(restored.model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"\n{key} {flat.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def feature_settings(extractor: FeatureExtractor) -> dict[str, Any]:
    """The settings an index's features were made with: the weights' hash and ``COMPARED``."""
    described = extractor.describe()
    compared = {k: described[k] for k in COMPARED if k in described or k not in OPTIONAL}
    return {"weights_sha256": weights_sha256(extractor)} | compared


def checkpoint_source(extractor: FeatureExtractor) -> dict[str, Any]:
    """Where the weights came from (not compared: a moved checkpoint is the same one)."""
    return {
        "path": os.path.abspath(extractor.weights),
        "config_path": os.path.abspath(extractor.config_path) if extractor.config_path else None,
        "last_stride": extractor.restored.last_stride,
    }


def calibration_record(extractor: FeatureExtractor) -> dict[str, Any]:
    """An int8 index's header entry naming its calibration images, so that searches quantize
    the query network on the same ones (their fingerprint is compared); nothing otherwise."""
    calibration = extractor.precision.calibration
    return {"calibration": calibration.record()} if calibration is not None else {}


def check_settings(stored: dict[str, Any], made: dict[str, Any], where: str, source: str) -> None:
    """Refuse, in one line, features made otherwise than the index's (``source``: the weights)."""
    for key in sorted(
        stored.keys() | made.keys(), key=lambda k: (k != "precision", k == "weights_sha256", k)
    ):
        had, has = (values.get(key, OPTIONAL.get(key)) for values in (stored, made))
        if had != has:
            if key == "weights_sha256":
                raise UserError(
                    f"{where} holds features of other weights (sha256 "
                    f"{str(stored.get(key))[:12]}) than {source} (sha256 {made[key][:12]}): "
                    "use the checkpoint the index was built with, or another --index"
                )
            raise UserError(
                f"{where} holds features made with {key} {had!r}, this run makes {key} {has!r}: "
                "use the index's settings, or another --index"
            )


def index_extractor(
    header: dict[str, Any],
    where: str,
    weights: str | None,
    batch_size: int,
    device: str | None,
    precision: str | None = None,
    calibration: list[str] | None = None,
) -> FeatureExtractor:
    """The extractor of an index's settings (``weights``: the checkpoint, moved; ``precision``
    and ``calibration``: None for the index's own), checked."""
    source, settings = header["checkpoint"], header["settings"]
    stored = precision_of(settings)
    if precision is not None and precision != stored:
        raise UserError(
            f"{where} holds {stored} features, --precision is {precision}: search with the "
            "index's precision (leave --precision out), or build another index"
        )
    path = weights or source["path"]
    if not os.path.isfile(path):
        raise UserError(
            f"--weights {path}: no such file (the checkpoint {where} was built with; pass "
            "--weights where it is now)"
        )
    extractor = FeatureExtractor(
        path,
        config_path=source["config_path"],
        ema=settings["weights"] == "ema",
        device=device,
        batch_size=batch_size,
        feature=settings["feature"],
        flip=settings["flip"],
        last_stride=source["last_stride"],
        precision=stored,
        calibration=calibration or header.get("calibration"),
    )
    check_settings(settings, feature_settings(extractor), where, f"--weights {path}")
    return extractor
