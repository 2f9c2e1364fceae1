"""Where the GPU time of one SDXL UNet forward goes: CUDA kernel time by kind (GEMM, convolution, attention,
normalisation, elementwise, copies) and the longest kernels, from torch.profiler.

Full-size SDXL, random weights, 1024x1024, plain attention (SDPA). Kernel times are what a replayed CUDA
graph runs too; the gap between their sum and the wall time of an eager call is launch overhead.
Run on the GPU machine:  python -m bench.profile [--batches 2 7] [--dtype fp16]
Writes bench/results/profile_<gpu>.json.
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch

from bench.common import DTYPES, device_name, write_json
from bench.lora import random_unet
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


def profile_forward(unet, batch: int, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, 4, 128, 128, device="cuda", generator=g).to(dtype)
    t = torch.full((batch,), 500.0, device="cuda")
    ctx = torch.randn(batch, 77, 2048, device="cuda", generator=g).to(dtype)
    y = torch.randn(batch, 2816, device="cuda", generator=g).to(dtype)
    with torch.no_grad():
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
    result = {"batch": batch, "kernel_ms": round(total, 2),
              "by_kind_ms": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
              "top_kernels": [{"name": n[:140], "ms": round(ms, 3), "calls": c, "kind": kind_of(n)}
                              for n, (ms, c) in top]}
    print(f"batch {batch}: {total:.1f} ms of kernels;", {k: f"{v:.1f}" for k, v in result["by_kind_ms"].items()})
    for k in result["top_kernels"][:12]:
        print(f"  {k['ms']:7.2f} ms {k['calls']:4d}x {k['kind']:12s} {k['name'][:100]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 7])
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    args = parser.parse_args()
    unet = random_unet(UNetConfig.sdxl(), "cuda", DTYPES[args.dtype])
    rows = [profile_forward(unet, b, DTYPES[args.dtype]) for b in args.batches]
    path = write_json("profile", {"dtype": args.dtype, "resolution": 1024, "rows": rows})
    print("wrote", path, "on", device_name())


if __name__ == "__main__":
    main()
