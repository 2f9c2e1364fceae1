"""The cost of InstantID concepts in OMG: a k-concept image at 1024x1024 with full-size SDXL, InstantID's face
adapter (IP-Adapter Plus resampler + decoupled attn2 projections) and IdentityNet (a full SDXL ControlNet), all on
random weights, 50 DDIM steps, blending over the last 35: k LoRA concepts (rank 64, grouped stage 2), k InstantID
concepts (precomputed random faces: each its own pass with its face tokens and IdentityNet; concepts whose prompts
encode alike share one), and one of each. Seconds per stage, peak memory, added seconds per blending call.

Random weights make the masks meaningless: each concept gets a user box. CUDA graphs are off unless --cuda-graphs
(the face passes under graphs are not yet measured on a GPU).
Run on the GPU machine:  python -m bench.instantid [--out DIR]
On a CPU, at a tiny size (checks that it runs):  python -m bench.instantid --tiny
Writes bench/results/instantid_<gpu>.json (or into --out), and a copy under $OUT when that is set.
"""
from __future__ import annotations

import argparse

import torch

from bench.common import random_on_device, timed_generate
from bench.controlnet import CLASSES, PROMPT, add_arguments, added_cost, boxes, random_setting, write_result
from omg.faces import CANONICAL_KEYPOINTS, Face
from omg.ip_adapter import IPAdapter, ResamplerConfig
from omg.pipeline import Concept


def random_adapter(unet_config, device: str, dtype: torch.dtype, resampler: ResamplerConfig) -> IPAdapter:
    """N(0, 0.02) weights and biases, identity norms, built directly on the device."""
    return random_on_device(lambda: IPAdapter(unet_config, resampler), device, dtype,
                            zero_vectors=False).requires_grad_(False)


def random_face(seed: int) -> Face:
    g = torch.Generator().manual_seed(seed)
    return Face(torch.randn(512, generator=g) * 4, CANONICAL_KEYPOINTS * 200, f"random {seed}")


def run(model, args, kinds: list[str], loras, extra: dict, label: str) -> dict:
    cuda = torch.cuda.is_available() and not args.tiny
    concepts = []
    for i, (kind, box) in enumerate(zip(kinds, boxes(len(kinds), args.width, args.height))):
        prompt = f"a photo of sks {CLASSES[i]}"
        concepts.append(Concept(CLASSES[i], prompt, lora=loras[i], mask=box) if kind == "lora"
                        else Concept(CLASSES[i], prompt, face=random_face(i), mask=box))
    _, timed = timed_generate(model, PROMPT, concepts, label, cuda, steps=args.steps, blend_steps=args.blend_steps,
                              height=args.height, width=args.width, cuda_graphs=cuda and args.cuda_graphs, **extra)
    return dict(label=label, kinds=kinds, **timed)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--cuda-graphs", action="store_true")
    args = parser.parse_args(argv)
    model, device, dtype, net, loras = random_setting(args)
    resampler = (ResamplerConfig(dim=128, heads=2, output_dim=model.unet.config.context_dim) if args.tiny
                 else ResamplerConfig.instantid(model.unet.config.context_dim))
    adapter = random_adapter(model.unet.config, device, dtype, resampler)
    extra = dict(face_adapter=adapter, identitynet=net)
    faces, mixed = ["face"] * args.k, ["lora"] + ["face"] * (args.k - 1)
    run(model, args, faces, loras, extra, "warm-up")
    rows = [run(model, args, ["lora"] * args.k, loras, {}, f"{args.k} LoRA concepts"),
            run(model, args, faces, loras, extra, f"{args.k} InstantID concepts"),
            run(model, args, mixed, loras, extra, "LoRA + InstantID")]
    lora, face, _ = rows
    summary = added_cost(face, lora, {"stage2": args.blend_steps})
    print("summary:", summary, flush=True)
    return write_result(
        "instantid", args, rows, summary,
        "random weights; each concept a user box; LoRA concepts grouped (one UNet call a step); InstantID concepts "
        "share one face pass (base weights, face tokens, IdentityNet over their rows)",
        cuda_graphs=bool(args.cuda_graphs and not args.tiny))


if __name__ == "__main__":
    main()
