"""The cost of a ControlNet in OMG: a k-concept image at 1024x1024 with full-size SDXL and a full-size SDXL
ControlNet (random weights), 50 DDIM steps, blending over the last 35, rank-64 kohya LoRAs, the grouped stage 2 and
CUDA graphs; without a ControlNet, with one (stage 1 and stage 2's base pass, as the original), and with it on the
concept passes too (control_concepts), all in the same process. Seconds per stage, peak memory, and the added
seconds per model call of each stage.

Random weights make the attention masks meaningless, so each concept gets a user box (a strip of the image).
Run on the GPU machine:  python -m bench.controlnet [--out DIR_OR_FILE.json]
On a CPU, at a tiny size (checks that it runs):  python -m bench.controlnet --tiny
Writes bench/results/controlnet_<gpu>.json (or into --out), and a copy under $OUT when that is set.
"""
from __future__ import annotations

import argparse

import torch
from PIL import Image, ImageDraw

from bench.common import DTYPES, random_on_device, timed_generate, tiny_sdxl, write_json
from omg.control import Control
from omg.controlnet import ControlNet, ControlNetConfig
from omg.lora import load_lora
from omg.pipeline import Concept

CLASSES = ["man", "woman", "dog", "cat", "robot"]
PROMPT = "a man, a woman, a dog, a cat and a robot in a park"  # every class of CLASSES


def random_controlnet(config: ControlNetConfig, device: str, dtype: torch.dtype, seed: int = 0) -> ControlNet:
    """N(0, 0.02) matrices, zero biases, identity norms (as bench.lora.random_unet); zero convs random too, so
    the residuals are not zero. Built directly on the device."""
    return random_on_device(lambda: ControlNet(config), device, dtype, seed).requires_grad_(False)


def pose_image(height: int, width: int) -> Image.Image:
    """A stick figure per concept on black: what an openpose annotator draws (only its size matters here)."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for cx in (width // 4, 3 * width // 4):
        top, s = height // 5, height // 10
        draw.ellipse((cx - s // 2, top - s // 2, cx + s // 2, top + s // 2), outline=(255, 0, 0), width=4)
        draw.line((cx, top + s // 2, cx, top + 4 * s), fill=(0, 255, 0), width=6)
        draw.line((cx - 2 * s, top + 2 * s, cx + 2 * s, top + 2 * s), fill=(0, 0, 255), width=6)
        draw.line((cx, top + 4 * s, cx - s, top + 7 * s), fill=(255, 255, 0), width=6)
        draw.line((cx, top + 4 * s, cx + s, top + 7 * s), fill=(255, 0, 255), width=6)
    return image


def boxes(k: int, width: int, height: int) -> list[tuple[int, int, int, int]]:
    edges = [round(i * width / k) for i in range(k + 1)]
    return [(edges[i], 0, edges[i + 1], height) for i in range(k)]


def run(model, loras, args, control: list, control_concepts: bool, label: str) -> dict:
    cuda = torch.cuda.is_available() and not args.tiny
    concepts = [Concept(CLASSES[i], f"a photo of sks {CLASSES[i]}", lora=loras[i], mask=box)
                for i, box in enumerate(boxes(args.k, args.width, args.height))]
    _, timed = timed_generate(model, PROMPT, concepts, f"{label} (k={args.k})", cuda, steps=args.steps,
                              blend_steps=args.blend_steps, height=args.height, width=args.width, control=control,
                              control_concepts=control_concepts, cuda_graphs=cuda)
    return dict(label=label, k=args.k, controlnets=len(control), control_concepts=control_concepts, cuda_graphs=cuda,
                **timed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the k-concept cost benches (this one and bench.instantid)."""
    parser.add_argument("--k", type=int, default=2, help="concepts")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--blend-steps", type=int, default=35)
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--tiny", action="store_true", help="a tiny random SDXL on the CPU at 64x96, 4 steps")
    parser.add_argument("--out", default=None, help="folder for the JSON (default bench/results; a copy goes to $OUT "
                                                    "when set)")


