"""Several concepts' LoRAs on one shared base model, each added to its own rows of one batched call.

OMG's stage 2 runs the base model and k concept models at every step. Merging a concept costs a copy of
every tensor its LoRA touches (4.1 GiB fp16 for a rank-64 LoRA on all kohya SDXL targets). Here the base
weights are shared and only the thin factors are kept (325 MiB per such concept), so the base pass and all
concept passes fit in one UNet call: each base GEMM runs once over every row and each concept's block of
rows gets up_i(down_i(x)) on top (Punica's segmented GEMM; the blocks are equal here, so two batched
matmuls per layer serve every concept at once, the second adding into the layer's output in its epilogue).
Cost on an H100: 18.6 of the 126.8 ms of kernels of a batch-7 SDXL call with two rank-64 concepts
(bench/results/profile_h100.json), about what batching the passes saves: the price of not merging. Where memory
allows, merge_linears pays that price instead: the Linear layers run each concept's row block with its merged copy of
the weight (one GEMM per block; on an H200 the k = 2 stage-2 call then runs within 3 % of the bare UNet: README).

Row layout of a call: rows [0, first_row) are left alone (the base pass), then ``rows_per_concept`` rows
for each concept of ``members`` (a consecutive range of the concepts given), in order.
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from omg.errors import LoraError
from omg.lora.adapters import LowRank
from omg.lora.merge import Patch, merged_tensor
from omg.lora.unmerged import delta_fns, hookable, patches_by_module


def _stackable(m: nn.Module, items: list[Patch]) -> bool:
    """Plain low-rank weight patches on a Linear: the batched-matmul path."""
    return isinstance(m, nn.Linear) and all(
        p.part == "weight" and isinstance(p.adapter, LowRank) and p.adapter.low_rank() and p.adapter.mid is None
        for p in items)


class _Stacked:
    """Every concept's factors of one Linear: down [k, in, R], up [k, R, out] (strength and alpha/r folded into up;
    a concept's patches concatenated along the rank, zero-padded to the largest rank)."""

    def __init__(self, down: Tensor, up: Tensor):
        self.down, self.up = down, up
        self.nbytes = (down.numel() + up.numel()) * down.element_size()

    def add(self, x: Tensor, out: Tensor, members: range) -> None:
        n = len(members)
        xs = x.reshape(n, -1, x.shape[-1])
        low = torch.bmm(xs, self.down[members.start:members.stop])
        # out += low @ up in the GEMM's epilogue: no delta tensor, one read and one write of out
        out.view(n, -1, out.shape[-1]).baddbmm_(low, self.up[members.start:members.stop])


def _factors(items: list[Patch], n_in: int, n_out: int) -> tuple[Tensor, Tensor]:
    """One concept's (down [r, in], up scaled [out, r]) for a Linear, fp32, its patches concatenated."""
    if not items:
        return torch.zeros(0, n_in), torch.zeros(n_out, 0)
    down = torch.cat([p.adapter.down.float().reshape(p.adapter.rank, n_in) for p in items])
    up = torch.cat([p.adapter.up.float().reshape(n_out, p.adapter.rank) * (p.adapter.scale * p.strength)
                    for p in items], dim=1)
    return down, up


Entries = list[tuple[str, nn.Linear, list[list[Patch]]]]  # (name, Linear, per-concept patches) of some layers


def _stack_linears(entries: Entries) -> dict[str, _Stacked]:
    """_Stacked factors for every (name, Linear, per-concept patches). Layers of one shape share one buffer,
    filled with a few bulk copies: copying 722 layers x k concepts one by one cost 0.4 s of host time."""
    groups: dict[tuple, list] = defaultdict(list)
    for name, m, per_concept in entries:
        rank = max(sum(p.adapter.rank for p in items) for items in per_concept)
        groups[(m.in_features, m.out_features, rank, m.weight.dtype, m.weight.device)].append((name, per_concept))
    stacked = {}
    for (n_in, n_out, rank, dtype, device), members in groups.items():
        k = len(members[0][1])
        down = torch.zeros(len(members), k, n_in, rank, device=device, dtype=dtype)
        up = torch.zeros(len(members), k, rank, n_out, device=device, dtype=dtype)
        for i in range(k):
            single = [len(pc[i]) == 1 and pc[i][0].adapter.rank == rank for _, pc in members]
            if all(single):  # the common case (one file per concept, one rank): two bulk copies
                patches = [pc[i][0] for _, pc in members]
                scale = torch.tensor([p.adapter.scale * p.strength for p in patches]).view(-1, 1, 1)
                d = torch.stack([p.adapter.down.reshape(rank, n_in) for p in patches])
                u = torch.stack([p.adapter.up.reshape(n_out, rank) for p in patches]).float() * scale.to(d.device)
                down[:, i] = d.to(device, dtype).transpose(1, 2)
                up[:, i] = u.to(device, dtype).transpose(1, 2)
                continue
            for j, (_, pc) in enumerate(members):
                d, u = _factors(pc[i], n_in, n_out)
                down[j, i, :, :d.shape[0]] = d.T.to(device, dtype)
                up[j, i, :u.shape[1]] = u.T.to(device, dtype)
        for j, (name, _) in enumerate(members):
            stacked[name] = _Stacked(down[j], up[j])
    return stacked


