"""Rendering of the synthetic pedestrians: identities, cameras, poses and the painting itself.

Every identity is a procedurally drawn, stylised pedestrian. Cues that survive the change of
modality are the body shape and proportions, clothing cut (sleeves, shorts, skirt), hair length,
bags, the clothing pattern and the clothes' luminance layout. Colour exists only in visible images:
infrared images are rendered in grey from a per-identity infrared map (skin bright, fabrics by a
noisy function of their visible luminance, bags dark), in inverted (black-hot) polarity, with
their own gain, gamma, blur and sensor noise, so low-level statistics differ strongly between the
modalities, which is the gap that modality-specific BatchNorm is meant to absorb. Cameras differ in
framing, shear, mirroring, scale, illumination and background; every image has its own pose.

Nothing here knows a data set's layout: ``draw_person``, ``draw_camera`` and ``draw_pose`` turn a
random generator into a description, and ``render`` paints one image from three descriptions.
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
class _Garment:
    """A piece of clothing: pattern geometry, two colours and two heats (materials)."""

    pattern: str
    angle: float
    freq: float
    duty: float
    phase: float
    colour_a: np.ndarray
    colour_b: np.ndarray
    heat_a: float
    heat_b: float


@dataclass(frozen=True)
class Person:
    """One identity; lengths are fractions of the body height."""

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
    sleeve: float
    lower: str
    lower_len: float
    hair_long: float
    hairline: float
    bag: str
    bag_side: float
    panel: float
    top: _Garment
    bottom: _Garment
    skin: np.ndarray
    hair: np.ndarray
    shoes: np.ndarray
    bag_colour: np.ndarray
    heat_skin: float
    heat_hair: float
    heat_shoes: float
    heat_bag: float
    coat: float
    hat: float
    hat_colour: np.ndarray
    heat_hat: float


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


def _draw_garment(
    rng: np.random.Generator, patterns: Sequence[str], p: Sequence[float]
) -> _Garment:
    """Draw one garment; its two heats differ enough for the pattern to show in infrared."""
    pattern = str(rng.choice(patterns, p=p))
    colour_a, index = _colour(rng)
    colour_b, _ = _colour(rng, exclude=index)
    # Near-infrared brightness follows the fabric's reflectance, which correlates with its
    # visible luminance but not with its hue: the luminance layout of the clothes crosses the
    # modality gap, the colours do not. A per-garment jitter keeps the mapping imperfect.
    heat_a = _infrared_level(colour_a, rng)
    heat_b = _infrared_level(colour_b, rng)
    return _Garment(
        pattern=pattern,
        angle=float(rng.choice((-1, 1)) * rng.uniform(0.6, 0.95)),
        freq=float(rng.uniform(3.5, 8.0)),
        duty=float(rng.uniform(0.3, 0.6)),
        phase=float(rng.uniform(0.0, 1.0)),
        colour_a=colour_a,
        colour_b=colour_b,
        heat_a=heat_a,
        heat_b=heat_b,
    )


def draw_person(rng: np.random.Generator) -> Person:
    """Draw the body, clothing, colours and heat map of one identity."""
    lower = str(rng.choice(_LOWER_CUTS, p=_LOWER_CUT_P))
    lower_len = {"trousers": 1.0, "shorts": rng.uniform(0.35, 0.5), "skirt": rng.uniform(0.3, 0.6)}
    shoulder = rng.uniform(0.09, 0.14)
    tone = rng.uniform(0.0, 1.0)
    return Person(
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
        sleeve=float(rng.choice((0.35, 1.0), p=(0.4, 0.6))),
        lower=lower,
        lower_len=float(lower_len[lower]),
        hair_long=float(rng.choice((0.0, rng.uniform(0.06, 0.16)), p=(0.65, 0.35))),
        hairline=float(rng.uniform(0.55, 0.9)),
        bag=str(rng.choice(_BAGS, p=_BAG_P)),
        bag_side=float(rng.choice((-1.0, 1.0))),
        panel=float(rng.choice((0.0, rng.uniform(0.04, 0.07)), p=(0.7, 0.3))),
        top=_draw_garment(rng, _TOP_PATTERNS, _TOP_PATTERN_P),
        bottom=_draw_garment(rng, _BOTTOM_PATTERNS, _BOTTOM_PATTERN_P),
        skin=_SKIN_LIGHT + tone * (_SKIN_DARK - _SKIN_LIGHT),
        hair=np.clip(
            _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] + rng.uniform(-0.03, 0.03), 0, 1
        ),
        shoes=_colour(rng)[0] * 0.6,
        bag_colour=_colour(rng)[0],
        heat_skin=float(rng.uniform(0.85, 1.0)),
        heat_hair=float(rng.uniform(0.4, 0.6)),
        heat_shoes=float(rng.uniform(0.2, 0.4)),
        heat_bag=float(rng.uniform(0.08, 0.3)),
        coat=float(rng.choice((0.0, rng.uniform(0.08, 0.2)), p=(0.75, 0.25))),
        hat=float(rng.choice((0.0, rng.uniform(0.7, 1.0)), p=(0.8, 0.2))),
        hat_colour=_colour(rng)[0],
        heat_hat=float(rng.uniform(0.2, 0.4)),
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


def _soft(dist: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased coverage of the region ``dist > 0`` (signed distance in body units)."""
    return np.clip(dist / px + 0.5, 0.0, 1.0)


