"""Applying LoRA files to a model: matching and validation (bind), and the merged modes.

- ConceptWeights: the touched tensors of one concept, merged as W + s·ΔW in fp32 and stored in the model
  dtype; every other tensor stays the base model's. Run the base module with them swapped in
  (``applied``: parameter .data pointers swapped and swapped back, no copies) or through
  torch.func.functional_call (``call``). Memory: exactly the bytes of the touched tensors.
- merge_lora_ / merged_lora: in-place merge into the base weights with a backup of the touched tensors;
  restore() copies the backups back, so the base is restored bit for bit (no subtraction).
- text_encoder_lora: the text encoder with a concept's LoRA applied for the duration of a with-block.
Nothing touches the model before the whole LoRA has been matched and validated; an error during an
in-place merge restores what was already written.

omg.generate's default is neither: GroupedLora (grouped.py) keeps every concept's factors on the shared base
weights and runs the base and all concept passes of a step as one batched call (an H100 k=2 image: 10.0 GiB
peak against 18.0 with merged concepts, 4 % slower; bench/results/omg_grouped_h100.json).
ConceptWeights + applied() is its lora_mode="merged" and this module's default. A concept pass then runs the
plain UNet at full speed (no extra FLOPs, no hooks) and switching concepts costs a pointer swap per touched
tensor (~1 ms in and out for 369 tensors), whereas unmerged deltas add FLOPs and launches to every pass (+28%
per forward on the CPU mid config below; PEFT-style adapters, as the original code's schedule runs them in
bench/reference.py) and the in-place mode re-merges on every switch (0.41 s merge + restore on the CPU mid
config). Its price is memory, exactly the touched tensors: 4.1 GiB fp16 for a LoRA on all 722 kohya SDXL targets
(1.8 GiB attention-only), 16 GiB for 4 such concepts on an 80 GB card. When that does not fit, use UnmergedLora
(rank-64 factors: 325 MiB per concept on SDXL) or merge_lora_ with backup_device="cpu".
torch.func.functional_call (``call``) gives the same result without touching the module, at a higher
per-call cost (+13 ms vs +3 ms per forward on the CPU mid config with 8x8 latents).
CPU mid config: bench/lora.py CONFIGS["mid"] (248 M parameters), fp32, rank 64 on 369 modules, batch 2 at
32x32 latents, interleaved min of 5: load 0.11 s, merge 0.28 s, forward 631 ms base / 640 swapped / 806
unmerged; concept 755 MiB = the touched tensors (80% of the UNet's 947 MiB); unmerged factors 145 MiB.
"""
from __future__ import annotations

import os
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from omg.errors import LoraError
from omg.lora.adapters import Adapter, Full, dora_axis, fits
from omg.lora.formats import LoraFile, load_lora
from omg.lora.targets import Target, family, target_table

LoraSpec = Union[LoraFile, str, os.PathLike, tuple, Sequence]  # file, (file, strength) or a list of those


@dataclass(frozen=True)
class Patch:
    """One adapter's contribution to one parameter."""

    adapter: Adapter
    target: Target
    strength: float
    part: str  # "weight" or "bias"
    path: str  # the LoRA file, for messages


def normalize(loras: LoraSpec) -> list[tuple[LoraFile, float]]:
    """LoraFile | path | (lora, strength) | [(lora, strength), ...] -> [(LoraFile, strength), ...]."""
    if isinstance(loras, (LoraFile, str, os.PathLike)):
        loras = [(loras, 1.0)]
    elif isinstance(loras, tuple) and len(loras) == 2 and isinstance(loras[1], (int, float)):
        loras = [loras]
    out = []
    for item in loras:
        lora, strength = item if isinstance(item, tuple) else (item, 1.0)
        if not isinstance(lora, LoraFile):
            lora = load_lora(lora)
        out.append((lora, float(strength)))
    return out


def _view_shape(p: Tensor, target: Target, part: str) -> tuple[int, ...]:
    shape = tuple(p.shape)
    if target.rows is not None:
        shape = (target.rows[1] - target.rows[0], *shape[1:])
    if target.transpose and part == "weight":
        shape = shape[::-1]
    return shape


def _other_base_hint(names: Sequence[str]) -> str:
    sd1 = ("down_blocks_0_attentions", "down_blocks.0.attentions", "input_blocks_1_1", "input_blocks.1.1",
           "up_blocks_3_attentions", "output_blocks_11", "lora_te_text")
    if any(s in n for n in names for s in sd1):
        return " This looks like a LoRA for SD 1.x/2.x (attention at the first level), not SDXL."
    return ""


