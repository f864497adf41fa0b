"""The random descriptions of the synthetic data: identities, cameras and per-image poses.

Every identity is a stylised pedestrian whose shape, clothing cut, hair, bag, pattern and
luminance layout survive the change of modality; colour exists only in visible images, and every
surface also has an infrared level. Cameras differ in framing, illumination and background. The
order of the draws is part of the output: every image of every seed depends on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_TOP_PATTERNS = ("solid", "hstripes", "vstripes", "diagonal", "checks", "dots", "block")
_TOP_PATTERN_P = (0.2, 0.2, 0.1, 0.1, 0.15, 0.1, 0.15)
_BOTTOM_PATTERNS = ("solid", "hstripes", "vstripes", "checks")
_BOTTOM_PATTERN_P = (0.6, 0.1, 0.15, 0.15)
_LOWER_CUTS = ("trousers", "shorts", "skirt")
_LOWER_CUT_P = (0.6, 0.2, 0.2)
_BAGS = ("none", "backpack", "shoulder")
_BAG_P = (0.5, 0.25, 0.25)

# Clothing colours in sRGB [0, 1]; a small palette so that identities share colours.
_PALETTE = np.array(
    [
        (0.08, 0.08, 0.09),  # black
        (0.90, 0.90, 0.87),  # white
        (0.50, 0.50, 0.50),  # grey
        (0.10, 0.13, 0.35),  # navy
        (0.20, 0.35, 0.75),  # blue
        (0.55, 0.70, 0.90),  # light blue
        (0.75, 0.12, 0.12),  # red
        (0.45, 0.10, 0.15),  # maroon
        (0.90, 0.55, 0.65),  # pink
        (0.90, 0.50, 0.15),  # orange
        (0.92, 0.82, 0.25),  # yellow
        (0.20, 0.55, 0.25),  # green
        (0.45, 0.45, 0.20),  # olive
        (0.82, 0.74, 0.58),  # beige
        (0.45, 0.30, 0.18),  # brown
        (0.45, 0.25, 0.60),  # purple
        (0.10, 0.50, 0.50),  # teal
        (0.25, 0.35, 0.55),  # denim
    ]
)
# Most people wear black, white, grey, navy or denim, so colour alone is a weak identity cue.
_PALETTE_WEIGHT = np.array([4, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3], dtype=np.float64)
_HAIR_COLOURS = np.array(
    [(0.06, 0.05, 0.05), (0.20, 0.13, 0.08), (0.40, 0.26, 0.14), (0.78, 0.66, 0.40), (0.6,) * 3]
)
_SKIN_LIGHT = np.array((0.96, 0.80, 0.68))
_SKIN_DARK = np.array((0.42, 0.28, 0.19))


@dataclass(frozen=True)
class Material:
    """A surface: its colour in visible light (sRGB in [0, 1]) and its infrared level."""

    colour: np.ndarray
    heat: float


@dataclass(frozen=True)
class Garment:
    """A piece of clothing: pattern geometry and two materials (``second`` shows in the pattern)."""

    pattern: str
    angle: float
    freq: float
    duty: float
    phase: float
    first: Material
    second: Material


@dataclass(frozen=True)
class Body:
    """Body shape; lengths are fractions of the body height (``arm``, ``leg``: half widths)."""

    height: float
    head: float
    neck: float
    torso: float
    shoulder: float
    waist: float
    arm: float
    arm_len: float
    leg: float
    gap: float


@dataclass(frozen=True)
class Clothes:
    """Clothing cut: sleeve length (fraction of the arm), lower garment, coat and chest panel."""

    top: Garment
    bottom: Garment
    sleeve: float
    lower: str
    lower_len: float
    coat: float
    panel: float


@dataclass(frozen=True)
class Hair:
    """Hair: ``long`` below the shoulders (0 for short), ``hairline`` as a fraction of the head."""

    material: Material
    long: float
    hairline: float


@dataclass(frozen=True)
class Hat:
    """A hat covering ``height`` of the head (0: no hat)."""

    height: float
    material: Material


@dataclass(frozen=True)
class Bag:
    """A bag: ``kind`` none, backpack or shoulder; ``side`` -1 or 1 for a shoulder bag."""

    kind: str
    side: float
    material: Material


@dataclass(frozen=True)
class Person:
    """One identity, grouped by the parts that are painted."""

    body: Body
    clothes: Clothes
    skin: Material
    hair: Hair
    hat: Hat
    bag: Bag
    shoes: Material


@dataclass(frozen=True)
class Camera:
    """Rendering style of one camera; ``background`` is larger than an image and gets cropped."""

    infrared: bool
    background: np.ndarray
    gain: float
    cast: np.ndarray
    gamma: float
    offset: float
    noise: float
    row_noise: float
    blur: float
    shear: float
    mirror: bool
    scale: float
    shift: float
    light: float


@dataclass(frozen=True)
class Pose:
    """Per-image jitter of framing and pose."""

    dx: float
    dy: float
    scale: float
    back: bool
    swing: tuple[float, float]
    stride: float
    bg_row: float
    bg_col: float
    brightness: float
    warmth: float


def _colour(rng: np.random.Generator, exclude: int = -1) -> tuple[np.ndarray, int]:
    """Draw a palette colour (not ``exclude``) with a little jitter; return it and its index."""
    weights = np.where(np.arange(len(_PALETTE)) == exclude, 0.0, _PALETTE_WEIGHT)
    index = int(rng.choice(len(_PALETTE), p=weights / weights.sum()))
    return np.clip(_PALETTE[index] + rng.uniform(-0.05, 0.05, 3), 0.0, 1.0), index


def _infrared_level(colour: np.ndarray, rng: np.random.Generator) -> float:
    """Infrared level of a fabric: a noisy monotonic function of its visible luminance."""
    luminance = float(colour @ np.array([0.299, 0.587, 0.114]))
    return float(np.clip(0.15 + 0.7 * luminance + rng.uniform(-0.06, 0.06), 0.08, 0.9))


def _draw_garment(rng: np.random.Generator, patterns: Sequence[str], p: Sequence[float]) -> Garment:
    """Draw one garment; its two heats differ enough for the pattern to show in infrared."""
    pattern = str(rng.choice(patterns, p=p))
    colour_a, index = _colour(rng)
    colour_b, _ = _colour(rng, exclude=index)
    # Near-infrared brightness follows the fabric's reflectance, which correlates with its
    # visible luminance but not with its hue: the luminance layout of the clothes crosses the
    # modality gap, the colours do not. A per-garment jitter keeps the mapping imperfect.
    heat_a = _infrared_level(colour_a, rng)
    heat_b = _infrared_level(colour_b, rng)
    return Garment(
        pattern=pattern,
        angle=float(rng.choice((-1, 1)) * rng.uniform(0.6, 0.95)),
        freq=float(rng.uniform(3.5, 8.0)),
        duty=float(rng.uniform(0.3, 0.6)),
        phase=float(rng.uniform(0.0, 1.0)),
        first=Material(colour_a, heat_a),
        second=Material(colour_b, heat_b),
    )


def draw_person(rng: np.random.Generator) -> Person:
    """Draw the body, clothing, colours and heat map of one identity."""
    # One draw after another in a fixed order (it interleaves the groups), grouped at the end.
    lower = str(rng.choice(_LOWER_CUTS, p=_LOWER_CUT_P))
    lower_len = {"trousers": 1.0, "shorts": rng.uniform(0.35, 0.5), "skirt": rng.uniform(0.3, 0.6)}
    shoulder = rng.uniform(0.09, 0.14)
    tone = rng.uniform(0.0, 1.0)
    body = Body(
        height=float(rng.uniform(0.8, 0.92)),
        head=float(rng.uniform(0.055, 0.075)),
        neck=float(rng.uniform(0.015, 0.035)),
        torso=float(rng.uniform(0.27, 0.36)),
        shoulder=float(shoulder),
        waist=float(shoulder * rng.uniform(0.7, 0.95)),
        arm=float(rng.uniform(0.02, 0.032)),
        arm_len=float(rng.uniform(0.33, 0.4)),
        leg=float(rng.uniform(0.032, 0.05)),
        gap=float(rng.uniform(0.004, 0.02)),
    )
    sleeve = float(rng.choice((0.35, 1.0), p=(0.4, 0.6)))
    hair_long = float(rng.choice((0.0, rng.uniform(0.06, 0.16)), p=(0.65, 0.35)))
    hairline = float(rng.uniform(0.55, 0.9))
    bag_kind = str(rng.choice(_BAGS, p=_BAG_P))
    bag_side = float(rng.choice((-1.0, 1.0)))
    panel = float(rng.choice((0.0, rng.uniform(0.04, 0.07)), p=(0.7, 0.3)))
    top = _draw_garment(rng, _TOP_PATTERNS, _TOP_PATTERN_P)
    bottom = _draw_garment(rng, _BOTTOM_PATTERNS, _BOTTOM_PATTERN_P)
    skin = _SKIN_LIGHT + tone * (_SKIN_DARK - _SKIN_LIGHT)
    hair = np.clip(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] + rng.uniform(-0.03, 0.03), 0, 1)
    shoes = _colour(rng)[0] * 0.6
    bag = _colour(rng)[0]
    heat_skin = float(rng.uniform(0.85, 1.0))
    heat_hair = float(rng.uniform(0.4, 0.6))
    heat_shoes = float(rng.uniform(0.2, 0.4))
    heat_bag = float(rng.uniform(0.08, 0.3))
    coat = float(rng.choice((0.0, rng.uniform(0.08, 0.2)), p=(0.75, 0.25)))
    hat = float(rng.choice((0.0, rng.uniform(0.7, 1.0)), p=(0.8, 0.2)))
    hat_colour = _colour(rng)[0]
    heat_hat = float(rng.uniform(0.2, 0.4))
    return Person(
        body=body,
        clothes=Clothes(top, bottom, sleeve, lower, float(lower_len[lower]), coat, panel),
        skin=Material(skin, heat_skin),
        hair=Hair(Material(hair, heat_hair), hair_long, hairline),
        hat=Hat(hat, Material(hat_colour, heat_hat)),
        bag=Bag(bag_kind, bag_side, Material(bag, heat_bag)),
        shoes=Material(shoes, heat_shoes),
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / (field.std() + 1e-8)


def draw_camera(
    rng: np.random.Generator, infrared: bool, outdoor: bool, height: int, width: int
) -> Camera:
    """Draw one camera's style and paint its background, 1.5x taller and 2x wider than an image."""
    bh, bw = height * 3 // 2, width * 2
    rows = np.arange(bh, dtype=np.float64)[:, None] / bh
    horizon = rng.uniform(0.55, 0.75)
    floor = np.clip((rows - horizon) * 40.0, 0.0, 1.0) * np.ones((1, bw))
    texture = _smooth_noise(rng, (bh, bw), sigma=max(1.0, height / 20))
    if infrared:
        wall, ground = rng.uniform(0.06, 0.2), rng.uniform(0.04, 0.16)
        field = wall + (ground - wall) * floor + rng.uniform(0.02, 0.05) * texture
        # A few warm objects (radiators, lamps, parked cars) as distractors for the person.
        for _ in range(int(rng.integers(1, 4))):
            r0, c0 = int(rng.integers(0, bh - 4)), int(rng.integers(0, bw - 4))
            dr, dc = int(rng.integers(3, bh // 4)), int(rng.integers(2, bw // 4))
            field[r0 : r0 + dr, c0 : c0 + dc] += rng.uniform(0.1, 0.35)
        background = ndimage.gaussian_filter(field, 1.0)[..., None]
    else:
        base = (0.55, 0.75) if outdoor else (0.35, 0.65)
        wall_tone = rng.uniform(*base) * rng.uniform(0.85, 1.15, 3)
        ground_tone = rng.uniform(0.3, 0.6) * rng.uniform(0.9, 1.1, 3)
        field = wall_tone + (ground_tone - wall_tone) * floor[..., None]
        field = field * (1.0 + rng.uniform(0.05, 0.12) * texture[..., None])
        # Doors, windows, pillars and shop fronts give each camera a recognisable scene.
        for _ in range(int(rng.integers(2, 5))):
            r0, c0 = int(rng.integers(0, bh - 4)), int(rng.integers(0, bw - 4))
            dr, dc = int(rng.integers(bh // 6, bh // 2)), int(rng.integers(2, bw // 3))
            field[r0 : r0 + dr, c0 : c0 + dc] = rng.uniform(0.15, 0.85, 3) * (
                1.0 + 0.05 * texture[r0 : r0 + dr, c0 : c0 + dc, None]
            )
        background = np.clip(field, 0.0, 1.0)
    return Camera(
        infrared=infrared,
        background=background,
        gain=float(rng.uniform(1.0, 1.2) if infrared else rng.uniform(0.8, 1.1)),
        cast=np.ones(3) if infrared else rng.uniform(0.88, 1.12, 3),
        gamma=float(rng.uniform(0.7, 1.4) if infrared else 1.0),
        offset=float(rng.uniform(0.0, 0.06) if infrared else 0.0),
        noise=float(rng.uniform(0.02, 0.045) if infrared else rng.uniform(0.005, 0.012)),
        row_noise=float(rng.uniform(0.005, 0.02) if infrared else 0.0),
        blur=float(rng.uniform(0.5, 0.9) if infrared else rng.uniform(0.2, 0.5)),
        shear=float(rng.uniform(-0.06, 0.06)),
        mirror=bool(rng.random() < 0.3),
        scale=float(rng.uniform(0.9, 1.04)),
        shift=float(rng.uniform(-0.04, 0.04)),
        light=float(rng.uniform(-0.8, 0.8)),
    )


def draw_pose(rng: np.random.Generator) -> Pose:
    """Draw the per-image jitter of framing, view (front/back), limbs and lighting."""
    return Pose(
        dx=float(rng.uniform(-0.06, 0.06)),
        dy=float(rng.uniform(-0.03, 0.03)),
        scale=float(rng.uniform(0.95, 1.05)),
        back=bool(rng.random() < 0.4),
        swing=(float(rng.uniform(-0.03, 0.05)), float(rng.uniform(-0.03, 0.05))),
        stride=float(rng.uniform(-0.015, 0.03)),
        bg_row=float(rng.random()),
        bg_col=float(rng.random()),
        brightness=float(rng.uniform(0.85, 1.15)),
        warmth=float(rng.uniform(-0.05, 0.05)),
    )
