"""OMG's masked noise blending and classifier-free guidance in one pass.

    eps_u = (1 - Σ_i M_i) · base_u + Σ_i M_i · u_i          (same for the conditional half, c)
    eps   = eps_u + g · (eps_c - eps_u)                     (Ho & Salimans 2022)

base_u, base_c (1, C, H, W) float32 are the base model's halves, concept_eps (k, 2, C, H, W) the concepts'
[uncond, cond] predictions, masks (k, H, W). One program reads each input once per pixel block and writes one
output (or eps_u and eps_c for a caller that rescales guidance). Inference only.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from kernels._triton import tl, triton

ConceptEps = Union[Tensor, Sequence[Tensor], Sequence[tuple[Tensor, Tensor]]]


# ------------------------------------------------------------------------------------------------ kernel

@triton.jit
def _blend_kernel(
    BASE_U,  # (C, HW) contiguous float32: base model, unconditional half
    BASE_C,  # (C, HW) contiguous float32: base model, conditional half
    CONCEPTS,  # (k, 2, C, HW) contiguous float32: each concept's [uncond, cond]
    MASKS,  # (k, HW) contiguous float32
    OUT_A,  # (C, HW) float32: guided eps (GUIDED) or eps_u
    OUT_B,  # (C, HW) float32: eps_c (not GUIDED)
    HW, C, n_concepts,
    guidance,  # g of classifier-free guidance
    GUIDED: tl.constexpr,
    BLOCK: tl.constexpr,  # pixels per program
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < HW
    union = tl.zeros((BLOCK,), tl.float32)
    for i in range(n_concepts):
        union += tl.load(MASKS + i * HW + offs, mask=ok, other=0.0)
    keep = 1.0 - union
    for c in range(C):
        eps_u = keep * tl.load(BASE_U + c * HW + offs, mask=ok, other=0.0)
        eps_c = keep * tl.load(BASE_C + c * HW + offs, mask=ok, other=0.0)
        for i in range(n_concepts):
            m = tl.load(MASKS + i * HW + offs, mask=ok, other=0.0)  # an L1 hit after the union pass
            eps_u += m * tl.load(CONCEPTS + ((2 * i) * C + c) * HW + offs, mask=ok, other=0.0)
            eps_c += m * tl.load(CONCEPTS + ((2 * i + 1) * C + c) * HW + offs, mask=ok, other=0.0)
        if GUIDED:
            tl.store(OUT_A + c * HW + offs, eps_u + guidance * (eps_c - eps_u), mask=ok)
        else:
            tl.store(OUT_A + c * HW + offs, eps_u, mask=ok)
            tl.store(OUT_B + c * HW + offs, eps_c, mask=ok)


# ---------------------------------------------------------------------------------------------- launcher

def _launch(base_u: Tensor, base_c: Tensor, concepts: Tensor, masks: Tensor, guidance: float,
            guided: bool) -> tuple[Tensor, Tensor]:
    _, C, H, W = base_u.shape
    hw = H * W
    base_u, base_c, concepts, masks = (t.contiguous() for t in (base_u, base_c, concepts, masks))
    out_a = torch.empty_like(base_u)
    out_b = out_a if guided else torch.empty_like(base_c)
    block = min(1024, max(128, triton.next_power_of_2(hw)))
    _blend_kernel[(triton.cdiv(hw, block),)](base_u, base_c, concepts, masks, out_a, out_b, hw, C,
                                              masks.shape[0], float(guidance), GUIDED=guided, BLOCK=block,
                                              num_warps=4)
    return out_a, out_b


def stack_concepts(concept_eps: ConceptEps, like: Tensor) -> Tensor:
    """(k, 2, C, H, W) from a tensor of that shape, a list of (2, C, H, W) or of (u, c) pairs of (1, C, H, W)."""
    if isinstance(concept_eps, Tensor):
        return concept_eps
    items = [torch.cat(list(e)) if isinstance(e, (tuple, list)) else e for e in concept_eps]
    if not items:
        return like.new_zeros(0, 2, *like.shape[1:])
    return torch.stack([e.reshape(2, *like.shape[1:]) for e in items])


def _check(base_u: Tensor, base_c: Tensor, concepts: Tensor, masks: Tensor) -> None:
    if base_u.ndim != 4 or base_u.shape[0] != 1 or base_c.shape != base_u.shape:
        raise ValueError(f"base_u and base_c must be (1, C, H, W) alike, got {tuple(base_u.shape)} and "
                         f"{tuple(base_c.shape)}")
    _, C, H, W = base_u.shape
    k = masks.shape[0] if masks.ndim == 3 else -1
    if masks.shape[1:] != (H, W) or concepts.shape != (k, 2, C, H, W):
        raise ValueError(f"expected masks (k, {H}, {W}) and concept eps (k, 2, {C}, {H}, {W}), got "
                         f"{tuple(masks.shape)} and {tuple(concepts.shape)}")


# ------------------------------------------------------------------------------------- public (Triton)

def blend_guided_triton(base_u: Tensor, base_c: Tensor, concept_eps: ConceptEps, masks: Tensor,
                        guidance: float) -> Tensor:
    """Masked blend of both halves, then guidance, in one kernel: float32 (1, C, H, W)."""
    concepts = stack_concepts(concept_eps, base_u)
    _check(base_u, base_c, concepts, masks)
    return _launch(base_u, base_c, concepts, masks.float(), guidance, guided=True)[0]


def blend_eps_triton(base_u: Tensor, base_c: Tensor, concept_eps: ConceptEps, masks: Tensor) -> tuple[Tensor, Tensor]:
    """The blended halves (eps_u, eps_c), for guidance applied outside (e.g. with rescale)."""
    concepts = stack_concepts(concept_eps, base_u)
    _check(base_u, base_c, concepts, masks)
    return _launch(base_u, base_c, concepts, masks.float(), 0.0, guided=False)


# ----------------------------------------------------------------------------------- PyTorch references

def blend_eps_reference(base_u: Tensor, base_c: Tensor, concept_eps: ConceptEps,
                        masks: Tensor) -> tuple[Tensor, Tensor]:
    """omg.pipeline.BlendedEps' blend: (1 - Σ M_i) · base + Σ M_i · eps_i for each half, in concept order."""
    concepts = stack_concepts(concept_eps, base_u)
    _check(base_u, base_c, concepts, masks)
    keep = 1 - masks.float().sum(0)[None, None]
    eps_u, eps_c = keep * base_u, keep * base_c
    for i in range(masks.shape[0]):
        m = masks[i].float()[None, None]
        eps_u, eps_c = eps_u + m * concepts[i, 0:1], eps_c + m * concepts[i, 1:2]
    return eps_u, eps_c


def blend_guided_reference(base_u: Tensor, base_c: Tensor, concept_eps: ConceptEps, masks: Tensor,
                           guidance: float) -> Tensor:
    """blend_eps_reference, then eps_u + g · (eps_c - eps_u)."""
    eps_u, eps_c = blend_eps_reference(base_u, base_c, concept_eps, masks)
    return eps_u + guidance * (eps_c - eps_u)
