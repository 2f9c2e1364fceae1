"""Unmerged mode: LoRA deltas added on the fly by forward hooks on the affected Linear/Conv2d layers.

y = layer(x) + s·scale·up(mid(down(x))) for low-rank adapters (kohya/LoCon/PEFT; the thin factors are all
that is kept, in the model dtype). LoHa, LoKr, full diffs and DoRA have no cheap factored form: their
effective delta D = W'(fp32) − W is precomputed once and applied as one more layer with weight D.
``batch`` restricts the delta to a slice of the batch, so several concepts can share one UNet call
(the base rows stay untouched). The base weights are never modified.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omg.errors import LoraError
from omg.lora.adapters import LowRank
from omg.lora.merge import LoraSpec, Patch, bind, merged_fp32


def _conv_args(m: nn.Conv2d) -> dict:
    return dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)


def _low_rank_fn(m: nn.Module, a: LowRank, strength: float) -> Callable[[Tensor], Tensor]:
    dt, dev = m.weight.dtype, m.weight.device
    up = (a.up.to(dev, torch.float32) * (a.scale * strength)).to(dt)
    down = a.down.to(dev, dt)
    r = down.shape[0]
    if isinstance(m, nn.Linear):
        up, down = up.reshape(up.shape[0], r), down.reshape(r, -1)
        return lambda x: F.linear(F.linear(x, down), up)
    up = up.reshape(up.shape[0], r, 1, 1)
    if a.mid is None:
        down = down.reshape(r, m.in_channels // m.groups, *m.kernel_size)
        return lambda x: F.conv2d(F.conv2d(x, down, **_conv_args(m)), up)
    mid = a.mid.to(dev, dt)
    down = down.reshape(r, m.in_channels, 1, 1)
    return lambda x: F.conv2d(F.conv2d(F.conv2d(x, down), mid, **_conv_args(m)), up)


def _dense_fn(m: nn.Module, patches: list[Patch]) -> Callable[[Tensor], Tensor]:
    w32 = m.weight.detach().float()
    delta = (merged_fp32(m.weight, patches) - w32).to(m.weight.dtype)
    if isinstance(m, nn.Linear):
        return lambda x: F.linear(x, delta)
    return lambda x: F.conv2d(x, delta, **_conv_args(m))


def _bias_fn(m: nn.Module, patches: list[Patch]) -> Callable[[Tensor], Tensor]:
    b = sum(p.strength * p.adapter.bias_delta(m.weight.device) for p in patches).to(m.weight.dtype)
    shape = (-1,) if isinstance(m, nn.Linear) else (-1, 1, 1)
    return lambda x: b.reshape(shape)


def patches_by_module(patches: dict[str, list[Patch]]) -> dict[str, list[Patch]]:
    """bind()'s {parameter: patches} regrouped by module; refuses patches on part of a fused weight."""
    per_module: dict[str, list[Patch]] = {}
    for items in patches.values():
        for p in items:
            if p.target.rows is not None or p.target.transpose:
                raise LoraError(f"{p.path}: {p.adapter.name} targets part of a fused weight ({p.target.weight}); "
                                f"unmerged mode needs whole Linear/Conv2d layers, use the merged modes")
            per_module.setdefault(p.target.module, []).append(p)
    return per_module


def hookable(m: nn.Module, name: str, items: list[Patch]) -> nn.Module:
    """m (the module `name` that items patch), checked to be one whose output a delta can be added to."""
    if not isinstance(m, (nn.Linear, nn.Conv2d)):
        raise LoraError(f"{items[0].path}: unmerged mode cannot hook {type(m).__name__} {name}")
    return m


def delta_fns(m: nn.Module, items: list[Patch]) -> tuple[list[Callable[[Tensor], Tensor]], int]:
    """Functions whose outputs sum to the patches' change of m's output, and the bytes they hold."""
    fns, dense, nbytes = [], [], 0
    for p in items:
        if p.part == "weight" and isinstance(p.adapter, LowRank) and p.adapter.low_rank():
            fns.append(_low_rank_fn(m, p.adapter, p.strength))
            nbytes += sum(t.numel() * m.weight.element_size() for t in p.adapter.tensors())
        elif p.part == "weight":
            dense.append(p)
    if dense:
        fns.append(_dense_fn(m, dense))
        nbytes += m.weight.numel() * m.weight.element_size()
    biases = [p for p in items if p.part == "bias"]
    if biases:
        fns.append(_bias_fn(m, biases))
    return fns, nbytes


class UnmergedLora:
    """Forward hooks adding LoRA deltas to the base module's outputs; remove() (or the with-block end) undoes it."""

    def __init__(self, root: nn.Module, loras: LoraSpec, strict: bool = False, batch: Optional[slice] = None):
        per_module = patches_by_module(bind(root, loras, strict))
        self.batch = batch
        self.handles = []
        self.extra_bytes = 0  # memory held by the on-the-fly factors / dense deltas
        try:
            for name, items in per_module.items():
                fns, nbytes = delta_fns(hookable(root.get_submodule(name), name, items), items)
                self.extra_bytes += nbytes
                self.handles.append(root.get_submodule(name).register_forward_hook(self._hook(fns)))
        except BaseException:
            self.remove()
            raise

    def _hook(self, fns):
        rows = self.batch

        def hook(module, args, out):
            x = args[0] if rows is None else args[0][rows]
            delta = fns[0](x)
            for fn in fns[1:]:
                delta = delta + fn(x)
            if rows is None:
                return out + delta
            out[rows] += delta  # a fresh layer output: safe to update in place
            return out
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> "UnmergedLora":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
