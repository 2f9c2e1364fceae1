"""Key-name mappings between the SGM single-file layout (our module names) and the diffusers/transformers layouts.

Everything here is built from the published renaming rules (kohya's make_unet_conversion_map in
library/sdxl_model_util.py, diffusers' convert_ldm_unet_checkpoint / convert_open_clip_checkpoint of its
single-file loader); the TSV in tests/data is only the
test oracle. Tensors that change on the way (fused q/k/v, transposed projection, 1x1-conv <-> Linear) go
through a :class:`Recipe` applied per key at load time, so no second full copy of a state dict is made.

Component keys carry no prefix; SGM_PREFIXES names the single-file prefix of each component.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor

SGM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "conditioner.embedders.0.transformer.",
    "clip_g": "conditioner.embedders.1.model.",
}
# Present in some SGM files and unused by the model (stable-diffusion.cpp lists them as unused).
HARMLESS_SGM_KEYS = frozenset({
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.1.model.logit_scale",
    "denoiser.sigmas",
})


# ---------------------------------------------------------------------------------------------- recipes

@dataclass(frozen=True)
class Recipe:
    """One target tensor = convert(*tensors of sources); identity of the single source when convert is None."""

    sources: tuple[str, ...]
    convert: Optional[Callable[..., Tensor]] = None

    def apply(self, tensors: Iterable[Tensor]) -> Tensor:
        tensors = tuple(tensors)
        if self.convert is None:
            assert len(tensors) == 1, self.sources
            return tensors[0]
        return self.convert(*tensors)


def identity_recipes(keys: Mapping[str, str]) -> dict[str, Recipe]:
    """{target: source} -> plain renaming recipes."""
    return {target: Recipe((source,)) for target, source in keys.items()}


def fuse_rows(*parts: Tensor) -> Tensor:
    """q, k, v -> OpenCLIP in_proj (rows [q; k; v])."""
    return torch.cat(parts, dim=0)


def transpose(t: Tensor) -> Tensor:
    """HF Linear weight [out, in] <-> OpenCLIP text_projection [in, out] (used as x @ P)."""
    if t.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {list(t.shape)}")
    return t.t().contiguous()


def linear_to_conv1x1(t: Tensor) -> Tensor:
    """diffusers VAE attention Linear [C, C] -> SGM 1x1 conv [C, C, 1, 1] (already 4-D: unchanged)."""
    return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t


def conv1x1_to_linear(t: Tensor) -> Tensor:
    """SGM 1x1 conv [C, C, 1, 1] -> diffusers Linear [C, C]."""
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t


# ---------------------------------------------------------------------------------------------- UNet

_RESBLOCK = {  # SGM ResBlock child -> diffusers ResnetBlock2D child
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
_UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
}


def _rename_head(name: str, table: Mapping[str, str]) -> Optional[str]:
    """Replace the leading dotted component(s) of name found in table; None when none matches."""
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


def _join(*parts: Optional[str]) -> str:
    return ".".join(p for p in parts if p)


@dataclass(frozen=True)
class UNetNaming:
    """What the UNet block names depend on: ResBlocks per down level, and which diffusers up_blocks have attention."""

    num_res_blocks: int
    up_blocks_with_attention: frozenset[int]

    @classmethod
    def from_config(cls, config) -> "UNetNaming":
        levels = len(config.channel_mult)
        return cls(config.num_res_blocks,
                   frozenset(i for i in range(levels) if config.transformer_depth[levels - 1 - i]))

    @classmethod
    def from_diffusers_keys(cls, keys: Iterable[str]) -> "UNetNaming":
        resnets, attn = set(), set()
        for k in keys:
            if m := re.match(r"down_blocks\.0\.resnets\.(\d{1,9})\.", k):
                resnets.add(int(m.group(1)))
            elif m := re.match(r"up_blocks\.(\d{1,9})\.attentions\.", k):
                attn.add(int(m.group(1)))
        return cls(len(resnets), frozenset(attn))

    @classmethod
    def from_sgm_keys(cls, keys: Iterable[str]) -> "UNetNaming":
        """num_res_blocks from the first downsampler (input_blocks.{nrb+1}.0.op); attention is not needed this way."""
        keys = list(keys)
        ops = [int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d{1,9})\.0\.op\.", k))]
        if ops:
            return cls(min(ops) - 1, frozenset())
        blocks = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d{1,9})\.", k))}
        return cls(max(len(blocks) - 1, 0), frozenset())


def unet_sgm_name_to_diffusers(name: str, naming: UNetNaming) -> Optional[str]:
    """SGM UNet key or module path -> diffusers name (None if it is no SDXL-family UNet name)."""
    top = _rename_head(name, _UNET_TOP)
    if top is not None:
        return top
    per_level = naming.num_res_blocks + 1
    if m := re.fullmatch(r"input_blocks\.(\d{1,9})\.(\d{1,9})(?:\.(.+))?", name):
        n, layer, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if n == 0:
            return None
        level, j = divmod(n - 1, per_level)
        if j == naming.num_res_blocks:  # the level's downsampler: input_blocks.N.0.op
            if layer != 0 or rest is None or not (rest == "op" or rest.startswith("op.")):
                return None
            return _join(f"down_blocks.{level}.downsamplers.0.conv", rest[2:].lstrip("."))
        if layer == 0:
            res = _rename_head(rest or "", _RESBLOCK)
            return None if res is None else f"down_blocks.{level}.resnets.{j}.{res}"
        return _join(f"down_blocks.{level}.attentions.{j}", rest) if layer == 1 else None
    if m := re.fullmatch(r"middle_block\.(\d{1,9})(?:\.(.+))?", name):
        layer, rest = int(m.group(1)), m.group(2)
        if layer in (0, 2):
            res = _rename_head(rest or "", _RESBLOCK)
            return None if res is None else f"mid_block.resnets.{layer // 2}.{res}"
        return _join("mid_block.attentions.0", rest) if layer == 1 else None
    if m := re.fullmatch(r"output_blocks\.(\d{1,9})\.(\d{1,9})(?:\.(.+))?", name):
        n, layer, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, j = divmod(n, per_level)
        if layer == 0:
            res = _rename_head(rest or "", _RESBLOCK)
            return None if res is None else f"up_blocks.{level}.resnets.{j}.{res}"
        if rest is not None and (rest == "conv" or rest.startswith("conv.")):  # Upsample: ...N.{1|2}.conv
            return f"up_blocks.{level}.upsamplers.0.{rest}" if j == naming.num_res_blocks else None
        return _join(f"up_blocks.{level}.attentions.{j}", rest) if layer == 1 else None
    return None


def unet_diffusers_name_to_sgm(name: str, naming: UNetNaming) -> Optional[str]:
    """diffusers UNet key or module path -> SGM name (None if it is no SDXL-family UNet name)."""
    top = _rename_head(name, {v: k for k, v in _UNET_TOP.items()})
    if top is not None:
        return top
    per_level = naming.num_res_blocks + 1
    res_back = {v: k for k, v in _RESBLOCK.items()}
    block = r"(down|up)_blocks\.(\d{1,9})\.(resnets|attentions|downsamplers|upsamplers)\.(\d{1,9})(?:\.(.+))?"
    if m := re.fullmatch(block, name):
        side, level, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "resnets":
            res = _rename_head(rest or "", res_back)
            if res is None:
                return None
            n = level * per_level + j + 1 if side == "down" else level * per_level + j
            return f"{'input' if side == 'down' else 'output'}_blocks.{n}.0.{res}"
        if kind == "attentions":
            n = level * per_level + j + 1 if side == "down" else level * per_level + j
            return _join(f"{'input' if side == 'down' else 'output'}_blocks.{n}.1", rest)
        if j != 0 or rest is None or not (rest == "conv" or rest.startswith("conv.")):
            return None
        if side == "down" and kind == "downsamplers":
            return _join(f"input_blocks.{(level + 1) * per_level}.0.op", rest[4:].lstrip("."))
        if side == "up" and kind == "upsamplers":
            layer = 2 if level in naming.up_blocks_with_attention else 1
            return f"output_blocks.{level * per_level + naming.num_res_blocks}.{layer}.{rest}"
        return None
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d{1,9})(?:\.(.+))?", name):
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return _join("middle_block.1", rest) if j == 0 else None
        res = _rename_head(rest or "", res_back)
        return None if res is None or j > 1 else f"middle_block.{2 * j}.{res}"
    return None


@functools.lru_cache(maxsize=8)
def _unet_sgm_keys(config) -> tuple[str, ...]:
    from omg.unet import UNet  # the key set of the model itself; built on meta, so no memory

    with torch.device("meta"):
        return tuple(UNet(config).state_dict())


def unet_diffusers_to_sgm(config) -> dict[str, str]:
    """{diffusers key: SGM key} over every parameter of UNet(config); one-to-one (1680 keys for SDXL)."""
    naming = UNetNaming.from_config(config)
    out = {}
    for key in _unet_sgm_keys(config):
        diffusers = unet_sgm_name_to_diffusers(key, naming)
        assert diffusers is not None and diffusers not in out, key
        out[diffusers] = key
    return out


def unet_module_map(config) -> dict[str, str]:
    """{diffusers module path: SGM module path} for every UNet module that owns parameters."""
    return {d.rsplit(".", 1)[0]: s.rsplit(".", 1)[0] for d, s in unet_diffusers_to_sgm(config).items()}


def unet_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """SGM UNet state dict -> diffusers names (same tensors; for export and tests)."""
    naming = UNetNaming.from_sgm_keys(sd)
    out = {}
    for key, t in sd.items():
        name = unet_sgm_name_to_diffusers(key, naming)
        if name is None:
            raise KeyError(f"no diffusers name for UNet key {key!r}")
        out[name] = t
    return out


def unet_recipes_from_diffusers(keys: Iterable[str]) -> tuple[dict[str, Recipe], list[str]]:
    """Recipes {SGM key: diffusers source} for a diffusers UNet state dict, and the keys that map nowhere."""
    keys = list(keys)
    naming = UNetNaming.from_diffusers_keys(keys)
    recipes, unmapped = {}, []
    for key in keys:
        sgm = unet_diffusers_name_to_sgm(key, naming)
        if sgm is None or sgm in recipes:
            unmapped.append(key)
        else:
            recipes[sgm] = Recipe((key,))
    return recipes, unmapped


# ---------------------------------------------------------------------------------------------- VAE

_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTN_LEGACY = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # older diffusers names
_VAE_MID = {"block_1": "resnets.0", "block_2": "resnets.1"}


def vae_sgm_name_to_diffusers(name: str, num_levels: int) -> Optional[str]:
    """SGM VAE key or module path -> diffusers name (None if unknown)."""
    if name.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return name
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", name)
    if not m:
        return None
    part, rest = m.groups()
    if rest.split(".")[0] in ("conv_in", "conv_out"):
        return name
    if renamed := _rename_head(rest, {"norm_out": "conv_norm_out"}):
        return f"{part}.{renamed}"
    if mm := re.fullmatch(r"(down|up)\.(\d{1,9})\.block\.(\d{1,9})\.(.+)", rest):
        side, level, j, inner = mm.group(1), int(mm.group(2)), int(mm.group(3)), mm.group(4)
        if (side == "down") != (part == "encoder") or level >= num_levels:
            return None
        index = level if side == "down" else num_levels - 1 - level
        inner = _rename_head(inner, {"nin_shortcut": "conv_shortcut"}) or inner
        return f"{part}.{side}_blocks.{index}.resnets.{j}.{inner}"
    if mm := re.fullmatch(r"(down|up)\.(\d{1,9})\.(downsample|upsample)\.(.+)", rest):
        side, level, inner = mm.group(1), int(mm.group(2)), mm.group(4)
        if (side == "down") != (part == "encoder") or level >= num_levels or mm.group(3)[:2] != side[:2]:
            return None
        index = level if side == "down" else num_levels - 1 - level
        return f"{part}.{side}_blocks.{index}.{mm.group(3)}rs.0.{inner}"
    if mm := re.fullmatch(r"mid\.attn_1\.(norm|q|k|v|proj_out)(\..+)?", rest):
        return f"{part}.mid_block.attentions.0.{_VAE_ATTN[mm.group(1)]}{mm.group(2) or ''}"
    if mm := re.fullmatch(r"mid\.(block_1|block_2)\.(.+)", rest):
        inner = _rename_head(mm.group(2), {"nin_shortcut": "conv_shortcut"}) or mm.group(2)
        return f"{part}.mid_block.{_VAE_MID[mm.group(1)]}.{inner}"
    return None


def vae_diffusers_name_to_sgm(name: str, num_levels: int) -> Optional[str]:
    """diffusers VAE key or module path -> SGM name (None if unknown); accepts query/key/value/proj_attn."""
    if name.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return name
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", name)
    if not m:
        return None
    part, rest = m.groups()
    if rest.split(".")[0] in ("conv_in", "conv_out"):
        return name
    if renamed := _rename_head(rest, {"conv_norm_out": "norm_out"}):
        return f"{part}.{renamed}"
    if mm := re.fullmatch(r"(down|up)_blocks\.(\d{1,9})\.resnets\.(\d{1,9})\.(.+)", rest):
        side, index, j, inner = mm.group(1), int(mm.group(2)), int(mm.group(3)), mm.group(4)
        if (side == "down") != (part == "encoder") or index >= num_levels:
            return None
        level = index if side == "down" else num_levels - 1 - index
        inner = _rename_head(inner, {"conv_shortcut": "nin_shortcut"}) or inner
        return f"{part}.{side}.{level}.block.{j}.{inner}"
    if mm := re.fullmatch(r"(down|up)_blocks\.(\d{1,9})\.(downsamplers|upsamplers)\.0\.(.+)", rest):
        side, index, inner = mm.group(1), int(mm.group(2)), mm.group(4)
        if (side == "down") != (part == "encoder") or index >= num_levels or mm.group(3)[:2] != side[:2]:
            return None
        level = index if side == "down" else num_levels - 1 - index
        return f"{part}.{side}.{level}.{mm.group(3)[:-2]}.{inner}"
    attn = r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)(\..+)?"
    if mm := re.fullmatch(attn, rest):
        back = {v: k for k, v in _VAE_ATTN.items()}
        sgm = back.get(mm.group(1)) or _VAE_ATTN_LEGACY[mm.group(1)]
        return f"{part}.mid.attn_1.{sgm}{mm.group(2) or ''}"
    if mm := re.fullmatch(r"mid_block\.resnets\.(0|1)\.(.+)", rest):
        inner = _rename_head(mm.group(2), {"conv_shortcut": "nin_shortcut"}) or mm.group(2)
        return f"{part}.mid.block_{int(mm.group(1)) + 1}.{inner}"
    return None


def vae_num_levels(keys: Iterable[str], diffusers: bool) -> int:
    """Resolution levels of a VAE key set (encoder down blocks) in SGM or diffusers naming."""
    pattern = r"encoder\.down_blocks\.(\d{1,9})\." if diffusers else r"encoder\.down\.(\d{1,9})\."
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _is_vae_attn_weight(sgm_key: str) -> bool:
    return re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight", sgm_key) is not None


def vae_recipes_from_diffusers(keys: Iterable[str]) -> tuple[dict[str, Recipe], list[str]]:
    """Recipes {SGM key: diffusers source} (attention Linear -> 1x1 conv) and the keys that map nowhere."""
    keys = list(keys)
    levels = vae_num_levels(keys, diffusers=True)
    recipes, unmapped = {}, []
    for key in keys:
        sgm = vae_diffusers_name_to_sgm(key, levels)
        if sgm is None or sgm in recipes:
            unmapped.append(key)
        else:
            recipes[sgm] = Recipe((key,), linear_to_conv1x1 if _is_vae_attn_weight(sgm) else None)
    return recipes, unmapped


def vae_sgm_to_diffusers_keys(sgm_keys: Iterable[str]) -> dict[str, str]:
    """{SGM key: diffusers key} for a VAE key set (names only; attention weights also need conv1x1_to_linear)."""
    sgm_keys = list(sgm_keys)
    levels = vae_num_levels(sgm_keys, diffusers=False)
    return {k: vae_sgm_name_to_diffusers(k, levels) for k in sgm_keys}


def vae_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """SGM VAE state dict -> diffusers names, mid-attention 1x1 convs as Linear weights (export and tests)."""
    names = vae_sgm_to_diffusers_keys(sd)
    out = {}
    for key, t in sd.items():
        if names[key] is None:
            raise KeyError(f"no diffusers name for VAE key {key!r}")
        out[names[key]] = conv1x1_to_linear(t) if _is_vae_attn_weight(key) else t
    return out


# ---------------------------------------------------------------------------------------------- text encoders

_HF_LAYER_TO_OPENCLIP = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def clip_l_recipes_from_hf(keys: Iterable[str]) -> tuple[dict[str, Recipe], list[str]]:
    """CLIP-L in transformers layout -> our keys ("text_model.*", the SGM keys). transformers 5 saves
    CLIPTextModel without the "text_model." head; both spellings are accepted. position_ids is dropped."""
    recipes, unmapped = {}, []
    for key in keys:
        target = key if key.startswith("text_model.") else "text_model." + key
        if target == "text_model.embeddings.position_ids":
            continue
        if target in recipes:
            unmapped.append(key)
        else:
            recipes[target] = Recipe((key,))
    return recipes, unmapped


def clip_g_recipes_from_hf(keys: Iterable[str]) -> tuple[dict[str, Recipe], list[str]]:
    """bigG in transformers CLIPTextModelWithProjection layout -> OpenCLIP keys.

    q/k/v are fused into in_proj (rows q, k, v), text_projection.weight is transposed (x @ P), the rest renamed.
    """
    keys = list(keys)
    present = set(keys)
    recipes: dict[str, Recipe] = {}
    used: set[str] = set()

    def add(target: str, recipe: Recipe) -> None:
        if target in recipes or any(s not in present for s in recipe.sources):
            return
        recipes[target] = recipe
        used.update(recipe.sources)

    def hf(key: str) -> str:  # the file's spelling: with or without the "text_model." head
        return key if key in present or "text_model." + key not in present else "text_model." + key

    for key in keys:
        inner = key[len("text_model."):] if key.startswith("text_model.") else key
        if inner == "embeddings.position_ids":
            used.add(key)
        elif inner == "embeddings.token_embedding.weight":
            add("token_embedding.weight", Recipe((key,)))
        elif inner == "embeddings.position_embedding.weight":
            add("positional_embedding", Recipe((key,)))
        elif inner.startswith("final_layer_norm."):
            add("ln_final." + inner[len("final_layer_norm."):], Recipe((key,)))
        elif inner == "text_projection.weight":
            add("text_projection", Recipe((key,), transpose))
        elif m := re.fullmatch(r"encoder\.layers\.(\d{1,9})\.self_attn\.(q|k|v)_proj\.(weight|bias)", inner):
            layer, kind = m.group(1), m.group(3)
            base = f"encoder.layers.{layer}.self_attn"
            sources = tuple(hf(f"{base}.{p}_proj.{kind}") for p in "qkv")
            add(f"transformer.resblocks.{layer}.attn.in_proj_{kind}", Recipe(sources, fuse_rows))
        elif m := re.fullmatch(r"encoder\.layers\.(\d{1,9})\.(.+)\.(weight|bias)", inner):
            renamed = _rename_head(m.group(2), _HF_LAYER_TO_OPENCLIP)
            if renamed is not None:
                add(f"transformer.resblocks.{m.group(1)}.{renamed}.{m.group(3)}", Recipe((key,)))
    unmapped = [k for k in keys if k not in used]
    return recipes, unmapped


def clip_g_to_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP bigG state dict -> transformers CLIPTextModelWithProjection keys (split in_proj, transpose P)."""
    back = {v: k for k, v in _HF_LAYER_TO_OPENCLIP.items()}
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = t
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = t
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key[len("ln_final."):]] = t
        elif key == "text_projection":
            out["text_projection.weight"] = transpose(t)
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d{1,9})\.attn\.in_proj_(weight|bias)", key):
            for name, part in zip("qkv", t.chunk(3, dim=0)):
                out[f"text_model.encoder.layers.{m.group(1)}.self_attn.{name}_proj.{m.group(2)}"] = part.contiguous()
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d{1,9})\.(.+)\.(weight|bias)", key):
            renamed = _rename_head(m.group(2), back)
            if renamed is None:
                raise KeyError(f"no transformers name for bigG key {key!r}")
            out[f"text_model.encoder.layers.{m.group(1)}.{renamed}.{m.group(3)}"] = t
        else:
            raise KeyError(f"no transformers name for bigG key {key!r}")
    return out


