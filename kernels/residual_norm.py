"""LayerNorm over the last axis, optionally of a residual sum that it also writes: the transformer block's
``x = x + attn(...)`` followed by the next ``norm(x)`` in one pass.

    s = x + delta          (rounded to x's dtype: the residual stream, as torch's add stores it)
    y = (s - mean(s)) / sqrt(var(s) + eps) · weight + bias

Why: an SDXL transformer block runs three LayerNorms and three residual adds over its tokens; torch's LayerNorm
kernel stays well below the memory bandwidth on SDXL's 640- and 1280-wide rows (under CUDA graphs this kernel takes
about half its time), and each add reads the sum back for the norm after it. Fused, a pair reads x and delta once
and writes s and y once (4 passes instead of 5).
Rows of any float dtype; statistics and arithmetic in fp32 (two-pass over the row held in registers), one
rounding at the output.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import tl, triton

TILE = 4096  # elements per program: rows of up to this width, several narrow rows together
WARPS = 4


def layer_norm_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def add_layer_norm_reference(x: Tensor, delta: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                             eps: float) -> tuple[Tensor, Tensor]:
    """(x + delta, layer_norm(x + delta)) with torch's ops."""
    s = x + delta
    return s, layer_norm_reference(s, weight, bias, eps)


@triton.jit
def _layer_norm_kernel(X, DELTA, W, B, S, Y, rows, width, eps, HAS_DELTA: tl.constexpr, HAS_AFFINE: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK)
    c_ok = c < width
    ok = (r < rows)[:, None] & c_ok[None, :]
    at = r[:, None].to(tl.int64) * width + c[None, :]
    x = tl.load(X + at, mask=ok, other=0.0)
    if HAS_DELTA:
        s = (x.to(tl.float32) + tl.load(DELTA + at, mask=ok, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + at, s, mask=ok)
        x = s
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / width
    centred = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / width + eps)
    y = centred * rstd[:, None]
    if HAS_AFFINE:
        y = y * tl.load(W + c, mask=c_ok, other=1.0).to(tl.float32)[None, :] \
            + tl.load(B + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + at, y.to(Y.dtype.element_ty), mask=ok)


def supports(x: Tensor) -> bool:
    """Rows the kernel holds in one tile."""
    return x.shape[-1] <= TILE and x.dtype != torch.float64


def _launch(x: Tensor, delta: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float
            ) -> tuple[Optional[Tensor], Tensor]:
    if (weight is None) != (bias is None):
        raise ValueError("give both weight and bias (affine) or neither")
    width = x.shape[-1]
    x = x.contiguous()
    rows = x.numel() // width
    block = triton.next_power_of_2(width)
    per_program = max(1, min(TILE // block, triton.next_power_of_2(rows)))
    s = torch.empty_like(x) if delta is not None else None
    y = torch.empty_like(x)
    has_affine = weight is not None
    _layer_norm_kernel[(triton.cdiv(rows, per_program),)](
        x, delta.contiguous() if delta is not None else x, weight if has_affine else x, bias if has_affine else x,
        s if s is not None else y, y, rows, width, eps, HAS_DELTA=delta is not None, HAS_AFFINE=has_affine,
        ROWS=per_program, BLOCK=block, num_warps=WARPS if block * per_program >= 4096 else 4)
    return s, y


def layer_norm_triton(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """The kernel: layer_norm(x) over the last axis, contiguous output."""
    return _launch(x, None, weight, bias, eps)[1]


def add_layer_norm_triton(x: Tensor, delta: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
                          ) -> tuple[Tensor, Tensor]:
    """The kernel: (x + delta, layer_norm(x + delta)), both contiguous; x and delta of one shape and dtype."""
    if delta.shape != x.shape or delta.dtype != x.dtype:
        raise ValueError(f"delta must match x: {tuple(x.shape)} {x.dtype}, got {tuple(delta.shape)} {delta.dtype}")
    s, y = _launch(x, delta, weight, bias, eps)
    return s, y
