"""Section ``features``: :func:`extract_features` images/s on the fast path's model."""

from __future__ import annotations

from typing import Any

import numpy as np

from utils.base.modality import Modality
from utils.benchmark.measure import timed
from utils.benchmark.section import Bench, Row, Section, figure
from utils.evaluation.evaluate import extract_features


def run_features(bench: Bench) -> dict[str, Any]:
    """Time :func:`extract_features` on random uint8 images, after a warm-up batch."""
    args, trainer = bench.args, bench.trainer()
    model = trainer.ema.module if trainer.ema is not None else trainer.model_without_ddp
    batch, amp = args.test_batch, trainer.amp
    shape = (args.feature_images, args.img_h, args.img_w, 3)
    images = np.random.default_rng(args.seed + 1).integers(0, 256, size=shape, dtype=np.uint8)
    extract_features(model, images[:batch], Modality.INFRARED, trainer.device, batch, amp)
    (pool, _), seconds = timed(
        lambda: extract_features(model, images, Modality.INFRARED, trainer.device, batch, amp)
    )
    return dict(
        images_per_s=round(len(images) / seconds, 2), images=len(images), batch_size=batch,
        amp=amp, feature_dim=int(pool.shape[1]), timed_s=round(seconds, 3),
    )  # fmt: skip


def feature_rows(doc: dict[str, Any]) -> list[Row]:
    """Feature-extraction images/s."""
    return [("feature extraction images/s", figure(doc, "features", "images_per_s"), "", "")]


FEATURES = Section("features", run_features, feature_rows, uses_trainer=True)
