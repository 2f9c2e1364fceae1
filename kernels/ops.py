"""The Triton kernels as torch custom operators (``torch.ops.omg.*``), so ``torch.compile`` understands them.

Why: dynamo cannot trace the kernels' Python launchers (data-dependent checks, ``triton.cdiv`` on shapes, the
launch itself), and tracing a user-defined Triton kernel specialises its integer arguments. An opaque custom op
with a fake (meta) function is one node in the graph: ``torch.compile(unet, fullgraph=True)`` traces the UNet
around it, inductor calls it at run time, and the fake function tells the compiler each output's shape, dtype
and strides (they must equal the real ones: the output layout is fixed below for both devices).

Each op has one implementation for every device: the Triton kernel where it runs (``runs_triton``: CUDA tensors,
triton installed, OMG_DISABLE_TRITON not "1", shapes/dtypes the kernel supports), else the PyTorch reference. So
the ops run everywhere, and on CPU they are the references bit for bit. ``TRITON_ON_CPU`` is a test switch:
under TRITON_INTERPRET=1 the Triton kernels run on CPU tensors through the same ops.

The ops have no autograd: kernels/__init__ calls the references directly when a tensor needs a gradient.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from kernels import cross_attention as _ca
from kernels import ffn as _ffn
from kernels import fp8 as _fp8
from kernels import norm as _norm
from kernels import residual_norm as _ln
from kernels._triton import HAS_TRITON

TRITON_ON_CPU = False  # tests only: run the kernels on CPU tensors (meaningful under TRITON_INTERPRET=1)


def runs_triton(*tensors: Optional[Tensor]) -> bool:
    """Whether the Triton kernel runs for these (real, not fake) tensors."""
    if not HAS_TRITON or os.environ.get("OMG_DISABLE_TRITON", "") == "1":
        return False
    given = [t for t in tensors if t is not None]
    return all(t.is_cuda or (TRITON_ON_CPU and t.device.type == "cpu") for t in given)


def _sdpa_layout(batch: int, heads: int, n: int, d: int, like: Tensor) -> Tensor:
    """An empty (B, h, N, d) tensor laid out (B, N, h, d) like torch SDPA's and the kernel's output, so
    Attention.out's "b h n d -> b n (h d)" is a view."""
    return torch.empty(batch, n, heads, d, device=like.device, dtype=like.dtype).transpose(1, 2)


def _in_sdpa_layout(t: Tensor) -> Tensor:
    """t (B, h, N, d) copied into the kernel's layout (the references return contiguous tensors)."""
    out = _sdpa_layout(*t.shape, like=t)
    out.copy_(t)
    return out


