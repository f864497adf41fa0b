"""The whole pipeline on synthetic SYSU-MM01 data, on a CPU in minutes.

    python -m utils.demo --out demo                      # data -> search -> train -> test
    python -m utils.demo --out demo --compare --seeds 0 1 2
        # also trains all-shared and all-split and compares mAP over seeds

Each step runs the real command-line tool (``search.py``, ``train.py``, ``test.py``) in a
subprocess, exactly as a user would, with settings scaled down for a CPU: ResNet-18, small images,
no ImageNet download, few epochs.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.base.cli import run_cli
from utils.base.errors import UserError

log = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = (("all", 1), ("indoor", 1), ("all", 10))


def run_step(name: str, command: list[str]) -> float:
    """Run one pipeline step as a subprocess; fail with its name if it fails."""
    log.info("[%s] %s", name, " ".join(command))
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise UserError(f"demo step '{name}' failed with exit status {done.returncode}")
    elapsed = time.time() - started
    log.info("[%s] done in %.0f s", name, elapsed)
    return elapsed


def common_flags(args: argparse.Namespace, data: Path) -> list[str]:
    """Flags shared by search, training and test: data, image size, CPU-sized batches."""
    return [
        "--dataset",
        "sysu",
        "--data_root",
        str(data),
        "--img_h",
        str(args.img_h),
        "--img_w",
        str(args.img_w),
        "--test_batch",
        "128",
    ]


def training_flags(args: argparse.Namespace, seed: int) -> list[str]:
    """The CPU-scaled recipe: the paper's losses and schedule shape, fewer and shorter epochs."""
    return [
        "--pretrained",
        "none",
        "--batch_size",
        str(args.batch_size),
        "--num_pos",
        "4",
        "--seed",
        str(seed),
        "--warmup_epochs",
        "2",
        "--lr",
        str(args.lr),
        "--milestones",
        str(int(args.epochs * 0.75)),
        str(int(args.epochs * 0.9)),
        "--save_freq",
        "0",
        "--test_freq",
        "0",
        "--log_freq",
        "10",
        "--ema_decay",
        "0.97",
        "--overwrite",
    ]


def train_and_test(
    args: argparse.Namespace,
    data: Path,
    config: Path,
    note: str,
    seed: int,
    protocols: Sequence[tuple[str, int]],
) -> dict[str, Any]:
    """Train one architecture and score it; returns {protocol: bnneck metrics}."""
    py = sys.executable
    runs = Path(args.out) / "runs"
    run_step(
        f"train {note}",
        [
            py,
            "train.py",
            *common_flags(args, data),
            *training_flags(args, seed),
            "--config_path",
            str(config),
            "--epochs",
            str(args.epochs),
            "--save",
            str(runs),
            "--note",
            note,
        ],
    )
    weights = runs / note / "checkpoint_latest.pth"
    results = {}
    for mode, shot in protocols:
        out = runs / note / f"test_{mode}_shot{shot}.json"
        run_step(
            f"test {note} {mode} shot {shot}",
            [
                py,
                "test.py",
                *common_flags(args, data),
                "--weights",
                str(weights),
                "--ema",
                "--mode",
                mode,
                "--shot",
                str(shot),
                "--save_json",
                str(out),
            ],
        )
        payload = json.loads(out.read_text())["results"]
        results[f"{mode} {'single' if shot == 1 else 'multi'}-shot"] = next(iter(payload.values()))
    return results


def make_data(args: argparse.Namespace, seed: int) -> Path:
    """Synthetic SYSU-MM01 for ``seed`` (reused when already there)."""
    data = Path(args.out) / f"data_seed{seed}"
    if not (data / "exp" / "test_id.txt").is_file():
        run_step(
            "data",
            [
                sys.executable,
                "-m",
                "data.toy",
                "--dataset",
                "sysu",
                "--out",
                str(data),
                "--seed",
                str(seed),
                "--overwrite",
            ],
        )
    return data


