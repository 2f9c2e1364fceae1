"""Shared helpers for the benchmarks: CUDA timing, peak memory, JSON output."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Callable

import torch
from torch import nn

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def gpu_slug() -> str:
    """Short GPU name for result file names: 'h100', 'h200', 'cpu'."""
    name = device_name().lower()
    for slug in ("h200", "h100", "a100", "l40s", "a10g"):
        if slug in name:
            return slug
    return "cpu" if not torch.cuda.is_available() else name.split()[-1]


def time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds per call (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def peak_memory_gib(fn: Callable[[], object]) -> float:
    """Peak GPU memory allocated while running fn once (GiB), including what was resident before."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def write_json(name: str, payload: dict, out_dir: str | None = None) -> str:
    """Write bench/results/<name>_<gpu>.json (and a copy under $OUT when set); return the path."""
    payload = {"bench": name, "device": device_name(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "command": "python -m bench." + os.path.basename(sys.argv[0]).removesuffix(".py") + "".join(
                   " " + a for a in sys.argv[1:]), **payload}
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}_{gpu_slug()}.json")
    text = json.dumps(payload, indent=2)
    with open(path, "w") as f:
        f.write(text + "\n")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], os.path.basename(path)), "w") as f:
            f.write(text + "\n")
    return path


def random_on_device(build: Callable[[], nn.Module], device, dtype: torch.dtype, seed: int = 0,
                     zero_vectors: bool = True) -> nn.Module:
    """build() made on the meta device and filled on `device`: norms identity, matrices N(0, 0.02), other vectors
    zero (or, zero_vectors=False, N(0, 0.02) too). Full-size random models without a CPU copy."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        module = build()
    module.to_empty(device=device)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif p.dim() >= 2 or not zero_vectors:
                    p.normal_(0, 0.02)
                else:
                    p.zero_()
    return module.to(dtype).eval()


def tiny_sdxl(**kw):
    """The tiny random SDXL the CPU benches' --tiny runs use (tests/test_pipeline.py's model)."""
    from omg.model import SDXL
    from omg.vae import VAEConfig

    return SDXL.random(vae_config=VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), norm_groups=8), seed=5, **kw)


def timed_generate(model, prompt: str, concepts: list, label: str, cuda: bool, **options) -> tuple:
    """One omg.generate call timed (its own stage timings and the wall clock) with its peak CUDA memory, printed:
    (result, row of seconds, wall_seconds, timings, unet_evaluations, peak_gib)."""
    import gc

    from omg.pipeline import generate

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = generate(model, prompt, concepts, progress=False, **options)
    wall = time.perf_counter() - start
    t = result.timings
    row = dict(seconds=round(t["total"], 3), wall_seconds=round(wall, 3),
               timings={n: round(v, 3) for n, v in t.items()}, unet_evaluations=result.unet_evaluations,
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
    print(f"{label:28s}: {t['total']:6.2f} s (setup {t['setup']:.2f}, stage1 {t['stage1']:.2f}, "
          f"stage2 {t['stage2']:.2f}); peak {row['peak_gib']} GiB", flush=True)
    return result, row
