"""Cropped concept passes (the opt-in `concept_crop` of omg.OMGOptions): each concept's UNet pass of stage 2 runs
on its mask's bounding box plus a margin instead of the whole latent.

Why: a concept pass only matters where its mask is non-zero (the blend weights it by the mask), and a concept
usually covers a fraction of the image, so most of its UNet work is thrown away. The margin gives the crop's
edge the context the convolutions and self-attention see in the full image; the result inside the mask is an
approximation of the exact path's, outside every mask the blend is the base pass's, as in the exact path.

Boxes are in latent pixels, widened outwards to the UNet's downsampling multiple (2^(levels-1)), so the crop's
pixels fall on the same grid of every level as in the full latent; they are clamped to the latent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class CropBox:
    """Rows [top, bottom) and columns [left, right) of a latent."""

    top: int
    bottom: int
    left: int
    right: int

    def crop(self, x: Tensor) -> Tensor:
        """x (..., H, W) -> (..., bottom - top, right - left), a view."""
        return x[..., self.top:self.bottom, self.left:self.right]

    def paste(self, cropped: Tensor, size: tuple[int, int]) -> Tensor:
        """cropped (..., h, w) at its place in zeros (..., H, W): outside the box the concept's mask is zero, so
        the blend never weights what is there (zeros: 0 · 0 adds exactly nothing)."""
        full = cropped.new_zeros(*cropped.shape[:-2], *size)
        self.crop(full).copy_(cropped)
        return full

    def covers(self, size: tuple[int, int]) -> bool:
        return (self.top, self.left) == (0, 0) and (self.bottom, self.right) == tuple(size)


def _round_down(value: int, multiple: int) -> int:
    return value // multiple * multiple


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def concept_boxes(masks: Tensor, present: Sequence[Sequence[int]], margin: int,
                  multiple: int) -> list[Optional[CropBox]]:
    """One box per active concept: the union over the images in which it is present of its mask's support
    (masks (B, k, H, W), non-zero = support), widened by `margin` and to `multiple`. None where the concept has
    no support in any image (its pass then runs on the whole latent, as the exact path)."""
    if margin < 0 or multiple < 1:
        raise ValueError(f"margin must be >= 0 and multiple >= 1, got {margin} and {multiple}")
    images, count, height, width = masks.shape
    boxes: list[Optional[CropBox]] = []
    for j in range(count):
        support = torch.zeros(height, width, dtype=torch.bool, device=masks.device)
        for b in range(images):
            if j in present[b]:
                support |= masks[b, j] != 0
        rows, cols = support.any(dim=1).nonzero().flatten(), support.any(dim=0).nonzero().flatten()
        if rows.numel() == 0:
            boxes.append(None)
            continue
        top, bottom = int(rows[0]) - margin, int(rows[-1]) + 1 + margin
        left, right = int(cols[0]) - margin, int(cols[-1]) + 1 + margin
        boxes.append(CropBox(max(0, _round_down(top, multiple)), min(height, _round_up(bottom, multiple)),
                             max(0, _round_down(left, multiple)), min(width, _round_up(right, multiple))))
    return boxes


def unet_multiple(unet: torch.nn.Module) -> int:
    """The UNet's downsampling multiple: 2^(levels - 1) (SDXL: 4); 1 for a UNet without omg's config."""
    config = getattr(unet, "config", None)
    levels = len(getattr(config, "channel_mult", (1,)))
    return 2 ** (levels - 1)
