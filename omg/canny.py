"""Canny edges (Canny 1986) in PyTorch, for canny ControlNets: a photo in, the white-on-black edge map they take.

Built in because it needs no weights. It follows OpenCV's cv2.Canny(image, 100, 200) on an RGB array, what the
SDXL canny ControlNets' examples run: 3x3 Sobel gradients of each channel (replicated borders, no blur), at each
pixel those of the channel with the largest L1 magnitude |gx| + |gy|, non-maximum suppression along the
gradient direction quantised to 0/45/90/135 degrees (OpenCV's comparisons), and hysteresis: pixels above
`high` are edges, pixels above `low` are edges when 8-connected to one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_TAN_22_5 = math.tan(math.radians(22.5))


def _sobel(channels: Tensor) -> tuple[Tensor, Tensor]:
    """gx, gy of each channel of (C, H, W), borders replicated (cv2.Canny's Sobel)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=channels.dtype,
                      device=channels.device)
    padded = F.pad(channels[:, None], (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, kx[None, None])[:, 0]
    gy = F.conv2d(padded, kx.T.contiguous()[None, None])[:, 0]
    return gx, gy


def _neighbours(mag: Tensor, dy: int, dx: int) -> tuple[Tensor, Tensor]:
    """mag at (y + dy, x + dx) and (y - dy, x - dx), zero outside the image."""
    p = F.pad(mag, (1, 1, 1, 1))
    h, w = mag.shape
    ahead = p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    behind = p[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
    return ahead, behind


def _non_maximum_suppression(gx: Tensor, gy: Tensor, mag: Tensor) -> Tensor:
    """mag where it is a local maximum across the edge. OpenCV's comparisons: along x and y, > the neighbour
    before (left, above) and >= the one after; along a diagonal, > both."""
    ax, ay = gx.abs(), gy.abs()
    horizontal = ay < ax * _TAN_22_5  # gradient near 0 degrees: compare left and right
    vertical = ay > ax * (_TAN_22_5 + 2)  # beyond 67.5 degrees (tan 67.5 = tan 22.5 + 2): above and below
    diagonal = ~horizontal & ~vertical
    same_sign = (gx * gy) >= 0  # OpenCV: (gx ^ gy) < 0 picks the anti-diagonal
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for region, (dy, dx), strict in ((horizontal, (0, 1), False), (vertical, (1, 0), False),
                                     (diagonal & same_sign, (1, 1), True), (diagonal & ~same_sign, (1, -1), True)):
        ahead, behind = _neighbours(mag, dy, dx)
        keep |= region & (mag > behind) & ((mag > ahead) if strict else (mag >= ahead))
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

    low, high: hysteresis thresholds on the 0-255 scale of the L1 gradient magnitude, as cv2.Canny takes them.
    The image is quantised to 8 bits first, as a uint8 array handed to cv2.Canny would be."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"canny takes a (3, H, W) or (1, H, W) image, got shape {tuple(image.shape)}")
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got {low}, {high}")
    pixels = (image.float().clamp(0, 1) * 255).round()
    gx, gy = _sobel(pixels)  # (C, H, W)
    strongest = (gx.abs() + gy.abs()).argmax(dim=0, keepdim=True)  # per pixel, the channel with the most gradient
    gx, gy = gx.gather(0, strongest)[0], gy.gather(0, strongest)[0]
    mag = _non_maximum_suppression(gx, gy, gx.abs() + gy.abs())
    edges = _hysteresis(mag > high, mag > low)
    return edges.float().expand(3, -1, -1).clone()
