"""Triton kernels for OMG, each beside its PyTorch reference, and the dispatch between them.

Modules: kernels.cross_attention (fused short-key attention: plain, capture, replay), kernels.blend,
kernels.norm, kernels.residual_norm and kernels.ffn (the UNet's GroupNorm(+SiLU), residual add + LayerNorm and
GEGLU, fused), kernels.fp8 (e4m3 matmuls with per-row scales: the activations' quantisation fused).

The functions here call the custom ops of kernels.ops (torch.ops.omg.*, which torch.compile traces as single
nodes): each runs the Triton kernel when every tensor is on CUDA, triton imports, the kernel supports the
shapes/dtypes, and OMG_DISABLE_TRITON is not "1", otherwise the reference (CPU fallback, test oracle). Under
autograd (a tensor needs a gradient) the references run directly, as the kernels have no backward.

    attention(q, k, v)                                         softmax(q kᵀ/√d) v, T ≤ 256 keys in one tile
    capture(q, k, v, rows, map_format, tokens, heat)           -> Captured(out, maps, heat)
    capture_maps(q, k, rows, map_format, tokens, heat)         -> Captured(None, maps, heat): no output
    replay(q, k, v, maps, rows)                                rows attend with stored maps, others plainly
    replay_maps(maps, v)                                       decode(maps) · v
    blend_guided(base_u, base_c, concept_eps, masks, g)        OMG masked blend + CFG in one pass
    blend_eps(base_u, base_c, concept_eps, masks)              the blended halves (for rescaled guidance)
    group_norm(x, groups, weight, bias, eps, shift, silu)      silu(GroupNorm(x + shift)), two passes
    norm_act(norm, x, shift, silu)                             the same for an nn.GroupNorm
    layer_norm(norm, x)                                        an nn.LayerNorm's output, one pass
    add_layer_norm(norm, x, delta)                             (x + delta, norm(x + delta)) in one pass
    geglu(h)                                                   a · gelu(g) of h = [a, g] in one pass
    quantize_rows(x)                                           (e4m3 x / scale, scale = row amax / 448), one pass
    fp8_linear(x, w_q, w_scale, bias)                          x wᵀ + b as an e4m3 GEMM (w from quantize_weight)
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from kernels import blend as _blend
from kernels import cross_attention as _ca
from kernels import ops as _ops  # noqa: F401 (registers torch.ops.omg.*)
from kernels._triton import HAS_TRITON
from kernels.blend import ConceptEps, blend_eps_reference, blend_guided_reference, stack_concepts
from kernels.cross_attention import (LOG8_STEP, MAP_FORMATS, Captured, capture_maps_reference, capture_reference,
                                     cross_attention_reference, decode_maps, encode_maps, replay_maps_reference,
                                     replay_reference, supports)
from kernels.ffn import geglu_reference
from kernels.fp8 import fp8_matmul, fp8_matmul_reference, quantize_rows_reference, quantize_weight
from kernels.norm import group_norm_reference
from kernels.residual_norm import add_layer_norm_reference, layer_norm_reference

__all__ = ["HAS_TRITON", "LOG8_STEP", "MAP_FORMATS", "Captured", "use_triton", "supports", "attention", "capture",
           "capture_maps", "replay", "replay_maps", "blend_guided", "blend_eps", "decode_maps", "encode_maps",
           "cross_attention_reference", "capture_reference", "capture_maps_reference", "replay_reference",
           "replay_maps_reference", "blend_guided_reference", "blend_eps_reference", "group_norm", "norm_act", "geglu",
           "layer_norm", "add_layer_norm", "layer_norm_reference", "add_layer_norm_reference", "group_norm_reference",
           "geglu_reference", "quantize_rows", "quantize_rows_reference", "quantize_weight", "fp8_linear", "fp8_matmul",
           "fp8_matmul_reference"]


def use_triton(*tensors: Optional[Tensor]) -> bool:
    """True when triton imports, OMG_DISABLE_TRITON is not "1", every given tensor is on CUDA and none needs a
    gradient (the kernels have no backward: under autograd the references run, so training gets gradients)."""
    if not HAS_TRITON or os.environ.get("OMG_DISABLE_TRITON", "") == "1":
        return False
    given = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in given):
        return False
    return all(t.is_cuda for t in given)


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records this call: then the references run (the custom ops have no backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ/√d) v: (B, h, N, d), (B, h, T, d) x2 -> (B, h, N, d)."""
    if _needs_grad(q, k, v):
        return cross_attention_reference(q, k, v)
    return torch.ops.omg.attention(q, k, v)


