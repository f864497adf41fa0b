"""The benchmark's settings, each declared once: sizes preset per device, and their checks."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, get_type_hints

import torch

from model import DEPTHS
from utils.base.cli import FLAG, Flag, add_flags, build, check_fields, options, setting
from utils.base.errors import UserError
from utils.benchmark.registry import SECTIONS

PRESET = "preset"


def at_least(low: int) -> dict[str, Any]:
    """The check of an integer option, and the words of its refusal."""
    return {"check": lambda v: v >= low, "expected": f"an integer >= {low}"}


def preset(cuda: int, cpu: int, text: str, low: int = 1, **flag: Any) -> Any:
    """A size whose default depends on the device: the paper's on CUDA, minutes on a small CPU."""
    text = f"{text} (default: {cuda} on CUDA, {cpu} on the CPU)"
    return field(
        default=None, metadata={FLAG: Flag(text, **at_least(low), **flag), PRESET: (cuda, cpu)}
    )


def size(default: int, text: str, low: int = 1) -> Any:
    """An integer option whose help shows its default."""
    return setting(default, f"{text} (default: %(default)s)", **at_least(low))


@dataclass(frozen=True)
class BenchSettings:
    """What the benchmark measures, and at which sizes (None: the device's preset)."""

    device: str | None = setting(None, "cuda, cuda:N or cpu (default: cuda if any)")
    depth: int | None = preset(50, 18, "ResNet depth", choices=DEPTHS)
    img_h: int | None = preset(256, 128, "image height")
    img_w: int | None = preset(128, 64, "image width")
    batch_size: int | None = preset(64, 16, "images per modality per step")
    steps: int | None = preset(30, 4, "timed training steps per round")
    rounds: int | None = preset(3, 3, "timed rounds per training path (the fastest counts)")
    warmup: int | None = preset(10, 2, "untimed steps first", low=0)
    feature_images: int | None = preset(4096, 256, "images of the feature extraction")
    test_batch: int | None = preset(256, 64, "feature-extraction batch")
    search_steps: int | None = preset(16, 4, "timed steps per round of the search comparison")
    num_pos: int = size(4, "images per identity and modality in a batch")
    workers: int | None = setting(
        None, "DataLoader workers of the plain path (default: min(4, CPUs))", **at_least(0)
    )
    search_rounds: int = size(2, "rounds of the search comparison")
    # SYSU-MM01 multi-shot all-search: 3,803 infrared queries, 10 images per visible folder.
    metrics_query: int = size(3803, "queries of the SYSU multi-shot problem (metrics, re-ranking)")
    metrics_gallery: int = size(3010, "gallery images of the SYSU multi-shot problem")
    # LLCM infrared-to-visible: its 7,166 infrared test images against one image per (identity,
    # visible camera) folder, at most 351 identities x 9 cameras.
    llcm_query: int = size(7166, "queries of the LLCM problem")
    llcm_gallery: int = size(3159, "gallery images of the LLCM problem")
    threads: int | None = setting(
        None,
        "torch threads (default: torch's; 1 keeps threads from spin-waiting for each other on "
        "a CPU shared with other programs)",
        **at_least(1),
    )
    seed: int = size(0, "random seed", low=0)
    extractor_images: int = size(128, "image files per size of the extractor section")
    extractor_batch: int = size(64, "the extractor section's batch")
    extractor_rounds: int = size(2, "passes of the extractor section (the fastest counts)")
    gallery_size: int = size(100_000, "synthetic feature vectors in the gallery section's index")
    gallery_queries: int = size(1000, "queries of the gallery section")
    gallery_dim: int = size(512, "feature size (512: ResNet-18's, the demo's; 2048: ResNet-50's)")
    gallery_probes: int = size(32, "inverted lists searched per query by approximate search")
    gallery_dense_pairs: int = size(
        10**8,
        "largest query x gallery matrix ranked whole, as utils.match did before blockwise search",
    )
    precision_weights: str | None = setting(
        None,
        "a SYSU-MM01 checkpoint (e.g. the demo's) whose fp32, bf16 and int8 features the "
        "precision section also scores on the data set it was trained on",
    )
    arch: str = setting("split", "shared, split or an architecture file")
    amp: str = setting("bf16", "fast path, CUDA", choices=("bf16", "fp16", "none"))
    compile: bool = setting(False, "torch.compile the fast path")
    channels_last: bool | None = setting(None, "default: on CUDA only")
    skip: tuple[str, ...] = setting(
        (), "sections to skip", choices=[section.name for section in SECTIONS]
    )
    out: str | None = setting(None, "also write the JSON document here")
    markdown: str | None = setting(None, "also write a Markdown table here")

    def __post_init__(self) -> None:
        check_fields(self)
        size, per_id = self.batch_size, self.num_pos
        if size is not None and (size % per_id or size // per_id < 2):
            raise UserError(
                f"--batch_size {size} must be a multiple of --num_pos {per_id} "
                "with at least 2 identities"
            )

    def sizes(self) -> dict[str, Any]:
        """The integer options by name, and ``--arch`` (the JSON document's settings)."""
        hints = get_type_hints(BenchSettings)
        wanted = [name for name, kind in hints.items() if kind in (int, int | None)] + ["arch"]
        return {name: getattr(self, name) for name in wanted}


def get_args_parser() -> argparse.ArgumentParser:
    """The benchmark's options; sizes left out take the device's preset."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m utils.benchmark",
        description="Benchmark training, features, metrics, re-ranking and the search (JSON).",
    )
    add_flags(parser, options(BenchSettings), [None])
    return parser


def read_options(argv: Sequence[str] | None = None) -> BenchSettings:
    """The benchmark's settings of a command line, checked."""
    return build(BenchSettings, vars(get_args_parser().parse_args(argv)))


def resolve_options(settings: BenchSettings, device: torch.device) -> BenchSettings:
    """The settings with the sizes left out filled from ``device``'s preset."""
    which = 0 if device.type == "cuda" else 1
    filled = {
        item.name: item.metadata[PRESET][which]
        for item in fields(settings)
        if PRESET in item.metadata and getattr(settings, item.name) is None
    }
    if settings.workers is None:
        filled["workers"] = min(4, os.cpu_count() or 1)
    return replace(settings, **filled)
