"""Painting of the synthetic pedestrians: one image of a person seen by a camera in a pose, its
parts painted back to front over the camera's background, then the sensor. Infrared images are
grey, black-hot, with their own gain, gamma, blur and noise: the low-level gap between modalities
that modality-specific BatchNorm is meant to absorb.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage

from data.toy.describe import Camera, Garment, Material, Person, Pose

_ANKLE_V = 0.965  # where the legs end, as a fraction of the body height
_SHOULDER_ROUND = 0.035  # radius of the rounded shoulders
_HEAD_WIDTH = 0.82  # half width of the head over its half height


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


def _stripes(coord: np.ndarray, garment: Garment, px: float) -> np.ndarray:
    """Anti-aliased stripes across ``coord``: 1 inside a band, 0 between bands."""
    frac = np.mod(coord * garment.freq + garment.phase, 1.0)
    inside = np.minimum(frac, garment.duty - frac)
    outside = np.minimum(frac - garment.duty, 1.0 - frac)
    return _soft(np.where(frac < garment.duty, inside, -outside) / garment.freq, px)


def _pattern(garment: Garment, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    """Mix weight of the garment's second material at every point (body coordinates)."""
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


@dataclass
class _Scene:
    """One image being painted: body coordinates of every pixel (``u`` across, ``v`` down, in
    body heights; ``px`` is one pixel), the canvas, its shading and where the torso lies."""

    person: Person
    pose: Pose
    infrared: bool
    u: np.ndarray
    v: np.ndarray
    px: float
    shade: np.ndarray
    canvas: np.ndarray
    shoulder_v: float
    hip_v: float

    def soft(self, dist: np.ndarray) -> np.ndarray:
        """Anti-aliased coverage of ``dist > 0`` at this image's resolution."""
        return _soft(dist, self.px)

    def value(self, material: Material) -> np.ndarray:
        """What ``material`` paints: its colour, or in infrared its level (warmer or cooler)."""
        return np.array([material.heat + self.pose.warmth]) if self.infrared else material.colour

    def mix(self, garment: Garment, weight: np.ndarray) -> np.ndarray:
        """The garment's first material blended towards its second by ``weight``."""
        a, b = self.value(garment.first), self.value(garment.second)
        return a + (b - a) * weight[..., None]

    @cached_property
    def top(self) -> np.ndarray:
        """Every pixel's value of the top, with a contrasting chest panel seen from the front."""
        u, v, px, clothes = self.u, self.v, self.px, self.person.clothes
        weight = _pattern(clothes.top, u, v - self.shoulder_v, px)
        if clothes.panel and not self.pose.back:
            panel = _ellipse(u, v, 0.0, self.shoulder_v + 0.1, clothes.panel * 1.2, clothes.panel)
            weight = np.maximum(weight * (1 - _soft(panel, px)), _soft(panel, px))
        return self.mix(clothes.top, weight)

    @cached_property
    def bottom(self) -> np.ndarray:
        """Every pixel's value of the lower garment, its pattern starting at the hips."""
        bottom = self.person.clothes.bottom
        return self.mix(bottom, _pattern(bottom, self.u, self.v - self.hip_v, self.px))

    def paint(self, mask: np.ndarray, layer: np.ndarray) -> None:
        """Blend ``layer`` (one value or one per pixel), shaded, over the canvas by ``mask``."""
        # Most parts cover a small box of the image: blend only inside it (3x faster).
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            return
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        part = (layer[box] if layer.ndim == 3 else layer) * self.shade[box]
        self.canvas[box] += mask[box][..., None] * (part - self.canvas[box])


def _scene(person: Person, camera: Camera, pose: Pose, height: int, width: int) -> _Scene:
    """Place the body in the image and crop the camera's background for this pose."""
    body = person.body
    body_px = body.height * camera.scale * pose.scale * height
    feet = height * (0.5 + 0.5 * body_px / height + pose.dy)
    centre = width * (0.5 + pose.dx + camera.shift)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + np.float32(0.5)
    v = (ys - (feet - body_px)) / body_px
    u = (xs - centre) / body_px - camera.shear * (v - 0.5)
    if camera.mirror != pose.back:
        u = -u
    # Round bodies: darker towards the silhouette in visible light, cooler in infrared
    # (grazing emission); a per-camera side light in visible images only.
    across = np.clip(np.abs(u) / (body.shoulder + 2 * body.arm), 0.0, 1.0) ** 2
    if camera.infrared:
        shade = 1.0 - 0.12 * across
    else:
        shade = (1.0 - 0.3 * across) * (1.0 + camera.light * u)
    bh, bw = camera.background.shape[:2]
    r0 = int(pose.bg_row * (bh - height))
    c0 = int(pose.bg_col * (bw - width))
    shoulder_v = 2 * body.head + body.neck
    return _Scene(
        person=person,
        pose=pose,
        infrared=camera.infrared,
        u=u,
        v=v,
        px=1.0 / body_px,
        shade=shade[..., None],
        canvas=camera.background[r0 : r0 + height, c0 : c0 + width].copy(),
        shoulder_v=shoulder_v,
        hip_v=shoulder_v + body.torso,
    )


