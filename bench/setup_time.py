"""generate's work before stage 1 (concept weights, conditioning, the call schedule) with full-size random SDXL:
the base's text encodings shared with the concepts whose LoRAs have no text-encoder part (the default) against
every conditioning encoding anew, alternated in one run, the best of --rounds each.

Two rank-64 UNet-only LoRAs and the default negative prompt, so the shared run encodes 4 prompts and the other 6.
Runs where it is started (CPU here: the text encoders' matmuls dominate; on a GPU they are launch-bound).
Run:  python -m bench.setup_time [--device cpu] [--rounds 2]
Writes bench/results/setup_time_<gpu or cpu>.json.
"""
from __future__ import annotations

import argparse
import time

import torch

import omg.pipeline as pipeline
from bench.common import device_name, random_on_device, write_json
from bench.generate import CLASSES, PROMPT, boxes
from bench.lora import kohya_lora
from omg.lora import load_lora
from omg.model import SDXL
from omg.pipeline import Concept, generate
from omg.text import SDXLTextEncoder
from omg.unet import UNet, UNetConfig
from omg.vae import AutoencoderKL, VAEConfig


class _SetupDone(Exception):
    """Raised where stage 1 would start: the timed part ends there."""


def _stop(*args, **kwargs):
    raise _SetupDone


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    dtype = torch.float16 if args.device == "cuda" else torch.bfloat16
    unet = random_on_device(lambda: UNet(UNetConfig.sdxl()), args.device, dtype)
    text = random_on_device(lambda: SDXLTextEncoder.sdxl(), args.device, dtype)
    vae = random_on_device(lambda: AutoencoderKL(VAEConfig.sdxl()), args.device, torch.float32)
    for m in (unet, text, vae):
        m.requires_grad_(False)
    model = SDXL(unet, vae, text)
    loras = [load_lora(kohya_lora(unet, 64, False, seed=i + 1)) for i in range(2)]
    concepts = [Concept(CLASSES[i], f"a photo of sks {CLASSES[i]}", lora=loras[i], mask=box)
                for i, box in enumerate(boxes(2, 256))]
    shared = pipeline._concept_conditioning

    def anew(*a, **k):  # every conditioning encodes its negative prompt again (the code before)
        return shared(*a[:5], **{**k, "base_text": None})

    def setup_seconds(conditioning) -> float:
        pipeline._concept_conditioning = conditioning
        start = time.perf_counter()
        try:
            generate(model, PROMPT, concepts, steps=50, blend_steps=35, height=256, width=256, progress=False)
        except _SetupDone:
            pass
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run_stage1, pipeline.run_stage1 = pipeline.run_stage1, _stop
    try:
        setup_seconds(shared)  # the first call: LoRA binding and stacking, kernel warm-up
        times: dict[str, list[float]] = {"shared": [], "anew": []}
        for _ in range(args.rounds):
            times["anew"].append(setup_seconds(anew))
            times["shared"].append(setup_seconds(shared))
    finally:
        pipeline.run_stage1, pipeline._concept_conditioning = run_stage1, shared
    best = {k: round(min(v), 3) for k, v in times.items()}
    print(f"setup before stage 1 on {device_name()}: shared encodings {best['shared']:.2f} s, each conditioning "
          f"anew {best['anew']:.2f} s ({best['anew'] / best['shared']:.2f}x); all rounds {times}")
    payload = {"rows": times, "best_s": best, "anew_over_shared": round(best["anew"] / best["shared"], 3),
               "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
               "note": "full-size random SDXL, two rank-64 UNet-only LoRAs, the default negative prompt; "
                       "256x256 (the setup does not depend on it)"}
    path = write_json("setup_time", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