def _heat_for(q: Tensor, rows: slice, tokens: Optional[Tensor], heat: Optional[Tensor]) -> Optional[Tensor]:
    """The heat accumulator the op adds into: a new zero one when tokens come without it."""
    if tokens is None or heat is not None:
        return heat
    return torch.zeros(rows.stop - rows.start, q.shape[2], tokens.numel(), device=q.device, dtype=torch.float32)


def _maps_or_none(maps: Tensor, map_format: Optional[str]) -> Optional[Tensor]:
    return None if map_format is None else maps


def capture(q: Tensor, k: Tensor, v: Tensor, rows: slice, map_format: Optional[str] = None,
            tokens: Optional[Tensor] = None, heat: Optional[Tensor] = None) -> Captured:
    """Attention of every row and, for the batch rows `rows` (R of them): the map store (R, h, N, T) in
    `map_format` ("bf16", "log8" or None for none) and heat (R, N, n_tok) += head-mean probs[..., tokens]
    (heat: a float32 accumulator, created when None and tokens are given)."""
    if _needs_grad(q, k, v):
        return capture_reference(q, k, v, rows, map_format, tokens, heat)
    rows = _ca._check_rows(rows, q.shape[0])
    heat = _heat_for(q, rows, tokens, heat)
    out, maps = torch.ops.omg.capture(q, k, v, rows.start, rows.stop, map_format, tokens, heat)
    return Captured(out, _maps_or_none(maps, map_format), heat)


def capture_maps(q: Tensor, k: Tensor, rows: slice, map_format: Optional[str] = None,
                 tokens: Optional[Tensor] = None, heat: Optional[Tensor] = None) -> Captured:
    """capture's map store and heat without the attention output (Captured.out is None): one pass over the
    rows' queries and keys only, for a caller that keeps torch SDPA's output bit for bit."""
    if _needs_grad(q, k):
        return capture_maps_reference(q, k, rows, map_format, tokens, heat)
    rows = _ca._check_rows(rows, q.shape[0])
    heat = _heat_for(q, rows, tokens, heat)
    maps = torch.ops.omg.capture_maps(q, k, rows.start, rows.stop, map_format, tokens, heat)
    return Captured(None, _maps_or_none(maps, map_format), heat)


def replay(q: Tensor, k: Tensor, v: Tensor, maps: Tensor, rows: slice) -> Tensor:
    """Rows `rows` attend with the stored maps (out = decode(maps) · v), the other rows plainly."""
    if _needs_grad(q, k, v, maps):
        return replay_reference(q, k, v, maps, rows)
    rows = _ca._check_rows(rows, q.shape[0])
    return torch.ops.omg.replay(q, k, v, maps, rows.start, rows.stop)


def replay_maps(maps: Tensor, v: Tensor) -> Tensor:
    """decode(maps) · v: (R, h, N, T), (R, h, T, d) -> (R, h, N, d)."""
    if _needs_grad(maps, v):
        return replay_maps_reference(maps, v)
    return torch.ops.omg.replay_maps(maps, v)


def _blend_on_gpu(base_u: Tensor, base_c: Tensor, concepts: Tensor, masks: Tensor) -> bool:
    """The kernel reads float32 predictions (masks of any float dtype)."""
    return (use_triton(base_u, base_c, concepts, masks) and masks.is_floating_point()
            and all(t.dtype == torch.float32 for t in (base_u, base_c, concepts)))


