"""Where the GPU time of one SDXL UNet forward goes: CUDA kernel time by kind (GEMM, convolution, attention,
normalisation, elementwise, copies) and the longest kernels, from torch.profiler.

Full-size SDXL, random weights, 1024x1024, plain attention (SDPA). Kernel times are what a replayed CUDA
graph runs too; the gap between their sum and the wall time of an eager call is launch overhead.
--grouped k profiles the batched stage-2 call: 3 base rows and k concepts' rows with their rank-64 LoRAs
(omg.lora.GroupedLora). --generate k profiles a short omg.generate (10 steps, 7 blended, k concepts, CUDA
graphs): the CPU-side operations by self time (syncs show up as aten::item / cudaStreamSynchronize), and the
GPU's kernel time against the wall time.
Run on the GPU machine:  python -m bench.profile [--batches 2 7] [--grouped 2] [--generate 2] [--dtype fp16]
Writes bench/results/profile_<gpu>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import re
from collections import defaultdict

import torch

from bench.common import DTYPES, device_name, write_json
from bench.lora import kohya_lora, random_unet
from omg.lora import GroupedLora, bind, load_lora
from omg.unet import UNetConfig

KINDS = [  # first match wins
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("convolution", r"conv|fprop|dgrad|implicit_gemm|winograd|cudnn"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|matmul|cublas|sm90_|sm80_"),
    ("normalisation", r"norm|welford|moments"),
    ("copy", r"copy|cat|transpose|permute|contiguous|memcpy|memset|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|gelu|mul|add|reduce"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, low)), "other")


def profile_forward(unet, batch: int, dtype: torch.dtype, grouped=None) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, 4, 128, 128, device="cuda", generator=g).to(dtype)
    t = torch.full((batch,), 500.0, device="cuda")
    ctx = torch.randn(batch, 77, 2048, device="cuda", generator=g).to(dtype)
    y = torch.randn(batch, 2816, device="cuda", generator=g).to(dtype)
    with torch.no_grad(), grouped.installed(batch - 2 * grouped.count) if grouped else contextlib.nullcontext():
        for _ in range(3):
            unet(x, t, ctx, y)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            unet(x, t, ctx, y)
            torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel[event.name]
            entry[0] += event.time_range.elapsed_us() / 1e3  # ms
            entry[1] += 1
    by_kind: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        by_kind[kind_of(name)] += ms
    total = sum(by_kind.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:25]
    result = {"batch": batch, "grouped_lora_concepts": grouped.count if grouped else 0, "kernel_ms": round(total, 2),
              "by_kind_ms": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
              "top_kernels": [{"name": n[:140], "ms": round(ms, 3), "calls": c, "kind": kind_of(n)}
                              for n, (ms, c) in top]}
    print(f"batch {batch} ({result['grouped_lora_concepts']} LoRA concepts): {total:.1f} ms of kernels;",
          {k: f"{v:.1f}" for k, v in result["by_kind_ms"].items()})
    for k in result["top_kernels"][:12]:
        print(f"  {k['ms']:7.2f} ms {k['calls']:4d}x {k['kind']:12s} {k['name'][:100]}")
    return result


def profile_generate(k: int, dtype: torch.dtype) -> dict:
    import time

    from bench.generate import CLASSES, PROMPT, boxes, random_sdxl
    from omg.pipeline import Concept, generate
    model = random_sdxl(dtype)
    loras = [load_lora(kohya_lora(model.unet, 64, locon=False, seed=i + 1), device="cuda") for i in range(k)]
    concepts = [Concept(CLASSES[i], f"a photo of sks {CLASSES[i]}", lora=loras[i], mask=box)
                for i, box in enumerate(boxes(k))]
    run = lambda: generate(model, PROMPT, concepts, steps=10, blend_steps=7, progress=False)  # noqa: E731
    run()  # warm-up: graphs are captured per call, kernels compiled once
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        result = run()
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    gpu = sum(e.time_range.elapsed_us() for e in prof.events()
              if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    cpu_ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]
    rows = [{"name": e.key[:100], "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count}
            for e in cpu_ops]
    print(f"generate k={k}, 10 steps: wall {wall:.2f} s (profiled), GPU kernels {gpu / 1e3:.2f} s; timings "
          f"{ {n: round(v, 3) for n, v in result.timings.items()} }")
    for r in rows[:15]:
        print(f"  {r['self_cpu_ms']:9.2f} ms {r['calls']:6d}x {r['name']}")
    return {"k": k, "steps": 10, "blend_steps": 7, "wall_s": round(wall, 3), "gpu_kernel_s": round(gpu / 1e3, 3),
            "timings": {n: round(v, 3) for n, v in result.timings.items()}, "top_cpu_ops": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 7])
    parser.add_argument("--grouped", type=int, nargs="*", default=[], help="k concepts' LoRA rows on 3 base rows")
    parser.add_argument("--generate", type=int, nargs="*", default=[], help="profile omg.generate with k concepts")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    unet = random_unet(UNetConfig.sdxl(), "cuda", dtype)
    rows = [profile_forward(unet, b, dtype) for b in args.batches]
    for k in args.grouped:
        loras = [bind(unet, load_lora(kohya_lora(unet, 64, locon=False, seed=i + 1), device="cuda")) for i in range(k)]
        rows.append(profile_forward(unet, 3 + 2 * k, dtype, GroupedLora(unet, loras)))
        del loras
    del unet
    torch.cuda.empty_cache()
    generated = [profile_generate(k, dtype) for k in args.generate]
    path = write_json("profile", {"dtype": args.dtype, "resolution": 1024, "rows": rows, "generate": generated})
    print("wrote", path, "on", device_name())


if __name__ == "__main__":
    main()
