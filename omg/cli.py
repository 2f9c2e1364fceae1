"""The `omg` command.

    omg generate --checkpoint sd_xl_base_1.0.safetensors --prompt "a man and a woman in a park" \\
        --concept "man: a photo of sks man @ sks.safetensors" --concept "woman: a photo of xyz woman @ xyz.safetensors" \\
        --out out.png --save-masks
    omg generate --spec concepts.yaml         # the same as a YAML/JSON file (keys as the flags, concepts as a list)

Writes the image with its generation parameters in a PNG text chunk ("parameters", JSON), the stage-1 image
(<out>_stage1.png) and, on request, mask and attention overlays.
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
    if ":" not in text:
        raise ValueError(f"--concept {text!r}: expected 'class: prompt [@ lora.safetensors[*scale]] [! negative]'")
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
        raise ValueError(f"{path}: expected a mapping of options, got {type(spec).__name__}")
    base = os.path.dirname(os.path.abspath(path))
    for c in spec.get("concepts", []):  # LoRA paths are relative to the spec file
        if c.get("lora") and not os.path.isabs(c["lora"]):
            c["lora"] = os.path.join(base, c["lora"])
    return spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omg", description="Occlusion-friendly multi-concept SDXL generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="render one multi-concept image",
                       description="Render one image in which every concept keeps its identity.")
    g.add_argument("--spec", help="YAML/JSON file with any of the options below and a 'concepts' list")
    g.add_argument("--checkpoint", help="SDXL single-file .safetensors or diffusers folder (default: demo weights)")
    g.add_argument("--prompt", help="global prompt naming each concept's class noun")
    g.add_argument("--concept", action="append", default=[],
                   help="'class: prompt [@ lora.safetensors[*scale]] [! negative prompt]' (repeatable)")
    g.add_argument("--negative-prompt")
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", type=float)
    g.add_argument("--blend-steps", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--sampler")
    g.add_argument("--store", choices=["outputs", "maps", "recompute"])
    g.add_argument("--lora-mode", choices=["grouped", "merged"],
                   help="concept weights in stage 2: LoRA factors on the shared base (grouped, default) or merged")
    g.add_argument("--sam", help="segment-anything checkpoint (vit_b/l/h) to refine the masks")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    g.add_argument("--out", default="omg.png")
    g.add_argument("--save-masks", action="store_true", help="also write <out>_masks.png")
    g.add_argument("--save-attention", action="store_true", help="also write <out>_attention_<i>.png")
    g.add_argument("--no-progress", action="store_true")
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


def generate_command(args: argparse.Namespace) -> int:
    import torch

    import omg
    from omg.masks import overlay_heatmap, overlay_masks

    spec = load_spec(args.spec) if args.spec else {}
    if not (args.spec or args.prompt or args.checkpoint or args.concept) and os.path.exists(DEMO_SPEC):
        spec = load_spec(DEMO_SPEC)  # bare `omg generate`: the demo world's scene, with its masks
        args.save_masks = True
    options = {k: v for k, v in vars(args).items() if v is not None and k not in ("spec", "concept", "command")}
    spec.update({k: v for k, v in options.items() if k not in ("out", "save_masks", "save_attention", "no_progress")
                 and not (k == "concept")})
    concepts = spec.pop("concepts", []) + [parse_concept(c) for c in args.concept]
    prompt = spec.pop("prompt", None)
    if not prompt:
        raise ValueError("a --prompt (or 'prompt' in the spec) is required")
    device = spec.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = spec.pop("dtype", None) or ("fp16" if device.startswith("cuda") else "fp32")
    dtype = getattr(torch, DTYPES[dtype_name])
    model, source = _load_model(spec.pop("checkpoint", None), device, dtype)
    if source in ("random-tiny", DEMO_CHECKPOINT):  # both are 256-pixel models
        spec.setdefault("height", 256)
        spec.setdefault("width", 256)
    known = {"negative_prompt", "steps", "guidance", "blend_steps", "seed", "height", "width", "sampler", "store",
             "lora_mode", "sam", "guidance_rescale", "dilate", "feather", "strict", "self_replay_steps", "spacing"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"unknown options {unknown}; known: {sorted(known)}")
    result = omg.generate(model, prompt, [omg.Concept(**c) for c in concepts], progress=not args.no_progress,
                          **spec)
    parameters = {"prompt": prompt, "concepts": concepts, "checkpoint": source, "dtype": dtype_name, **spec,
                  "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
                  "masks_found": result.concept_masks.found}
    out = args.out
    stem = os.path.splitext(out)[0]
    save_png(result.image, out, parameters)
    save_png(result.stage1_image, stem + "_stage1.png", {**parameters, "stage": 1})
    written = [out, stem + "_stage1.png"]
    if args.save_masks and len(concepts):
        save_png(overlay_masks(result.stage1_image, result.masks), stem + "_masks.png")
        written.append(stem + "_masks.png")
    if args.save_attention:
        for i in range(len(concepts)):
            save_png(overlay_heatmap(result.stage1_image, result.heatmaps[i]), f"{stem}_attention_{i}.png")
            written.append(f"{stem}_attention_{i}.png")
    for c, found in zip(concepts, result.concept_masks.found):
        if not found:
            print(f"omg: concept {c['class_name']!r} was not found in the stage-1 image and was skipped",
                  file=sys.stderr)
    print("wrote " + ", ".join(written))
    print("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
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
