"""Concept LoRA deltas on row blocks of a layer's output (omg.lora.grouped), added in one pass.

A grouped call lays its rows out as [base rows | concept 0's rows | concept 1's rows | ...], each concept block P
rows long (rows = batch rows x tokens, flattened). Concept j's delta is low_j @ up_j, with low_j = x_j @ down_j
computed beforehand (low (n, P, R), up (n, R, N)):

    out[first_row + j P : first_row + (j + 1) P] += low_j @ up_j

Why: cuBLAS's batched GEMM with beta = 1 (baddbmm_) reads and writes the layer output at about half the memory
bandwidth at SDXL's shapes (K = R = 64 leaves its tiles nothing to overlap the output traffic with). Here each
program loads one output tile, adds its [BLOCK_M, R] x [R, BLOCK_N] product (fp32 accumulation) and stores it.
A tile never straddles two blocks: BLOCK_M divides P and first_row (``block_rows``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kernels._triton import tl, triton

BLOCK_N = 128
MAX_BLOCK_M = 64


class LowRankRows(NamedTuple):
    """A low-rank delta for row blocks of a layer output: rows [first_row + j P, first_row + (j + 1) P) of the
    flattened (rows, N) output get low[j] @ up[j]; low (n, P, R), up (n, R, N)."""
    low: Tensor
    up: Tensor
    first_row: int


def block_rows(first_row: int, block: int, cap: int = MAX_BLOCK_M) -> int:
    """The tile height: the largest power of two <= cap dividing both first_row and the block length (0 when it
    is below 16, the smallest tl.dot tile: the reference runs then)."""
    m = cap
    while m >= 16 and (first_row % m or block % m):
        m //= 2
    return m if m >= 16 else 0


def add_low_rank_reference(out: Tensor, delta: LowRankRows) -> None:
    """out (rows, N) += the delta, in place, with torch's batched GEMM."""
    low, up, first = delta
    n, p = low.shape[:2]
    out[first:first + n * p].view(n, p, -1).baddbmm_(low, up)


@triton.jit
def _add_low_rank_kernel(OUT, LOW, UP, first_row, block, width, rank,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    j = (pid_m * BLOCK_M) // block  # the concept of this tile
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of the concept blocks
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_R)
    c_ok, k_ok = c < width, k < rank
    low = tl.load(LOW + r.to(tl.int64)[:, None] * rank + k[None, :], mask=k_ok[None, :], other=0.0)
    up = tl.load(UP + j.to(tl.int64) * rank * width + k[:, None] * width + c[None, :],
                 mask=k_ok[:, None] & c_ok[None, :], other=0.0)
    at = (first_row + r).to(tl.int64)[:, None] * width + c[None, :]
    o = tl.load(OUT + at, mask=c_ok[None, :], other=0.0)
    acc = tl.dot(low, up, acc=o.to(tl.float32))
    tl.store(OUT + at, acc.to(OUT.dtype.element_ty), mask=c_ok[None, :])


def supports(out: Tensor, delta: LowRankRows) -> bool:
    low, up, first = delta
    return (out.dim() == 2 and out.is_contiguous() and low.is_contiguous() and up.is_contiguous()
            and low.dtype == up.dtype == out.dtype and out.dtype in (torch.float16, torch.bfloat16)
            and block_rows(first, low.shape[1]) > 0)


def add_low_rank_triton(out: Tensor, delta: LowRankRows) -> None:
    low, up, first = delta
    n, p, rank = low.shape
    width = out.shape[1]
    bm = block_rows(first, p)
    grid = (n * p // bm, triton.cdiv(width, BLOCK_N))
    _add_low_rank_kernel[grid](out, low, up, first, p, width, rank, BLOCK_M=bm, BLOCK_N=BLOCK_N,
                               BLOCK_R=max(16, triton.next_power_of_2(rank)), num_warps=4)
