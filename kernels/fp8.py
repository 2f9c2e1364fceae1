"""FP8 (e4m3) matmuls with per-row scales: the activations quantised per token in one pass, the weights per
output channel once.

    scale_a[m] = max(amax_k |x[m, k]|, MIN_AMAX) · (1/448)      x_q = e4m3(x · (1 / scale_a))    (M, K)
    scale_b[n] = max(amax_k |w[n, k]|, MIN_AMAX) · (1/448)      w_q = e4m3(w · (1 / scale_b))    (N, K)
    y = (x_q · scale_a) (w_q · scale_b)ᵀ + bias                                                  (M, N)

448 is e4m3fn's largest finite value, so each row's largest entry maps onto it (to an fp32 rounding: the scale is
a product with fp32(1/448), which the kernel and torch round alike on every device, whereas torch's CUDA division
by a scalar is itself such a product, so a quotient would differ between devices); entries are multiplied by the
row's reciprocal (one IEEE division a row, not one an entry: it halved the kernel's time on an H200).
Why the kernel: the activation's quantisation is a row amax, a division and a cast; torch runs them as several
passes over x (with fp32 temporaries), the kernel reads x once and writes x_q and scale_a. The matmul is
torch._scaled_mm with rowwise scales (cuBLASLt on sm89+: H100, H200), fp32 accumulation, the scales and the bias
applied in its epilogue; elsewhere (CPU, older GPUs) it is the dequantised formulation above in fp32
(`fp8_matmul_reference`), which is also the tests' oracle.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from kernels._triton import tl, triton

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
INV_E4M3_MAX = 1.0 / E4M3_MAX
MIN_AMAX = 1e-12  # a zero row gets this amax: its scale stays finite and x_q is zero
MULTIPLE = 16  # _scaled_mm needs K and N multiples of 16 (the layers that are not stay 16-bit: omg.fp8)
BLOCK = 8192  # elements per program (rows x the row width rounded up to a power of 2)


def quantize_rows_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) -> (x_q (M, K) e4m3, scale (M, 1) fp32), fp32 arithmetic."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_AMAX) * INV_E4M3_MAX
    return (x32 * (1.0 / scale)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


@triton.jit
def _round_to_e4m3(v):
    """v (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, still fp32: the cast after it is exact.
    The GPU's cast (cvt.rn) rounds so itself (tested bit for bit against torch's); the interpreter's does not (it
    rounds ties up and drops the carry into the exponent: 126.5 -> 64), so there the rounding is spelled out."""
    bits = v.to(tl.int32, bitcast=True)
    sign = bits & -2147483648
    mag = bits & 2147483647
    # normal range (|v| >= 2^-6): keep 3 of fp32's 23 mantissa bits, ties to even (a carry moves the exponent)
    normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & -1048576
    # subnormal range: multiples of 2^-9, rounded to an integer count by the 2^23 trick (fp32 adds round to even)
    a = mag.to(tl.float32, bitcast=True)
    sub = (((a * 512.0 + 8388608.0) - 8388608.0) * 0.001953125).to(tl.int32, bitcast=True)
    return (tl.where(a < 0.015625, sub, normal) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_rows_kernel(X,  # pointer to the input (M, K), rows `stride_x` apart, unit column stride
                          Q,  # pointer to the e4m3 output (M, K), contiguous
                          SCALE,  # pointer to the fp32 scales (M,)
                          n_rows, n_cols, stride_x, min_amax, fp8_max, inv_fp8_max,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ROUND: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    ok = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), min_amax)
    scale = amax * inv_fp8_max
    inv = tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)  # IEEE, as torch's (Triton's / is approximate)
    q = tl.clamp(x * inv[:, None], -fp8_max, fp8_max)
    if ROUND:  # the interpreter (CPU tensors): its cast does not round to nearest even
        q = _round_to_e4m3(q)
    tl.store(Q + rows[:, None] * n_cols + cols[None, :], q.to(Q.dtype.element_ty), mask=ok)
    tl.store(SCALE + rows, scale, mask=rows < n_rows)


def quantize_rows_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel; x (M, K) with unit column stride, K <= BLOCK."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows takes (M, K), got {tuple(x.shape)}")
    n_rows, n_cols = x.shape
    block_k = triton.next_power_of_2(n_cols)
    if block_k > BLOCK:
        raise ValueError(f"rows of {n_cols} > {BLOCK} entries are not supported")
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty(n_rows, n_cols, device=x.device, dtype=E4M3)
    scale = torch.empty(n_rows, 1, device=x.device, dtype=torch.float32)
    block_m = BLOCK // block_k
    _quantize_rows_kernel[(triton.cdiv(n_rows, block_m),)](x, q, scale, n_rows, n_cols, x.stride(0), MIN_AMAX,
                                                           E4M3_MAX, INV_E4M3_MAX, BLOCK_M=block_m, BLOCK_K=block_k,
                                                           ROUND=not x.is_cuda, num_warps=4)
    return q, scale


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """A Linear's weight (N, K) -> (w_q (N, K) e4m3, scale (1, N) fp32): per output channel, once per weight."""
    q, scale = quantize_rows_reference(w.detach())
    return q.contiguous(), scale.reshape(1, -1).contiguous()


def fp8_matmul_reference(x_q: Tensor, scale_a: Tensor, w_q: Tensor, scale_b: Tensor, bias: Optional[Tensor],
                         out_dtype: torch.dtype) -> Tensor:
    """The dequantised formulation in fp32: (x_q scale_a) (w_q scale_b)ᵀ + bias, rounded once to out_dtype."""
    y = (x_q.float() * scale_a) @ (w_q.float() * scale_b.reshape(-1, 1)).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@lru_cache(maxsize=None)
def _sm89_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def scaled_mm_runs(x: Tensor) -> bool:
    """Whether torch._scaled_mm's fp8 GEMM runs for x: a CUDA tensor on an sm89+ GPU (Ada, Hopper, Blackwell)."""
    return x.is_cuda and hasattr(torch, "_scaled_mm") and _sm89_or_newer(x.device.index or 0)


def fp8_matmul(x_q: Tensor, scale_a: Tensor, w_q: Tensor, scale_b: Tensor, bias: Optional[Tensor],
               out_dtype: torch.dtype) -> Tensor:
    """(x_q scale_a) (w_q scale_b)ᵀ + bias: torch._scaled_mm on sm89+ GPUs, else the dequantised reference."""
    if scaled_mm_runs(x_q):
        if bias is not None and out_dtype == torch.float32:  # _scaled_mm takes a bias for 16-bit outputs only
            return torch._scaled_mm(x_q, w_q.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype) + bias
        return torch._scaled_mm(x_q, w_q.t(), scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype)
    return fp8_matmul_reference(x_q, scale_a, w_q, scale_b, bias, out_dtype)
