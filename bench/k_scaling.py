"""How a render's time grows with its number of concepts k: the step profile of a warm k-concept image (default
options, CUDA graphs) for each k, beside the bare UNet graph at the batches its stages run (stage 1: 2 rows;
stage 2: 2 + 2k rows).

    python -m bench.k_scaling --concepts 1 5

Prints, per k, the steady stage-1 and stage-2 step against the bare UNet graph at the same batch, and the time
ratio against the first k that the bare graphs alone would give (50 x stage-1 step + blend steps x stage-2 step):
what the concepts' LoRA work adds to the UNet's own scaling with batch. Writes bench/results/k_scaling_<gpu>.json
after each k.
"""
from __future__ import annotations

import argparse

import torch

from bench.common import DTYPES, write_json
from bench.generate import random_sdxl, step_profile
from bench.lora import kohya_lora
from omg.lora import load_lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concepts", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--blend-steps", type=int, default=35)
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--name", default="k_scaling")
    args = parser.parse_args()
    model = random_sdxl(DTYPES[args.dtype])
    loras = [load_lora(kohya_lora(model.unet, 64, locon=False, seed=i + 1), device="cuda")
             for i in range(max(args.concepts))]
    rows = []
    for k in args.concepts:
        profile = step_profile(model, loras, k, args, "grouped", window=0)
        stages = profile["stages"]
        bare = {stage: next(iter(s["plain_unet_graph_ms"].values())) for stage, s in stages.items()}
        step = {stage: s["step_ms"]["median"] for stage, s in stages.items()}
        rows.append(dict(k=k, stage1_rows=2, stage2_rows=2 + 2 * k, stage1_step_ms=step["stage1"],
                         stage2_step_ms=step["stage2"], stage1_bare_unet_ms=bare["stage1"],
                         stage2_bare_unet_ms=bare["stage2"],
                         steady_s=round((args.steps * step["stage1"] + args.blend_steps * step["stage2"]) / 1e3, 3),
                         bare_s=round((args.steps * bare["stage1"] + args.blend_steps * bare["stage2"]) / 1e3, 3),
                         first_image_timings=profile["timings"]))
        first = rows[0]
        summary = {f"k{r['k']}_over_k{first['k']}": dict(steady=round(r["steady_s"] / first["steady_s"], 3),
                                                           bare_unet=round(r["bare_s"] / first["bare_s"], 3))
                   for r in rows[1:]}
        write_json(args.name, dict(steps=args.steps, blend_steps=args.blend_steps, dtype=args.dtype, lora_rank=64,
                                   resolution=1024, rows=rows, summary=summary))
        r = rows[-1]
        print(f"k={k}: stage-1 step {r['stage1_step_ms']} ms (bare UNet b2 {r['stage1_bare_unet_ms']} ms), stage-2 "
              f"step {r['stage2_step_ms']} ms (bare UNet b{r['stage2_rows']} {r['stage2_bare_unet_ms']} ms); steady "
              f"{r['steady_s']} s, bare {r['bare_s']} s; {summary}", flush=True)
    del model
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