# ---------------------------------------------------------------------------------------------- whole SGM file

def sgm_recipes(keys: Iterable[str], component: str) -> dict[str, Recipe]:
    """Recipes for one component of an SGM single file: strip its prefix.

    bigG: some files store "text_projection.weight" (a Linear weight, i.e. P transposed) instead of
    "text_projection"; it is transposed into place.
    """
    prefix = SGM_PREFIXES[component]
    recipes = {k[len(prefix):]: Recipe((k,)) for k in keys if k.startswith(prefix) and k not in HARMLESS_SGM_KEYS}
    if component == "clip_g" and "text_projection" not in recipes and "text_projection.weight" in recipes:
        recipes["text_projection"] = Recipe((prefix + "text_projection.weight",), transpose)
        del recipes["text_projection.weight"]
    return recipes


# ---------------------------------------------------------------------------------------------- ControlNet

CONTROLNET_SGM_PREFIX = "control_model."  # ControlNet single files of the original code (cldm) may carry it


def controlnet_diffusers_name_to_sgm(name: str, naming: UNetNaming, hint_blocks: int) -> Optional[str]:
    """diffusers ControlNetModel key -> SGM (cldm) name: the conditioning embedding is input_hint_block (its convs
    at even indices, SiLUs between), the zero convolutions zero_convs.N.0 and middle_block_out.0; the encoder
    half and middle block are named as in the UNet. hint_blocks: how many convs the embedding has between its
    first and last (6 for SDXL's 16, 32, 96, 256 channels). None for a name of no ControlNet."""
    if m := re.fullmatch(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d{1,9}))\.(weight|bias)", name):
        index = 0 if m.group(1) == "conv_in" else 2 * hint_blocks + 2 if m.group(1) == "conv_out" else (
            2 * int(m.group(2)) + 2)
        return f"input_hint_block.{index}.{m.group(3)}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d{1,9})\.(weight|bias)", name):
        return f"zero_convs.{m.group(1)}.0.{m.group(2)}"
    if m := re.fullmatch(r"controlnet_mid_block\.(weight|bias)", name):
        return f"middle_block_out.0.{m.group(1)}"
    if name.startswith(("up_blocks.", "conv_norm_out.", "conv_out.")):  # no decoder in a ControlNet
        return None
    return unet_diffusers_name_to_sgm(name, naming)


