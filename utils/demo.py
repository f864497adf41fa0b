"""The whole pipeline on synthetic SYSU-MM01 data, on a CPU in minutes.

    python -m utils.demo --out demo                      # data -> search -> train -> test
    python -m utils.demo --out demo --compare --seeds 0 1 2
        # also trains all-shared and all-split and compares mAP over seeds

Each step runs the real command-line tool in a subprocess, as a user would, scaled down for a
CPU (ResNet-18, small images, no ImageNet download, few epochs). Under ``--out`` it leaves
``results.md``, the pictures and a ``README.md`` showing them beside the table. It ends as a user
with their own crops would: ``utils.match --labels_from_folders`` and a gallery index
(``utils.gallery add`` and ``search``) on crops copied from the synthetic test set into
``crops/<modality>/<identity>/<image>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.base.cli import add_flags, build, check_fields, options, run_cli, setting
from utils.base.errors import UserError

log = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parent.parent
DATASET = "sysu"  # the demo's synthetic data set
PROTOCOLS = (("all", 1), ("indoor", 1), ("all", 10))
# The synthetic SYSU-MM01's training split is the generator's default (24 train + 8 val ids).
TRAIN_IDS, VAL_IDS = 24, 8
# With 16 test identities one model's Rank-1 moved by about 3 points between gallery draws and by
# 15 points between two sets of 16; with 96 the draws agree to about 1 point, for some 10 s more
# data generation and 25 s more testing on two CPU cores.
TEST_IDS = 96
# The crops of the final matching step: identities, visible images of each (one infrared each).
CROP_IDS, CROPS_PER_ID = 12, 2
# SYSU-MM01's infrared and visible cameras.
INFRARED_CAMS, VISIBLE_CAMS = ("cam3", "cam6"), ("cam1", "cam2", "cam4", "cam5")


def run_step(name: str, command: list[str], stdout: Path | None = None) -> float:
    """Run one pipeline step as a subprocess (its standard output into ``stdout`` when given);
    fail with its name if it fails."""
    log.info("[%s] %s", name, " ".join(command))
    started = time.time()
    if stdout is None:
        done = subprocess.run(command, cwd=ROOT, check=False)
    else:
        with stdout.open("w") as sink:
            done = subprocess.run(command, cwd=ROOT, check=False, stdout=sink)
    if done.returncode != 0:
        raise UserError(f"demo step '{name}' failed with exit status {done.returncode}")
    elapsed = time.time() - started
    log.info("[%s] done in %.0f s", name, elapsed)
    return elapsed


def command(*words: object, **flags: object) -> list[str]:
    """A command line: ``words``, then ``--name value`` per flag (True: the flag alone; a list:
    its values)."""
    line = [str(word) for word in words]
    for name, value in flags.items():
        values = value if isinstance(value, list) else [] if value is True else [value]
        line += [f"--{name}", *(str(item) for item in values)]
    return line


def common_flags(demo: DemoSettings, data: Path) -> dict[str, object]:
    """Flags shared by search, training and test: data, image size, CPU-sized batches."""
    return dict(dataset=DATASET, data_root=data, img_h=demo.img_h, img_w=demo.img_w, test_batch=128)


def training_flags(demo: DemoSettings, seed: int) -> dict[str, object]:
    """The CPU-scaled recipe: the paper's losses and schedule shape, fewer and shorter epochs."""
    return {
        "pretrained": "none",
        "batch_size": demo.batch_size,
        "num_pos": 4,
        "seed": seed,
        "warmup_epochs": 2,
        "lr": demo.lr,
        "milestones": [int(demo.epochs * 0.75), int(demo.epochs * 0.9)],
        "save_freq": 0,
        "test_freq": 0,
        "log_freq": 10,
        "ema_decay": 0.97,
        "overwrite": True,
    }


