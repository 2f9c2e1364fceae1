"""GroupNorm with an optional per-channel shift before it and SiLU after it, in two passes over the tensor.

    y = silu( (x + shift - mean_g) / sqrt(var_g + eps) · weight + bias )        (shift, silu optional)

Why: torch's GroupNorm on SDXL's UNet shapes is slow (its statistics kernel runs one block per (batch, group):
64 blocks for a 2 x 320 x 128 x 128 tensor, 3.3 of a 42.7 ms batch-2 forward on an H100, bench/profile.py),
and the SiLU after it and the timestep-embedding add before it (ResBlock: conv(x) + emb) are two more full
passes. Here pass 1 splits every group into chunks and writes each chunk's count, mean and centred sum of
squares; pass 2 combines them (Chan et al.'s parallel variance, stable in fp32) and writes the normalised,
activated output, so the tensor is read twice and written once.
NCHW contiguous input, any float dtype; statistics and arithmetic in fp32, one rounding at the output.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import tl, triton

CHUNK = 4096  # elements per program


def group_norm_reference(x: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                         shift: Optional[Tensor] = None, silu: bool = False) -> Tensor:
    """torch's ops: x (B, C, *spatial); shift (B, C) added first (in x's dtype, as `conv(x) + emb` is)."""
    if shift is not None:
        x = x + shift.reshape(*shift.shape, *[1] * (x.dim() - 2)).to(x.dtype)
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


@triton.jit
def _stats_kernel(X, SHIFT, PART_MEAN, PART_M2, group_size, hw, channels_per_group, channels, groups, n_chunks,
                  HAS_SHIFT: tl.constexpr, CHUNK_SIZE: tl.constexpr):
    bg = tl.program_id(0)  # batch * groups + group
    chunk = tl.program_id(1)
    start = chunk * CHUNK_SIZE
    offs = start + tl.arange(0, CHUNK_SIZE)
    ok = offs < group_size
    x = tl.load(X + bg.to(tl.int64) * group_size + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        b = bg // groups
        c = (bg % groups) * channels_per_group + offs // hw
        x += tl.load(SHIFT + b * channels + c, mask=ok, other=0.0).to(tl.float32)
    count = tl.minimum(group_size - start, CHUNK_SIZE).to(tl.float32)
    mean = tl.sum(x, axis=0) / count
    centred = tl.where(ok, x - mean, 0.0)
    tl.store(PART_MEAN + bg * n_chunks + chunk, mean)
    tl.store(PART_M2 + bg * n_chunks + chunk, tl.sum(centred * centred, axis=0))


@triton.jit
def _apply_kernel(X, SHIFT, W, B, Y, PART_MEAN, PART_M2, group_size, hw, channels_per_group, channels, groups,
                  n_chunks, eps, HAS_SHIFT: tl.constexpr, HAS_AFFINE: tl.constexpr, SILU: tl.constexpr,
                  CHUNK_SIZE: tl.constexpr, CHUNKS_P2: tl.constexpr):
    bg = tl.program_id(0)
    chunk = tl.program_id(1)
    # the group's statistics from its chunks' partials (every program of the group combines the same few)
    i = tl.arange(0, CHUNKS_P2)
    has = i < n_chunks
    part_mean = tl.load(PART_MEAN + bg * n_chunks + i, mask=has, other=0.0)
    part_m2 = tl.load(PART_M2 + bg * n_chunks + i, mask=has, other=0.0)
    counts = tl.where(has, tl.minimum(group_size - i * CHUNK_SIZE, CHUNK_SIZE), 0).to(tl.float32)
    # tl.cast, not group_size.to: an integer argument may arrive as a Python int (triton specialises 1, and
    # torch.compile's Triton wrapper passes constants), which has no .to
    total = tl.cast(group_size, tl.float32)
    mean = tl.sum(counts * part_mean, axis=0) / total
    delta = tl.where(has, part_mean - mean, 0.0)
    var = (tl.sum(part_m2, axis=0) + tl.sum(counts * delta * delta, axis=0)) / total
    rstd = 1.0 / tl.sqrt(var + eps)

    offs = chunk * CHUNK_SIZE + tl.arange(0, CHUNK_SIZE)
    ok = offs < group_size
    base = bg.to(tl.int64) * group_size
    x = tl.load(X + base + offs, mask=ok, other=0.0).to(tl.float32)
    c = (bg % groups) * channels_per_group + offs // hw
    if HAS_SHIFT:
        x += tl.load(SHIFT + (bg // groups) * channels + c, mask=ok, other=0.0).to(tl.float32)
    y = (x - mean) * rstd
    if HAS_AFFINE:
        y = y * tl.load(W + c, mask=ok, other=1.0).to(tl.float32) + tl.load(B + c, mask=ok, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=ok)


def group_norm_triton(x: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                      shift: Optional[Tensor] = None, silu: bool = False) -> Tensor:
    """The kernel; x contiguous (B, C, *spatial) with C divisible by groups."""
    batch, channels = x.shape[:2]
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    if (weight is None) != (bias is None):
        raise ValueError("give both weight and bias (affine) or neither")
    if shift is not None and tuple(shift.shape) != (batch, channels):
        raise ValueError(f"shift must be (batch, channels) = {(batch, channels)}, got {tuple(shift.shape)}")
    x = x.contiguous()
    hw = x[0, 0].numel()
    group_size = channels // groups * hw
    n_chunks = triton.cdiv(group_size, CHUNK)
    part_mean = torch.empty(batch * groups, n_chunks, device=x.device, dtype=torch.float32)
    part_m2 = torch.empty_like(part_mean)
    y = torch.empty_like(x)
    shift_arg = shift.contiguous() if shift is not None else x  # unused when HAS_SHIFT is off
    args = (hw, channels // groups, channels, groups, n_chunks)
    grid = (batch * groups, n_chunks)
    _stats_kernel[grid](x, shift_arg, part_mean, part_m2, group_size, *args, HAS_SHIFT=shift is not None,
                        CHUNK_SIZE=CHUNK, num_warps=8)
    has_affine = weight is not None
    _apply_kernel[grid](x, shift_arg, weight if has_affine else x, bias if has_affine else x, y, part_mean, part_m2,
                        group_size, *args, eps, HAS_SHIFT=shift is not None, HAS_AFFINE=has_affine, SILU=silu,
                        CHUNK_SIZE=CHUNK, CHUNKS_P2=triton.next_power_of_2(n_chunks), num_warps=8)
    return y
