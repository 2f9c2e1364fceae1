"""GroupNorm with an optional per-channel shift before it and SiLU after it, in two passes over the tensor.

    y = silu( (x + shift - mean_g) / sqrt(var_g + eps) · weight + bias )        (shift, silu optional)

Why: torch's GroupNorm on SDXL's UNet shapes is slow (its statistics kernel runs one block per (batch, group):
64 blocks for a 2 x 320 x 128 x 128 tensor, 3.3 of a 42.7 ms batch-2 forward on an H100, bench/profile.py),
and the SiLU after it and the timestep-embedding add before it (ResBlock: conv(x) + emb) are two more full
passes. Here pass 1 splits every group into chunks and writes each chunk's count, mean and centred sum of
squares; pass 2 combines them (Chan et al.'s parallel variance, stable in fp32) and writes the normalised,
activated output, so the tensor is read twice and written once.

Channels-last input (B, H, W, C in memory: the UNet's layout on CUDA, where cuDNN's convolutions run natively
and the transformers' token views need no transposes) takes a second set of kernels over [pixels, channels]
tiles, each row of a tile contiguous: pass 1 keeps each channel's running mean and centred sum of squares over
a split of the pixels, a small pass combines a group's channels and splits into its mean and 1/std, and pass 2
writes the output in the input's layout.
Contiguous or channels-last input, any float dtype; statistics and arithmetic in fp32, one rounding at the output.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import tl, triton

CHUNK = 4096  # elements per program
BLOCK_PIXELS, BLOCK_CHANNELS = 32, 128  # channels-last tiles
SPLIT_TARGET = 512  # channels-last pass 1: about this many programs, each over a split of the pixels


def is_channels_last(x: Tensor) -> bool:
    """A 4-d tensor laid out (B, H, W, C) in memory and not also plain contiguous (where the two coincide, the
    contiguous kernels serve it): the layout the channels-last kernels take and return."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """Channels-last for a channels-last x (is_channels_last), else contiguous: group_norm's output layout for input
    x, and the layout omg.unet gives activations for convolution weights x."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


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


