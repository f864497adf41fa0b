"""Features of any images from a trained checkpoint: the library's extractor and its command.

    python -m utils.extract --weights runs/x/checkpoint_latest.pth --ema --images crops/ \
        --modality infrared --out features.npz

    from utils.extract import FeatureExtractor
    extractor = FeatureExtractor("runs/x/checkpoint_latest.pth", ema=True)
    features = extractor(["a.jpg", "b.png"], modality="infrared")  # (2, D), L2-normalised

Every image gets exactly the test-time input of ``test.py`` (the same decoding, resizing,
normalisation and feature code, see :func:`input_contract`), so a data set's test images get the
features ``test.py --save_features`` writes for them. The image size and the network come from
the checkpoint (this project's or the authors' with their ``config.cfg``; those carry no size and
use the paper's 256x128).

``--images`` takes image files, folders (searched recursively for image files, sorted) and
``.txt`` lists of paths (one a line; relative lines are relative to the list's folder). The
``.npz`` (``np.load(FILE, allow_pickle=False)``) holds ``features`` (N x D float32,
L2-normalised), ``paths`` (as listed), ``resolved_paths`` (absolute), ``modality`` (per image),
``feature``, ``flip``, ``checkpoint``, ``config_path``, ``ema``, ``weights`` (``live`` or
``ema``) and the preprocessing: ``img_size`` (height, width), ``resize``, ``channel_order``,
``value_range``, ``mean``, ``std`` (at bf16 or int8 also those of :mod:`utils.precision`).
Unreadable images are skipped, named in the log and in ``FILE.skipped.txt``
(``features.skipped.txt`` beside ``features.npz``; removed when none was).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data.images import prepare_image, read_image
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from model import read_checkpoint
from model.fold import folded_network
from model.restore import Restored, model_from_checkpoint
from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.base.io import check_not_input, check_output_file, write_atomic, write_text_atomic
from utils.base.logger import setup_logging
from utils.base.modality import Modality
from utils.engine.eval_settings import CHECKPOINT_FLAGS
from utils.engine.options import HelpFormatter, checkpoint_parser, select_device
from utils.evaluation.evaluate import FEATURES, extract_features
from utils.precision import PRECISION_FLAGS, add_precision_flags, extractor_precision

log = logging.getLogger("extract")
ImageInput = str | os.PathLike | Image.Image | np.ndarray
MODALITIES = ("visible", "infrared")
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# Decoding threads: PIL releases the GIL while decoding and resizing.
MAX_DECODERS = 8
# More images than this many batches get a progress bar (on a terminal).
QUIET_BATCHES = 4
# The command-line options that are FeatureExtractor's arguments, by the same names.
EXTRACTOR_FLAGS = (*CHECKPOINT_FLAGS, "device", "batch_size", "feature", "flip", *PRECISION_FLAGS)


def input_contract(img_size: tuple[int, int]) -> dict[str, Any]:
    """What a network of this project expects of an image at test time, as plain values."""
    return {
        "img_size": [int(img_size[0]), int(img_size[1])],
        "layout": "NCHW float32",
        "channel_order": "RGB",
        "colour": "grey and palette images converted to RGB (three equal channels for grey)",
        "resize": "LANCZOS to (width, height), aspect ratio not kept",
        "value_range": [0.0, 1.0],
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "normalise": "(pixel / 255 - mean) / std, per channel",
        "output": "L2-normalise the feature; distance: Euclidean, of normalised features",
    }


@dataclass
class Extraction:
    """The features of the inputs that could be read, and which ones could not."""

    features: torch.Tensor
    kept: list[int]
    skipped: dict[int, str] = field(default_factory=dict)


def _as_list(images: Sequence[ImageInput] | ImageInput) -> list[ImageInput]:
    """``images`` as a list: one path, PIL image or HxW(x3) array counts as a list of one."""
    if isinstance(images, str | os.PathLike | Image.Image):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


def _check_input(item: Any, position: int) -> None:
    """A TypeError naming ``images[position]`` unless it is a path, PIL image or uint8 array;
    a UserError when it is an image without pixels."""
    if isinstance(item, str | os.PathLike):
        return
    if isinstance(item, np.ndarray):
        shape_ok = item.ndim == 2 or (item.ndim == 3 and item.shape[2] == 3)
        if item.dtype != np.uint8 or not shape_ok:
            raise TypeError(
                f"images[{position}]: expected a uint8 array of shape HxW or HxWx3, got "
                f"{item.dtype} {tuple(item.shape)}"
            )
        height, width = item.shape[:2]
    elif isinstance(item, Image.Image):
        width, height = item.size
    else:
        raise TypeError(
            f"images[{position}]: expected a file path, a PIL image or a uint8 array, "
            f"got {type(item).__name__}"
        )
    if not (height and width):
        raise UserError(f"images[{position}]: an empty image ({width}x{height} pixels)")


def _decode(item: ImageInput, size_wh: tuple[int, int]) -> np.ndarray | UserError | Warning:
    """One input as uint8 (H, W, 3) at ``size_wh``, the error that names the bad file, or PIL's
    warning of a very large image (when it is raised)."""
    try:
        if isinstance(item, Image.Image):
            return prepare_image(item, size_wh)
        if isinstance(item, np.ndarray):
            return prepare_image(Image.fromarray(np.ascontiguousarray(item)), size_wh)
        return read_image(item, size_wh)
    except (UserError, Image.DecompressionBombWarning) as err:
        return err


def _modalities(modality: str | Modality | Sequence[str | Modality], count: int) -> list[Modality]:
    """One modality per image from a name (all images) or a sequence of names."""
    one = isinstance(modality, str | Modality) or not isinstance(modality, Iterable)
    names = [modality] * count if one else list(modality)
    if len(names) != count:
        raise UserError(f"modality: {len(names)} values for {count} images")
    for name in names:
        if not (isinstance(name, Modality) or (isinstance(name, str) and name in MODALITIES)):
            raise UserError(f"modality {name!r}: expected 'visible' or 'infrared'")
    return [Modality.parse(name) for name in names]


class FeatureExtractor:
    """A checkpoint's network with the test-time preprocessing: images in, features out.

    ``FeatureExtractor(weights, config_path=None, ema=False, device=None, batch_size=64,
    feature="bnneck", flip=False, precision="fp32", calibration=None)``; ``extractor(images,
    modality="infrared")`` returns an (N, D) float32 tensor of L2-normalised features on the CPU.
    Each modality runs through its own network with the BNs folded into the convolutions
    (``fold_bn=False``: as it is), at ``precision`` (int8: see :mod:`utils.precision`).
    """

    def __init__(
        self,
        weights: str | os.PathLike[str],
        config_path: str | os.PathLike[str] | None = None,
        ema: bool = False,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        feature: str = "bnneck",
        flip: bool = False,
        last_stride: int | None = None,
        fold_bn: bool = True,
        precision: str = "fp32",
        calibration: Sequence[str | os.PathLike[str]] | dict[str, Sequence[str]] | None = None,
    ) -> None:
        if not isinstance(weights, str | os.PathLike):
            raise UserError(f"weights {weights!r}: expected the path of a checkpoint file")
        if feature not in FEATURES:
            raise UserError(f"feature {feature!r}: expected one of {', '.join(FEATURES)}")
        if batch_size < 1:
            raise UserError(f"batch_size {batch_size}: expected at least 1")
        self.device = select_device(None if device is None else str(device))
        checkpoint = read_checkpoint(weights)
        self.restored: Restored = model_from_checkpoint(
            weights, checkpoint, config_path, last_stride, ema
        )
        self.model = self.restored.model.to(self.device).eval()
        # Folding each modality's BNs into the convolutions once gives the same features (to
        # round-off, about 1e-7) in fewer operations: the faster path, measured by the benchmark.
        self.networks = {
            modality: folded_network(self.model, modality) if fold_bn else self.model
            for modality in Modality
        }
        self.weights, self.config_path, self.ema = str(weights), config_path, ema
        self.batch_size, self.feature, self.flip = batch_size, feature, flip
        self.img_size = self.restored.img_size
        self.dim = int(self.model.feat_dim)
        self.precision = extractor_precision(
            precision, calibration, checkpoint, self.weights, self.img_size, image_files
        )

    def describe(self) -> dict[str, Any]:
        """Where the features come from and how the images were prepared, as plain values."""
        return {
            "checkpoint": self.weights,
            "config_path": str(self.config_path or ""),
            "ema": self.ema,
            "weights": "ema" if self.ema else "live",
            "feature": self.feature,
            "flip": self.flip,
            **self.precision.describe(),
            **input_contract(self.img_size),
        }

    def decode(
        self, images: Sequence[ImageInput], workers: int | None = None
    ) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """Decode and resize ``images``: uint8 (kept, H, W, 3), kept positions, skipped ones."""
        height, width = self.img_size
        workers = workers or min(MAX_DECODERS, os.cpu_count() or 1, max(1, len(images)))
        # PIL's warning of a very large image names no file: raised, then named in our warning.
        bomb = Image.DecompressionBombWarning
        with (
            warnings.catch_warnings(action="error", category=bomb),
            ThreadPoolExecutor(max_workers=workers) as pool,
        ):
            decoded = list(pool.map(_decode, images, [(width, height)] * len(images)))
        for position in [i for i, result in enumerate(decoded) if isinstance(result, bomb)]:
            too_many = f"over {Image.MAX_IMAGE_PIXELS} pixels, a possible decompression bomb"
            log.warning("%s: %s; decoded anyway", images[position], too_many)
            with warnings.catch_warnings(action="ignore", category=bomb):
                decoded[position] = _decode(images[position], (width, height))
        kept = [i for i, pixels in enumerate(decoded) if isinstance(pixels, np.ndarray)]
        skipped = {i: str(err) for i, err in enumerate(decoded) if isinstance(err, UserError)}
        if not kept:
            return np.empty((0, height, width, 3), dtype=np.uint8), kept, skipped
        return np.stack([decoded[position] for position in kept]), kept, skipped

    def features_of_pixels(self, pixels: np.ndarray, modality: str | Modality) -> torch.Tensor:
        """Features (CPU float32, L2-normalised) of decoded uint8 (N, H, W, 3) images."""
        if not len(pixels):
            return torch.empty((0, self.dim))
        # Float32 on every device unless asked: the features do not depend on the hardware.
        modality = Modality.parse(modality)
        network = self.precision.network(self.networks[modality], modality)
        with self.precision.context(self.device):
            pool, bnneck = extract_features(
                network, pixels, modality, self.device, self.batch_size, "none", flip=self.flip
            )
        features = (bnneck if self.feature == "bnneck" else pool).cpu()
        check_finite(features, f"{self.weights}{' (EMA)' if self.ema else ''}")
        return features

    def extract(
        self,
        images: Sequence[ImageInput] | ImageInput,
        modality: str | Modality | Sequence[str | Modality] = "infrared",
        on_error: str = "raise",
    ) -> Extraction:
        """Features of ``images``, the positions kept and (``on_error="skip"``) those skipped."""
        if on_error not in ("raise", "skip"):
            raise UserError(f"on_error {on_error!r}: expected 'raise' or 'skip'")
        items = _as_list(images)
        for position, item in enumerate(items):
            _check_input(item, position)
        modalities = _modalities(modality, len(items))
        rows = torch.empty((len(items), self.dim))
        skipped: dict[int, str] = {}
        many = len(items) > QUIET_BATCHES * self.batch_size and sys.stderr.isatty()
        with tqdm(total=len(items), desc="features", unit="img", disable=not many) as bar:
            for kind in Modality:
                positions = [i for i, m in enumerate(modalities) if m is kind]
                for start in range(0, len(positions), self.batch_size):
                    chunk = positions[start : start + self.batch_size]
                    pixels, kept, errors = self.decode([items[i] for i in chunk])
                    if errors and on_error == "raise":
                        raise UserError(next(iter(errors.values())))
                    skipped.update({chunk[i]: reason for i, reason in errors.items()})
                    rows[[chunk[i] for i in kept]] = self.features_of_pixels(pixels, kind)
                    bar.update(len(chunk))
        kept_rows = [i for i in range(len(items)) if i not in skipped]
        return Extraction(rows[kept_rows], kept_rows, dict(sorted(skipped.items())))

    @overload
    def __call__(
        self,
        images: Sequence[ImageInput] | ImageInput,
        modality: str | Modality | Sequence[str | Modality] = ...,
        on_error: Literal["raise"] = ...,
    ) -> torch.Tensor: ...

    @overload
    def __call__(
        self,
        images: Sequence[ImageInput] | ImageInput,
        modality: str | Modality | Sequence[str | Modality] = ...,
        on_error: Literal["skip"] = ...,
    ) -> Extraction: ...

    def __call__(
        self,
        images: Sequence[ImageInput] | ImageInput,
        modality: str | Modality | Sequence[str | Modality] = "infrared",
        on_error: str = "raise",
    ) -> torch.Tensor | Extraction:
        """(N, D) features; with ``on_error="skip"`` an :class:`Extraction` saying what was kept."""
        extraction = self.extract(images, modality, on_error)
        return extraction.features if on_error == "raise" else extraction


def check_finite(features: torch.Tensor, source: str) -> None:
    """Refuse features holding NaN or infinity, in one line naming their cause: the weights."""
    if not bool(torch.isfinite(features).all()):
        raise UserError(
            f"{source}: the network's features are not finite (NaN or infinity): these weights "
            "overflow float32; expected the weights of a trained network"
        )


# --------------------------------------------------------------------------------------------
# Paths on the command line
# --------------------------------------------------------------------------------------------
def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _images_under(folder: Path) -> list[Path]:
    """The image files under ``folder``, sorted, through linked subfolders (each folder once)."""
    found, seen = [], set()
    for root, subfolders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders.sort()  # which path of a folder linked twice is listed: the same every run
        found += [path for name in names if _is_image(path := Path(root, name))]
    return sorted(found)


def _listed(list_file: Path, flag: str) -> list[Path]:
    """The paths of a ``.txt`` list (relative ones relative to its folder)."""
    try:
        lines = list_file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{flag} {list_file}: cannot read the list ({err})") from None
    paths = [Path(line.strip()) for line in lines if line.strip()]
    if not paths:
        raise UserError(f"{flag} {list_file}: the list names no image")
    return [p if p.is_absolute() else list_file.parent / p for p in paths]


def image_files(paths: Iterable[str], flag: str) -> list[tuple[str, str]]:
    """(as listed, resolved) image paths of ``flag``'s files, folders and ``.txt`` lists."""
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            images = _images_under(path)
            if not images:
                suffixes = ", ".join(IMAGE_SUFFIXES)
                raise UserError(f"{flag} {path}: no image files ({suffixes}) in this folder")
            found += images
        elif path.suffix.lower() == ".txt" and path.is_file():
            found += _listed(path, flag)
        elif path.exists():
            found.append(path)
        else:
            raise UserError(f"{flag} {path}: no such file or folder")
    if not found:
        raise UserError(f"{flag}: no images given")
    return [(str(p), str(p.resolve())) for p in found]


