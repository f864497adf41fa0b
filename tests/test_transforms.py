"""The batched (any device) and per-image augmentation, and normalisation."""

from __future__ import annotations

import pytest
import torch

import data.transforms as transforms
from data import augment_batch, normalize
from data.transforms import ERASE_FILL, IMAGENET_MEAN, IMAGENET_STD

H, W = 16, 8


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Values 1..255: a zero never appears in the image, so padded pixels are recognisable.
    return torch.randint(1, 256, (n, H, W, 3), generator=gen, dtype=torch.uint8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_normalize_values_and_layout() -> None:
    images = _images()
    out = normalize(images)
    assert out.shape == (6, 3, H, W) and out.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (images.permute(0, 3, 1, 2).double() / 255 - mean.double()) / std.double()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        normalize(images.float())


def test_augment_shapes_and_determinism() -> None:
    images = _images()
    out = augment_batch(images, _gen(1))
    assert out.shape == (6, 3, H, W) and out.dtype == torch.float32
    torch.testing.assert_close(out, augment_batch(images, _gen(1)), rtol=0, atol=0)
    assert not torch.equal(out, augment_batch(images, _gen(2)))


def test_forced_flip_equals_flipped_input() -> None:
    images = _images()
    out = augment_batch(images, _gen(0), pad=0, flip_p=1.0, erase_p=0.0)
    torch.testing.assert_close(out, normalize(images).flip(-1), rtol=0, atol=0)
    none = augment_batch(images, _gen(0), pad=0, flip_p=0.0, erase_p=0.0)
    torch.testing.assert_close(none, normalize(images), rtol=0, atol=0)


def test_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    pad = 3
    images = _images(n=16)
    out = augment_batch(images, _gen(4), pad=pad, flip_p=0.0, erase_p=0.0)
    padded = normalize(
        torch.nn.functional.pad(images.permute(0, 3, 1, 2), (pad,) * 4)
        .permute(0, 2, 3, 1)
        .contiguous()
    )
    shifts = set()
    for i in range(len(images)):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + H, dx : dx + W])
        ]
        assert len(matches) == 1, f"image {i}: not a single window of the padded image"
        shifts.add(matches[0])
    assert len(shifts) > 4  # offsets vary across the batch
    # a pixel from the zero padding reads exactly (0 - mean) / std
    border = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert any((out[i, :, 0, 0] - border).abs().max() < 1e-6 for i in range(len(images)))


def _check_erased(out: torch.Tensor, clean: torch.Tensor) -> list[float]:
    """Assert each changed region is one rectangle holding exactly the fill; return its areas."""
    fill = torch.tensor(ERASE_FILL, dtype=torch.float32).view(3, 1, 1)
    fractions = []
    for i in range(len(out)):
        changed = (out[i] != clean[i]).any(0)
        if not changed.any():
            fractions.append(0.0)
            continue
        rows = changed.any(1).nonzero()[:, 0]
        cols = changed.any(0).nonzero()[:, 0]
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert changed[r0:r1, c0:c1].all() and changed.sum() == (r1 - r0) * (c1 - c0)
        assert torch.equal(out[i, :, r0:r1, c0:c1], fill.expand(3, r1 - r0, c1 - c0))
        fractions.append(float((r1 - r0) * (c1 - c0)) / (H * W))
    return fractions


def test_erasing_fills_one_rectangle_with_the_values() -> None:
    images = _images(n=64)
    clean = normalize(images)
    out = augment_batch(images, _gen(5), pad=0, flip_p=0.0, erase_p=1.0)
    fractions = _check_erased(out, clean)
    assert sum(f > 0 for f in fractions) >= 60  # nearly always some attempt fits
    # rounding h and w on a 16x8 image stretches the 0.02..0.4 range a little
    assert all(f == 0 or 0.01 <= f <= 0.5 for f in fractions)
    half = augment_batch(images, _gen(6), pad=0, flip_p=0.0, erase_p=0.5)
    erased = sum(f > 0 for f in _check_erased(half, clean))
    assert 15 <= erased <= 49


def test_erasing_ratio_reaches_one_over_0_3_in_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    # The recipe draws the height/width ratio uniformly in (0.3, 1/0.3); 3.33 cuts it short.
    assert transforms.ERASE_RATIO == (0.3, 1 / 0.3)
    assert transforms.ERASE_AREA == (0.02, 0.4)
    seen: list[torch.Tensor] = []
    original = transforms._erase_params

    def recording(area: torch.Tensor, ratio: torch.Tensor, height: int, width: int):
        seen.append(ratio)
        return original(area, ratio, height, width)

    monkeypatch.setattr(transforms, "_erase_params", recording)
    augment_batch(_images(n=512), _gen(7), erase_p=1.0)
    ratios = torch.cat(seen).flatten()
    assert ratios.numel() == 512 * transforms.ERASE_ATTEMPTS
    assert ratios.min() >= 0.3 and ratios.max() < 1 / 0.3
    assert (ratios > 3.33).sum() > 10  # about 0.1% of 51,200 uniform draws lie above 3.33


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_batch_on_cuda_never_synchronises() -> None:
    images = _images(n=8).cuda()
    cpu = augment_batch(images.cpu(), _gen(9))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = augment_batch(images, _gen(9))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out.cpu(), cpu)
