"""The benchmark's options: sizes preset per device, and their validation."""

from __future__ import annotations

import argparse
import os

import torch

from model import DEPTHS
from utils.base.errors import UserError
from utils.benchmark.registry import SECTIONS

# (option, CUDA default, CPU default, help): the paper's sizes on CUDA, minutes on a small CPU.
PRESETS = (
    ("depth", 50, 18, "ResNet depth"),
    ("img_h", 256, 128, "image height"),
    ("img_w", 128, 64, "image width"),
    ("batch_size", 64, 16, "images per modality per step"),
    ("steps", 30, 4, "timed training steps per round"),
    ("rounds", 3, 3, "timed rounds per training path (the fastest counts)"),
    ("warmup", 10, 2, "untimed steps first"),
    ("feature_images", 4096, 256, "images of the feature extraction"),
    ("test_batch", 256, 64, "feature-extraction batch"),
    ("search_steps", 16, 4, "timed steps per round of the search comparison"),
)
# (option, default, help) of the other integer options.
INTEGERS = (
    ("num_pos", 4, "images per identity and modality in a batch"),
    ("workers", None, "DataLoader workers of the plain path (default: min(4, CPUs))"),
    ("search_rounds", 2, "rounds of the search comparison"),
    # SYSU-MM01 multi-shot all-search: 3,803 infrared queries, 10 images per visible folder.
    ("metrics_query", 3803, "queries of the SYSU multi-shot problem (metrics, re-ranking)"),
    ("metrics_gallery", 3010, "gallery images of the SYSU multi-shot problem"),
    # LLCM infrared-to-visible: its 7,166 infrared test images against one image per (identity,
    # visible camera) folder, at most 351 identities x 9 cameras.
    ("llcm_query", 7166, "queries of the LLCM problem"),
    ("llcm_gallery", 3159, "gallery images of the LLCM problem"),
    ("threads", None, "torch threads (default: torch's; 1 keeps threads from spin-waiting for "
     "each other on a CPU shared with other programs)"),
    ("seed", 0, "random seed"),
    ("extractor_images", 128, "image files per size of the extractor section"),
    ("extractor_batch", 64, "the extractor section's batch"),
    ("extractor_rounds", 2, "passes of the extractor section (the fastest counts)"),
    ("gallery_size", 100_000, "synthetic feature vectors in the gallery section's index"),
    ("gallery_queries", 1000, "queries of the gallery section"),
    ("gallery_dim", 512, "feature size (512: ResNet-18's, the demo's; 2048: ResNet-50's)"),
    ("gallery_probes", 32, "inverted lists searched per query by approximate search"),
    ("gallery_dense_pairs", 10**8, "largest query x gallery matrix ranked whole, as utils.match "
     "did before blockwise search"),
)  # fmt: skip


def get_args_parser() -> argparse.ArgumentParser:
    """The benchmark's options; sizes left out take the device's preset."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m utils.benchmark",
        description="Benchmark training, features, metrics, re-ranking and the search (JSON).",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if any)")
    for key, cuda, cpu, text in PRESETS:
        choices = DEPTHS if key == "depth" else None
        text += f" (default: {cuda} on CUDA, {cpu} on the CPU)"
        parser.add_argument(f"--{key}", type=int, choices=choices, default=None, help=text)
    for key, default, text in INTEGERS:
        text += "" if default is None else f" (default: {default})"
        parser.add_argument(f"--{key}", type=int, default=default, help=text)
    parser.add_argument("--arch", default="split", help="shared, split or an architecture file")
    parser.add_argument(
        "--amp", choices=("bf16", "fp16", "none"), default="bf16", help="fast path, CUDA"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    parser.add_argument(
        "--channels_last", action=argparse.BooleanOptionalAction, help="default: on CUDA only"
    )
    names = [section.name for section in SECTIONS]
    parser.add_argument("--skip", nargs="*", choices=names, default=[], help="sections to skip")
    parser.add_argument("--out", default=None, help="also write the JSON document here")
    parser.add_argument("--markdown", default=None, help="also write a Markdown table here")
    return parser


def resolve_options(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill the sizes left out from the device's preset; validate them."""
    for key, cuda, cpu, _ in PRESETS:
        if getattr(args, key) is None:
            setattr(args, key, cuda if device.type == "cuda" else cpu)
    if args.workers is None:
        args.workers = min(4, os.cpu_count() or 1)
    at_least = {key: 1 for key, *_ in PRESETS + INTEGERS} | {"warmup": 0, "workers": 0, "seed": 0}
    for key, low in at_least.items():
        if getattr(args, key) is not None and getattr(args, key) < low:
            raise UserError(f"--{key} {getattr(args, key)}: expected an integer >= {low}")
    if args.batch_size % args.num_pos or args.batch_size // args.num_pos < 2:
        raise UserError(
            f"--batch_size {args.batch_size} must be a multiple of --num_pos {args.num_pos} "
            "with at least 2 identities"
        )
    return args