def _backpack(scene: _Scene) -> np.ndarray:
    """Coverage of a backpack: behind the shoulders from the front, on the back from behind."""
    u, v = scene.u, scene.v
    reach = np.minimum(
        scene.person.body.shoulder * 0.85 - np.abs(u), 0.12 - np.abs(v - scene.shoulder_v - 0.14)
    )
    return scene.soft(reach)


def _long_hair(scene: _Scene) -> np.ndarray:
    """Coverage of long hair, falling from the head to below the shoulders."""
    u, v, body, hair = scene.u, scene.v, scene.person.body, scene.person.hair
    return scene.soft(
        np.minimum(
            body.head * _HEAD_WIDTH * 1.15 - np.abs(u),
            np.minimum(v - body.head, scene.shoulder_v + hair.long - v),
        )
    )


def _paint_backpack_behind(scene: _Scene) -> None:
    """A backpack seen from the front sticks out behind the shoulders."""
    if scene.person.bag.kind == "backpack" and not scene.pose.back:
        scene.paint(_backpack(scene), scene.value(scene.person.bag.material))


def _paint_legs(scene: _Scene) -> None:
    """Legs, covered by trousers or shorts (a skirt leaves them bare), skin below, then shoes."""
    u, v, person, hip_v = scene.u, scene.v, scene.person, scene.hip_v
    body, clothes = person.body, person.clothes
    skin = scene.value(person.skin)
    leg_len = _ANKLE_V - hip_v
    cover_v = {"trousers": _ANKLE_V + 1.0, "shorts": hip_v + clothes.lower_len * leg_len}.get(
        clothes.lower, hip_v
    )
    for side, swing in ((-1.0, -scene.pose.stride), (1.0, scene.pose.stride)):
        hip_u = side * (body.gap / 2 + body.leg)
        ankle_u = hip_u + swing
        dist, _ = _segment(u, v, (hip_u, hip_v - 0.02), (ankle_u, _ANKLE_V))
        covered = scene.soft(cover_v - v)[..., None]
        scene.paint(scene.soft(body.leg - dist), scene.bottom * covered + skin * (1 - covered))
        shoe = _ellipse(u, v, ankle_u, _ANKLE_V + 0.012, body.leg * 1.25, 0.022)
        scene.paint(scene.soft(shoe), scene.value(person.shoes))


def _paint_hips(scene: _Scene) -> None:
    """The pelvis in the lower garment, and a skirt flaring out below it."""
    u, v, hip_v = scene.u, scene.v, scene.hip_v
    body, clothes = scene.person.body, scene.person.clothes
    pelvis = np.minimum(body.waist - np.abs(u), np.minimum(v - (hip_v - 0.05), hip_v + 0.05 - v))
    scene.paint(scene.soft(pelvis), scene.bottom)
    if clothes.lower == "skirt":
        skirt_end = hip_v + clothes.lower_len * (_ANKLE_V - hip_v)
        frac = np.clip((v - hip_v) / (skirt_end - hip_v), 0.0, 1.0)
        half = body.waist + frac * (body.leg * 1.6)
        region = np.minimum(half - np.abs(u), np.minimum(v - (hip_v - 0.03), skirt_end - v))
        scene.paint(scene.soft(region), scene.bottom)


def _paint_hair_behind(scene: _Scene) -> None:
    """Long hair falls behind the head and shoulders in front view."""
    hair = scene.person.hair
    if hair.long and not scene.pose.back:
        scene.paint(_long_hair(scene), scene.value(hair.material))


def _paint_torso(scene: _Scene) -> None:
    """A trapezoid from the shoulders to the hips (a coat flares below), rounded shoulders."""
    u, v, body = scene.u, scene.v, scene.person.body
    shoulder_v, hip_v = scene.shoulder_v, scene.hip_v
    r = _SHOULDER_ROUND
    frac = np.clip((v - shoulder_v) / body.torso, 0.0, 1.0)
    flare = np.clip(v - hip_v, 0.0, None) * 0.35
    trapezoid = np.minimum(
        body.shoulder + (body.waist - body.shoulder) * frac + flare - np.abs(u),
        np.minimum(v - (shoulder_v + r), hip_v + scene.person.clothes.coat - v),
    )
    shoulders, _ = _segment(
        u, v, (-(body.shoulder - r), shoulder_v + r), (body.shoulder - r, shoulder_v + r)
    )
    scene.paint(scene.soft(np.maximum(trapezoid, r - shoulders)), scene.top)


