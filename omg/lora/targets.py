"""Which model weight a LoRA module name addresses: a lookup table built from the model's own names.

Every Linear/Conv2d of the UNet is entered under each spelling a LoRA file may use for it (kohya
underscore name of its SGM path and of its diffusers path, PEFT "unet.<diffusers path>" with and
without ".processor", LyCORIS "lycoris_…", raw paths). Text-encoder entries are built from the
encoders' parameter names; bigG's fused attention gets one entry per q/k/v row slice of in_proj_weight.
Names are never turned back from underscores into dots (that is ambiguous: kohya spells both as "_").
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Optional

from torch import nn

from omg.errors import LoraError

TEXT_FAMILIES = {"te1": ("lora_te1_", "lora_te_", "text_encoder."), "te2": ("lora_te2_", "text_encoder_2.")}


@dataclass(frozen=True)
class Target:
    """A weight (or a row slice of one) in a root module, addressed by parameter names relative to the root."""

    module: str  # module path in the root; the Linear/Conv2d to hook in unmerged mode
    weight: str  # parameter name of the weight
    bias: Optional[str] = None  # parameter name of the bias (full-diff .diff_b goes there)
    rows: Optional[tuple[int, int]] = None  # rows of a fused weight (bigG in_proj: q, k, v)
    transpose: bool = False  # stored transposed relative to a Linear weight (bigG text_projection: x @ P)


@dataclass
class TargetTable:
    names: dict[str, Target]
    families: frozenset[str]  # name families this root can take ("unet", "te1", "te2")


def family(name: str) -> str:
    """'te1' / 'te2' for text-encoder spellings, 'unet' for everything else."""
    if name.startswith(TEXT_FAMILIES["te2"]):
        return "te2"
    if name.startswith(TEXT_FAMILIES["te1"]):
        return "te1"
    return "unet"


def _u(path: str) -> str:
    return path.replace(".", "_")


def _add(table: dict[str, Target], name: str, target: Target) -> None:
    old = table.setdefault(name, target)
    assert old == target, f"LoRA name {name} would address both {old} and {target}"


_CACHE: "weakref.WeakKeyDictionary[nn.Module, TargetTable]" = weakref.WeakKeyDictionary()


def target_table(root: nn.Module) -> TargetTable:
    """The lookup table of a UNet (omg.unet.UNet) or of an SDXL text encoder (with .clip_l / .clip_g)."""
    if root not in _CACHE:
        from omg.unet import UNet
        if isinstance(root, UNet):
            _CACHE[root] = TargetTable(unet_targets(root), frozenset({"unet"}))
        elif hasattr(root, "clip_l") or hasattr(root, "clip_g"):
            fams = {f for f, attr in (("te1", "clip_l"), ("te2", "clip_g")) if hasattr(root, attr)}
            _CACHE[root] = TargetTable(text_targets(root), frozenset(fams))
        else:
            raise LoraError(f"LoRA targets are known for omg.unet.UNet and the SDXL text encoder, "
                            f"not {type(root).__name__}")
    return _CACHE[root]


# ------------------------------------------------------------------------------------------- UNet

def unet_targets(unet: nn.Module) -> dict[str, Target]:
    from omg.keymap import unet_module_map  # diffusers module path -> SGM module path

    table: dict[str, Target] = {}
    layers = {}
    for name, m in unet.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            layers[name] = t = Target(name, f"{name}.weight", f"{name}.bias" if m.bias is not None else None)
            for alias in (f"lora_unet_{_u(name)}", name, f"diffusion_model.{name}", f"model.diffusion_model.{name}"):
                _add(table, alias, t)
    for diffusers, sgm in unet_module_map(unet.config).items():
        if sgm not in layers:  # norms and other non-adaptable modules
            continue
        t = layers[sgm]
        for alias in (f"lora_unet_{_u(diffusers)}", f"lycoris_{_u(diffusers)}"):
            _add(table, alias, t)
        for path in (diffusers, f"unet.{diffusers}"):
            _add(table, path, t)
            # old attention-processor spellings: attn1.processor.to_q, attn1.processor.to_out (ComfyUI)
            if re.search(r"\.attn\d\.to_(q|k|v|out\.0)$", path):
                proc = re.sub(r"\.to_(q|k|v|out)(\.0)?$", r".processor.to_\1", path)
                _add(table, proc, t)
                if path.endswith(".to_out.0"):
                    _add(table, path[:-2], t)
                    _add(table, proc + ".0", t)
    return table


# ------------------------------------------------------------------------------------------- text

# HF CLIP module -> older diffusers text-encoder spelling (…self_attn.to_q_lora.down.weight)
_OLD_ATTN = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}


def _text_aliases(table: dict[str, Target], hf: str, prefixes: tuple[str, str], target: Target) -> None:
    kohya, diffusers = prefixes
    names = [f"{kohya}{_u(hf)}", f"{diffusers}{hf}"]
    m = re.search(r"\.self_attn\.(q|k|v|out)_proj$", hf)
    if m:
        names.append(f"{diffusers}{hf[: m.start()]}.self_attn.{_OLD_ATTN[m.group(1) + '_proj']}")
    for name in names:
        _add(table, name, target)


def text_targets(text: nn.Module) -> dict[str, Target]:
    table: dict[str, Target] = {}
    clip_l = getattr(text, "clip_l", None)
    if clip_l is not None:
        for name, m in clip_l.named_modules():
            if isinstance(m, nn.Linear) and name.startswith("text_model."):
                bias = f"clip_l.{name}.bias" if m.bias is not None else None
                t = Target(f"clip_l.{name}", f"clip_l.{name}.weight", bias)
                _text_aliases(table, name, ("lora_te1_", "text_encoder."), t)
    clip_g = getattr(text, "clip_g", None)
    if clip_g is not None:
        params = dict(clip_g.named_parameters())
        for pname, p in params.items():
            if pname == "text_projection":  # used as x @ P: a Linear weight would be P.T
                t = Target("clip_g", "clip_g.text_projection", None, transpose=True)
                _text_aliases(table, "text_projection", ("lora_te2_", "text_encoder_2."), t)
                continue
            m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|"
                             r"mlp\.c_fc\.weight|mlp\.c_proj\.weight)", pname)
            if not m:
                continue
            block, what = m.groups()
            hf = f"text_model.encoder.layers.{block}."
            g = f"clip_g.transformer.resblocks.{block}."
            if what == "attn.in_proj_weight":
                width = p.shape[0] // 3
                has_bias = f"transformer.resblocks.{block}.attn.in_proj_bias" in params
                bias = g + "attn.in_proj_bias" if has_bias else None
                for i, qkv in enumerate("qkv"):
                    t = Target(g + "attn", g + "attn.in_proj_weight", bias, rows=(i * width, (i + 1) * width))
                    _text_aliases(table, hf + f"self_attn.{qkv}_proj", ("lora_te2_", "text_encoder_2."), t)
                continue
            module = what[: -len(".weight")]
            hf_name = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}[module]
            bias = g + module + ".bias" if f"transformer.resblocks.{block}.{module}.bias" in params else None
            _text_aliases(table, hf + hf_name, ("lora_te2_", "text_encoder_2."), Target(g + module, g + what, bias))
    return table
