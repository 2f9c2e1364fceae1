"""Canny edges (Canny 1986) in PyTorch, for canny ControlNets: a photo in, the white-on-black edge map they take.

Built in because it needs no weights. It follows OpenCV's cv2.Canny(image, 100, 200), what the SDXL canny
ControlNets were trained on: 3x3 Sobel gradients of the grey image (no blur), L1 magnitude |gx| + |gy|,
non-maximum suppression along the gradient direction quantised to 0/45/90/135 degrees, and hysteresis: pixels
above `high` are edges, pixels above `low` are edges when 8-connected to one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_TAN_22_5 = math.tan(math.radians(22.5))


def _sobel(gray: Tensor) -> tuple[Tensor, Tensor]:
    """gx, gy of (H, W), borders reflected without repeating the edge (reflect-101, OpenCV's default)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=gray.dtype, device=gray.device)
    padded = F.pad(gray[None, None], (1, 1, 1, 1), mode="reflect")
    gx = F.conv2d(padded, kx[None, None])[0, 0]
    gy = F.conv2d(padded, kx.T.contiguous()[None, None])[0, 0]
    return gx, gy


def _neighbours(mag: Tensor, dy: int, dx: int) -> tuple[Tensor, Tensor]:
    """mag at (y + dy, x + dx) and (y - dy, x - dx), zero outside the image."""
    p = F.pad(mag, (1, 1, 1, 1))
    h, w = mag.shape
    ahead = p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    behind = p[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
    return ahead, behind


def _non_maximum_suppression(gx: Tensor, gy: Tensor, mag: Tensor) -> Tensor:
    """mag where it is a local maximum across the edge (OpenCV's rule: > the neighbour behind, >= the one ahead)."""
    ax, ay = gx.abs(), gy.abs()
    horizontal = ay <= ax * _TAN_22_5  # gradient near 0 degrees: compare left and right
    vertical = ay > ax / _TAN_22_5  # near 90 degrees: above and below
    same_sign = (gx * gy) > 0
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for region, (dy, dx) in ((horizontal, (0, 1)), (vertical, (1, 0)),
                             (~horizontal & ~vertical & same_sign, (1, 1)),
                             (~horizontal & ~vertical & ~same_sign, (1, -1))):
        ahead, behind = _neighbours(mag, dy, dx)
        keep |= region & (mag > behind) & (mag >= ahead)
    return torch.where(keep, mag, torch.zeros_like(mag))


def _hysteresis(strong: Tensor, weak: Tensor) -> Tensor:
    """Weak pixels 8-connected to a strong one (a fixed point of masked 3x3 dilation)."""
    edges = strong.float()[None, None]
    allowed = weak.float()[None, None]
    while True:
        grown = F.max_pool2d(edges, 3, stride=1, padding=1) * allowed
        grown = torch.maximum(grown, edges)
        if torch.equal(grown, edges):
            return edges[0, 0] > 0
        edges = grown


@torch.no_grad()
def canny(image: Tensor, low: float = 100.0, high: float = 200.0) -> Tensor:
    """(3, H, W) or (1, H, W) image in [0, 1] -> (3, H, W) edge map in {0, 1} (white edges on black).

    low, high: hysteresis thresholds on the 0-255 scale of the L1 gradient magnitude, as cv2.Canny takes them."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"canny takes a (3, H, W) or (1, H, W) image, got shape {tuple(image.shape)}")
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got {low}, {high}")
    pixels = (image.float().clamp(0, 1) * 255).round()
    if pixels.shape[0] == 3:  # ITU-R 601 luma, rounded to 8 bits as cv2.cvtColor does
        pixels = (0.299 * pixels[0] + 0.587 * pixels[1] + 0.114 * pixels[2]).round()
    else:
        pixels = pixels[0]
    gx, gy = _sobel(pixels)
    mag = _non_maximum_suppression(gx, gy, gx.abs() + gy.abs())
    edges = _hysteresis(mag > high, mag > low)
    return edges.float().expand(3, -1, -1).clone()