def train_and_test(
    demo: DemoSettings,
    data: Path,
    config: Path,
    note: str,
    seed: int,
    protocols: Sequence[tuple[str, int]],
    rank_lists: int = 0,
) -> dict[str, Any]:
    """Train one architecture, draw its curves and score it; returns {protocol: metrics}. The
    first protocol also draws ``rank_lists`` rank lists (``rank_lists/`` in the run folder)."""
    py = sys.executable
    runs = Path(demo.out) / "runs"
    flags = common_flags(demo, data) | training_flags(demo, seed)
    run = {"config_path": config, "epochs": demo.epochs, "save": runs, "note": note}
    run_step(f"train {note}", command(py, "train.py", **flags, **run))
    run_step(f"curves {note}", command(py, "-m", "utils.plot", runs / note))
    weights = runs / note / "checkpoint_latest.pth"
    results = {}
    for number, (mode, shot) in enumerate(protocols):
        out = runs / note / f"test_{mode}_shot{shot}.json"
        pictures = {"visualize": rank_lists} if number == 0 and rank_lists else {}
        flags = {"weights": weights, "ema": True, "mode": mode, "shot": shot, "save_json": out}
        test = command(py, "test.py", **common_flags(demo, data), **flags, **pictures)
        # test.py logs its table and also prints it; the log shows it, the file keeps it.
        run_step(f"test {note} {mode} shot {shot}", test, stdout=out.with_suffix(".md"))
        payload = json.loads(out.read_text())["results"]
        results[f"{mode} {'single' if shot == 1 else 'multi'}-shot"] = next(iter(payload.values()))
    return results


def test_ids_of(data: Path) -> list[str]:
    """The test identities of a SYSU-MM01 root (``exp/test_id.txt``); empty when it is missing."""
    path = data / "exp" / "test_id.txt"
    return path.read_text().strip().split(",") if path.is_file() else []


def make_data(demo: DemoSettings, seed: int) -> Path:
    """Synthetic SYSU-MM01 for ``seed`` (reused when there with ``--test_ids`` test identities)."""
    data = Path(demo.out) / f"data_seed{seed}"
    if len(test_ids_of(data)) != demo.test_ids:
        sizes = {"train_ids": TRAIN_IDS, "val_ids": VAL_IDS, "test_ids": demo.test_ids}
        toy = {"dataset": DATASET, "out": data, "seed": seed, **sizes, "overwrite": True}
        run_step("data", command(sys.executable, "-m", "data.toy", **toy))
    return data


def search(demo: DemoSettings, data: Path, seed: int) -> Path:
    """Run a short architecture search and draw its curves; returns the architecture's path."""
    runs = Path(demo.out) / "runs"
    note = f"search_seed{seed}"
    flags = common_flags(demo, data) | training_flags(demo, seed)
    schedule = {"depth": 18, "epochs": demo.search_epochs, "arch_warmup": demo.arch_warmup}
    arch = {"arch_fraction": 0.3, "arch_freq": 2, "arch_lr": 0.05, "save": runs, "note": note}
    run_step("search", command(sys.executable, "search.py", **flags, **schedule, **arch))
    run_step("curves search", command(sys.executable, "-m", "utils.plot", runs / note))
    return runs / note / "arch.json"


def make_crops(data: Path, out: Path, ids: int = CROP_IDS) -> Path:
    """Copy test crops as a user's labelled folders, ``crops/{infrared,visible}/<id>/<image>``
    (anew): one infrared and ``CROPS_PER_ID`` visible images of each of ``ids`` identities."""
    crops = out / "crops"
    shutil.rmtree(crops, ignore_errors=True)
    for pid in test_ids_of(data)[:ids]:
        for modality, cams, count in (
            ("infrared", INFRARED_CAMS, 1),
            ("visible", VISIBLE_CAMS, CROPS_PER_ID),
        ):
            found = sorted(p for cam in cams for p in (data / cam / f"{int(pid):04d}").glob("*.*"))
            folder = crops / modality / f"{int(pid):04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for image in found[:count]:
                shutil.copyfile(image, folder / f"{image.parent.parent.name}_{image.name}")
    return crops


