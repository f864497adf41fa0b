"""Architecture configs: which BatchNorm slots of the backbone are shared or split.

Two formats are read: this project's JSON, keyed by slot name (``{"format": "cmnas-arch",
"version": 1, "depth": 50, "slots": {"bn1": "split", ...}, "provenance": {...}}``), and the
authors' ``config.cfg``: one line of integers, ``0`` = split, ``1`` = shared, in the order of
:func:`slot_names` (stem BN; then per stage the downsample BN, then each block's BNs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.base.errors import UserError
from utils.base.io import write_text_atomic

FORMAT_NAME = "cmnas-arch"
FORMAT_VERSION = 1
SHARED = "shared"
SPLIT = "split"
CHOICES = (SHARED, SPLIT)

# (block type, blocks per stage) for each supported depth.
RESNET_LAYOUT: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
# The supported ResNet depths (the choices of every --depth flag).
DEPTHS = tuple(RESNET_LAYOUT)
_DEPTH_LIST = ", ".join(map(str, DEPTHS))  # "18, 34, 50"
_DEPTH_CHOICE = f"{', '.join(map(str, DEPTHS[:-1]))} or {DEPTHS[-1]}"  # "18, 34 or 50"
# The authors' .cfg codes.
_CFG_CODE = {SPLIT: 0, SHARED: 1}
_CFG_CHOICE = {code: choice for choice, code in _CFG_CODE.items()}
# The top-level keys of this project's JSON; anything else is a typo or another tool's file.
JSON_KEYS = ("format", "version", "depth", "slots", "provenance")


def _check_depth(depth: int, source: str | None = None) -> None:
    if depth not in RESNET_LAYOUT:
        prefix = f"{source}: " if source else ""
        raise UserError(f"{prefix}unsupported ResNet depth {depth}: expected one of {_DEPTH_LIST}")


def has_downsample(depth: int, stage: int) -> bool:
    """Whether block 0 of ``stage`` (1..4) has a projection shortcut for this depth."""
    kind, _ = RESNET_LAYOUT[depth]
    # Bottleneck stages always change width; basic-block layer1 keeps 64 channels at stride 1.
    return kind == "bottleneck" or stage > 1


def slot_names(depth: int) -> list[str]:
    """All BN slot names of a ResNet of ``depth``, in the authors' ``.cfg`` order."""
    _check_depth(depth)
    kind, blocks = RESNET_LAYOUT[depth]
    bns_per_block = 3 if kind == "bottleneck" else 2
    names = ["bn1"]
    for stage, count in enumerate(blocks, start=1):
        if has_downsample(depth, stage):
            names.append(f"layer{stage}.0.downsample.bn")
        for block in range(count):
            names.extend(f"layer{stage}.{block}.bn{k}" for k in range(1, bns_per_block + 1))
    return names


@dataclass
class Arch:
    """A BN separation scheme: a choice (``"shared"``/``"split"``) per slot of a ResNet."""

    depth: int
    slots: dict[str, str]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_slots(self.depth, self.slots, source="architecture")
        self.slots = {name: self.slots[name] for name in slot_names(self.depth)}

    @classmethod
    def uniform(cls, depth: int, choice: str, **provenance: Any) -> Arch:
        """An architecture with every slot set to ``choice``."""
        return cls(depth, dict.fromkeys(slot_names(depth), choice), dict(provenance))

    def split_slots(self) -> list[str]:
        """Names of the split slots, in canonical order."""
        return [name for name, choice in self.slots.items() if choice == SPLIT]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict of this project's format."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "depth": self.depth,
            "slots": dict(self.slots),
            "provenance": dict(self.provenance),
        }

    def to_cfg(self) -> str:
        """The authors' one-line ``config.cfg`` text (0 = split, 1 = shared)."""
        return " ".join(str(_CFG_CODE[self.slots[name]]) for name in slot_names(self.depth))

    def summary(self) -> str:
        """A short human-readable description, e.g. ``ResNet-50: 12/53 split``."""
        return f"ResNet-{self.depth}: {len(self.split_slots())}/{len(self.slots)} split"


