"""Per-module adapters of the community LoRA formats, each able to produce its weight delta ΔW in fp32.

Formulas (kohya networks/lora.py, LyCORIS modules/{locon,loha,lokr}.py, ComfyUI lora.py):
  LowRank (kohya LoRA/LoCon, PEFT, old diffusers):  ΔW = alpha/r · up @ down          (r = down.shape[0])
      with Tucker (lora_mid):                        ΔW = alpha/r · einsum(mid, down, up)
  LoHa:  ΔW = alpha/r · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)  (r = w1_b.shape[0]); Tucker factors via hada_t1/t2
  LoKr:  ΔW = scale · kron(w1, w2), w1 = lokr_w1 or w1_a @ w1_b, w2 = lokr_w2, w2_a @ w2_b or Tucker(t2);
         scale = alpha/r only when a factor is decomposed (r of the last decomposed factor), else 1
  Full:  ΔW = diff, Δb = diff_b
  DoRA (dora_scale, any of the above):  W' = dora_scale · (W + ΔW) / ‖W + ΔW‖ (LyCORIS weight_decompose:
         norm over every axis but the output axis when dora_scale.shape[0] == W.shape[0], else over every
         axis but the input axis; PEFT's lora_magnitude_vector is always on the output axis, its conv
         shape [1, out, 1, 1] notwithstanding: peft DoraConv2dLayer); with strength s the merged weight is
         W + s·(W' − W) (ComfyUI; equal to LyCORIS at s = 1 — LyCORIS's own multiplier instead scales
         dora_scale/‖·‖ − 1 around W + ΔW).
Alpha 0 or missing means alpha = rank (kohya, LyCORIS).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from omg.errors import LoraError

Shape = tuple[int, ...]


def _f32(t: Tensor, device: torch.device | str | None) -> Tensor:
    return t.to(device=device, dtype=torch.float32)


def tucker(core: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    """Rebuild a conv weight [out, in, k, k] from a Tucker core [r, r, k, k], w_in [r, in], w_out [r, out] (LyCORIS)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", core, w_in, w_out)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _scale(alpha: Optional[float], rank: int) -> float:
    return 1.0 if alpha is None or alpha == 0 else alpha / rank


def fits(delta_shape: Shape, target_shape: Shape) -> bool:
    """A delta fits a weight when the output axis and the number of elements per output agree (reshape only)."""
    return (len(delta_shape) >= 1 and len(target_shape) >= 1 and delta_shape[0] == target_shape[0]
            and math.prod(delta_shape[1:]) == math.prod(target_shape[1:]))


@dataclass
class Adapter:
    """One module's adapter from a LoRA file. Subclasses define delta_shape() and delta()."""

    name: str  # the module name as spelled in the file (keys minus their format suffix)
    keys: list[str]  # the file keys it was built from, for error messages
    alpha: Optional[float] = None
    dora_scale: Optional[Tensor] = None
    # True: dora_scale is per output channel whatever its shape (PEFT); None: its shape decides (LyCORIS)
    dora_on_output: Optional[bool] = None
    kind: str = field(default="", init=False)

    # -- interface ---------------------------------------------------------------------------
    def delta_shape(self) -> Shape:
        raise NotImplementedError

    def delta(self, device=None) -> Tensor:
        """ΔW in fp32 including the format's alpha scale, in the shape the factors give (reshape to W)."""
        raise NotImplementedError

    def bias_delta(self, device=None) -> Optional[Tensor]:
        return None

    def tensors(self) -> list[Tensor]:
        return [v for v in vars(self).values() if isinstance(v, Tensor)]

    def low_rank(self) -> bool:
        """True when the delta can be applied on the fly as a chain of thin layers (unmerged mode)."""
        return False

    # -- shared ------------------------------------------------------------------------------
    def check(self) -> None:
        """Internal consistency (ranks agree); raises LoraError naming the keys."""
        try:
            self.delta_shape()
        except (IndexError, ValueError) as e:
            raise LoraError(f"inconsistent factor shapes in {self.keys}: {self._shapes()} ({e})") from None

    def _shapes(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in vars(self).items() if isinstance(v, Tensor)}

    def apply_(self, w: Tensor, strength: float) -> None:
        """w ← w + strength·ΔW (DoRA: w + strength·(W' − w)); w is fp32, shaped like the target."""
        if self.dora_scale is None:
            self._add_delta_(w, strength)
            return
        delta = self.delta(w.device).reshape(w.shape)
        decomposed = dora(w + delta, self.dora_scale.to(w.device, torch.float32), self.keys, self.dora_on_output)
        w.add_(decomposed - w, alpha=strength)

    def _add_delta_(self, w: Tensor, strength: float) -> None:
        w.add_(self.delta(w.device).reshape(w.shape), alpha=strength)