def random_setting(args) -> tuple:
    """(model, device, dtype, a random ControlNet, k kohya LoRAs): full-size SDXL on CUDA at 1024x1024 with rank-64
    LoRAs, or with --tiny the tiny SDXL on the CPU at 64x96, 4 steps, rank 4 (args' size and steps set here)."""
    from bench.lora import kohya_lora

    if args.tiny:
        args.height, args.width, args.steps, args.blend_steps = 64, 96, 4, 2
        model, device, dtype, rank = tiny_sdxl(), "cpu", torch.float32, 4
        controlnet = random_controlnet(ControlNetConfig.tiny(model.unet.config), device, dtype)
    else:
        from bench.generate import random_sdxl

        args.height = args.width = 1024
        device, dtype, rank = "cuda", DTYPES[args.dtype], 64
        model = random_sdxl(dtype)
        controlnet = random_controlnet(ControlNetConfig.sdxl(), device, dtype)
    loras = [load_lora(kohya_lora(model.unet, rank, locon=False, seed=i + 1), device=device) for i in range(args.k)]
    return model, device, dtype, controlnet, loras


def added_cost(row: dict, baseline: dict, calls: dict[str, int]) -> dict:
    """What row costs over baseline (two rows of run()): seconds per stage and per model call of that stage (calls:
    stage name -> model calls), the whole image's seconds and ratio, peak memory where measured."""
    out = {}
    for stage, n in calls.items():
        added = row["timings"][stage] - baseline["timings"][stage]
        out[f"{stage}_added_s"] = round(added, 3)
        out[f"{stage}_added_ms_per_call"] = round(1e3 * added / n, 2)
    out["total_added_s"] = round(row["seconds"] - baseline["seconds"], 3)
    out["total_ratio"] = round(row["seconds"] / baseline["seconds"], 3)
    if baseline["peak_gib"] is not None:
        out["peak_added_gib"] = round(row["peak_gib"] - baseline["peak_gib"], 2)
    return out


def write_result(name: str, args, rows: list, summary: dict, note: str, **fields) -> dict:
    """The bench's JSON (<name>_tiny for --tiny): its settings, `fields`, the rows, the summary and the note."""
    out = {"steps": args.steps, "blend_steps": args.blend_steps, "k": args.k,
           "dtype": "fp32" if args.tiny else args.dtype, "resolution": [args.height, args.width], **fields,
           "rows": rows, "summary": summary, "note": note}
    path = write_json(f"{name}_tiny" if args.tiny else name, out, args.out)
    print("wrote", path)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    model, _, _, controlnet, loras = random_setting(args)
    control = [Control(pose_image(args.height, args.width), controlnet, scale=0.8)]
    run(model, loras, args, control, False, "warm-up (ControlNet)")
    rows = [run(model, loras, args, [], False, "no ControlNet"),
            run(model, loras, args, control, False, "ControlNet (base passes)"),
            run(model, loras, args, control, True, "ControlNet (+ concept passes)")]
    none, base, concepts = rows
    summary = {**added_cost(base, none, {"stage1": args.steps, "stage2": args.blend_steps}),  # a call a step
               "control_concepts_added_s": round(concepts["seconds"] - base["seconds"], 3)}
    print("summary:", summary, flush=True)
    return write_result(
        "controlnet", args, rows, summary,
        "random weights; each concept a user box; stage 2 grouped (one UNet call a step), CUDA graphs; the ControlNet "
        "runs once per model call over the base rows (stage 2: uncond, stage-1 source, cond), and over every row "
        "with control_concepts",
        controlnet="random SDXL ControlNet (ControlNetConfig.sdxl(), 1.25 G parameters)" if not args.tiny
        else "tiny")


if __name__ == "__main__":
    main()