def _paint_arms(scene: _Scene) -> None:
    """Arms: sleeves cover the upper part, then bare skin and a hand."""
    u, v, person, shoulder_v = scene.u, scene.v, scene.person, scene.shoulder_v
    body, skin = person.body, scene.value(person.skin)
    for side, swing in ((-1.0, scene.pose.swing[0]), (1.0, scene.pose.swing[1])):
        start = (side * (body.shoulder - body.arm), shoulder_v + body.arm)
        end = (side * (body.shoulder + body.arm * 0.5 + swing), shoulder_v + body.arm_len)
        dist, t = _segment(u, v, start, end)
        sleeve = scene.soft((person.clothes.sleeve - t) * body.arm_len)[..., None]
        scene.paint(scene.soft(body.arm - dist), scene.top * sleeve + skin * (1 - sleeve))
        hand = _ellipse(u, v, end[0], end[1] + body.arm, body.arm * 1.1, body.arm * 1.4)
        scene.paint(scene.soft(hand), skin)


def _paint_head(scene: _Scene) -> None:
    """Neck, head, hair (the back view shows hair only) and a hat."""
    u, v, person, soft = scene.u, scene.v, scene.person, scene.soft
    head, ru, hair = person.body.head, person.body.head * _HEAD_WIDTH, person.hair
    skin, hair_value = scene.value(person.skin), scene.value(hair.material)
    neck = np.minimum(head * 0.4 - np.abs(u), np.minimum(v - head, scene.shoulder_v + 0.01 - v))
    scene.paint(soft(neck), skin)
    scene.paint(soft(_ellipse(u, v, 0.0, head, ru, head)), skin)
    cap = soft(_ellipse(u, v, 0.0, head * 0.95, ru * 1.1, head * 1.08))
    if scene.pose.back:
        scene.paint(cap * soft(2 * head * 0.93 - v), hair_value)
        if hair.long:
            scene.paint(_long_hair(scene), hair_value)
    else:
        scene.paint(cap * soft(hair.hairline * head - v), hair_value)
    if person.hat.height:
        crown = soft(_ellipse(u, v, 0.0, head * 0.9, ru * 1.15, head * 1.1))
        scene.paint(crown * soft(person.hat.height * head - v), scene.value(person.hat.material))


def _paint_bag(scene: _Scene) -> None:
    """A backpack from behind (its straps from the front), or a shoulder bag with its strap."""
    u, v, bag, shoulder = scene.u, scene.v, scene.person.bag, scene.person.body.shoulder
    value, shoulder_v = scene.value(bag.material), scene.shoulder_v
    if bag.kind == "backpack":
        if scene.pose.back:
            scene.paint(_backpack(scene), value)
            return
        for side in (-1.0, 1.0):
            strap = np.minimum(
                0.012 - np.abs(u - side * shoulder * 0.55),
                np.minimum(v - shoulder_v, shoulder_v + 0.15 - v),
            )
            scene.paint(scene.soft(strap), value)
    elif bag.kind == "shoulder":
        bag_u, bag_v = bag.side * (shoulder + 0.035), scene.hip_v + 0.01
        dist, _ = _segment(u, v, (-bag.side * shoulder * 0.6, shoulder_v + 0.01), (bag_u, bag_v))
        scene.paint(scene.soft(0.008 - dist), value)
        box = np.minimum(0.05 - np.abs(u - bag_u), 0.045 - np.abs(v - bag_v - 0.03))
        scene.paint(scene.soft(box), value)


# Back to front: what is painted later covers what was painted before.
_PARTS = (
    _paint_backpack_behind,
    _paint_legs,
    _paint_hips,
    _paint_hair_behind,
    _paint_torso,
    _paint_arms,
    _paint_head,
    _paint_bag,
)


def _sensor(canvas: np.ndarray, camera: Camera, pose: Pose, rng: np.random.Generator) -> np.ndarray:
    """The camera's response, blur and noise over the painted scene; uint8 (height, width, 3)."""
    height = canvas.shape[0]
    if camera.infrared:
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


def render(
    person: Person, camera: Camera, pose: Pose, rng: np.random.Generator, height: int, width: int
) -> np.ndarray:
    """Paint one image of ``person`` seen by ``camera``; return uint8 (height, width, 3)."""
    scene = _scene(person, camera, pose, height, width)
    for paint_part in _PARTS:
        paint_part(scene)
    return _sensor(scene.canvas, camera, pose, rng)