def validate_slots(depth: int, slots: Mapping[str, Any], source: str) -> None:
    """Raise UserError unless ``slots`` names every slot of ``depth`` exactly once, validly."""
    expected = slot_names(depth)
    unknown = [name for name in slots if name not in expected]
    if unknown:
        raise UserError(
            f"{source}: unknown slot(s) {', '.join(unknown[:5])} for ResNet-{depth} "
            f"(expected names like {expected[0]}, {expected[1]}, {expected[2]})"
        )
    missing = [name for name in expected if name not in slots]
    if missing:
        raise UserError(
            f"{source}: {len(missing)} slot(s) missing for ResNet-{depth} "
            f"(expected {len(expected)}): {', '.join(missing[:5])}"
        )
    for name, value in slots.items():
        if value not in CHOICES:
            raise UserError(f"{source}: slot {name} is {value!r}: expected 'shared' or 'split'")


def parse_cfg(text: str, source: str = "config.cfg", depth: int | None = None) -> Arch:
    """Parse the authors' one-line config (0 = split, 1 = shared); infer depth from the count."""
    tokens = text.split()
    counts = {len(slot_names(d)): d for d in RESNET_LAYOUT}
    if depth is None:
        if len(tokens) not in counts:
            expected = ", ".join(
                f"{count} (ResNet-{d})" for count, d in sorted(counts.items(), reverse=True)
            )
            raise UserError(f"{source}: {len(tokens)} values, expected {expected} integers 0/1")
        depth = counts[len(tokens)]
    names = slot_names(depth)
    if len(tokens) != len(names):
        raise UserError(f"{source}: {len(tokens)} values, expected {len(names)} for ResNet-{depth}")
    slots = {}
    for position, (name, token) in enumerate(zip(names, tokens, strict=True), start=1):
        if token not in ("0", "1"):
            raise UserError(
                f"{source}: value {position} is {token!r}: expected 0 (split) or 1 (shared)"
            )
        slots[name] = _CFG_CHOICE[int(token)]
    return Arch(depth, slots, {"source": "authors-cfg", "file": source})


def arch_from_dict(data: Any, source: str = "architecture") -> Arch:
    """Build an Arch from this project's JSON dict, validating every field."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object with 'depth' and 'slots'")
    if data.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise UserError(f"{source}: format is {data.get('format')!r}, expected {FORMAT_NAME!r}")
    version = data.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise UserError(f"{source}: version {version!r} is not supported (expected 1)")
    unknown = [key for key in data if key not in JSON_KEYS]
    if unknown:
        raise UserError(
            f"{source}: unknown key(s) {', '.join(map(repr, unknown))} "
            f"(expected {', '.join(JSON_KEYS)})"
        )
    depth = data.get("depth")
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise UserError(f"{source}: 'depth' must be {_DEPTH_CHOICE}, got {depth!r}")
    _check_depth(depth, source)
    slots = data.get("slots")
    if not isinstance(slots, dict):
        raise UserError(f"{source}: 'slots' must be an object mapping slot name to shared/split")
    provenance = data.get("provenance", {})
    if not isinstance(provenance, dict):
        raise UserError(f"{source}: 'provenance' must be an object")
    validate_slots(depth, slots, source)
    return Arch(depth, dict(slots), dict(provenance))


def load_arch(path: str | os.PathLike[str], depth: int | None = None) -> Arch:
    """Read an architecture from this project's JSON or the authors' ``config.cfg`` (UTF-8, a
    byte-order mark skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: architecture file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read architecture file ({err})") from None
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        arch = arch_from_dict(data, str(path))
        if depth is not None and arch.depth != depth:
            raise UserError(f"{path}: architecture is for ResNet-{arch.depth}, expected {depth}")
        return arch
    return parse_cfg(text, str(path), depth)


def save_arch(arch: Arch, path: str | os.PathLike[str]) -> None:
    """Write ``arch`` as JSON, or as the authors' ``.cfg`` when the name ends in ``.cfg``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".cfg":
        write_text_atomic(path, arch.to_cfg() + "\n")
    else:
        write_text_atomic(path, json.dumps(arch.to_dict(), indent=2) + "\n")