def search(args: argparse.Namespace, data: Path, seed: int) -> Path:
    """Run a short architecture search; returns the derived architecture's path."""
    runs = Path(args.out) / "runs"
    note = f"search_seed{seed}"
    run_step(
        "search",
        [
            sys.executable,
            "search.py",
            *common_flags(args, data),
            *training_flags(args, seed),
            "--depth",
            "18",
            "--epochs",
            str(args.search_epochs),
            "--arch_warmup",
            str(args.arch_warmup),
            "--arch_fraction",
            "0.3",
            "--arch_freq",
            "2",
            "--arch_lr",
            "0.05",
            "--save",
            str(runs),
            "--note",
            note,
        ],
    )
    return runs / note / "arch.json"


def chance_level(data: Path) -> float:
    """Rank-1 of a random ranking, in percent: one over the number of test identities."""
    ids = (data / "exp" / "test_id.txt").read_text().strip().split(",")
    return 100.0 / len(ids)


def table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    """Markdown table: architecture, protocol, Rank-1, mAP (bnneck features)."""
    lines = ["| architecture | protocol | Rank-1 | mAP | mINP |", "|---|---|---|---|---|"]
    for arch, protocol, m in rows:
        lines.append(
            f"| {arch} | {protocol} | {m['rank1']:.2f} | {m['mAP']:.2f} | {m['mINP']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo pipeline and print its results table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="folder for data, runs and results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="data/run seeds")
    parser.add_argument(
        "--compare", action="store_true", help="also train all-shared and all-split and compare"
    )
    parser.add_argument("--epochs", type=int, default=12, help="training epochs")
    parser.add_argument("--search_epochs", type=int, default=6, help="search epochs")
    parser.add_argument("--arch_warmup", type=int, default=2, help="weights-only search epochs")
    parser.add_argument("--img_h", type=int, default=64, help="image height")
    parser.add_argument("--img_w", type=int, default=32, help="image width")
    parser.add_argument("--batch_size", type=int, default=32, help="images per modality")
    parser.add_argument("--lr", type=float, default=0.05, help="head learning rate")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s demo: %(message)s", datefmt="%H:%M:%S"
    )
    started = time.time()
    rows: list[tuple[str, str, dict[str, float]]] = []
    summary: dict[str, dict[str, list[float]]] = {}
    protocols = PROTOCOLS if not args.compare else (("all", 1),)
    chance = 0.0
    for seed in args.seeds:
        data = make_data(args, seed)
        chance = chance_level(data)
        candidates = [("searched", search(args, data, seed))]
        if args.compare:
            candidates += [
                ("all-shared", ROOT / "configs" / "resnet18_all_shared.json"),
                ("all-split", ROOT / "configs" / "resnet18_all_split.json"),
            ]
        for name, config in candidates:
            results = train_and_test(args, data, config, f"{name}_seed{seed}", seed, protocols)
            for protocol, metrics in results.items():
                rows.append((f"{name} (seed {seed})", protocol, metrics["bnneck"]))
                entry = summary.setdefault(f"{name} | {protocol}", {"rank1": [], "mAP": []})
                entry["rank1"].append(metrics["bnneck"]["rank1"])
                entry["mAP"].append(metrics["bnneck"]["mAP"])
    text = table(rows)
    if len(args.seeds) > 1:
        lines = [
            "",
            "| architecture | protocol | Rank-1 mean ± std | mAP mean ± std |",
            "|---|---|---|---|",
        ]
        for key, values in summary.items():
            arch, protocol = key.split(" | ")
            lines.append(
                f"| {arch} | {protocol} | {_mean_std(values['rank1'])} | "
                f"{_mean_std(values['mAP'])} |"
            )
        text += "\n" + "\n".join(lines)
    text += (
        f"\n\nChance level (all-search single-shot Rank-1): {chance:.2f}%. "
        f"Total time: {time.time() - started:.0f} s."
    )
    Path(args.out, "results.md").write_text(text + "\n")
    sys.stdout.write(
        "\nSynthetic SYSU-MM01 results (bnneck features, EMA weights):\n" + text + "\n"
    )
    return 0


def _mean_std(values: list[float]) -> str:
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


if __name__ == "__main__":
    sys.exit(run_cli(main))