def match_crops(crops: Path, weights: Path, out: Path) -> None:
    """Rank the visible crops for each infrared crop with ``utils.match``, as a user would."""
    query = {"query": crops / "infrared", "query_modality": "infrared"}
    gallery = {"gallery": crops / "visible", "gallery_modality": "visible"}
    flags = {"weights": weights, "ema": True, **query, **gallery, "out": out}
    match = command(sys.executable, "-m", "utils.match", **flags, labels_from_folders=True)
    run_step("match", match, stdout=out.parent / "matches.md")


def chance_level(data: Path) -> float:
    """Rank-1 of a random ranking, in percent: one over the number of test identities."""
    return 100.0 / len(test_ids_of(data))


def _cell(metrics: dict[str, float], key: str) -> str:
    """One metric, with its spread over the gallery trials when the result has one."""
    spread = metrics.get(f"{key}_std")
    return f"{metrics[key]:.2f}" + (f" ± {spread:.2f}" if spread is not None else "")


def table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    """Markdown table: architecture, protocol, Rank-1, mAP, mINP (mean ± std over trials)."""
    lines = ["| architecture | protocol | Rank-1 | mAP | mINP |", "|---|---|---|---|---|"]
    for arch, protocol, m in rows:
        cells = " | ".join(_cell(m, key) for key in ("rank1", "mAP", "mINP"))
        lines.append(f"| {arch} | {protocol} | {cells} |")
    return "\n".join(lines)


def pictures_of(out: Path, seeds: Sequence[int], notes: Sequence[str]) -> list[tuple[str, Path]]:
    """The demo's pictures that exist under ``out``, each with a heading: search, curves, lists."""
    runs = out / "runs"
    found: list[tuple[str, Path]] = []
    for seed in seeds:
        search_run = runs / f"search_seed{seed}"
        found.append((f"Search heat map (seed {seed})", search_run / "search_heatmap.png"))
        found.append((f"Search curves (seed {seed})", search_run / "curves.png"))
    for note in notes:
        found.append((f"Training curves: {note}", runs / note / "curves.png"))
        for path in sorted((runs / note / "rank_lists").glob("*/*.png")):
            found.append((f"Rank list: {note}, {path.stem}", path))
    return [(title, path) for title, path in found if path.is_file()]


# What each kind of picture shows, keyed by the start of its heading.
_CAPTIONS = {
    "Search heat map": (
        "Each BN slot's probability of being split per modality (rows, input to output) after "
        "each search epoch (columns): blue shared, white undecided, red split. The derived "
        "architecture splits the slots that end above one half."
    ),
    "Search curves": (
        "The search run per epoch: training losses, learning rate, and Rank-1 / mAP of the "
        "supernet on the identities held out for the architecture step (arch_*)."
    ),
    "Training curves": (
        "Training of the derived architecture per epoch: each loss term and their total, and "
        "the learning rate (warm-up, then steps). The demo evaluates once, after the last epoch."
    ),
    "Rank list": (
        "An infrared query (left) and its ten nearest visible gallery images in the first gallery "
        "draw of all-search single-shot: green frame the query's identity, red another one."
    ),
}


def readme(text: str, pictures: Sequence[tuple[str, Path]], out: Path, intro: str) -> str:
    """The demo's README.md: what ran, the results table, then each picture by relative link."""
    lines = ["# CM-NAS demo on synthetic SYSU-MM01", "", intro, "", "## Results", "", text, ""]
    lines += ["## Pictures", ""]
    explained: set[str] = set()
    for title, path in pictures:
        lines += [f"### {title}", ""]
        for kind, caption in _CAPTIONS.items():
            # Explain a kind of picture once, at its first appearance.
            if title.startswith(kind) and kind not in explained:
                explained.add(kind)
                lines += [caption, ""]
        link = Path(os.path.relpath(path, out)).as_posix()
        lines += [f"![{title}]({link})", ""]
    return "\n".join(lines + matches_section(out) + gallery_section(out))