def controlnet_recipes_from_diffusers(keys: Iterable[str]) -> tuple[dict[str, Recipe], list[str]]:
    """Recipes {SGM key: diffusers source} for a diffusers ControlNetModel state dict, and the keys that map nowhere."""
    keys = list(keys)
    naming = UNetNaming.from_diffusers_keys(keys)
    block = r"controlnet_cond_embedding\.blocks\.(\d{1,9})\."
    hint_blocks = len({m.group(1) for k in keys if (m := re.match(block, k))})
    recipes, unmapped = {}, []
    for key in keys:
        sgm = controlnet_diffusers_name_to_sgm(key, naming, hint_blocks)
        if sgm is None or sgm in recipes:
            unmapped.append(key)
        else:
            recipes[sgm] = Recipe((key,))
    return recipes, unmapped


def controlnet_sgm_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """SGM ControlNet state dict -> diffusers ControlNetModel names (same tensors; for export and tests)."""
    hint = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"input_hint_block\.(\d{1,9})\.weight", k)))
    last = hint[-1] if hint else -1
    unet_part = {k: t for k, t in sd.items() if not k.startswith(("input_hint_block.", "zero_convs.",
                                                                      "middle_block_out."))}
    out = unet_to_diffusers(unet_part)
    for key, t in sd.items():
        if m := re.fullmatch(r"input_hint_block\.(\d{1,9})\.(weight|bias)", key):
            i = int(m.group(1))
            head = "conv_in" if i == 0 else "conv_out" if i == last else f"blocks.{i // 2 - 1}"
            out[f"controlnet_cond_embedding.{head}.{m.group(2)}"] = t
        elif m := re.fullmatch(r"zero_convs\.(\d{1,9})\.0\.(weight|bias)", key):
            out[f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"] = t
        elif m := re.fullmatch(r"middle_block_out\.0\.(weight|bias)", key):
            out[f"controlnet_mid_block.{m.group(1)}"] = t
    return out