def _segment(
    u: np.ndarray, v: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distance of every point to the segment p0-p1, and its position t in [0, 1] along it."""
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((u - p0[0]) * du + (v - p0[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return np.hypot(u - (p0[0] + t * du), v - (p0[1] + t * dv)), t


def _ellipse(
    u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float
) -> np.ndarray:
    """Approximate signed distance to an ellipse (positive inside)."""
    return (1.0 - np.hypot((u - cu) / ru, (v - cv) / rv)) * min(ru, rv)


def _stripes(coord: np.ndarray, garment: _Garment, px: float) -> np.ndarray:
    """Anti-aliased stripes across ``coord``: 1 inside a band, 0 between bands."""
    frac = np.mod(coord * garment.freq + garment.phase, 1.0)
    inside = np.minimum(frac, garment.duty - frac)
    outside = np.minimum(frac - garment.duty, 1.0 - frac)
    return _soft(np.where(frac < garment.duty, inside, -outside) / garment.freq, px)


def _pattern(garment: _Garment, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    """Mix weight of the garment's second colour/heat at every point (body coordinates)."""
    kind = garment.pattern
    if kind == "solid":
        return np.zeros_like(u)
    if kind == "hstripes":
        return _stripes(v, garment, px)
    if kind == "vstripes":
        return _stripes(u, garment, px)
    if kind == "diagonal":
        return _stripes(u * np.cos(garment.angle) + v * np.sin(garment.angle), garment, px)
    if kind == "checks":
        a, b = _stripes(u, garment, px), _stripes(v, garment, px)
        return a + b - 2.0 * a * b
    if kind == "dots":
        cu = np.mod(u * garment.freq + garment.phase, 1.0) - 0.5
        cv = np.mod(v * garment.freq + garment.phase, 1.0) - 0.5
        return _soft((0.5 * garment.duty - np.hypot(cu, cv)) / garment.freq, px)
    # "block": a two-tone garment, split horizontally.
    return _soft(v - (0.3 + 0.4 * garment.phase) * 0.3, px)


def render(
    person: Person, camera: Camera, pose: Pose, rng: np.random.Generator, height: int, width: int
) -> np.ndarray:
    """Paint one image of ``person`` seen by ``camera``; return uint8 (height, width, 3)."""
    infrared = camera.infrared
    body_px = person.height * camera.scale * pose.scale * height
    feet = height * (0.5 + 0.5 * body_px / height + pose.dy)
    centre = width * (0.5 + pose.dx + camera.shift)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + np.float32(0.5)
    v = (ys - (feet - body_px)) / body_px
    u = (xs - centre) / body_px - camera.shear * (v - 0.5)
    if camera.mirror != pose.back:
        u = -u
    px = 1.0 / body_px
    p = person

    def value(colour: np.ndarray, heat: float) -> np.ndarray:
        return np.array([heat + pose.warmth]) if infrared else colour

    def garment_value(garment: _Garment, weight: np.ndarray) -> np.ndarray:
        a, b = value(garment.colour_a, garment.heat_a), value(garment.colour_b, garment.heat_b)
        return a + (b - a) * weight[..., None]

    # Round bodies: darker towards the silhouette in visible light, cooler in infrared
    # (grazing emission); a per-camera side light in visible images only.
    across = np.clip(np.abs(u) / (p.shoulder + 2 * p.arm), 0.0, 1.0) ** 2
    shade = 1.0 - 0.12 * across if infrared else (1.0 - 0.3 * across) * (1.0 + camera.light * u)
    shade = shade[..., None]

    bh, bw = camera.background.shape[:2]
    r0 = int(pose.bg_row * (bh - height))
    c0 = int(pose.bg_col * (bw - width))
    canvas = camera.background[r0 : r0 + height, c0 : c0 + width].copy()

    def paint(mask: np.ndarray, layer: np.ndarray) -> None:
        # Most parts cover a small box of the image: blend only inside it (3x faster).
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            return
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        part = (layer[box] if layer.ndim == 3 else layer) * shade[box]
        canvas[box] += mask[box][..., None] * (part - canvas[box])

    head_cv, head_ru = p.head, p.head * 0.82
    shoulder_v = 2 * p.head + p.neck
    hip_v = shoulder_v + p.torso
    ankle_v = 0.965
    round_r = 0.035
    top_w = p.top
    top_pattern = _pattern(top_w, u, v - shoulder_v, px)
    if p.panel and not pose.back:
        panel = _ellipse(u, v, 0.0, shoulder_v + 0.1, p.panel * 1.2, p.panel)
        top_pattern = np.maximum(top_pattern * (1 - _soft(panel, px)), _soft(panel, px))
    top_value = garment_value(top_w, top_pattern)
    bottom_value = garment_value(p.bottom, _pattern(p.bottom, u, v - hip_v, px))
    skin = value(p.skin, p.heat_skin)
    hair = value(p.hair, p.heat_hair)
    bag = value(p.bag_colour, p.heat_bag)

    # Backpack seen from the front: it sticks out behind the shoulders.
    pack = _soft(
        np.minimum(p.shoulder * 0.85 - np.abs(u), 0.12 - np.abs(v - shoulder_v - 0.14)), px
    )
    if p.bag == "backpack" and not pose.back:
        paint(pack, bag)

    # Legs, with skin below shorts or a skirt, then shoes.
    leg_len = ankle_v - hip_v
    # Trousers cover the legs, shorts the thighs; a skirt (painted later) leaves them bare.
    cover_v = {"trousers": ankle_v + 1.0, "shorts": hip_v + p.lower_len * leg_len}.get(
        p.lower, hip_v
    )
    for side, swing in ((-1.0, -pose.stride), (1.0, pose.stride)):
        hip_u = side * (p.gap / 2 + p.leg)
        ankle_u = hip_u + swing
        dist, _ = _segment(u, v, (hip_u, hip_v - 0.02), (ankle_u, ankle_v))
        mask = _soft(p.leg - dist, px)
        covered = _soft(cover_v - v, px)[..., None]
        paint(mask, bottom_value * covered + skin * (1 - covered))
        paint(
            _soft(_ellipse(u, v, ankle_u, ankle_v + 0.012, p.leg * 1.25, 0.022), px),
            value(p.shoes, p.heat_shoes),
        )
    pelvis = np.minimum(p.waist - np.abs(u), np.minimum(v - (hip_v - 0.05), hip_v + 0.05 - v))
    paint(_soft(pelvis, px), bottom_value)
    if p.lower == "skirt":
        skirt_end = hip_v + p.lower_len * leg_len
        frac = np.clip((v - hip_v) / (skirt_end - hip_v), 0.0, 1.0)
        half = p.waist + frac * (p.leg * 1.6)
        region = np.minimum(half - np.abs(u), np.minimum(v - (hip_v - 0.03), skirt_end - v))
        paint(_soft(region, px), bottom_value)

    # Long hair falls behind the head and shoulders in front view.
    long_hair = _soft(
        np.minimum(
            head_ru * 1.15 - np.abs(u), np.minimum(v - head_cv, shoulder_v + p.hair_long - v)
        ),
        px,
    )
    if p.hair_long and not pose.back:
        paint(long_hair, hair)

    # Torso: a trapezoid from the shoulders to the hips (a coat flares below), with rounded
    # shoulders.
    frac = np.clip((v - shoulder_v) / p.torso, 0.0, 1.0)
    flare = np.clip(v - hip_v, 0.0, None) * 0.35
    trapezoid = np.minimum(
        p.shoulder + (p.waist - p.shoulder) * frac + flare - np.abs(u),
        np.minimum(v - (shoulder_v + round_r), hip_v + p.coat - v),
    )
    shoulders, _ = _segment(
        u,
        v,
        (-(p.shoulder - round_r), shoulder_v + round_r),
        (p.shoulder - round_r, shoulder_v + round_r),
    )
    paint(_soft(np.maximum(trapezoid, round_r - shoulders), px), top_value)

    # Arms: sleeves cover the upper part, then bare skin and a hand.
    for side, swing in ((-1.0, pose.swing[0]), (1.0, pose.swing[1])):
        start = (side * (p.shoulder - p.arm), shoulder_v + p.arm)
        end = (side * (p.shoulder + p.arm * 0.5 + swing), shoulder_v + p.arm_len)
        dist, t = _segment(u, v, start, end)
        sleeve = _soft((p.sleeve - t) * p.arm_len, px)[..., None]
        paint(_soft(p.arm - dist, px), top_value * sleeve + skin * (1 - sleeve))
        paint(_soft(_ellipse(u, v, end[0], end[1] + p.arm, p.arm * 1.1, p.arm * 1.4), px), skin)

    # Neck, head, hair (the back view shows hair only).
    neck = np.minimum(p.head * 0.4 - np.abs(u), np.minimum(v - p.head, shoulder_v + 0.01 - v))
    paint(_soft(neck, px), skin)
    head = _soft(_ellipse(u, v, 0.0, head_cv, head_ru, p.head), px)
    paint(head, skin)
    cap = _soft(_ellipse(u, v, 0.0, head_cv * 0.95, head_ru * 1.1, p.head * 1.08), px)
    if pose.back:
        paint(cap * _soft(2 * p.head * 0.93 - v, px), hair)
        if p.hair_long:
            paint(long_hair, hair)
    else:
        paint(cap * _soft(p.hairline * p.head - v, px), hair)
    if p.hat:
        crown = _soft(_ellipse(u, v, 0.0, head_cv * 0.9, head_ru * 1.15, p.head * 1.1), px)
        paint(crown * _soft(p.hat * p.head - v, px), value(p.hat_colour, p.heat_hat))

    if p.bag == "backpack":
        if pose.back:
            paint(pack, bag)
        else:
            for side in (-1.0, 1.0):
                strap = np.minimum(
                    0.012 - np.abs(u - side * p.shoulder * 0.55),
                    np.minimum(v - shoulder_v, shoulder_v + 0.15 - v),
                )
                paint(_soft(strap, px), bag)
    elif p.bag == "shoulder":
        bag_u, bag_v = p.bag_side * (p.shoulder + 0.035), hip_v + 0.01
        dist, _ = _segment(
            u, v, (-p.bag_side * p.shoulder * 0.6, shoulder_v + 0.01), (bag_u, bag_v)
        )
        paint(_soft(0.008 - dist, px), bag)
        box = np.minimum(0.05 - np.abs(u - bag_u), 0.045 - np.abs(v - bag_v - 0.03))
        paint(_soft(box, px), bag)

    if infrared:
        image = camera.offset + camera.gain * np.clip(canvas[..., 0], 0.0, 1.0) ** camera.gamma
        image = ndimage.gaussian_filter(image, camera.blur)
        image = image * pose.brightness**0.5 + rng.standard_normal(image.shape) * camera.noise
        image = image + rng.standard_normal((height, 1)) * camera.row_noise
        # The infrared sensors run in inverted (black-hot) polarity: a per-modality affine change
        # of intensity that a modality-specific BN can undo and a shared one cannot.
        image = np.repeat(1.0 - image[..., None], 3, axis=2)
    else:
        image = canvas * (camera.gain * pose.brightness) * camera.cast
        image = ndimage.gaussian_filter(image, (camera.blur, camera.blur, 0.0))
        image = image + rng.standard_normal(image.shape) * camera.noise
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