def matches_section(out: Path) -> list[str]:
    """The README's part on the final ``utils.match`` step, when it ran."""
    metrics_file = out / "matches" / "metrics.json"
    if not metrics_file.is_file():
        return []
    metrics = json.loads(metrics_file.read_text())
    counts = {m: len(list((out / "crops" / m).rglob("*.*"))) for m in ("infrared", "visible")}
    return [
        "## Matching crops as a user would",
        "",
        f"`python -m utils.match --labels_from_folders` (the first model, EMA weights) ranked "
        f"{counts['visible']} visible crops for each of {counts['infrared']} infrared crops, "
        f"copied from the synthetic test set into `crops/<identity>/<image>` folders: Rank-1 "
        f"{metrics['rank1']:.2f}, Rank-5 {metrics['rank5']:.2f}, mAP {metrics['mAP']:.2f} (one "
        "small gallery, so not comparable with the protocol numbers above). "
        "[matches/index.html](matches/index.html) shows every query's ranked crops, framed green "
        "(same identity) or red; `matches/matches.csv` lists them with their distances.",
        "",
    ]


def search_gallery(crops: Path, weights: Path, out: Path) -> None:
    """Index the visible crops with ``utils.gallery add`` (anew: the model is new) and search
    the index with the infrared crops, as a user keeping a gallery would."""
    index, gallery = out / "gallery_index", (sys.executable, "-m", "utils.gallery")
    shutil.rmtree(index, ignore_errors=True)
    visible = {"images": crops / "visible", "ema": True, "modality": "visible", "weights": weights}
    run_step("gallery add", command(*gallery, "add", index=index, **visible))
    infrared = {"images": crops / "infrared", "modality": "infrared", "labels_from_folders": True}
    search = command(*gallery, "search", index=index, **infrared, out=out / "gallery_matches")
    run_step("gallery search", search, stdout=out / "gallery_matches.md")


def gallery_section(out: Path) -> list[str]:
    """The README's part on the gallery step, when it ran."""
    metrics_file = out / "gallery_matches" / "metrics.json"
    if not metrics_file.is_file():
        return []
    metrics = json.loads(metrics_file.read_text())
    return [
        "## The same crops through a gallery index",
        "",
        "`python -m utils.gallery add` extracted the visible crops once into `gallery_index/` (a "
        "later `add` extracts only new or changed images); `python -m utils.gallery search` "
        "ranked them for each infrared crop, with the rankings and distances of `utils.match`: "
        f"Rank-1 {metrics['rank1']:.2f}, mAP {metrics['mAP']:.2f}. "
        "[gallery_matches/index.html](gallery_matches/index.html) shows the ranked crops.",
        "",
    ]


@dataclass(frozen=True)
class DemoSettings:
    """The demo's settings (CPU-sized defaults)."""

    out: str = setting("demo", "folder for data, runs and results")
    seeds: tuple[int, ...] = setting((0,), "data/run seeds", nargs="+")
    compare: bool = setting(False, "also train all-shared and all-split and compare")
    epochs: int = setting(12, "training epochs")
    search_epochs: int = setting(6, "search epochs")
    arch_warmup: int = setting(2, "weights-only search epochs")
    img_h: int = setting(64, "image height")
    img_w: int = setting(32, "image width")
    batch_size: int = setting(32, "images per modality")
    lr: float = setting(0.05, "head learning rate")
    test_ids: int = setting(
        TEST_IDS, "synthetic test identities", check=lambda v: v >= 2, expected="at least 2"
    )
    rank_lists: int = setting(
        4,
        "rank-list pictures of the first model",
        check=lambda v: v >= 0,
        expected="a number >= 0",
    )

    def __post_init__(self) -> None:
        check_fields(self)