def _made_once(cache: weakref.WeakKeyDictionary, root: nn.Module, entries: Entries,
               make: Callable[[Entries], dict], reads_base: bool) -> dict:
    """make(entries), or what it made last for the same entries on root: repeated renders with the same concepts skip
    it (host-bound work before stage 2's first step, or merging). One entry per root, dropped with it; it holds the
    adapters its key names by id, so no id in it can be reused while it lives. reads_base: what make returns depends
    on the base weights' values too (their storage and in-place writes: a style LoRA merged into them is another key).
    """
    if not entries:  # nothing to keep
        cache.pop(root, None)
        return {}
    key = tuple((name, m.weight.dtype, m.weight.device,
                 (m.weight.data_ptr(), m.weight._version) if reads_base else None,
                 tuple(tuple((id(p.adapter), p.strength) for p in items) for items in per_concept))
                for name, m, per_concept in entries)
    last = cache.get(root)
    if last is not None and last[0] == key:
        return last[2]
    cache.pop(root, None)  # its tensors are freed before the new ones are made
    made = make(entries)
    cache[root] = (key, [p.adapter for _, _, per_concept in entries for items in per_concept for p in items], made)
    return made


# the last stacked factors and merged copies made per base model (_made_once)
_last_stacking: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list, dict[str, _Stacked]]]" = \
    weakref.WeakKeyDictionary()
_last_merged_rows: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list, dict[str, _MergedRows]]]" = \
    weakref.WeakKeyDictionary()


class _MergedRows:
    """Every concept's merged copy of one Linear's weight (None: the concept leaves it alone): the base rows run the
    base weight, each concept's row block its own copy, one GEMM each."""

    def __init__(self, weights: list[Optional[Tensor]]):
        self.weights = weights
        self.nbytes = sum(w.numel() * w.element_size() for w in weights if w is not None)

    def forward(self, m: nn.Linear, x: Tensor, rows: slice, rows_per_concept: int, members: range) -> Tensor:
        """m(x) with the members' copies on their row blocks (x: (rows, ..., in))."""
        per_row = x[0].numel() // m.in_features
        flat_x = x.reshape(-1, m.in_features)
        out = flat_x.new_empty(flat_x.shape[0], m.out_features)
        blocks = [(0, rows.start, m.weight)] + [
            (rows.start + j * rows_per_concept, rows.start + (j + 1) * rows_per_concept,
             m.weight if self.weights[i] is None else self.weights[i]) for j, i in enumerate(members)]
        for start, stop, weight in blocks:
            if stop > start:
                block = slice(start * per_row, stop * per_row)
                if m.bias is None:
                    torch.mm(flat_x[block], weight.t(), out=out[block])
                else:
                    torch.addmm(m.bias, flat_x[block], weight.t(), out=out[block])
        return out.view(*x.shape[:-1], m.out_features)


def _merge_rows(entries: Entries) -> dict[str, _MergedRows]:
    return {name: _MergedRows([merged_tensor(m.weight, items) if items else None for items in per_concept])
            for name, m, per_concept in entries}


def release_kept(root: nn.Module, stacking: bool = True) -> None:
    """Drop what GroupedLora keeps on root for its next construction: the concepts' merged copies (merge_linears: 4.1
    GiB a concept for a rank-64 LoRA on every kohya target of SDXL) and, with stacking, the stacked factors."""
    _last_merged_rows.pop(root, None)
    if stacking:
        _last_stacking.pop(root, None)


