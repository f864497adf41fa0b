"""Score a checkpoint with a data set's test protocols (this project's checkpoint or the authors').

    python test.py --dataset sysu --data_root DATA/SYSU-MM01 --weights runs/x/checkpoint_latest.pth
    python test.py --dataset regdb --data_root DATA/RegDB --trial 3 --weights ckpt.pth.tar \
        --config_path config.cfg --ema
    python test.py --dataset llcm --data_root DATA/LLCM --weights runs/y/checkpoint_latest.pth

This project's checkpoints carry their architecture, class count, image size and split, so
``--weights`` alone rebuilds the network; the authors' need their ``config.cfg``. SYSU and LLCM
run all 10 gallery draws (query features extracted once) unless ``--trial k``; RegDB both
directions of the split ``--trial``. ``--save_features FILE`` writes the ``.npz`` that
docs/evaluation.md describes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data import ProtocolSettings, get_dataset
from data.registry import dataset_names
from model import CMNASNet, read_checkpoint
from model.checkpoint import is_authors_checkpoint, largest_tensors, stored_integer
from model.restore import DEFAULT_IMG_SIZE, model_from_checkpoint
from utils.base.cli import build, default_of, run_cli
from utils.base.errors import UserError
from utils.base.io import DiskFull, write_atomic, write_text_atomic
from utils.base.logger import setup_logging
from utils.engine.build import check_data_root, select_device
from utils.engine.eval_settings import DataSettings, EvalSettings, TestSettings
from utils.engine.options import check_data, parse_flags, test_parser

log = logging.getLogger("test")


def get_args_parser() -> argparse.ArgumentParser:
    """The test.py parser (the authors' flag names plus a few of this project's)."""
    parser = test_parser("Evaluate a checkpoint with a data set's test protocols.")
    # None: the checkpoint's (this project's checkpoints), else the defaults.
    parser.set_defaults(img_h=None, img_w=None, dataset=None)
    return parser


def check_outputs(settings: TestSettings) -> None:
    """Fail before any work unless every output can be written and none is the checkpoint."""
    weights = Path(settings.checkpoint.weights).resolve()
    outputs = (("--save_json", settings.save_json), ("--save_features", settings.save_features))
    for flag, path in outputs:
        if not path:
            continue
        check_output_file(path, flag)
        if Path(path).resolve() == weights:
            raise UserError(
                f"{flag} {path}: is the --weights checkpoint (it would be overwritten); "
                "choose another file name"
            )
    json_file, features = settings.save_json, settings.save_features
    if json_file and features and Path(json_file).resolve() == Path(features).resolve():
        raise UserError(f"--save_features {features}: the same file as --save_json")
    if not settings.visualize:
        return
    folder = probe = (rank_list_root(settings.save_json) / "rank_lists").absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--visualize: cannot write {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--visualize: cannot write {folder}: {probe} is not writable")


def rank_list_root(save_json: str | None) -> Path:
    """Where ``--visualize`` writes its rank_lists/ folder: beside ``--save_json``, else ./."""
    return Path(save_json).parent if save_json else Path(".")


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


def protocol_settings(settings: TestSettings) -> ProtocolSettings:
    """The protocol options; one the data set cannot honour is an error naming what it offers."""
    dataset = get_dataset(settings.data.dataset)
    direction, roles = settings.direction, settings.v2i_roles
    if settings.tvsearch:
        if "direction" not in dataset.test_options:
            raise UserError(
                f"--tvsearch: {dataset.title} has no choice of direction "
                f"({dataset.describe_test_options()})"
            )
        if direction not in ("both", "i2v"):
            raise UserError(f"--tvsearch (--direction i2v) contradicts --direction {direction}")
        direction = "i2v"
    protocol = ProtocolSettings(settings.mode, settings.shot, direction, roles)
    if roles != "defined" and not any(p.swap_roles for p in dataset.protocols(protocol)):
        raise UserError(f"--v2i_roles {roles}: {dataset.title} has no swapped-roles protocol")
    return protocol


def resolve_data(
    data: DataSettings, weights: str, checkpoint: dict[str, Any]
) -> tuple[DataSettings, str]:
    """The data settings, image size and split (``--trial``) from the checkpoint's training
    options where the flags leave them out, and the table title's mark of an image size other
    than the trained one (also warned of)."""
    trained = checkpoint.get("args") if not is_authors_checkpoint(checkpoint) else None
    trained = trained if isinstance(trained, dict) else {}
    flags = ("img_h", "img_w")
    size = tuple(
        stored_integer(trained.get(flag) or fallback, flag, weights)
        for flag, fallback in zip(flags, DEFAULT_IMG_SIZE, strict=True)
    )
    height, width = (
        s if given is None else given for s, given in zip(size, data.img_size, strict=True)
    )
    dataset = get_dataset(data.dataset)
    trial = data.trial
    trained_split = trained.get("trial") if trained.get("dataset") == dataset.name else None
    if dataset.num_splits > 1 and trial is None:
        trial = stored_integer(trained_split or 1, "trial", weights)
    elif (
        dataset.num_splits > 1
        and trained_split is not None
        and stored_integer(trained_split, "trial", weights) != trial
    ):
        what = (
            "%s was trained on %s trial %s; the test identities of trial %d may include its "
            "training identities"
        )
        log.warning(what, weights, dataset.title, trained_split, trial)
    data = replace(data, img_h=height, img_w=width, trial=trial)
    check_data(data)
    if data.img_size == size:
        return data, ""
    what = (
        "--img_h/--img_w %dx%d: %s was trained at %dx%d; features of another size usually "
        "score lower"
    )
    log.warning(what, *data.img_size, weights, *size)
    return data, f" (at {data.img_h}x{data.img_w}; trained at {size[0]}x{size[1]})"


def run_tests(
    data: DataSettings,
    evaluation: EvalSettings,
    protocols: ProtocolSettings,
    model: CMNASNet,
    device: torch.device,
    keep: list[Any] | None = None,
) -> tuple[dict[str, Any], list[tuple[str, dict[str, float]]]]:
    """Run the protocols ``protocols`` select; returns the results and the table rows
    (``keep``, when given, receives each protocol's features)."""
    from utils.engine.evaluation import evaluate_data
    from utils.evaluation.evaluate import FEATURES

    dataset = get_dataset(data.dataset)
    draws = dataset.draws_of(data.trial)
    evaluated = evaluate_data(model, data, evaluation, protocols, draws, device, keep)
    results = {dataset.result_name(p, data.split): result for p, result in evaluated}
    rows = [
        (f"{name} {kind}", result[kind]) for name, result in results.items() for kind in FEATURES
    ]
    return results, rows


def write_rank_lists(dataset_name: str, root: Path, queries: int, kept: list[Any]) -> None:
    """Rank-list pictures of ``queries`` queries for each evaluated protocol, under ``root``."""
    from utils.evaluation.visualize import save_rank_lists

    dataset = get_dataset(dataset_name)
    for features in kept:
        protocol = features.protocol
        query, gallery = features.query, features.gallery_of(0)
        if protocol.swap_roles:
            query, gallery = gallery, query
        save_rank_lists(
            query,
            gallery,
            root / "rank_lists" / dataset.rank_list_folder(protocol),
            queries,
            query_label=query.modality.name.lower(),
            gallery_label=gallery.modality.name.lower(),
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
        arrays[f"{key}_swap_roles"] = np.asarray(features.protocol.swap_roles)
    return arrays


def write_output(flag: str, path: str, write: Callable[[str], None]) -> None:
    """Write ``path`` with ``write`` (atomic: never half a file), a failure named in one line."""
    try:
        write(path)
    except DiskFull as err:
        raise UserError(f"{flag} {path}: {err}") from None
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write ({err.strerror})") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, rebuild the model from its checkpoint, evaluate and report."""
    values, trained = parse_flags(get_args_parser, argv, "--weights")
    setup_logging()
    if values["dataset"] is None:  # the checkpoint's training data set, else the default one
        name = trained.get("dataset")
        values["dataset"] = name if name in dataset_names() else default_of(DataSettings, "dataset")
    settings = build(TestSettings, values)
    evaluation, source = settings.evaluation, settings.checkpoint
    device = select_device(evaluation.device)
    get_dataset(settings.data.dataset).check_trial(settings.data.trial, testing=True)
    protocols = protocol_settings(settings)
    check_outputs(settings)
    checkpoint = read_checkpoint(source.weights)
    data, marks = resolve_data(settings.data, source.weights, checkpoint)
    check_data_root(data.dataset, data.data_root, data.trial, parts=("test",))
    model = model_from_checkpoint(
        source.weights, checkpoint, source.config_path, source.last_stride, source.ema
    ).model
    model.to(device).eval()
    kept: list[Any] | None = [] if settings.visualize or settings.save_features else None
    try:
        results, rows = run_tests(data, evaluation, protocols, model, device, kept)
    except ValueError as err:
        if "NaN" not in str(err):
            raise
        largest = ", ".join(largest_tensors(model.state_dict(), 2))
        raise UserError(
            f"{source.weights}: the {'EMA' if source.ema else 'live'} weights are finite but give "
            f"non-finite features (they overflow; largest: {largest}): the checkpoint cannot be "
            "scored"
        ) from None
    from utils.evaluation.evaluate import format_table

    # The table goes to stdout only (the log on stderr would show it a second time).
    rerank = evaluation.rerank
    marks += (" (EMA)" if source.ema else "") + (" (flip)" if evaluation.flip else "")
    marks += f" ({rerank.describe()})" if rerank is not None else ""
    sys.stdout.write(format_table(rows, title=f"{source.weights}{marks}") + "\n")
    if settings.save_json:
        payload = {
            "weights": source.weights,
            "ema": source.ema,
            "flip": evaluation.flip,
            "rerank": rerank.as_dict() if rerank is not None else False,
            "dataset": data.dataset,
            "img_size": list(data.img_size),
            "results": results,
        }
        text = json.dumps(payload, indent=2) + "\n"
        write_output("--save_json", settings.save_json, lambda path: write_text_atomic(path, text))
        log.info("wrote %s", settings.save_json)
    if settings.save_features:
        arrays = feature_arrays(kept or [], evaluation.flip)
        write_output(
            "--save_features",
            settings.save_features,
            lambda path: write_atomic(path, lambda handle: np.savez(handle, **arrays)),
        )
        log.info("wrote %s", settings.save_features)
    if settings.visualize:
        root = rank_list_root(settings.save_json)
        write_rank_lists(data.dataset, root, settings.visualize, kept or [])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
