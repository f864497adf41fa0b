"""Speed benchmark: training paths, feature extraction, metrics, re-ranking, search (JSON).

    python -m utils.benchmark                       # paper sizes on CUDA, small sizes on a CPU
    python -m utils.benchmark --threads 1 --out bench.json --markdown bench.md

Images/s count both modalities, ``2 * batch_size * steps / seconds``, for the fastest of
``--rounds`` windows after ``--warmup`` untimed steps (the best window filters out other programs'
bursts on a shared machine). Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the
process's maximum resident set size on the CPU. No unit test asserts a speed.

Each section of the JSON document is a :class:`~utils.benchmark.section.Section` (its name, a
``run(bench) -> dict`` function, its Markdown rows) listed in ``registry.SECTIONS``.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model import Arch, load_arch
from utils.base.errors import UserError
from utils.base.logger import setup_logging
from utils.benchmark.measure import machine
from utils.benchmark.options import BenchSettings, get_args_parser, read_options, resolve_options
from utils.benchmark.registry import SECTIONS
from utils.benchmark.section import TRAIN_IDS, Bench, synthetic_train_set, training_settings
from utils.benchmark.training import plain_loader, speedup
from utils.engine.build import select_device

log = logging.getLogger("benchmark")


def benchmark_arch(name: str, depth: int) -> Arch:
    """The architecture ``--arch`` names, checked against ``--depth``."""
    if name in ("shared", "split"):
        return Arch.uniform(depth, name)
    if (arch := load_arch(name)).depth != depth:
        raise UserError(f"--arch {name} is a ResNet-{arch.depth}; --depth is {depth}")
    return arch


def _cell(value: Any, unit: str = "") -> str:
    """A figure as table text: "-" for a skipped one, two decimals below 100."""
    if value is None or value == "":
        return "-" if value is None else ""
    return f"{value:,.2f}{unit}" if unit or value < 100 else f"{value:,.0f}"


def markdown_table(doc: dict[str, Any]) -> str:
    """The figures as a Markdown table, under a line naming the machine they came from."""
    info, settings = doc["machine"], doc["settings"]
    rows = [row for section in SECTIONS for row in section.rows(doc)]
    return "\n".join(
        [
            f"Measured on {info['device']} ({info['cpu_count']} CPUs, {settings['threads']} torch "
            f"threads), torch {info['torch']}, commit {info['commit']}, {info['date']}: ResNet-"
            f"{settings['depth']} ({settings['arch']}), {settings['img_h']}x{settings['img_w']}, "
            f"{settings['images_per_step']} images per step.",
            "",
            "| measure | fast | plain | ratio |",
            "|---|---|---|---|",
            *(f"| {what} | {_cell(a)} | {_cell(b)} | {_cell(r, 'x')} |" for what, a, b, r in rows),
        ]
    )


def run_benchmark(options: BenchSettings) -> dict[str, Any]:
    """Run every section not skipped; returns the JSON document."""
    device = select_device(options.device)
    args = resolve_options(options, device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    arch = benchmark_arch(args.arch, args.depth)
    settings = args.sizes() | {"threads": torch.get_num_threads()}
    settings.update(images_per_step=2 * args.batch_size, train_ids=TRAIN_IDS)
    doc = {"machine": machine(device), "settings": settings}
    doc |= {section: {"skipped": True} for section in args.skip}
    wanted = [section for section in SECTIONS if section.name not in args.skip]
    data = synthetic_train_set((args.img_h, args.img_w), args.seed)
    with tempfile.TemporaryDirectory(prefix="cmnas_bench_") as tmp:
        settings = training_settings(args, Path(tmp), arch)
        bench = Bench(args, device, arch, data, settings)
        for position, section in enumerate(wanted):
            doc[section.name] = section.run(bench)
            if not any(later.uses_trainer for later in wanted[position + 1 :]):
                bench.release_trainer()
    doc["speedup"] = speedup(doc)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, run the benchmark, print the JSON document (and write the files)."""
    args = read_options(argv)
    setup_logging()
    doc = run_benchmark(args)
    text = json.dumps(doc, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(doc) + "\n")
    log.info("summary:\n%s", markdown_table(doc))
    sys.stdout.write(text)
    return 0


__all__ = [
    "BenchSettings",
    "get_args_parser",
    "main",
    "markdown_table",
    "plain_loader",
    "read_options",
    "resolve_options",
    "run_benchmark",
]