def _empty_maps(like: Tensor) -> Tensor:
    """The stand-in for "no map store" (a custom op returns tensors, not None)."""
    return like.new_empty(0, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------ group norm

@torch.library.custom_op("omg::group_norm", mutates_args=())
def group_norm(x: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               shift: Optional[Tensor], silu: bool) -> Tensor:
    """silu(GroupNorm(x + shift)); output laid out as kernels.norm.memory_format_of(x) (channels-last in, out)."""
    if runs_triton(x, weight, bias, shift) and x.dtype != torch.float64:
        return _norm.group_norm_triton(x, groups, weight, bias, eps, shift, silu)
    # the values of contiguous input whatever the layout (torch's CPU channels-last GroupNorm sums another way)
    out = _norm.group_norm_reference(x.contiguous(), groups, weight, bias, eps, shift, silu)
    return out.contiguous(memory_format=_norm.memory_format_of(x))


@group_norm.register_fake
def _(x: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
      shift: Optional[Tensor], silu: bool) -> Tensor:
    return torch.empty_like(x, memory_format=_norm.memory_format_of(x))


# ------------------------------------------------------------------------------------------ layer norm

@torch.library.custom_op("omg::layer_norm", mutates_args=())
def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """LayerNorm over the last axis; contiguous output."""
    if runs_triton(x, weight, bias) and _ln.supports(x):
        return _ln.layer_norm_triton(x, weight, bias, eps)
    return _ln.layer_norm_reference(x, weight, bias, eps).contiguous()


@layer_norm.register_fake
def _(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("omg::add_layer_norm", mutates_args=())
def add_layer_norm(x: Tensor, delta: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
                   ) -> tuple[Tensor, Tensor]:
    """(x + delta, LayerNorm(x + delta)); contiguous outputs."""
    if runs_triton(x, delta, weight, bias) and _ln.supports(x) and delta.shape == x.shape \
            and delta.dtype == x.dtype:
        return _ln.add_layer_norm_triton(x, delta, weight, bias, eps)
    s, y = _ln.add_layer_norm_reference(x, delta, weight, bias, eps)
    return s.contiguous(), y.contiguous()


@add_layer_norm.register_fake
def _(x: Tensor, delta: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
      ) -> tuple[Tensor, Tensor]:
    shape = torch.broadcast_shapes(x.shape, delta.shape)
    dtype = torch.promote_types(x.dtype, delta.dtype)
    return x.new_empty(shape, dtype=dtype), x.new_empty(shape, dtype=dtype)


# ----------------------------------------------------------------------------------------------- GEGLU

@torch.library.custom_op("omg::geglu", mutates_args=())
def geglu(h: Tensor) -> Tensor:
    """a · gelu(g) of h = [a, g]; contiguous output."""
    if runs_triton(h) and h.dtype != torch.float64:
        return _ffn.geglu_triton(h)
    return _ffn.geglu_reference(h).contiguous()


@geglu.register_fake
def _(h: Tensor) -> Tensor:
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


# ------------------------------------------------------------------------------------------------ FP8

@torch.library.custom_op("omg::quantize_fp8_rows", mutates_args=())
def quantize_fp8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x_q e4m3 (M, K), scale fp32 (M, 1)) of x (M, K): each row scaled by its amax / 448."""
    if runs_triton(x) and x.dtype != torch.float64 and x.shape[-1] <= _fp8.BLOCK:
        return _fp8.quantize_rows_triton(x)
    return _fp8.quantize_rows_reference(x)


@quantize_fp8_rows.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=_fp8.E4M3), x.new_empty(x.shape[0], 1, dtype=torch.float32)


# ------------------------------------------------------------------------------------------- attention

def _attention_kernel_runs(q: Tensor, k: Tensor, *others: Optional[Tensor]) -> bool:
    return runs_triton(q, k, *others) and _ca.supports(q, k)


@torch.library.custom_op("omg::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ/√d) v, output laid out as SDPA's."""
    if _attention_kernel_runs(q, k, v):
        return _ca.cross_attention_triton(q, k, v)
    return _in_sdpa_layout(_ca.cross_attention_reference(q, k, v))


@attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _sdpa_layout(*q.shape, like=q)


@torch.library.custom_op("omg::capture", mutates_args=("heat",))
def capture(q: Tensor, k: Tensor, v: Tensor, row_start: int, row_stop: int, map_format: Optional[str],
            tokens: Optional[Tensor], heat: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(out, maps) of kernels.capture; heat (given whenever tokens are) is accumulated in place; maps is empty
    when map_format is None."""
    rows = slice(row_start, row_stop)
    if _attention_kernel_runs(q, k, v, heat):
        captured = _ca.capture_triton(q, k, v, rows, map_format, tokens, heat)
        out = captured.out
    else:
        captured = _ca.capture_reference(q, k, v, rows, map_format, tokens, heat)
        out = _in_sdpa_layout(captured.out)
    return out, captured.maps if captured.maps is not None else _empty_maps(q)


def _fake_maps(q: Tensor, k: Tensor, row_start: int, row_stop: int, map_format: Optional[str]) -> Tensor:
    if map_format is None:
        return _empty_maps(q)
    return q.new_empty(row_stop - row_start, q.shape[1], q.shape[2], k.shape[2],
                       dtype=torch.bfloat16 if map_format == "bf16" else torch.uint8)


@capture.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, row_start: int, row_stop: int, map_format: Optional[str],
      tokens: Optional[Tensor], heat: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _sdpa_layout(*q.shape, like=q), _fake_maps(q, k, row_start, row_stop, map_format)


@torch.library.custom_op("omg::capture_maps", mutates_args=("heat",))
def capture_maps(q: Tensor, k: Tensor, row_start: int, row_stop: int, map_format: Optional[str],
                 tokens: Optional[Tensor], heat: Optional[Tensor]) -> Tensor:
    """The maps of kernels.capture_maps (empty when map_format is None); heat accumulated in place."""
    rows = slice(row_start, row_stop)
    if _attention_kernel_runs(q, k, heat):
        captured = _ca.capture_maps_triton(q, k, rows, map_format, tokens, heat)
    else:
        captured = _ca.capture_maps_reference(q, k, rows, map_format, tokens, heat)
    return captured.maps if captured.maps is not None else _empty_maps(q)


@capture_maps.register_fake
def _(q: Tensor, k: Tensor, row_start: int, row_stop: int, map_format: Optional[str], tokens: Optional[Tensor],
      heat: Optional[Tensor]) -> Tensor:
    return _fake_maps(q, k, row_start, row_stop, map_format)


@torch.library.custom_op("omg::replay", mutates_args=())
def replay(q: Tensor, k: Tensor, v: Tensor, maps: Tensor, row_start: int, row_stop: int) -> Tensor:
    """Rows [row_start, row_stop) attend with the stored maps, the others plainly; SDPA's layout."""
    rows = slice(row_start, row_stop)
    if _attention_kernel_runs(q, k, v, maps):
        return _ca.replay_triton(q, k, v, maps, rows)
    return _in_sdpa_layout(_ca.replay_reference(q, k, v, maps, rows))


@replay.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, maps: Tensor, row_start: int, row_stop: int) -> Tensor:
    return _sdpa_layout(*q.shape, like=q)


@torch.library.custom_op("omg::replay_maps", mutates_args=())
def replay_maps(maps: Tensor, v: Tensor) -> Tensor:
    """decode(maps) · v: (R, h, N, T), (R, h, T, d) -> (R, h, N, d) in SDPA's layout."""
    if _attention_kernel_runs(v, v, maps):
        return _ca.replay_maps_triton(maps, v)
    return _in_sdpa_layout(_ca.replay_maps_reference(maps, v))


@replay_maps.register_fake
def _(maps: Tensor, v: Tensor) -> Tensor:
    return _sdpa_layout(maps.shape[0], maps.shape[1], maps.shape[2], v.shape[3], like=v)