def checkpoint_inputs(weights: str, config_path: str | None) -> dict[str, str | None]:
    """The checkpoint's files among a command's inputs, as refusals name them."""
    return {"the --weights checkpoint": weights, "the --config_path file": config_path}


def none_read(flag: str, skipped: dict[int, str]) -> UserError:
    """The error for a side of which no image could be read, naming the first three and why."""
    reasons = list(skipped.values())
    named = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
    return UserError(f"{flag}: none of the {len(reasons)} images could be read ({named})")


def feature_arrays(
    extractor: FeatureExtractor,
    files: Sequence[tuple[str, str]],
    extraction: Extraction,
    modality: str,
) -> dict[str, np.ndarray]:
    """The ``.npz`` arrays of the images ``extraction`` kept (names in the module docstring)."""
    kept = [files[i] for i in extraction.kept]
    arrays: dict[str, np.ndarray] = {
        "features": extraction.features.numpy().astype(np.float32),
        "paths": np.asarray([given for given, _ in kept], dtype=np.str_).reshape(-1),
        "resolved_paths": np.asarray([real for _, real in kept], dtype=np.str_).reshape(-1),
        "modality": np.asarray([modality] * len(kept), dtype=np.str_).reshape(-1),
    }
    for key, value in extractor.describe().items():
        arrays[key] = np.asarray(value)
    return arrays