def get_args_parser() -> argparse.ArgumentParser:
    """The demo's options (CPU-sized defaults)."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    add_flags(parser, options(DemoSettings), [None])
    return parser


def over_seeds(summary: dict[str, list[dict[str, float]]]) -> str:
    """The table of each architecture's mean ± std over the seeds."""
    header = "| architecture | protocol | Rank-1 mean ± std | mAP mean ± std |"
    lines = ["", "Over seeds:", "", header, "|---|---|---|---|"]
    for key, runs in summary.items():
        rank1, m_ap = (_mean_std([metrics[name] for metrics in runs]) for name in ("rank1", "mAP"))
        lines.append(f"| {key} | {rank1} | {m_ap} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo pipeline, print its results table and write its README.md."""
    args = build(DemoSettings, vars(get_args_parser().parse_args(argv)))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s demo: %(message)s", datefmt="%H:%M:%S"
    )
    started = time.time()
    rows: list[tuple[str, str, dict[str, float]]] = []
    summary: dict[str, list[dict[str, float]]] = {}
    notes: list[str] = []
    protocols = PROTOCOLS if not args.compare else (("all", 1),)
    out = Path(args.out)
    for seed in args.seeds:
        data = make_data(args, seed)
        candidates = [("searched", search(args, data, seed))]
        if args.compare:
            candidates += [
                ("all-shared", ROOT / "configs" / "resnet18_all_shared.json"),
                ("all-split", ROOT / "configs" / "resnet18_all_split.json"),
            ]
        for name, config in candidates:
            note = f"{name}_seed{seed}"
            pictures = args.rank_lists if not notes else 0
            notes.append(note)
            results = train_and_test(args, data, config, note, seed, protocols, pictures)
            for protocol, metrics in results.items():
                rows.append((f"{name} (seed {seed})", protocol, metrics["bnneck"]))
                summary.setdefault(f"{name} | {protocol}", []).append(metrics["bnneck"])
    first_data = out / f"data_seed{args.seeds[0]}"
    weights = out / "runs" / notes[0] / "checkpoint_latest.pth"
    crops = make_crops(first_data, out)
    match_crops(crops, weights, out / "matches")
    search_gallery(crops, weights, out)
    text = table(rows) + (over_seeds(summary) if len(args.seeds) > 1 else "")
    text += (
        f"\n\nChance level (all-search single-shot Rank-1): {chance_level(first_data):.2f}%. "
        f"Total time: {time.time() - started:.0f} s."
    )
    (out / "results.md").write_text(text + "\n")
    pictures = pictures_of(out, args.seeds, notes)
    (out / "README.md").write_text(readme(text, pictures, out, intro(args)) + "\n")
    sys.stdout.write(
        "\nSynthetic SYSU-MM01 results (bnneck features, EMA weights, mean ± std over the "
        "10 gallery trials):\n" + text + f"\n\nPictures and this table: {out / 'README.md'}\n"
    )
    return 0


def intro(args: DemoSettings) -> str:
    """The first paragraph of the demo's README: what ran."""
    return (
        f"Written by `python -m utils.demo` (`make demo`): synthetic SYSU-MM01 data "
        f"({TRAIN_IDS} training + {VAL_IDS} validation identities, {args.test_ids} test "
        f"identities), a {args.search_epochs}-epoch architecture search, {args.epochs} epochs of "
        f"training of the architecture found, and the SYSU-MM01 test protocols. ResNet-18 from "
        f"scratch on {args.img_h}x{args.img_w} images, so these numbers show that the pipeline "
        f"works, not what the method reaches on real data. Results use BNNeck features and EMA "
        f"weights; each value is the mean over the protocol's 10 random gallery draws (trials), "
        f"± their standard deviation."
    )


def _mean_std(values: list[float]) -> str:
    """Mean ± population standard deviation, two decimals."""
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


if __name__ == "__main__":
    sys.exit(run_cli(main))