def _patched_layers(root: nn.Module, concepts: Sequence[Optional[dict[str, list[Patch]]]]
                    ) -> tuple[Entries, Entries]:
    """The layers the concepts patch, each with its per-concept patches (the module checked hookable, looked up in one
    walk of root: 722 get_submodule calls on SDXL cost 38 ms of host time): (those whose patches are all plain
    low-rank ones on a Linear, the others)."""
    per_concept = [patches_by_module(c or {}) for c in concepts]
    modules = dict(root.named_modules())
    low_rank, others = [], []
    for name in sorted({name for c in per_concept for name in c}):
        items = [c.get(name, []) for c in per_concept]
        m = hookable(modules[name], name, next(i for i in items if i))
        (low_rank if all(_stackable(m, i) for i in items) else others).append((name, m, items))
    return low_rank, others


def merged_copy_bytes(root: nn.Module, concepts: Sequence[Optional[dict[str, list[Patch]]]]) -> tuple[int, int]:
    """(the bytes merge_linears' copies take for these concepts, the bytes of those kept from the last construction on
    root, which making new ones frees or reuses)."""
    low_rank, _ = _patched_layers(root, concepts)
    total = sum(m.weight.numel() * m.weight.element_size() * sum(bool(i) for i in items) for _, m, items in low_rank)
    last = _last_merged_rows.get(root)
    return total, sum(layer.nbytes for layer in last[2].values()) if last is not None else 0


class _PerConcept:
    """Any other patches (LoCon convs, LoHa/LoKr/DoRA dense deltas, bias diffs): one delta per concept."""

    def __init__(self, m: nn.Module, per_concept: list[list[Patch]]):
        self.fns: list[list[Callable[[Tensor], Tensor]]] = []
        self.nbytes = 0
        for items in per_concept:
            fns, nbytes = delta_fns(m, items)
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
    merge_linears: the Linear layers with low-rank patches run merged copies of their weight on the concepts' rows
    instead of the factors' deltas (faster: a delta's extra read and write of the layer's output costs more than
    splitting its GEMM by row blocks; the copies cost what merging costs, 4.1 GiB a concept for a rank-64 LoRA on
    every kohya target of SDXL); their forward is replaced while installed (not for omg.fp8's e4m3 layers: switch it
    off with fp8).
    Use ``with grouped.installed(first_row, members): out = root(...)``; the base weights are never modified.
    """

    def __init__(self, root: nn.Module, concepts: Sequence[Optional[dict[str, list[Patch]]]],
                 rows_per_concept: int = 2, merge_linears: bool = False):
        self.root, self.count, self.rows_per_concept = root, len(concepts), rows_per_concept
        low_rank, others = _patched_layers(root, concepts)
        self.modules: dict[str, nn.Module] = {name: m for name, m, _ in low_rank + others}  # for installing
        self.layers: dict[str, _Stacked | _PerConcept | _MergedRows] = {
            name: _PerConcept(m, items) for name, m, items in others}
        stacked, merged = ([], low_rank) if merge_linears else (low_rank, [])
        self.layers.update(_made_once(_last_stacking, root, stacked, _stack_linears, reads_base=False))
        self.layers.update(_made_once(_last_merged_rows, root, merged, _merge_rows, reads_base=True))

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
            raise LoraError(f"members must be a consecutive range within {self.count} concepts, got {members}")
        rows = slice(first_row, first_row + self.rows_per_concept * len(members))
        handles = []

        def check(x: Tensor) -> None:
            if x.shape[0] != rows.stop:
                raise LoraError(f"a grouped LoRA call needs {rows.stop} rows "
                                f"({first_row} + {self.rows_per_concept} x {len(members)}), got {x.shape[0]}")

        def hook_for(layer):
            def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
                check(args[0])
                layer.add(args[0][rows], out[rows], members)  # a fresh layer output: safe to update in place
                return out
            return hook

        def forward_for(module: nn.Linear, layer: _MergedRows):
            if getattr(module, "fp8", False):
                raise LoraError("merge_linears runs 16-bit GEMMs: it does not combine with omg.fp8's e4m3 layers")

            def forward(x: Tensor) -> Tensor:
                check(x)
                return layer.forward(module, x, rows, self.rows_per_concept, members)
            return forward

        replaced = []
        try:
            if len(members):
                for name, layer in self.layers.items():
                    module = self.modules[name]
                    if isinstance(layer, _MergedRows):
                        module.forward = forward_for(module, layer)  # an instance attribute: nn.Module calls it
                        replaced.append(module)
                    else:
                        handles.append(module.register_forward_hook(hook_for(layer)))
            yield self.root
        finally:
            for h in handles:
                h.remove()
            for module in replaced:
                del module.forward
