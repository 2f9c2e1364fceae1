"""Reading LoRA files: every key is split into (module name as spelled in the file, format part), and the
parts of each module are assembled into one adapter (adapters.py).

Key spellings recognised (those of ComfyUI's comfy/lora.py load_lora):
  kohya / LyCORIS LoCon   <name>.lora_up.weight  .lora_down.weight  .lora_mid.weight  .alpha  .dora_scale
  PEFT / diffusers        <name>.lora_B.weight  .lora_A.weight  (.lora_magnitude_vector: PEFT DoRA)
  old diffusers           <name>_lora.up.weight (…processor.to_q_lora.up.weight), <name>.lora.up.weight,
                          <name>.lora_linear_layer.up.weight (and .down)
  LyCORIS LoHa / LoKr     <name>.hada_w1_a … .hada_t2, <name>.lokr_w1 … .lokr_t2
  full diff               <name>.diff  .diff_b
Module names are kept as spelled; targets.py resolves them through a table built from the model.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch
from torch import Tensor

from omg.errors import CheckpointError, LoraError
from omg.lora.adapters import Adapter, Full, LoHa, LoKr, LowRank
from omg.lora.targets import family as component_of
from omg.tensorfile import MAX_DIMS

# suffix -> (family, part); longest suffixes first so ".lora.up.weight" wins over ".up.weight"-like overlaps
_SUFFIXES: list[tuple[str, str, str]] = sorted([
    (".lora_up.weight", "lowrank", "up"), (".lora_down.weight", "lowrank", "down"),
    (".lora_mid.weight", "lowrank", "mid"),
    (".lora_B.weight", "lowrank", "up"), (".lora_A.weight", "lowrank", "down"),
    ("_lora.up.weight", "lowrank", "up"), ("_lora.down.weight", "lowrank", "down"),
    (".lora.up.weight", "lowrank", "up"), (".lora.down.weight", "lowrank", "down"),
    (".lora_linear_layer.up.weight", "lowrank", "up"), (".lora_linear_layer.down.weight", "lowrank", "down"),
    (".hada_w1_a", "loha", "w1_a"), (".hada_w1_b", "loha", "w1_b"), (".hada_w2_a", "loha", "w2_a"),
    (".hada_w2_b", "loha", "w2_b"), (".hada_t1", "loha", "t1"), (".hada_t2", "loha", "t2"),
    (".lokr_w1", "lokr", "w1"), (".lokr_w1_a", "lokr", "w1_a"), (".lokr_w1_b", "lokr", "w1_b"),
    (".lokr_w2", "lokr", "w2"), (".lokr_w2_a", "lokr", "w2_a"), (".lokr_w2_b", "lokr", "w2_b"),
    (".lokr_t2", "lokr", "t2"),
    (".diff", "full", "diff"), (".diff_b", "full", "diff_b"),
    # PEFT's magnitude is per output channel whatever its shape (conv: [1, out, 1, 1]), unlike LyCORIS's
    # dora_scale whose axis follows its shape: kept as its own part so the axis is never guessed
    (".alpha", "", "alpha"), (".dora_scale", "", "dora_scale"), (".lora_magnitude_vector", "", "magnitude"),
    (".lora_magnitude_vector.weight", "", "magnitude"),
], key=lambda s: -len(s[0]))

# Keys of formats we recognise but cannot apply: refusing beats applying half of a module.
_UNSUPPORTED = (".wd_for_diff", ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight", ".w_norm", ".b_norm",
                ".oft_blocks", ".oft_diag", ".set_weight", ".lora_B.bias")

PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers save_lora_weights / save_lora_adapter


def split_key(key: str) -> Optional[tuple[str, str, str]]:
    """'name.lora_up.weight' -> ('name', 'lowrank', 'up'); None for a key of no known format."""
    for suffix, family, part in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], family, part
    return None


@dataclass
class LoraFile:
    """A parsed LoRA file: one adapter per module name as spelled in the file."""

    path: str
    adapters: dict[str, Adapter]
    unknown_keys: list[str] = field(default_factory=list)  # keys of no known format (reported when applied)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def families(self) -> frozenset[str]:
        """The components its modules are for: "unet", "te1" (CLIP-L), "te2" (bigG)."""
        return frozenset(component_of(name) for name in self.adapters)

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for a in self.adapters.values():
            kinds[a.kind] = kinds.get(a.kind, 0) + 1
        return f"LoraFile({self.path!r}, {len(self.adapters)} modules {kinds}, {len(self.unknown_keys)} unknown keys)"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for a in self.adapters.values() for t in a.tensors())


def read_tensors(path: str, device: Union[str, torch.device] = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """State dict and string metadata of a LoRA file, via omg.checkpoint (validated safetensors header,
    or a weights-only pickle for .pt/.ckpt/.bin)."""
    from omg.tensorfile import open_source
    try:
        with open_source(path) as source:
            return {k: source.tensor(k, device) for k in source.keys()}, dict(source.metadata or {})
    except CheckpointError as e:
        raise LoraError(f"cannot read LoRA file: {e}") from e


def load_lora(source: Union[str, os.PathLike, Mapping[str, Tensor]], metadata: Optional[Mapping[str, str]] = None,
              name: Optional[str] = None, device: Union[str, torch.device] = "cpu") -> LoraFile:
    """Read a LoRA file (or a state dict) of any supported format into per-module adapters.

    Raises LoraError naming the file and keys for NaN/inf values, inconsistent ranks or half-present
    factor sets. Keys of no known format are kept in .unknown_keys and reported when applied.
    """
    if isinstance(source, Mapping):
        sd, meta, path = dict(source), dict(metadata or {}), name or "<state dict>"
    else:
        path = os.fspath(source)
        sd, meta = read_tensors(path, device)
        meta.update(metadata or {})
    if not sd:
        raise LoraError(f"{path}: the file holds no tensors")
    too_many = [f"{k} ({v.dim()} dims)" for k, v in sd.items() if v.dim() > MAX_DIMS]
    if too_many:  # torch refuses them in most ops (isfinite included); omg.tensorfile refuses such files
        raise LoraError(f"{path}: tensors with more than {MAX_DIMS} dimensions: {sorted(too_many)[:10]}")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise LoraError(f"{path}: {len(bad)} tensors hold NaN or inf values: {sorted(bad)[:10]}")

    groups: dict[str, dict[str, tuple[str, str, Tensor]]] = {}
    unknown, unsupported = [], []
    for key, value in sd.items():
        if any(key.endswith(s) for s in _UNSUPPORTED):
            unsupported.append(key)
            continue
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        module, family, part = parts
        groups.setdefault(module, {})[part] = (family, key, value)
    if unsupported:
        raise LoraError(f"{path}: adapter types omg cannot apply (GLoRA, OFT, norm, DoRA-on-diff, LoRA bias): "
                        f"{len(unsupported)} keys, e.g. {sorted(unsupported)[:5]}")

    alphas = _peft_alphas(meta)
    adapters: dict[str, Adapter] = {}
    for module, parts in groups.items():
        adapter = _build(path, module, parts, alphas)
        if adapter is None:  # only .alpha / .dora_scale with no factors
            unknown += [k for _, k, _ in parts.values()]
            continue
        try:
            adapter.check()
        except LoraError as e:
            raise LoraError(f"{path}: {e}") from None
        adapters[module] = adapter
    if not adapters:
        raise LoraError(f"{path}: no LoRA module found in {len(sd)} keys, e.g. {sorted(sd)[:5]}")
    return LoraFile(path=path, adapters=adapters, unknown_keys=sorted(unknown), metadata=meta)


def _build(path: str, module: str, parts: dict[str, tuple[str, str, Tensor]], alphas) -> Optional[Adapter]:
    families = {fam for fam, _, _ in parts.values() if fam}
    keys = sorted(k for _, k, _ in parts.values())
    if not families:
        return None
    if len(families) > 1:
        raise LoraError(f"{path}: module {module!r} mixes formats {sorted(families)}: {keys}")
    family = families.pop()
    t = {part: v for part, (_, _, v) in parts.items()}
    if "alpha" in t and t["alpha"].numel() != 1:
        raise LoraError(f"{path}: {parts['alpha'][1]}: alpha must be one number, got a tensor of shape "
                        f"{list(t['alpha'].shape)}")
    empty = {k: list(v.shape) for _, k, v in sorted(parts.values(), key=lambda p: p[1]) if v.numel() == 0}
    if empty:  # a rank-0 factor: alpha / rank divides by zero, and there is nothing to apply
        raise LoraError(f"{path}: module {module!r} has empty (rank-0 or zero-size) tensors: {empty}")
    alpha = float(t["alpha"].float().item()) if "alpha" in t else alphas(module, t)
    if "dora_scale" in t and "magnitude" in t:
        raise LoraError(f"{path}: module {module!r} has both a LyCORIS dora_scale and a PEFT "
                        f"lora_magnitude_vector: {keys}")
    peft_dora = "magnitude" in t
    common = dict(name=module, keys=keys, alpha=alpha,
                  dora_scale=t["magnitude"] if peft_dora else t.get("dora_scale"),
                  dora_on_output=True if peft_dora else None)
    try:
        if family == "lowrank":
            if "up" not in t or "down" not in t:
                raise LoraError(f"{path}: module {module!r} has only one of its up/down factors: {keys}")
            return LowRank(up=t["up"], down=t["down"], mid=t.get("mid"), **common)
        if family == "loha":
            missing = [p for p in ("w1_a", "w1_b", "w2_a", "w2_b") if p not in t]
            if missing:
                raise LoraError(f"{path}: LoHa module {module!r} lacks hada_{missing}: {keys}")
            return LoHa(w1_a=t["w1_a"], w1_b=t["w1_b"], w2_a=t["w2_a"], w2_b=t["w2_b"],
                        t1=t.get("t1"), t2=t.get("t2"), **common)
        if family == "lokr":
            return LoKr(**{p: t.get(p) for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}, **common)
        return Full(diff=t.get("diff"), diff_b=t.get("diff_b"), **common)
    except LoraError as e:
        msg = str(e)
        raise LoraError(msg if msg.startswith(path) else f"{path}: {msg}") from None


def _peft_alphas(meta: Mapping[str, str]):
    """alpha(module, tensors) from diffusers' adapter metadata (lora_alpha, alpha_pattern, use_rslora), else None.

    diffusers stores a PEFT LoraConfig per component as JSON under "lora_adapter_metadata", its keys
    prefixed with the component ("unet.lora_alpha") by the pipeline savers, unprefixed by save_lora_adapter.
    Without metadata PEFT's scale is alpha/r with alpha = r, i.e. 1.
    """
    raw = meta.get(PEFT_METADATA_KEY)
    if not raw:
        return lambda module, t: None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return lambda module, t: None

    def alpha(module: str, t: Mapping[str, Tensor]) -> Optional[float]:
        component, _, rel = module.partition(".")
        prefix = f"{component}." if f"{component}.lora_alpha" in config else ""
        rel = rel if prefix else module
        get = lambda k: config.get(prefix + k)  # noqa: E731
        if get("lora_alpha") is None or "down" not in t:
            return None
        value = float(get("lora_alpha"))
        for pattern, a in (get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern.lstrip('^')})$", rel):
                value = float(a)
                break
        if get("use_rslora"):  # scale alpha/sqrt(r) expressed as an alpha for alpha/r
            value = value * math.sqrt(t["down"].shape[0])
        return value

    return alpha
