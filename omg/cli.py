"""The `omg` command.

    omg generate --checkpoint sd_xl_base_1.0.safetensors --prompt "a man and a woman in a park" \\
        --concept "man: a photo of sks man @ sks.safetensors" \\
        --concept "woman: a photo of xyz woman @ xyz.safetensors" --out out.png --save-masks
    omg generate --spec concepts.yaml         # the same as a YAML/JSON file (keys as the flags, concepts as a list)
    omg generate --spec concepts.yaml --seeds 3 8 21      # three images in one batch: out.png, out_1.png, out_2.png

The options are omg.OMGOptions' fields (flag --blend-steps = spec key blend_steps). Writes each image with its
generation parameters in a PNG text chunk ("parameters", JSON), its stage-1 image (<stem>_stage1.png) and, on
request, mask and attention overlays.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any, Optional

DEMO_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "demo",
                               "demo_sdxl.safetensors")  # written by demo/train.py
DEMO_SPEC = os.path.join(os.path.dirname(DEMO_CHECKPOINT), "demo.yaml")  # the demo's prompt and concepts
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def parse_concept(text: str) -> dict:
    """'CLASS: PROMPT [@ LORA[*SCALE]] [! NEGATIVE]' -> concept dict."""
    from omg.errors import OptionError

    if ":" not in text:
        raise OptionError(f"--concept {text!r}: expected 'class: prompt [@ lora.safetensors[*scale]] [! negative]'")
    class_name, rest = (s.strip() for s in text.split(":", 1))
    concept: dict[str, Any] = {"class_name": class_name}
    if "!" in rest:
        rest, negative = (s.strip() for s in rest.split("!", 1))
        concept["negative_prompt"] = negative
    if "@" in rest:
        rest, lora = (s.strip() for s in rest.split("@", 1))
        if "*" in lora:
            lora, scale = lora.rsplit("*", 1)
            concept["lora_scale"] = float(scale)
        concept["lora"] = lora.strip()
    concept["prompt"] = rest
    return concept


def load_spec(path: str) -> dict:
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml
        spec = yaml.safe_load(text)
    else:
        spec = json.loads(text)
    if not isinstance(spec, dict):
        from omg.errors import OptionError
        raise OptionError(f"{path}: expected a mapping of options, got {type(spec).__name__}")
    base = os.path.dirname(os.path.abspath(path))
    for c in spec.get("concepts", []):  # LoRA paths are relative to the spec file
        if c.get("lora") and not os.path.isabs(c["lora"]):
            c["lora"] = os.path.join(base, c["lora"])
    _spec_paths(spec, base)
    return spec


def _spec_paths(spec: dict, base: str) -> None:
    """Control images, ControlNets and style LoRAs named in a spec file are relative to it, as concept LoRAs are."""
    from omg.control import Control
    from omg.style import StyleLora

    def rel(p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(base, p)
    for key, kind, fields in (("control", Control, ("image", "model")), ("style_lora", StyleLora, ("lora",))):
        entries = spec.get(key)
        if entries is None:
            continue
        resolved = []
        for entry in entries if isinstance(entries, list) else [entries]:
            d = kind.parse(entry).describe()
            resolved.append({**d, **{f: rel(d[f]) for f in fields}})
        spec[key] = resolved


RUN_KEYS = ("prompt", "concepts", "checkpoint", "device", "dtype")  # spec keys that are not OMGOptions fields


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    from omg.options import OMGOptions, cli_options

    parser = argparse.ArgumentParser(prog="omg", description="Occlusion-friendly multi-concept SDXL generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="render multi-concept images",
                       description="Render images in which every concept keeps its identity. The options after "
                                   "--save-attention are omg.OMGOptions' fields; a spec file takes the same "
                                   "names (with underscores).")
    g.add_argument("--spec", help="YAML/JSON file with any of the options below and a 'concepts' list")
    g.add_argument("--checkpoint", help="SDXL single-file .safetensors or diffusers folder (default: demo weights)")
    g.add_argument("--prompt", help="global prompt naming each concept's class noun")
    g.add_argument("--concept", action="append", default=[],
                   help="'class: prompt [@ lora.safetensors[*scale]] [! negative prompt]' (repeatable)")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    g.add_argument("--out", default="omg.png", help="image path; a batch writes <out>, <stem>_1.png, <stem>_2.png, ...")
    g.add_argument("--save-masks", action="store_true", help="also write <stem>_masks.png")
    g.add_argument("--save-attention", action="store_true", help="also write <stem>_attention_<i>.png")
    defaults = OMGOptions()
    for f in cli_options():  # one flag per option, named, typed and explained by its field
        meta = f.metadata
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS,
                                  "help": f"{meta['help']} (default: {getattr(defaults, f.name)!r})"}
        if meta["parse"] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            # a list option takes several values and may be repeated (--control a@x --control b@y)
            kwargs.update(type=meta["parse"], choices=meta["choices"], nargs="+" if meta["many"] else None,
                          action="extend" if meta["many"] else None)
        g.add_argument(_flag(f.name), **kwargs)
    return parser


def save_png(image: Any, path: str, parameters: Optional[dict] = None) -> None:
    """Write atomically (temp file + rename): an interrupted run never leaves half a PNG."""
    from PIL.PngImagePlugin import PngInfo

    from omg.atomic import atomic_path
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", json.dumps(parameters))
    with atomic_path(path, ".png") as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def _load_model(checkpoint: Optional[str], device: str, dtype: Any) -> tuple[Any, str]:
    import omg
    if checkpoint:
        return omg.load_sdxl(checkpoint, device=device, dtype=dtype), checkpoint
    if os.path.exists(DEMO_CHECKPOINT):
        return omg.load_sdxl(DEMO_CHECKPOINT, device=device, dtype=dtype), DEMO_CHECKPOINT
    from omg.model import SDXL
    from omg.vae import VAEConfig
    warnings.warn("no --checkpoint and no demo weights in weights/demo/: running a small RANDOM model, so the "
                  "images are noise; pass --checkpoint with real SDXL weights")
    model = SDXL.random(vae_config=VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), norm_groups=8), device=device,
                        dtype=dtype)
    return model, "random-tiny"


def _paths(out: str, index: int) -> tuple[str, str]:
    """(image path, stem for the extra files) of image `index` of a batch: out.png, out_1.png, out_2.png, ..."""
    stem, ext = os.path.splitext(out)
    stem = stem if index == 0 else f"{stem}_{index}"
    return stem + (ext or ".png"), stem


def generate_command(args: argparse.Namespace) -> int:
    import torch

    import omg
    from omg.errors import OptionError
    from omg.masks import overlay_heatmap, overlay_masks
    from omg.options import cli_options

    spec = load_spec(args.spec) if args.spec else {}
    if not (args.spec or args.prompt or args.checkpoint or args.concept) and os.path.exists(DEMO_SPEC):
        spec = load_spec(DEMO_SPEC)  # bare `omg generate`: the demo world's scene, with its masks
        args.save_masks = True
    option_names = [f.name for f in cli_options()]
    unknown = sorted(set(spec) - set(option_names) - set(RUN_KEYS))
    if unknown:
        raise OptionError(f"unknown options {unknown} in {args.spec}; known: {sorted(option_names + list(RUN_KEYS))}")
    spec.update({k: getattr(args, k) for k in ("prompt", "checkpoint", "device", "dtype")
                 if getattr(args, k) is not None})
    chosen = {k: v for k, v in spec.items() if k in option_names}
    chosen.update({k: getattr(args, k) for k in option_names if hasattr(args, k)})  # flags over the spec
    concepts = spec.get("concepts", []) + [parse_concept(c) for c in args.concept]
    prompt = spec.get("prompt")
    if not prompt:
        raise OptionError("a --prompt (or 'prompt' in the spec) is required")
    device = spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = spec.get("dtype") or ("fp16" if device.startswith("cuda") else "fp32")
    if not spec.get("checkpoint"):  # the demo weights or the random fallback: both are 256-pixel models
        chosen.setdefault("height", 256)
        chosen.setdefault("width", 256)
    options = omg.OMGOptions(**chosen)  # checked before the model is loaded
    model, source = _load_model(spec.get("checkpoint"), device, getattr(torch, DTYPES[dtype_name]))
    results = omg.generate(model, prompt, [omg.Concept(**c) for c in concepts], options)
    results = results if isinstance(results, list) else [results]
    written = []
    for i, result in enumerate(results):
        per_image = {k: v for k, v in chosen.items() if k not in ("seeds", "num_images")}  # each PNG: its own seed
        parameters = {"prompt": prompt, "concepts": concepts, "checkpoint": source, "dtype": dtype_name,
                      **per_image, "seed": result.seed,
                      "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
                      "masks_found": result.concept_masks.found, "mask_sources": result.mask_sources}
        out, stem = _paths(args.out, i)
        save_png(result.image, out, parameters)
        save_png(result.stage1_image, stem + "_stage1.png", {**parameters, "stage": 1})
        written += [out, stem + "_stage1.png"]
        if args.save_masks and len(concepts):
            save_png(overlay_masks(result.stage1_image, result.masks), stem + "_masks.png")
            written.append(stem + "_masks.png")
        if args.save_attention:
            for j in range(len(concepts)):
                save_png(overlay_heatmap(result.stage1_image, result.heatmaps[j]), f"{stem}_attention_{j}.png")
                written.append(f"{stem}_attention_{j}.png")
        for c, found in zip(concepts, result.concept_masks.found):
            if not found:
                print(f"omg: concept {c['class_name']!r} was not found in the stage-1 image of seed {result.seed} "
                      f"and was skipped", file=sys.stderr)
    print("wrote " + ", ".join(written))
    print("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in results[0].timings.items()))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate_command(args)
    except (ValueError, FileNotFoundError) as e:  # omg's input errors are ValueErrors: one line, no trace
        print(f"omg: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