def write_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], flag: str) -> None:
    """Write ``arrays`` as one ``.npz`` atomically (never half a file)."""
    try:
        write_atomic(path, lambda handle: np.savez(handle, **arrays))
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write ({err.strerror or err})") from None


def report_skipped(
    skipped: dict[str, str],
    out_file: str | os.PathLike[str],
    what: str,
    shown: str | os.PathLike[str] | None = None,
) -> None:
    """Write ``skipped`` (path -> reason) to ``out_file`` and warn, or log that none was.

    ``shown``: the name the warning gives the list (``out_file`` in a folder not yet in place).
    """
    if not skipped:
        Path(out_file).unlink(missing_ok=True)  # an earlier run's list would name the wrong ones
        log.info("every %s image was read", what)
        return
    lines = "".join(f"{path}\t{reason}\n" for path, reason in skipped.items())
    write_text_atomic(out_file, lines)
    first, where = next(iter(skipped)), shown or out_file
    log.warning(
        "%d unreadable image(s) skipped (first: %s), listed in %s", len(skipped), first, where
    )


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def extractor_parser(use: str) -> argparse.ArgumentParser:
    """Options shared by the commands that run a checkpoint on images (``use``: what it does)."""
    parser = argparse.ArgumentParser(
        add_help=False, allow_abbrev=False, parents=[checkpoint_parser(use)]
    )
    group = parser.add_argument_group("features")
    group.add_argument("--feature", choices=FEATURES[::-1], default="bnneck", help="which one")
    group.add_argument("--flip", action="store_true", help="sum with the mirror image's features")
    group.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA if any)")
    add_precision_flags(group)
    return parser