def blend_guided(base_u: Tensor, base_c: Tensor, concept_eps: ConceptEps, masks: Tensor, guidance: float) -> Tensor:
    """eps_u + g (eps_c - eps_u) of the masked blends eps = (1 - Σ M_i) base + Σ M_i eps_i; float32 (1, C, H, W)."""
    concepts = stack_concepts(concept_eps, base_u)
    if _blend_on_gpu(base_u, base_c, concepts, masks):
        return _blend.blend_guided_triton(base_u, base_c, concepts, masks, guidance)
    return blend_guided_reference(base_u, base_c, concepts, masks, guidance)


def blend_eps(base_u: Tensor, base_c: Tensor, concept_eps: ConceptEps, masks: Tensor) -> tuple[Tensor, Tensor]:
    """The masked blends (eps_u, eps_c) of both halves."""
    concepts = stack_concepts(concept_eps, base_u)
    if _blend_on_gpu(base_u, base_c, concepts, masks):
        return _blend.blend_eps_triton(base_u, base_c, concepts, masks)
    return blend_eps_reference(base_u, base_c, concepts, masks)


def group_norm(x: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               shift: Optional[Tensor] = None, silu: bool = False) -> Tensor:
    """silu(GroupNorm(x + shift)) (shift (B, C) and silu optional) for x (B, C, *spatial)."""
    if _needs_grad(x, weight, bias, shift):
        return group_norm_reference(x, groups, weight, bias, eps, shift, silu)
    return torch.ops.omg.group_norm(x, groups, weight, bias, eps, shift, silu)


def geglu(h: Tensor) -> Tensor:
    """a · gelu(g) for h = [a, g] along the last axis."""
    if _needs_grad(h):
        return geglu_reference(h)
    return torch.ops.omg.geglu(h)


def norm_act(norm: torch.nn.GroupNorm, x: Tensor, shift: Optional[Tensor] = None, silu: bool = True) -> Tensor:
    """silu(norm(x + shift[:, :, None, None])) for an nn.GroupNorm `norm` (shift and silu optional)."""
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, shift, silu)


def layer_norm(norm: torch.nn.LayerNorm, x: Tensor) -> Tensor:
    """norm(x) for an nn.LayerNorm over the last axis."""
    if len(norm.normalized_shape) != 1:
        return norm(x)
    if _needs_grad(x, norm.weight, norm.bias):
        return layer_norm_reference(x, norm.weight, norm.bias, norm.eps)
    return torch.ops.omg.layer_norm(x, norm.weight, norm.bias, norm.eps)


def add_layer_norm(norm: torch.nn.LayerNorm, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """(x + delta, norm(x + delta)): a residual add and the LayerNorm after it."""
    if len(norm.normalized_shape) != 1:
        s = x + delta
        return s, norm(s)
    if _needs_grad(x, delta, norm.weight, norm.bias):
        return add_layer_norm_reference(x, delta, norm.weight, norm.bias, norm.eps)
    return torch.ops.omg.add_layer_norm(x, delta, norm.weight, norm.bias, norm.eps)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) -> (x_q (M, K) float8_e4m3fn, scale (M, 1) fp32) with x ≈ x_q · scale, scale = row amax / 448."""
    return torch.ops.omg.quantize_fp8_rows(x)


def fp8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x (..., K) @ wᵀ + bias in e4m3 with per-token and per-output-channel scales, in x's dtype; (w_q, w_scale) from
    quantize_weight(w). torch._scaled_mm on sm89+ GPUs, elsewhere the dequantised formulation (fp32)."""
    x2 = x.reshape(-1, x.shape[-1])
    x_q, x_scale = quantize_rows(x2)
    return fp8_matmul(x_q, x_scale, w_q, w_scale, bias, x.dtype).reshape(*x.shape[:-1], w_q.shape[0])