def bind(root: nn.Module, loras: LoraSpec, strict: bool = False) -> dict[str, list[Patch]]:
    """Match every adapter to a parameter of root and validate shapes: {parameter name: [Patch, ...]}.

    Raises LoraError (naming file and keys) when a matched module does not fit, or when none of a file's
    modules for root's components matches. Unmatched module names and unknown keys give one warning with
    their count (LoraError when strict). Never modifies root.
    """
    table = target_table(root)
    params = dict(root.named_parameters())
    patches: dict[str, list[Patch]] = {}
    for lora, strength in normalize(loras):
        errors, unmatched, matched, relevant = [], [], 0, 0
        for name, adapter in lora.adapters.items():
            if family(name) not in table.families:
                continue  # another component's module (e.g. text encoder keys while binding the UNet)
            relevant += 1
            target = table.names.get(name)
            if target is None:
                unmatched.append(name)
                continue
            matched += 1
            w = params[target.weight]
            shape = _view_shape(w, target, "weight")
            if not (isinstance(adapter, Full) and adapter.diff is None):
                ds = adapter.delta_shape()
                if not fits(ds, shape):
                    errors.append(f"{name}: delta {list(ds)} for {target.weight} {list(shape)}")
                    continue
                if adapter.dora_scale is not None and dora_axis(tuple(adapter.dora_scale.shape), shape,
                                                                adapter.dora_on_output) is None:
                    what = "PEFT lora_magnitude_vector (one per output)" if adapter.dora_on_output else "dora_scale"
                    errors.append(f"{name}: {what} {list(adapter.dora_scale.shape)} for {list(shape)}")
                    continue
                patches.setdefault(target.weight, []).append(Patch(adapter, target, strength, "weight", lora.path))
            db = adapter.diff_b if isinstance(adapter, Full) else None
            if db is not None:
                if target.bias is None:
                    errors.append(f"{name}: diff_b for a layer without bias ({target.weight})")
                    continue
                bshape = _view_shape(params[target.bias], target, "bias")
                if tuple(db.shape) != bshape:
                    errors.append(f"{name}: diff_b {list(db.shape)} for {target.bias} {list(bshape)}")
                    continue
                patches.setdefault(target.bias, []).append(Patch(adapter, target, strength, "bias", lora.path))
        if errors:
            raise LoraError(f"{lora.path}: {len(errors)} LoRA modules do not fit this model: {errors[:8]}"
                            + _other_base_hint(errors + unmatched))
        if relevant and not matched:
            raise LoraError(f"{lora.path}: none of its {relevant} modules for {sorted(table.families)} matches "
                            f"this model, e.g. {sorted(unmatched)[:5]}.{_other_base_hint(unmatched)}")
        ignored = sorted(unmatched) + lora.unknown_keys
        if ignored:
            msg = (f"{lora.path}: {len(ignored)} LoRA keys/modules match nothing in the model and are ignored "
                   f"({len(unmatched)} unmatched modules, {len(lora.unknown_keys)} unknown keys): {ignored[:20]}"
                   + _other_base_hint(ignored))
            if strict:
                raise LoraError(msg)
            warnings.warn(msg, stacklevel=3)
    return patches


@torch.no_grad()
def merged_fp32(param: Tensor, patches: Sequence[Patch]) -> Tensor:
    """The parameter with its patches applied (W + s·ΔW, or the DoRA form), in fp32."""
    w = param.detach().to(torch.float32, copy=True)
    for p in patches:
        view = w if p.target.rows is None else w[p.target.rows[0]:p.target.rows[1]]
        if p.part == "bias":
            view.add_(p.adapter.bias_delta(w.device).reshape(view.shape), alpha=p.strength)
            continue
        p.adapter.apply_(view.T if p.target.transpose else view, p.strength)
    return w


def merged_tensor(param: Tensor, patches: Sequence[Patch]) -> Tensor:
    """merged_fp32 stored in the parameter's dtype; LoraError if that overflows to inf/NaN."""
    out = merged_fp32(param, patches).to(param.dtype)
    # inputs were checked finite at load; only a narrow dtype (fp16: max 65504) can overflow on the cast
    if torch.finfo(param.dtype).max < 1e38 and not bool(torch.isfinite(out).all()):
        files = sorted({p.path for p in patches})
        raise LoraError(f"{files}: merging {[p.adapter.name for p in patches]} gives NaN/inf in {param.dtype} "
                        f"(alpha or strength too large?)")
    return out


