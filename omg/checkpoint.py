"""Checkpoint layouts and strict loading: SGM single files, diffusers folders, UNet-only files.

Tensors come from omg.tensorfile (validated before anything is allocated). Modules are built on the meta
device and filled with ``load_state_dict(assign=True, strict=True)`` only after every key and shape has been
checked, so a bad file gives one CheckpointError and no partial model.
"""
from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from omg import keymap
from omg.errors import CheckpointError
from omg.tensorfile import SHOW, FiniteCheck, PathLike, TensorSource, _first, open_source
# re-exported: omg.checkpoint.load_state_dict is public API; the readers are reached from here too
from omg.tensorfile import _DTYPES, MetaSource, SafetensorsFile, load_state_dict  # noqa: F401


# ---------------------------------------------------------------------------------------------- layouts

@dataclass
class Part:
    """One model component of a checkpoint: where its tensors are and how module keys are made from them."""

    name: str  # "unet" | "vae" | "text"
    source: TensorSource
    recipes: dict[str, keymap.Recipe]  # module key -> recipe over source keys
    unexpected: list[str]  # source keys that belong to this part but map to no module key
    file_name: Callable[[str], str]  # module key -> how the file would name it (for messages)
    hints: dict[str, Any] = field(default_factory=dict)  # config fields the shapes cannot tell


@dataclass
class Checkpoint:
    path: str
    layout: str  # "sgm", "sgm-unet", "diffusers-unet", "diffusers"
    parts: dict[str, Part]
    sources: list[TensorSource]
    unexpected: list[str] = field(default_factory=list)  # keys of no component at all

    def close(self) -> None:
        for s in self.sources:
            s.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_HINT_FIELDS = {  # per config: the fields shapes leave no trace of, and their checks
    "unet": {"head_dim": int, "norm_groups": int},
    "controlnet": {"head_dim": int, "norm_groups": int},
    "vae": {"norm_groups": int, "scaling_factor": float},
    "clip_l": {"heads": int, "act": str},
    "clip_g": {"heads": int, "act": str},
}


