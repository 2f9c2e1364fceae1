"""Several concepts' LoRAs on one shared base model, each added to its own rows of one batched call.

OMG's stage 2 runs the base model and k concept models at every step. Merging a concept costs a copy of
every tensor its LoRA touches (4.1 GiB fp16 for a rank-64 LoRA on all kohya SDXL targets). Here the base
weights are shared and only the thin factors are kept (325 MiB per such concept), so the base pass and all
concept passes fit in one UNet call: each base GEMM runs once over every row and each concept's block of
rows gets up_i(down_i(x)) on top (Punica's segmented GEMM; the blocks are equal here, so two batched
matmuls per layer serve every concept at once).

Row layout of a call: rows [0, first_row) are left alone (the base pass), then ``rows_per_concept`` rows
for each concept of ``members`` (a consecutive range of the concepts given), in order.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from omg.lora.adapters import LowRank
from omg.lora.merge import Patch
from omg.lora.unmerged import delta_fns, hookable, patches_by_module


def _stackable(m: nn.Module, items: list[Patch]) -> bool:
    """Plain low-rank weight patches on a Linear: the batched-matmul path."""
    return isinstance(m, nn.Linear) and all(
        p.part == "weight" and isinstance(p.adapter, LowRank) and p.adapter.low_rank() and p.adapter.mid is None
        for p in items)


class _Stacked:
    """Every concept's factors of one Linear, concatenated over its patches and zero-padded to one rank:
    down [k, in, R], up [k, R, out] (strength and alpha/r folded into up)."""

    def __init__(self, m: nn.Linear, per_concept: list[list[Patch]]):
        dev, dt = m.weight.device, m.weight.dtype
        downs, ups = [], []
        for items in per_concept:
            downs.append(torch.cat([p.adapter.down.to(dev, torch.float32).reshape(p.adapter.rank, -1) for p in items])
                         if items else m.weight.new_zeros(0, m.in_features, dtype=torch.float32))
            ups.append(torch.cat([p.adapter.up.to(dev, torch.float32).reshape(-1, p.adapter.rank)
                                  * (p.adapter.scale * p.strength) for p in items], dim=1)
                       if items else m.weight.new_zeros(m.out_features, 0, dtype=torch.float32))
        rank = max(d.shape[0] for d in downs)
        self.down = torch.zeros(len(per_concept), m.in_features, rank, device=dev, dtype=dt)
        self.up = torch.zeros(len(per_concept), rank, m.out_features, device=dev, dtype=dt)
        for i, (d, u) in enumerate(zip(downs, ups)):
            self.down[i, :, :d.shape[0]] = d.T
            self.up[i, :u.shape[1]] = u.T
        self.nbytes = (self.down.numel() + self.up.numel()) * self.down.element_size()

    def add(self, x: Tensor, out: Tensor, members: range) -> None:
        n = len(members)
        xs = x.reshape(n, -1, x.shape[-1])
        low = torch.bmm(xs, self.down[members.start:members.stop])
        # out += low @ up in the GEMM's epilogue: no delta tensor, one read and one write of out
        out.view(n, -1, out.shape[-1]).baddbmm_(low, self.up[members.start:members.stop])


class _PerConcept:
    """Any other patches (LoCon convs, LoHa/LoKr/DoRA dense deltas, bias diffs): one delta per concept."""

    def __init__(self, m: nn.Module, per_concept: list[list[Patch]]):
        self.fns: list[list[Callable[[Tensor], Tensor]]] = []
        self.nbytes = 0
        for items in per_concept:
            fns, nbytes = delta_fns(m, items) if items else ([], 0)
            self.fns.append(fns)
            self.nbytes += nbytes

    def add(self, x: Tensor, out: Tensor, members: range) -> None:
        per = x.shape[0] // len(members)
        for j, i in enumerate(members):
            rows = slice(j * per, (j + 1) * per)
            for fn in self.fns[i]:
                out[rows] += fn(x[rows])


class GroupedLora:
    """Concept LoRAs applied to their own row blocks of one call to a shared base module (see module doc).

    concepts: one bind() result per concept ({parameter: [Patch]}; None or {} for a concept without LoRA).
    Use ``with grouped.installed(first_row, members): out = root(...)``; the base weights are never modified.
    """

    def __init__(self, root: nn.Module, concepts: Sequence[Optional[dict[str, list[Patch]]]],
                 rows_per_concept: int = 2):
        self.root, self.count, self.rows_per_concept = root, len(concepts), rows_per_concept
        per_concept = [patches_by_module(c or {}) for c in concepts]
        names = sorted({name for c in per_concept for name in c})
        self.layers: dict[str, _Stacked | _PerConcept] = {}
        for name in names:
            items = [c.get(name, []) for c in per_concept]
            m = hookable(root, name, next(i for i in items if i))
            kind = _Stacked if all(_stackable(m, i) for i in items) else _PerConcept
            self.layers[name] = kind(m, items)

    @property
    def extra_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())

    @property
    def stacked_layers(self) -> int:
        return sum(isinstance(layer, _Stacked) for layer in self.layers.values())

    @contextmanager
    def installed(self, first_row: int, members: Optional[range] = None) -> Iterator[nn.Module]:
        """Hooks on the root for calls laid out as [first_row base rows, then members' row blocks]."""
        members = range(self.count) if members is None else members
        if members.step != 1 or members.start < 0 or members.stop > self.count:
            raise ValueError(f"members must be a consecutive range within {self.count} concepts, got {members}")
        rows = slice(first_row, first_row + self.rows_per_concept * len(members))
        handles = []

        def hook_for(layer):
            def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
                x = args[0]
                if x.shape[0] != rows.stop:
                    raise ValueError(f"a grouped LoRA call needs {rows.stop} rows "
                                     f"({first_row} + {self.rows_per_concept} x {len(members)}), got {x.shape[0]}")
                layer.add(x[rows], out[rows], members)  # a fresh layer output: safe to update in place
                return out
            return hook

        try:
            if len(members):
                for name, layer in self.layers.items():
                    handles.append(self.root.get_submodule(name).register_forward_hook(hook_for(layer)))
            yield self.root
        finally:
            for h in handles:
                h.remove()