def dora_axis(magnitude_shape: Shape, w_shape: Shape, on_output: Optional[bool] = None) -> Optional[int]:
    """The weight axis a DoRA magnitude spans (0 output, 1 input), None when it fits neither.

    on_output=True (PEFT) allows only the output axis; otherwise the shape decides (LyCORIS wd_on_out:
    shape[0] == out, else older LyCORIS's input axis [1, in, ...]).
    """
    numel = math.prod(magnitude_shape)
    if on_output:
        return 0 if len(w_shape) >= 1 and numel == w_shape[0] else None
    if len(magnitude_shape) >= 1 and magnitude_shape[0] == w_shape[0] and numel == w_shape[0]:
        return 0
    if len(w_shape) >= 2 and numel == w_shape[1]:
        return 1
    return None


def dora(w: Tensor, magnitude: Tensor, keys=(), on_output: Optional[bool] = None) -> Tensor:
    """LyCORIS weight_decompose: magnitude · w / ‖w‖, norm over the axes magnitude does not span (dora_axis)."""
    axis = dora_axis(tuple(magnitude.shape), tuple(w.shape), on_output)
    if axis == 0:  # wd_on_out
        mag = magnitude.reshape(w.shape[0], *[1] * (w.dim() - 1))
        norm = torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True)
    elif axis == 1:  # decomposed on the input axis (older LyCORIS)
        mag = magnitude.reshape(1, w.shape[1], *[1] * (w.dim() - 2))
        norm = torch.linalg.vector_norm(w, dim=(0, *range(2, w.dim())), keepdim=True)
    else:
        raise LoraError(f"dora_scale {list(magnitude.shape)} fits neither axis of the weight {list(w.shape)} "
                        f"({list(keys)})")
    return w * (mag / (norm + torch.finfo(torch.float32).eps))


@dataclass
class LowRank(Adapter):
    """kohya LoRA / LoCon (optionally Tucker), PEFT lora_A/lora_B, old diffusers down/up."""

    up: Tensor = None  # [out, r] or [out, r, 1, 1]
    down: Tensor = None  # [r, in] or [r, in, k, k] (Tucker: [r, in, 1, 1])
    mid: Optional[Tensor] = None  # Tucker core [r, r, k, k]

    def __post_init__(self):
        self.kind = "locon_tucker" if self.mid is not None else "lora"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    def delta_shape(self) -> Shape:
        r = self.rank
        _require(self.up.shape[1] == r, f"up has rank {self.up.shape[1]}, down has rank {r}")
        _require(all(s == 1 for s in self.up.shape[2:]), "up must be 1x1")
        if self.mid is None:
            return (self.up.shape[0], *self.down.shape[1:])
        _require(tuple(self.mid.shape[:2]) == (r, r), f"lora_mid {list(self.mid.shape)} does not have rank {r}")
        _require(all(s == 1 for s in self.down.shape[2:]), "Tucker down must be 1x1")
        return (self.up.shape[0], self.down.shape[1], *self.mid.shape[2:])

    def delta(self, device=None) -> Tensor:
        up, down = _f32(self.up, device).flatten(1), _f32(self.down, device).flatten(1)
        if self.mid is None:
            d = up @ down
        else:
            d = tucker(_f32(self.mid, device), down, up.T)
        return d * self.scale

    def low_rank(self) -> bool:
        return self.dora_scale is None

    def _add_delta_(self, w: Tensor, strength: float) -> None:
        if self.mid is not None or not w.is_contiguous():
            return super()._add_delta_(w, strength)
        # addmm into the weight: no dense ΔW temporary
        up, down = _f32(self.up, w.device).flatten(1), _f32(self.down, w.device).flatten(1)
        w.view(w.shape[0], -1).addmm_(up, down, alpha=strength * self.scale)