class ConceptWeights:
    """A concept's merged tensors by parameter name; everything else is shared with the base module.

    Build with ConceptWeights.merge(root, loras); run with ``with cw.applied(root): root(...)`` or
    ``cw.call(root, *args)``. ``nbytes`` is the memory the concept costs.
    """

    def __init__(self, tensors: dict[str, Tensor], files: Sequence[str] = ()):
        self.tensors = tensors
        self.files = list(files)
        self._resolved: tuple = (None, [])  # (weakref to the root, [(parameter, tensor)]) of the last applied()

    def _pairs(self, root: nn.Module) -> list[tuple[nn.Parameter, Tensor]]:
        ref, pairs = self._resolved
        if ref is None or ref() is not root:
            pairs = []
            for name, t in self.tensors.items():
                p = root.get_parameter(name)
                if p.shape != t.shape or p.dtype != t.dtype or p.device != t.device:
                    raise LoraError(f"concept tensor {name} {list(t.shape)} {t.dtype} {t.device} does not match "
                                    f"the model's {list(p.shape)} {p.dtype} {p.device}; merge again after .to()")
                pairs.append((p, t))
            self._resolved = (weakref.ref(root), pairs)
        return pairs

    @classmethod
    def merge(cls, root: nn.Module, loras: LoraSpec, strict: bool = False) -> "ConceptWeights":
        specs = normalize(loras)
        patches = bind(root, specs, strict)
        tensors = {name: merged_tensor(root.get_parameter(name), items) for name, items in patches.items()}
        return cls(tensors, [lora.path for lora, _ in specs])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __repr__(self) -> str:
        return f"ConceptWeights({len(self.tensors)} tensors, {self.nbytes / 2**20:.1f} MiB, {self.files})"

    @contextmanager
    def applied(self, root: nn.Module) -> Iterator[nn.Module]:
        """Swap the merged tensors into root's parameters (pointer swap, no copy) and back on exit."""
        pairs, saved = self._pairs(root), []
        try:
            for p, t in pairs:
                if p.device != t.device or p.dtype != t.dtype:  # the root was moved since
                    self._resolved = (None, [])
                    raise LoraError(f"concept tensors are {t.dtype} on {t.device}, the model is {p.dtype} on "
                                    f"{p.device}; merge again after .to()")
                saved.append((p, p.data))
                p.data = t
            yield root
        finally:
            for p, data in reversed(saved):
                p.data = data

    def call(self, root: nn.Module, *args, **kwargs):
        """root(*args, **kwargs) with the merged tensors, via torch.func.functional_call (root untouched)."""
        return torch.func.functional_call(root, self.tensors, args, kwargs, strict=False)


class MergedLora:
    """Handle of an in-place merge: restore() copies the backed-up originals back (bitwise exact)."""

    def __init__(self, root: nn.Module, backups: dict[str, Tensor]):
        self.root, self.backups = root, backups

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.backups.values())

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the originals back. Stacked merges must be restored last-in, first-out."""
        stack = getattr(self.root, "_omg_lora_merges", [])
        if self.backups and stack and stack[-1] is not self:
            raise RuntimeError("in-place LoRA merges must be restored in reverse order")
        _copy_back(self.root, self.backups)
        self.backups = {}
        if stack and stack[-1] is self:
            stack.pop()


@torch.no_grad()
def _copy_back(root: nn.Module, backups: dict[str, Tensor]) -> None:
    for name, original in backups.items():
        root.get_parameter(name).copy_(original)


@torch.no_grad()
def merge_lora_(root: nn.Module, loras: LoraSpec, strict: bool = False,
                backup_device: Optional[Union[str, torch.device]] = None) -> MergedLora:
    """Merge LoRA(s) into root's weights in place (storage and data pointers unchanged).

    The touched originals are kept (on backup_device, default their own device) for an exact restore();
    if anything fails half-way, what was written is restored before the error propagates.
    """
    patches = bind(root, loras, strict)
    backups: dict[str, Tensor] = {}
    try:
        for name, items in patches.items():
            p = root.get_parameter(name)
            new = merged_tensor(p, items)
            backups[name] = p.detach().to(backup_device or p.device, copy=True)
            p.copy_(new)
    except BaseException:
        _copy_back(root, backups)
        raise
    handle = MergedLora(root, backups)
    if not hasattr(root, "_omg_lora_merges"):
        root._omg_lora_merges = []
    root._omg_lora_merges.append(handle)
    return handle


@contextmanager
def merged_lora(root: nn.Module, loras: LoraSpec, strict: bool = False) -> Iterator[nn.Module]:
    """root with LoRA(s) merged in place for the with-block; restored exactly afterwards."""
    handle = merge_lora_(root, loras, strict)
    try:
        yield root
    finally:
        handle.restore()


@contextmanager
def text_encoder_lora(text: nn.Module, loras: LoraSpec, strict: bool = False) -> Iterator[nn.Module]:
    """The SDXL text encoder with a concept's LoRA (te1 -> CLIP-L, te2 -> bigG incl. fused q/k/v rows)
    applied for the with-block: ``with text_encoder_lora(model.text, lora) as te: te.encode([prompt])``.

    Merged tensors are swapped in and the originals swapped back, so the encoder is restored exactly;
    a LoRA without text-encoder modules leaves it untouched.
    """
    weights = ConceptWeights.merge(text, loras, strict)
    with weights.applied(text):
        yield text
