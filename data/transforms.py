"""The paper's training augmentation, batched on any device.

In the authors' order: zero-pad by ``pad``, random crop back to HxW, horizontal flip, ImageNet
normalisation, random erasing filled with 0.485/0.456/0.406 in the *normalised* tensor. Random
numbers are drawn on the CPU and moved without blocking; the rest is gathers and ``torch.where``,
so a CUDA batch is augmented without a host synchronisation.
"""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The classic random erasing fills with these numbers after normalisation (not with black).
ERASE_FILL = (0.485, 0.456, 0.406)
# Attempts per image to find an erasing rectangle that fits, as in Zhong et al.'s code.
ERASE_ATTEMPTS = 100
# The erased area as a fraction of the image, and the rectangle's height/width ratio, both drawn
# uniformly. The ratio range is symmetric under h <-> w: its upper end is exactly 1/0.3, not 3.33.
ERASE_AREA = (0.02, 0.4)
ERASE_RATIO = (0.3, 1 / 0.3)

# Columns of the per-image parameter table: crop offsets, flip, erase flag and rectangle.
_DY, _DX, _FLIP, _ERASE, _TOP, _LEFT, _EH, _EW = range(8)


def _check_batch(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")


def _constants(device: torch.device) -> torch.Tensor:
    """Return (3, 3) rows mean, std, fill on ``device`` without a blocking copy."""
    table = torch.tensor([IMAGENET_MEAN, IMAGENET_STD, ERASE_FILL], dtype=torch.float32)
    return _to_device(table, device)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without making the host wait for the GPU."""
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        # Pinned memory makes the non-blocking copy truly asynchronous.
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _normalise(images: torch.Tensor, consts: torch.Tensor) -> torch.Tensor:
    mean = consts[0].view(1, 3, 1, 1)
    std = consts[1].view(1, 3, 1, 1)
    # permute keeps NHWC strides, so the result is NCHW in channels_last memory format.
    return (images.permute(0, 3, 1, 2).float().div(255.0) - mean) / std


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 (N,H,W,3) images to float (N,3,H,W) in [0,1] normalised with ImageNet stats."""
    _check_batch(images)
    return _normalise(images, _constants(images.device))


def _erase_params(
    area: torch.Tensor, ratio: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From (N, A) attempt draws return (fits, h, w) of the first attempt that fits."""
    target = area * (height * width)
    # torch.round rounds half to even like Python's round() in the classic code.
    h = torch.round(torch.sqrt(target * ratio)).long()
    w = torch.round(torch.sqrt(target / ratio)).long()
    fits = (h < height) & (w < width)
    first = fits.int().argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    return fits.any(dim=1), h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]


def _apply(images: torch.Tensor, params: torch.Tensor, pad: int) -> torch.Tensor:
    """Apply a parameter table (already on the images' device) to a uint8 NHWC batch."""
    n, height, width, _ = images.shape
    device = images.device
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    # Output pixel (i, j) of the crop of the padded image is input pixel (i+dy-pad, j+dx-pad);
    # a flip reads column width-1-j of the crop instead of j.
    flip = params[:, _FLIP, None].bool()
    src_cols = torch.where(flip, width - 1 - cols, cols) + params[:, _DX, None] - pad  # (N, W)
    src_rows = rows + params[:, _DY, None] - pad  # (N, H)
    inside = ((src_rows >= 0) & (src_rows < height))[:, :, None] & (
        (src_cols >= 0) & (src_cols < width)
    )[:, None, :]
    batch = torch.arange(n, device=device)[:, None, None]
    gathered = images[
        batch, src_rows.clamp(0, height - 1)[:, :, None], src_cols.clamp(0, width - 1)[:, None, :]
    ]
    # The padding is zero in uint8, so it becomes (0 - mean) / std after normalisation.
    cropped = gathered * inside[..., None].to(torch.uint8)
    consts = _constants(device)
    out = _normalise(cropped, consts)

    top, left = params[:, _TOP, None], params[:, _LEFT, None]
    in_rows = (rows >= top) & (rows < top + params[:, _EH, None])  # (N, H)
    in_cols = (cols >= left) & (cols < left + params[:, _EW, None])  # (N, W)
    erase = params[:, _ERASE, None, None].bool() & in_rows[:, :, None] & in_cols[:, None, :]
    return torch.where(erase[:, None], consts[2].view(1, 3, 1, 1), out)


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    pad: int = 10,
    flip_p: float = 0.5,
    erase_p: float = 0.5,
    erase_area: tuple[float, float] = ERASE_AREA,
    erase_ratio: tuple[float, float] = ERASE_RATIO,
) -> torch.Tensor:
    """Augment uint8 (N,H,W,3) images on their device; return normalised float (N,3,H,W).

    Random numbers come from the CPU ``generator`` (torch's default one when None), drawn as one
    (N, 8) int64 parameter table.
    """
    _check_batch(images)
    n, height, width, _ = images.shape

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, dtype=torch.float64)

    crop = torch.floor(uniform(n, 2) * (2 * pad + 1)).long().clamp_(max=2 * pad)
    flip = uniform(n) < flip_p
    erase = uniform(n) < erase_p
    area = erase_area[0] + (erase_area[1] - erase_area[0]) * uniform(n, ERASE_ATTEMPTS)
    ratio = erase_ratio[0] + (erase_ratio[1] - erase_ratio[0]) * uniform(n, ERASE_ATTEMPTS)
    fits, eh, ew = _erase_params(area, ratio, height, width)
    corner = uniform(n, 2)
    top = torch.floor(corner[:, 0] * (height - eh + 1)).long()
    left = torch.floor(corner[:, 1] * (width - ew + 1)).long()
    columns = [crop[:, 0], crop[:, 1], flip.long(), (erase & fits).long(), top, left, eh, ew]
    params = torch.stack(columns, dim=1)
    return _apply(images, _to_device(params, images.device), pad)