def get_args_parser() -> argparse.ArgumentParser:
    """The ``python -m utils.extract`` parser."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.extract",
        description="Features of your own images from a trained checkpoint, into one .npz.",
        parents=[extractor_parser("extract with")],
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--images", nargs="+", required=True, metavar="PATH", help="files, folders, .txt lists"
    )
    parser.add_argument("--modality", choices=MODALITIES, required=True, help="of every image")
    parser.add_argument("--out", required=True, metavar="FILE", help="the .npz to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Extract the features of ``--images`` and write them with their description."""
    args = get_args_parser().parse_args(argv)
    setup_logging()
    check_output_file(args.out, "--out")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: expected at least 1")
    files = image_files(args.images, "--images")
    check_not_input(Path(args.out), checkpoint_inputs(args.weights, args.config_path), files)
    extractor = FeatureExtractor(**{flag: getattr(args, flag) for flag in EXTRACTOR_FLAGS})
    extraction = extractor([real for _, real in files], args.modality, on_error="skip")
    skipped = {files[i][0]: reason for i, reason in extraction.skipped.items()}
    if not extraction.kept:
        raise none_read("--images", extraction.skipped)
    write_npz(args.out, feature_arrays(extractor, files, extraction, args.modality), "--out")
    report_skipped(skipped, Path(args.out).with_suffix(".skipped.txt"), args.modality)
    log.info("wrote %d x %d features to %s", *extraction.features.shape, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