def _hints_from_metadata(path: str, metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """save_sgm stores each config as JSON under "omg.config"; keep only the fields shapes cannot give."""
    raw = metadata.get("omg.config")
    if raw is None:
        return {}
    try:
        configs = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: metadata omg.config is not valid JSON: {e}") from e
    if not isinstance(configs, dict):
        raise CheckpointError(f"{path}: metadata omg.config must be a JSON object")
    return {part: {k: configs[part][k] for k in fields if k in configs[part]}
            for part, fields in _HINT_FIELDS.items() if isinstance(configs.get(part), dict)}


def _check_hints(path: str, part: str, hints: Mapping[str, Any]) -> None:
    """Config hints come from file metadata or config.json: validate before they shape a module."""
    groups = {"clip_l": hints.get("clip_l", {}), "clip_g": hints.get("clip_g", {})} if part == "text" else {part: hints}
    for group, values in groups.items():
        for k, v in values.items():
            kind = _HINT_FIELDS[group].get(k)
            ok = kind is not None and ((isinstance(v, str) and v in ("gelu", "quick_gelu")) if kind is str else (
                type(v) is int and 0 < v <= 1 << 16 if kind is int else
                type(v) in (int, float) and math.isfinite(v) and v > 0))
            if not ok:
                raise CheckpointError(f"{path}: config value {group}.{k} = {v!r} is not supported")


def _sgm_parts(source: TensorSource, layout: str) -> tuple[dict[str, Part], list[str]]:
    keys = source.keys()
    hints = _hints_from_metadata(source.path, source.metadata)
    parts: dict[str, Part] = {}
    if layout == "sgm-unet":  # UNet keys without the model.diffusion_model. prefix
        recipes = {k: keymap.Recipe((k,)) for k in keys}
        parts["unet"] = Part("unet", source, recipes, [], lambda k: k, hints.get("unet", {}))
        return parts, []

    def with_prefix(component: str) -> Callable[[str], str]:
        return lambda k: keymap.SGM_PREFIXES[component] + k

    parts["unet"] = Part("unet", source, keymap.sgm_recipes(keys, "unet"), [], with_prefix("unet"),
                         hints.get("unet", {}))
    if any(k.startswith(keymap.SGM_PREFIXES["vae"]) for k in keys):
        parts["vae"] = Part("vae", source, keymap.sgm_recipes(keys, "vae"), [], with_prefix("vae"),
                            hints.get("vae", {}))
    if any(k.startswith("conditioner.") for k in keys):
        recipes = {f"{enc}.{k}": r for enc in ("clip_l", "clip_g") for k, r in keymap.sgm_recipes(keys, enc).items()}

        def text_name(k: str) -> str:
            enc, _, rest = k.partition(".")
            return keymap.SGM_PREFIXES[enc] + rest if enc in keymap.SGM_PREFIXES else k
        parts["text"] = Part("text", source, recipes, [], text_name,
                             {"clip_l": hints.get("clip_l", {}), "clip_g": hints.get("clip_g", {})})
    known = tuple(keymap.SGM_PREFIXES.values())
    stray = [k for k in keys if not k.startswith(known) and k not in keymap.HARMLESS_SGM_KEYS]
    return parts, stray


def _unet_diffusers_part(source: TensorSource, hints: dict[str, Any], folder: str = "") -> Part:
    recipes, unmapped = keymap.unet_recipes_from_diffusers(source.keys())
    naming = keymap.UNetNaming.from_diffusers_keys(source.keys())

    def file_name(k: str) -> str:
        return folder + (keymap.unet_sgm_name_to_diffusers(k, naming) or k)
    return Part("unet", source, recipes, unmapped, file_name, hints)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read(1 << 20).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot read the config: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: a config must be a JSON object")
    return value


def _diffusers_unet_hints(path: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """head_dim and norm_groups from a diffusers UNet config.json (attention_head_dim is heads per level)."""
    hints: dict[str, Any] = {}
    if isinstance(cfg.get("norm_num_groups"), int):
        hints["norm_groups"] = cfg["norm_num_groups"]
    channels = cfg.get("block_out_channels")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim")
    kinds = cfg.get("down_block_types")
    if isinstance(channels, list) and heads is not None and isinstance(kinds, list):
        heads = [heads] * len(channels) if isinstance(heads, int) else heads
        try:
            dims = {c // h for c, h, kind in zip(channels, heads, kinds) if "CrossAttn" in str(kind)}
        except (TypeError, ZeroDivisionError) as e:
            raise CheckpointError(f"{path}: bad attention_head_dim / block_out_channels: {e}") from e
        if len(dims) > 1:
            raise CheckpointError(f"{path}: per-level head widths {sorted(dims)} differ; this UNet uses one "
                                  f"head width (SGM num_head_channels)")
        if dims:
            hints["head_dim"] = dims.pop()
    return hints


_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


def _component_source(folder: str) -> TensorSource:
    """The weights of one diffusers component folder: shard index > .safetensors > fp16 variant > .bin."""
    candidates = []
    for base in _WEIGHT_NAMES:
        candidates += [f"{base}.safetensors.index.json", f"{base}.safetensors", f"{base}.fp16.safetensors.index.json",
                       f"{base}.fp16.safetensors", f"{base}.bin.index.json", f"{base}.bin", f"{base}.fp16.bin"]
    for name in candidates:
        if os.path.isfile(os.path.join(folder, name)):
            return open_source(os.path.join(folder, name))
    others = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if len(others) == 1:
        return open_source(others[0])
    raise CheckpointError(f"{folder}: no weights found (expected e.g. diffusion_pytorch_model.safetensors or "
                          f"model.safetensors; found {_first(sorted(os.listdir(folder)))})")


DIFFUSERS_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")


def checkpoint_from_diffusers(path: str, sources: Mapping[str, TensorSource],
                              configs: Optional[Mapping[str, dict]] = None) -> Checkpoint:
    """A diffusers model from its component sources ({"unet": ..., "vae": ..., "text_encoder": ..., ...})
    and their config.json contents (used only for what shapes cannot tell: heads, groups, activation)."""
    configs = configs or {}
    if "unet" not in sources:
        raise CheckpointError(f"{path}: a diffusers model needs unet/")
    _other_architecture(f"{path}/unet", sources["unet"].keys(), sources["unet"], "diffusers-unet")
    unet_hints = _diffusers_unet_hints(f"{path}/unet", configs.get("unet", {}))
    parts = {"unet": _unet_diffusers_part(sources["unet"], unet_hints, "unet/")}
    if "vae" in sources:
        src, cfg = sources["vae"], configs.get("vae", {})
        recipes, unmapped = keymap.vae_recipes_from_diffusers(src.keys())
        hints = {k: cfg[h] for k, h in (("norm_groups", "norm_num_groups"), ("scaling_factor", "scaling_factor"))
                 if h in cfg}
        levels = keymap.vae_num_levels(src.keys(), diffusers=True)
        parts["vae"] = Part("vae", src, recipes, ["vae/" + k for k in unmapped],
                            lambda k: "vae/" + (keymap.vae_sgm_name_to_diffusers(k, levels) or k), hints)
    has_l, has_g = "text_encoder" in sources, "text_encoder_2" in sources
    if has_l != has_g:
        raise CheckpointError(f"{path}: has {'text_encoder' if has_l else 'text_encoder_2'} but not the other; "
                              f"SDXL needs both text encoders")
    if has_l:
        parts["text"] = _diffusers_text_part(path, sources["text_encoder"], sources["text_encoder_2"], configs)
    return Checkpoint(path, "diffusers", parts, list(sources.values()))


def _open_diffusers_folder(folder: str) -> Checkpoint:
    sources: dict[str, TensorSource] = {}
    try:
        configs = {}
        for sub in DIFFUSERS_FOLDERS:
            if os.path.isdir(os.path.join(folder, sub)):
                sources[sub] = _component_source(os.path.join(folder, sub))
                cfg = os.path.join(folder, sub, "config.json")
                configs[sub] = _read_json(cfg) if os.path.isfile(cfg) else {}
        return checkpoint_from_diffusers(folder, sources, configs)
    except CheckpointError:
        for s in sources.values():
            s.close()
        raise


def _diffusers_text_part(path: str, src_l: TensorSource, src_g: TensorSource, configs: Mapping[str, dict]) -> Part:
    rec_l, un_l = keymap.clip_l_recipes_from_hf(src_l.keys())
    rec_g, un_g = keymap.clip_g_recipes_from_hf(src_g.keys())
    source = _JoinedSource({"text_encoder/": src_l, "text_encoder_2/": src_g}, path)
    recipes = {f"clip_l.{k}": keymap.Recipe(tuple("text_encoder/" + s for s in r.sources), r.convert)
               for k, r in rec_l.items()}
    recipes.update({f"clip_g.{k}": keymap.Recipe(tuple("text_encoder_2/" + s for s in r.sources), r.convert)
                    for k, r in rec_g.items()})
    hints = {}
    for enc, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        cfg = configs.get(sub, {})
        hints[enc] = {k: cfg[h] for k, h in (("heads", "num_attention_heads"), ("act", "hidden_act")) if h in cfg}

    def file_name(k: str) -> str:
        enc, _, rest = k.partition(".")
        if enc == "clip_l":
            return "text_encoder/" + rest
        try:
            names = list(keymap.clip_g_to_hf({rest: torch.empty(3, 3, device="meta")}))
        except KeyError:
            return "text_encoder_2/" + k
        return "text_encoder_2/" + " / ".join(names)
    unexpected = ["text_encoder/" + k for k in un_l] + ["text_encoder_2/" + k for k in un_g]
    return Part("text", source, recipes, unexpected, file_name, hints)


class _JoinedSource(TensorSource):
    """Sources under name prefixes ("text_encoder/" + key), read as one."""

    def __init__(self, sources: Mapping[str, TensorSource], path: str):
        self._sources = dict(sources)
        self.path = path
        self.metadata = {}

    def _split(self, key: str) -> tuple[TensorSource, str]:
        head, rest = key.split("/", 1)
        return self._sources[head + "/"], rest

    def keys(self) -> list[str]:
        return [p + k for p, s in self._sources.items() for k in s.keys()]

    def meta(self, key: str) -> Tensor:
        src, k = self._split(key)
        return src.meta(k)

    def tensor(self, key: str, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> Tensor:
        src, k = self._split(key)
        return src.tensor(k, device, dtype)


def detect_layout(keys: Iterable[str]) -> Optional[str]:
    """"sgm" (single file, prefixed), "sgm-unet" (bare SGM UNet keys), "diffusers-unet", or None."""
    keys = list(keys)
    if any(k.startswith(keymap.SGM_PREFIXES["unet"]) for k in keys):
        return "sgm"
    if any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in keys):
        return "sgm-unet"
    if any(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in keys):
        return "diffusers-unet"
    return None


def _other_architecture(path: str, keys: list[str], source: TensorSource, layout: str) -> None:
    """Reject SD 1.x/2.x and other non-SDXL files with what was found against what SDXL has."""
    found = []
    if any(k.startswith("cond_stage_model.") for k in keys):
        found.append("a cond_stage_model.* text encoder (SD 1.x/2.x)")
    prefix = keymap.SGM_PREFIXES["unet"] if layout == "sgm" else ""
    label = {"sgm": prefix + "label_emb.0.0.weight", "sgm-unet": "label_emb.0.0.weight"}.get(
        layout, "add_embedding.linear_1.weight")
    unet_keys = [k for k in keys if k.startswith(prefix)]
    conv_proj = [k for k in unet_keys if k.endswith("proj_in.weight") and source.meta(k).ndim == 4]
    if conv_proj:
        found.append(f"{conv_proj[0]} is a 1x1 conv {list(source.meta(conv_proj[0]).shape)} (SD 1.x); "
                     f"SDXL's proj_in is Linear")
    if label not in keys:
        found.append(f"no {label} (SDXL's 2816-d vector embedding)")
        to_k = [k for k in unet_keys if k.endswith("attn2.to_k.weight")]
        if to_k:
            width = source.meta(to_k[0]).shape[-1]
            era = {768: "SD 1.x", 1024: "SD 2.x"}.get(width, "not SDXL")
            found.append(f"text context width {width} ({era}; SDXL has 2048)")
    if layout == "sgm" and any(k.startswith("conditioner.") for k in keys):
        odd = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith("conditioner.")}
                     - {"conditioner.embedders.0.transformer", "conditioner.embedders.1.model"})
        if odd:
            found.append(f"text encoders {_first(odd)} (SDXL base has conditioner.embedders.0.transformer "
                         f"CLIP-L and conditioner.embedders.1.model bigG)")
    if found:
        raise CheckpointError(f"{path}: not an SDXL checkpoint: found " + "; ".join(found) + ". Expected the SDXL "
                              "base layout (model.diffusion_model.label_emb.0.0.weight [1280, 2816], Linear "
                              "proj_in, context 2048, conditioner.embedders.{0,1}).")


def checkpoint_from_source(source: TensorSource) -> Checkpoint:
    """A single file's layout (SGM, or a UNet alone in SGM or diffusers layout); rejects other architectures."""
    path, keys = source.path, source.keys()
    layout = detect_layout(keys)
    if layout is None:
        raise CheckpointError(f"{path}: unrecognized layout: found {len(keys)} keys like {_first(keys[:5])}; "
                              f"expected an SDXL single file (model.diffusion_model.*, first_stage_model.*, "
                              f"conditioner.embedders.*) or a UNet (input_blocks.* / down_blocks.*)")
    _other_architecture(path, keys, source, layout)
    if layout == "diffusers-unet":
        hints = _hints_from_metadata(path, source.metadata).get("unet", {})
        return Checkpoint(path, layout, {"unet": _unet_diffusers_part(source, hints)}, [source])
    parts, stray = _sgm_parts(source, layout)
    return Checkpoint(path, layout, parts, [source], stray)


def open_checkpoint(path: PathLike) -> Checkpoint:
    """Open a single file (SGM, or a UNet alone in SGM or diffusers layout) or a diffusers folder; detect its layout."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        source = open_source(path)
        try:
            return checkpoint_from_source(source)
        except CheckpointError:
            source.close()
            raise
    if any(os.path.isdir(os.path.join(path, sub)) for sub in DIFFUSERS_FOLDERS):
        return _open_diffusers_folder(path)
    source = _component_source(path)  # a diffusers UNet folder on its own (config.json + weights)
    try:
        if detect_layout(source.keys()) != "diffusers-unet":
            raise CheckpointError(f"{path}: a folder without unet/ must hold a diffusers UNet; found keys like "
                                  f"{_first(source.keys()[:3])}")
        _other_architecture(path, source.keys(), source, "diffusers-unet")
        cfg_path = os.path.join(path, "config.json")
        hints = _diffusers_unet_hints(path, _read_json(cfg_path)) if os.path.isfile(cfg_path) else {}
        return Checkpoint(path, "diffusers-unet", {"unet": _unet_diffusers_part(source, hints)}, [source])
    except CheckpointError:
        source.close()
        raise


# ---------------------------------------------------------------------------------------------- strict loading

@dataclass
class Plan:
    """A part checked against the module its config builds: ready to load with no surprises."""

    part: Part
    config: Any
    module: Optional[nn.Module] = None  # built on meta during the check, or at load time


def _infer_config(part: Part, shapes: dict[str, Tensor]) -> Any:
    """The component's config from tensor shapes, plus the hints for what shapes cannot tell."""
    h = part.hints
    if part.name in ("unet", "controlnet"):
        from omg.controlnet import ControlNetConfig
        from omg.unet import UNetConfig
        if part.name == "controlnet":
            outer = ControlNetConfig.from_state_dict(shapes, **h)
            config = outer.unet
        else:
            outer = config = UNetConfig.from_state_dict(shapes, **h)
        widths = [config.model_channels * m for m, d in zip(config.channel_mult, config.transformer_depth) if d]
        widths += [config.model_channels * config.channel_mult[-1]] if config.transformer_depth_middle else []
        if any(w % config.head_dim for w in widths):
            raise ValueError(f"head width {config.head_dim} does not divide the attention widths {widths}")
        return outer
    if part.name == "vae":
        from omg.vae import VAEConfig
        return VAEConfig.from_state_dict(shapes, **h)
    from omg.text import TextEncoderConfig
    configs = []
    for enc in ("clip_l", "clip_g"):
        per = {k[len(enc) + 1:]: v for k, v in shapes.items() if k.startswith(enc + ".")}
        try:
            configs.append(TextEncoderConfig.from_state_dict(per, **h.get(enc, {})))
        except KeyError as e:  # name the key as the model names it
            raise KeyError(f"{enc}.{e.args[0]}" if e.args and isinstance(e.args[0], str) else e) from e
    return tuple(configs)


def build_on_meta(name: str, config: Any) -> nn.Module:
    """The module of a component ("unet", "vae", "text", "controlnet") on the meta device: no memory."""
    with torch.device("meta"):
        if name == "unet":
            from omg.unet import UNet
            return UNet(config)
        if name == "controlnet":
            from omg.controlnet import ControlNet
            return ControlNet(config)
        if name == "vae":
            from omg.vae import AutoencoderKL
            return AutoencoderKL(config)
        from omg.text import SDXLTextEncoder
        return SDXLTextEncoder(*config)


_EXPECTED: dict[tuple[str, Any], dict[str, tuple[tuple[int, ...], bool]]] = {}  # (name, config) -> key shapes


def _expected(name: str, config: Any) -> tuple[dict[str, tuple[tuple[int, ...], bool]], Optional[nn.Module]]:
    """{key: (shape, is floating)} of the module config builds; the module too when it had to be built."""
    known = _EXPECTED.get((name, config))
    if known is not None:
        return known, None
    module = build_on_meta(name, config)
    shapes = {k: (tuple(t.shape), t.dtype.is_floating_point) for k, t in module.state_dict().items()}
    if len(_EXPECTED) > 32:
        _EXPECTED.clear()
    _EXPECTED[(name, config)] = shapes
    return shapes, module


def plan_part(path: str, part: Part) -> tuple[Optional[Plan], list[str]]:
    """Check one part: recipes applied to meta tensors, config inferred, module built on meta, keys compared.

    Returns the plan, or None and the problems (each naming keys as the file names them).
    """
    shapes: dict[str, Tensor] = {}
    broken = []
    for target, recipe in part.recipes.items():
        try:
            shapes[target] = recipe.apply(part.source.meta(s) for s in recipe.sources)
        except Exception as e:  # a recipe over mis-shaped tensors (fuse, transpose) fails in torch
            shapes_in = [list(part.source.meta(s).shape) for s in recipe.sources]
            broken.append(f"{' + '.join(recipe.sources)} {shapes_in}: {e}")
    problems = [f"{part.name}: {len(broken)} tensors cannot be converted: {_first(broken)}"] if broken else []
    try:
        config = _infer_config(part, shapes)
    except (KeyError, StopIteration, IndexError) as e:
        missing = e.args[0] if isinstance(e, KeyError) and e.args else None
        what = f"key {part.file_name(missing)!r} is missing" if isinstance(missing, str) else f"{type(e).__name__}: {e}"
        return None, problems + [f"{part.name}: cannot infer the config from the tensor shapes: {what}"]
    except Exception as e:  # e.g. a zero-width tensor dividing, a head width not dividing
        what = f"{type(e).__name__}: {e}"
        return None, problems + [f"{part.name}: cannot infer the config from the tensor shapes: {what}"]
    try:
        expected, module = _expected(part.name, config)
    except Exception as e:  # shapes that make no buildable model (zero channels, groups not dividing, ...)
        return None, problems + [f"{part.name}: the tensor shapes give no buildable model ({config}): "
                                 f"{type(e).__name__}: {e}"]
    missing = [part.file_name(k) for k in expected if k not in shapes]
    unexpected = list(part.unexpected) + [" + ".join(r.sources) for k, r in part.recipes.items() if k not in expected]
    wrong = []
    for k, (shape, floating) in expected.items():
        got = shapes.get(k)
        if got is None:
            continue
        if tuple(got.shape) != shape:
            wrong.append(f"{' + '.join(part.recipes[k].sources)} {list(got.shape)} (expected {list(shape)})")
        elif got.dtype.is_floating_point != floating:
            wrong.append(f"{' + '.join(part.recipes[k].sources)} dtype {got.dtype} "
                         f"(expected {'floating point' if floating else 'integer'})")
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes/dtypes", wrong)):
        if items:
            problems.append(f"{part.name}: {len(items)} {label}: {_first(items)}")
    return (None if problems else Plan(part, config, module)), problems


def plan_checkpoint(ckpt: Checkpoint) -> dict[str, Plan]:
    """Check every part; one CheckpointError listing all problems, or the plans."""
    plans, problems = {}, []
    if ckpt.unexpected:
        problems.append(f"{len(ckpt.unexpected)} keys of no SDXL component: {_first(ckpt.unexpected)}")
    for name, part in ckpt.parts.items():
        _check_hints(part.source.path, name, part.hints)
        plan, found = plan_part(ckpt.path, part)
        problems += found
        if plan is not None:
            plans[name] = plan
    if problems:
        raise CheckpointError(f"{ckpt.path} ({ckpt.layout} layout): cannot load:\n  " + "\n  ".join(problems))
    return plans


def materialize(plan: Plan, device: Union[str, torch.device], dtype: Optional[torch.dtype]) -> nn.Module:
    """Load the tensors (one at a time, straight to device/dtype) into the meta module; strict and complete.

    A tensor holding NaN or inf once loaded (corrupt data, or a value beyond the dtype's range) raises a
    CheckpointError naming it: such a model would only ever produce non-finite images.
    """
    part = plan.part
    module = plan.module if plan.module is not None else build_on_meta(part.name, plan.config)
    plan.module = None  # the module is handed out; a plan loads once
    state, finite = {}, FiniteCheck(part.source.path)

    def read(key: str) -> Tensor:
        t = part.source.tensor(key, device, dtype)
        finite.add(key, t)  # source keys are the file's names
        return t

    for target, recipe in part.recipes.items():
        t = recipe.apply(read(s) for s in recipe.sources)
        state[target] = t if t.is_contiguous() else t.contiguous()
    finite.raise_if_any()
    module.load_state_dict(state, strict=True, assign=True)
    if hasattr(module, "rebuild_buffers"):
        module.rebuild_buffers()
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    assert not left, f"{part.name}: still on meta after loading: {left[:SHOW]}"
    module.requires_grad_(False)
    return module.eval()