@dataclass
class LoHa(Adapter):
    """LyCORIS LoHa: Hadamard product of two low-rank products, optionally Tucker (hada_t1/hada_t2)."""

    w1_a: Tensor = None
    w1_b: Tensor = None
    w2_a: Tensor = None
    w2_b: Tensor = None
    t1: Optional[Tensor] = None
    t2: Optional[Tensor] = None

    def __post_init__(self):
        self.kind = "loha_tucker" if self.t1 is not None else "loha"
        if (self.t1 is None) != (self.t2 is None):
            raise LoraError(f"LoHa needs both hada_t1 and hada_t2 or neither: {self.keys}")

    def _factor_shape(self, a: Tensor, b: Tensor, t: Optional[Tensor]) -> Shape:
        if t is None:
            _require(a.shape[1] == b.shape[0], f"{list(a.shape)} @ {list(b.shape)}")
            return (a.shape[0], b.shape[1])
        _require(a.shape[0] == b.shape[0] == t.shape[0] == t.shape[1], "Tucker ranks differ")
        return (a.shape[1], b.shape[1], *t.shape[2:])

    def delta_shape(self) -> Shape:
        s1 = self._factor_shape(self.w1_a, self.w1_b, self.t1)
        s2 = self._factor_shape(self.w2_a, self.w2_b, self.t2)
        _require(s1 == s2, f"LoHa factors give {s1} and {s2}")
        return s1

    def delta(self, device=None) -> Tensor:
        def factor(a, b, t):
            a, b = _f32(a, device), _f32(b, device)
            return a @ b if t is None else tucker(_f32(t, device), b, a)
        w1 = factor(self.w1_a, self.w1_b, self.t1)
        w2 = factor(self.w2_a, self.w2_b, self.t2)
        return w1 * w2 * _scale(self.alpha, self.w1_b.shape[0])


@dataclass
class LoKr(Adapter):
    """LyCORIS LoKr: kron(w1, w2), each factor full or decomposed (w2 optionally Tucker via lokr_t2)."""

    w1: Optional[Tensor] = None
    w1_a: Optional[Tensor] = None
    w1_b: Optional[Tensor] = None
    w2: Optional[Tensor] = None
    w2_a: Optional[Tensor] = None
    w2_b: Optional[Tensor] = None
    t2: Optional[Tensor] = None

    def __post_init__(self):
        self.kind = "lokr"
        if (self.w1 is None) == (self.w1_a is None or self.w1_b is None):
            raise LoraError(f"LoKr needs lokr_w1 or both lokr_w1_a/lokr_w1_b: {self.keys}")
        if (self.w2 is None) == (self.w2_a is None or self.w2_b is None):
            raise LoraError(f"LoKr needs lokr_w2 or both lokr_w2_a/lokr_w2_b: {self.keys}")

    @property
    def scale(self) -> float:
        # ComfyUI: rank of the last decomposed factor; full factors only -> 1 (LyCORIS forces alpha = rank)
        rank = self.w2_b.shape[0] if self.w2 is None else self.w1_b.shape[0] if self.w1 is None else None
        return 1.0 if rank is None else _scale(self.alpha, rank)

    def _w1_shape(self) -> Shape:
        if self.w1 is not None:
            return tuple(self.w1.shape)
        _require(self.w1_a.shape[1] == self.w1_b.shape[0], "lokr_w1_a/_b ranks differ")
        return (self.w1_a.shape[0], self.w1_b.shape[1])

    def _w2_shape(self) -> Shape:
        if self.w2 is not None:
            return tuple(self.w2.shape)
        if self.t2 is None:
            _require(self.w2_a.shape[1] == self.w2_b.shape[0], "lokr_w2_a/_b ranks differ")
            return (self.w2_a.shape[0], self.w2_b.shape[1])
        _require(self.w2_a.shape[0] == self.w2_b.shape[0] == self.t2.shape[0] == self.t2.shape[1],
                 "Tucker ranks differ")
        return (self.w2_a.shape[1], self.w2_b.shape[1], *self.t2.shape[2:])

    def delta_shape(self) -> Shape:
        s1, s2 = self._w1_shape(), self._w2_shape()
        _require(len(s1) == 2, "lokr_w1 must be 2-D")
        return (s1[0] * s2[0], s1[1] * s2[1], *s2[2:])

    def delta(self, device=None) -> Tensor:
        w1 = _f32(self.w1, device) if self.w1 is not None else _f32(self.w1_a, device) @ _f32(self.w1_b, device)
        if self.w2 is not None:
            w2 = _f32(self.w2, device)
        elif self.t2 is None:
            w2 = _f32(self.w2_a, device) @ _f32(self.w2_b, device)
        else:
            w2 = tucker(_f32(self.t2, device), _f32(self.w2_b, device), _f32(self.w2_a, device))
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous()) * self.scale


@dataclass
class Full(Adapter):
    """A full weight (and bias) difference: .diff / .diff_b."""

    diff: Optional[Tensor] = None
    diff_b: Optional[Tensor] = None

    def __post_init__(self):
        self.kind = "full"

    def delta_shape(self) -> Shape:
        return tuple(self.diff.shape) if self.diff is not None else ()

    def delta(self, device=None) -> Tensor:
        return _f32(self.diff, device)

    def bias_delta(self, device=None) -> Optional[Tensor]:
        return None if self.diff_b is None else _f32(self.diff_b, device)

    def apply_(self, w: Tensor, strength: float) -> None:
        if self.diff is not None:  # a bias-only entry leaves the weight alone
            super().apply_(w, strength)