@triton.jit
def _stats_nhwc_kernel(X, SHIFT, PART_MEAN, PART_M2, hw, channels, pixels_per_split, n_splits,
                       HAS_SHIFT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    split = tl.program_id(1)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < channels
    start = split * pixels_per_split
    stop = tl.minimum(start + pixels_per_split, hw)
    base = X + b.to(tl.int64) * hw * channels
    # sums of x - k with k the split's first pixel (shifted data: stable while k is near the mean, which a sample
    # of the channel is), accumulated per element and reduced once at the end; the timestep shift cancels in x - k
    k = tl.load(base + start.to(tl.int64) * channels + cs, mask=c_ok, other=0.0).to(tl.float32)
    s1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(start, stop, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        ok = (ps < stop)[:, None] & c_ok[None, :]
        x = tl.load(base + ps[:, None].to(tl.int64) * channels + cs[None, :], mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, x - k[None, :], 0.0)
        s1 += d
        s2 += d * d
    n = (stop - start).to(tl.float32)
    sum1 = tl.sum(s1, axis=0)
    mean = k + sum1 / n
    if HAS_SHIFT:
        mean += tl.load(SHIFT + b * channels + cs, mask=c_ok, other=0.0).to(tl.float32)
    out = (b * n_splits + split) * channels + cs
    tl.store(PART_MEAN + out, mean, mask=c_ok)
    tl.store(PART_M2 + out, tl.maximum(tl.sum(s2, axis=0) - sum1 * sum1 / n, 0.0), mask=c_ok)


@triton.jit
def _combine_nhwc_kernel(PART_MEAN, PART_M2, MEAN, RSTD, hw, channels, channels_per_group, groups,
                         pixels_per_split, n_splits, eps, SPLITS_P2: tl.constexpr, CPG_P2: tl.constexpr):
    bg = tl.program_id(0)
    b = bg // groups
    s = tl.arange(0, SPLITS_P2)
    j = tl.arange(0, CPG_P2)
    ok = (s < n_splits)[:, None] & (j < channels_per_group)[None, :]
    c = (bg % groups) * channels_per_group + j
    at = (b * n_splits + s)[:, None] * channels + c[None, :]
    part_mean = tl.load(PART_MEAN + at, mask=ok, other=0.0)
    part_m2 = tl.load(PART_M2 + at, mask=ok, other=0.0)
    counts = tl.minimum(hw - s * pixels_per_split, pixels_per_split).to(tl.float32)
    counts = tl.where(ok, counts[:, None], 0.0)
    total = tl.cast(hw, tl.float32) * tl.cast(channels_per_group, tl.float32)
    mean = tl.sum(tl.sum(counts * part_mean, axis=1), axis=0) / total
    delta = tl.where(ok, part_mean - mean, 0.0)
    var = (tl.sum(tl.sum(part_m2, axis=1), axis=0) + tl.sum(tl.sum(counts * delta * delta, axis=1), axis=0)) / total
    tl.store(MEAN + bg, mean)
    tl.store(RSTD + bg, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _apply_nhwc_kernel(X, SHIFT, W, B, Y, MEAN, RSTD, hw, channels, channels_per_group, groups,
                       HAS_SHIFT: tl.constexpr, HAS_AFFINE: tl.constexpr, SILU: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < channels
    ok = (ps < hw)[:, None] & c_ok[None, :]
    at = b.to(tl.int64) * hw * channels + ps[:, None].to(tl.int64) * channels + cs[None, :]
    x = tl.load(X + at, mask=ok, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        x += tl.load(SHIFT + b * channels + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    g = b * groups + cs // channels_per_group
    mean = tl.load(MEAN + g, mask=c_ok, other=0.0)
    rstd = tl.load(RSTD + g, mask=c_ok, other=0.0)
    y = (x - mean[None, :]) * rstd[None, :]
    if HAS_AFFINE:
        w = tl.load(W + cs, mask=c_ok, other=1.0).to(tl.float32)
        bias = tl.load(B + cs, mask=c_ok, other=0.0).to(tl.float32)
        y = y * w[None, :] + bias[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + at, y.to(Y.dtype.element_ty), mask=ok)


def _group_norm_nhwc(x: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                     shift: Optional[Tensor], silu: bool) -> Tensor:
    batch, channels, h, w = x.shape
    hw = h * w
    channel_blocks = triton.cdiv(channels, BLOCK_CHANNELS)
    wanted = max(1, SPLIT_TARGET // (batch * channel_blocks))
    pixels_per_split = triton.cdiv(triton.cdiv(hw, wanted), BLOCK_PIXELS) * BLOCK_PIXELS
    n_splits = triton.cdiv(hw, pixels_per_split)
    part_mean = torch.empty(batch, n_splits, channels, device=x.device, dtype=torch.float32)
    part_m2 = torch.empty_like(part_mean)
    mean = torch.empty(batch * groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    y = torch.empty_like(x, memory_format=torch.channels_last)
    shift_arg = shift.contiguous() if shift is not None else x
    _stats_nhwc_kernel[(batch, n_splits, channel_blocks)](
        x, shift_arg, part_mean, part_m2, hw, channels, pixels_per_split, n_splits, HAS_SHIFT=shift is not None,
        BLOCK_P=BLOCK_PIXELS, BLOCK_C=BLOCK_CHANNELS, num_warps=4)
    cpg = channels // groups
    _combine_nhwc_kernel[(batch * groups,)](
        part_mean, part_m2, mean, rstd, hw, channels, cpg, groups, pixels_per_split, n_splits, eps,
        SPLITS_P2=triton.next_power_of_2(n_splits), CPG_P2=triton.next_power_of_2(cpg), num_warps=4)
    has_affine = weight is not None
    _apply_nhwc_kernel[(batch, triton.cdiv(hw, BLOCK_PIXELS), channel_blocks)](
        x, shift_arg, weight if has_affine else x, bias if has_affine else x, y, mean, rstd, hw, channels, cpg,
        groups, HAS_SHIFT=shift is not None, HAS_AFFINE=has_affine, SILU=silu, BLOCK_P=BLOCK_PIXELS,
        BLOCK_C=BLOCK_CHANNELS, num_warps=4)
    return y


def group_norm_triton(x: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                      shift: Optional[Tensor] = None, silu: bool = False) -> Tensor:
    """The kernels; x (B, C, *spatial) with C divisible by groups, output in memory_format_of(x)."""
    batch, channels = x.shape[:2]
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    if (weight is None) != (bias is None):
        raise ValueError("give both weight and bias (affine) or neither")
    if shift is not None and tuple(shift.shape) != (batch, channels):
        raise ValueError(f"shift must be (batch, channels) = {(batch, channels)}, got {tuple(shift.shape)}")
    if is_channels_last(x):
        return _group_norm_nhwc(x, groups, weight, bias, eps, shift, silu)
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
