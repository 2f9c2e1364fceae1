"""GEGLU's gate in one pass: the FeedForward projection's output h = [a, g] (last axis) -> a · gelu(g).

    gelu(g) = g/2 · (1 + erf(g/√2))            (exact GELU, torch's default; Shazeer 2020 for GEGLU)

Why: torch runs gelu(g) and a · (that) as two kernels over SDXL's widest activations (5120 and 2560 channels
per token), 5.5 of a 42.7 ms batch-2 UNet forward on an H100 (bench/profile.py); one kernel reads h once and
writes the product once. fp32 arithmetic, one rounding at the output (torch rounds gelu(g) first: the two
differ by about one unit in the last place).

With a LowRankRows delta (a grouped concept LoRA on the projection, omg.lora.grouped) the kernel adds it to the
concept rows of h as it reads them: each tile's [BLOCK_M, R] x [R, BLOCK_N] products for a and g, accumulated in
fp32 on top of h. That removes a read and a write of h (the projection's 5120/10240-wide output) per concept row,
which cuBLAS's beta = 1 GEMM spends otherwise; h + delta is not rounded before the gate.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import tl, triton
from kernels.low_rank import LowRankRows, block_rows

BLOCK_M, BLOCK_N = 32, 128  # output tile: rows x gate columns
DELTA_BLOCK_N = 64  # with a delta: two [BLOCK_M, R] x [R, 64] products per tile besides the loads


def geglu_reference(h: Tensor, delta: Optional[LowRankRows] = None) -> Tensor:
    """a · gelu(g) of h = [a, g]; with a delta, of h + delta (its rows of the flattened h, in fp32)."""
    if delta is not None:
        low, up, first = delta
        n, p = low.shape[:2]
        flat = h.reshape(-1, h.shape[-1]).to(torch.float32, copy=True)
        flat[first:first + n * p] += torch.bmm(low.float(), up.float()).reshape(n * p, -1)
        return geglu_reference(flat.reshape(h.shape)).to(h.dtype)
    a, gate = h.chunk(2, dim=-1)
    return a * F.gelu(gate)


@triton.jit
def _geglu_kernel(H, Y, LOW, UP, rows, width, first_row, block, rank, HAS_DELTA: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < width
    ok = (r < rows)[:, None] & c_ok[None, :]
    at = r.to(tl.int64)[:, None] * (2 * width) + c[None, :]
    a = tl.load(H + at, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(H + at + width, mask=ok, other=0.0).to(tl.float32)
    if HAS_DELTA:
        if pid_m * BLOCK_M >= first_row:  # a tile of a concept block (tiles never straddle blocks)
            j = (pid_m * BLOCK_M - first_row) // block
            k = tl.arange(0, BLOCK_R)
            k_ok = k < rank
            low = tl.load(LOW + (r - first_row).to(tl.int64)[:, None] * rank + k[None, :],
                          mask=(r < rows)[:, None] & k_ok[None, :], other=0.0)
            up_at = UP + j.to(tl.int64) * rank * (2 * width) + k[:, None] * (2 * width) + c[None, :]
            up_ok = k_ok[:, None] & c_ok[None, :]
            a = tl.dot(low, tl.load(up_at, mask=up_ok, other=0.0), acc=a)
            g = tl.dot(low, tl.load(up_at + width, mask=up_ok, other=0.0), acc=g)
    y = a * (0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)))
    tl.store(Y + r.to(tl.int64)[:, None] * width + c[None, :], y.to(Y.dtype.element_ty), mask=ok)


def supports_delta(h: Tensor, delta: LowRankRows) -> bool:
    low, up, first = delta
    return (low.is_contiguous() and up.is_contiguous() and low.dtype == up.dtype == h.dtype
            and h.dtype in (torch.float16, torch.bfloat16) and block_rows(first, low.shape[1], BLOCK_M) > 0)


def geglu_triton(h: Tensor, delta: Optional[LowRankRows] = None) -> Tensor:
    """The kernel; h (..., 2F) -> (..., F)."""
    if h.shape[-1] % 2:
        raise ValueError(f"GEGLU needs an even last axis, got {h.shape[-1]}")
    h = h.contiguous()
    width = h.shape[-1] // 2
    y = torch.empty(*h.shape[:-1], width, device=h.device, dtype=h.dtype)
    rows = y.numel() // width if width else 0
    if delta is None:
        grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(width, BLOCK_N))
        _geglu_kernel[grid](h, y, h, h, rows, width, 0, 1, 1, HAS_DELTA=False, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                            BLOCK_R=16, num_warps=4)
        return y
    low, up, first = delta
    bm = block_rows(first, low.shape[1], BLOCK_M)
    grid = (triton.cdiv(rows, bm), triton.cdiv(width, DELTA_BLOCK_N))
    _geglu_kernel[grid](h, y, low, up, rows, width, first, low.shape[1], low.shape[2], HAS_DELTA=True,
                        BLOCK_M=bm, BLOCK_N=DELTA_BLOCK_N, BLOCK_R=max(16, triton.next_power_of_2(low.shape[2])),
                        num_warps=4)
    return y
