"""Peak host memory of omg.load_sdxl on a full-size SDXL single file (random fp16 weights), loading to CPU.

Writes an SGM single-file .safetensors with every key and shape of SDXL base (about 6.9 GB, streamed: never
held in memory), loads it with load_sdxl(device="cpu", dtype=float16) in a fresh subprocess, and reports
peak RSS (ru_maxrss) against the file size, with the anonymous and file-backed parts sampled from
/proc/self/status during the load. The file is deleted afterwards unless --keep.

    python -m bench.load_rss [--dir /tmp] [--keep] [--device cuda]  # -> bench/results/load_rss_{cpu,cuda}.json

Reading: RSS counts the pages of the mapped file that were touched as well as the process's own memory
(RssAnon). The loader copies each tensor out of a private mapping and drops that tensor's pages right
away, so RssFile stays small and RssAnon ends at about the size of the loaded model (UNet and text
encoders in fp16, the VAE upcast to fp32, since fp16 overflows in the SDXL VAE).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "load_rss_{device}.json")
GIB = 1024 ** 3


def sdxl_shapes() -> dict[str, tuple[int, ...]]:
    """Every SGM key of SDXL base with its shape, from our modules built on the meta device."""
    from omg.model import SDXL
    from omg.text import SDXLTextEncoder
    from omg.unet import UNet, UNetConfig
    from omg.vae import AutoencoderKL, VAEConfig

    with torch.device("meta"):
        model = SDXL(UNet(UNetConfig.sdxl()), AutoencoderKL(VAEConfig.sdxl()), SDXLTextEncoder.sdxl())
    return {k: tuple(t.shape) for k, t in model.sgm_state_dict().items()}


def write_random_sgm(path: str, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> int:
    """Stream a safetensors file of random fp16 tensors (one tensor in memory at a time); returns its size."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key, shape in shapes.items():
            t = torch.empty(shape, dtype=torch.float16)
            if t.numel():
                t.normal_(0.0, 0.02, generator=gen)
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    os.replace(tmp, path)
    return os.path.getsize(path)


def _status() -> dict[str, int]:
    """RssAnon / RssFile / VmHWM of this process in bytes (/proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile", "RssShmem", "VmHWM", "VmRSS"):
                out[name] = int(value.split()[0]) * 1024
    return out


def child(path: str, device: str) -> None:
    """Runs in a fresh process: load and print the memory figures as JSON."""
    import omg

    before = _status()
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            s = _status()
            for k in peaks:
                peaks[k] = max(peaks[k], s[k])
            time.sleep(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    model = omg.load_sdxl(path, device=device, dtype=torch.float16)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    after = _status()
    model_bytes = sum(p.numel() * p.element_size() for m in model.components().values()
                      for p in [*m.parameters(), *m.buffers()])
    print(json.dumps({
        "load_seconds": seconds,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_load_bytes": before["VmRSS"], "rss_anon_before_load_bytes": before["RssAnon"],
        "rss_after_load_bytes": after["VmRSS"], "rss_anon_after_load_bytes": after["RssAnon"],
        "rss_file_after_load_bytes": after["RssFile"],
        "peak_rss_anon_sampled_bytes": peaks["RssAnon"], "peak_rss_file_sampled_bytes": peaks["RssFile"],
        "model_bytes": model_bytes,
        "dtypes": {name: str(next(m.parameters()).dtype) for name, m in model.components().items()},
        "device": str(model.device),
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--device", default="cpu", help="load target: cpu (default) or cuda")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.device)
        return
    shapes = sdxl_shapes()
    need = sum(math.prod(s) * 2 for s in shapes.values())
    free = shutil.disk_usage(args.dir).free
    if free < need * 1.1:
        sys.exit(f"{args.dir}: {free / GIB:.1f} GiB free, the file needs {need / GIB:.1f} GiB")
    path = os.path.join(args.dir, "omg_sdxl_random_fp16.safetensors")
    try:
        start = time.perf_counter()
        size = write_random_sgm(path, shapes)
        write_seconds = time.perf_counter() - start
        print(f"wrote {path}: {size / GIB:.2f} GiB in {write_seconds:.0f} s")
        run = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, "--device", args.device],
                             capture_output=True, text=True, check=False)
        if run.returncode:
            sys.exit(f"load failed:\n{run.stderr}")
        figures = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep and os.path.exists(path):
            os.unlink(path)
    result = {
        "what": f"omg.load_sdxl(path, device={args.device!r}, dtype=torch.float16) of an SGM single file in the full "
                "SDXL base layout with random fp16 weights, in a fresh process",
        "file_bytes": size, "file_write_seconds": write_seconds, **figures,
        "peak_rss_over_file": figures["ru_maxrss_bytes"] / size,
        "peak_rss_minus_baseline_over_file": (figures["ru_maxrss_bytes"] - figures["rss_before_load_bytes"]) / size,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0]},
        "note": "ru_maxrss counts touched pages of the mapped file as well as anonymous memory; the loader "
                "releases each tensor's file pages after copying it, so the peak is about the interpreter and "
                "libraries (rss_before_load_bytes) plus the loaded model when it lives in host memory "
                "(device cpu; the VAE in fp32 since fp16 overflows), or plus one tensor in flight for cuda.",
    }
    results = RESULTS.format(device=args.device.split(":")[0])
    os.makedirs(os.path.dirname(results), exist_ok=True)
    with open(results, "w") as f:
        json.dump(result, f, indent=2)
    print(f"file {size / GIB:.2f} GiB | model in memory {figures['model_bytes'] / GIB:.2f} GiB | "
          f"peak RSS {figures['ru_maxrss_bytes'] / GIB:.2f} GiB "
          f"(before load {figures['rss_before_load_bytes'] / GIB:.2f}) | peak RssAnon "
          f"{figures['peak_rss_anon_sampled_bytes'] / GIB:.2f} GiB, peak RssFile "
          f"{figures['peak_rss_file_sampled_bytes'] / GIB:.2f} GiB | load {figures['load_seconds']:.1f} s")
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
