"""Grouped concept LoRA deltas (omg.lora.grouped) three ways, side by side in one run:

  baddbmm   the delta added by cuBLAS's batched GEMM with beta = 1 (up(low) read-modify-writes the layer output)
  kernel    kernels.low_rank's one-pass add for every layer
  fused     the kernel, and the FeedForward projection's delta inside the GEGLU gate kernel (the default)

Sections: `layers`, each SDXL transformer Linear shape at 1024x1024 alone (base GEMM, then the delta each way, a
CUDA graph of the layer's calls); `unet`, the stage-2 call of k = 2 (2 base rows + 2 concepts x 2 rows, random
rank-64 LoRAs on every kohya target) replayed as a CUDA graph, with its output's difference to the baddbmm build.
`sweep` times the add kernel's tile shapes.

Run on the GPU machine:  python -m bench.lora_deltas [--sections layers unet sweep]
Writes bench/results/lora_deltas_<gpu>.json.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import kernels
from bench.common import device_name, time_ms, write_json
from bench.lora import kohya_lora, random_unet
from bench.unet_layout import graphed_ms, inputs
from kernels import ffn, low_rank
from omg.lora import GroupedLora, bind, load_lora
from omg.lora import grouped as grouped_module
from omg.unet import UNetConfig, preferred_memory_format

BUILDS = ("baddbmm", "kernel", "fused")
# (tokens, in, out, count per call) of the transformer Linears at 1024x1024; ff.net.0 is the GEGLU projection
LAYERS = {"to_q 640": (4096, 640, 640, 40), "ff.net.0 640": (4096, 640, 5120, 10),
          "ff.net.2 640": (4096, 2560, 640, 10), "to_q 1280": (1024, 1280, 1280, 240),
          "ff.net.0 1280": (1024, 1280, 10240, 60), "ff.net.2 1280": (1024, 5120, 1280, 60)}


@contextmanager
def build(name: str):
    """omg.lora.grouped as `name` adds its deltas (see the module doc)."""
    add, consumer = kernels.add_low_rank, grouped_module.fused_consumer
    if name == "baddbmm":
        kernels.add_low_rank = lambda out, delta: low_rank.add_low_rank_reference(out.view(-1, out.shape[-1]), delta)
    if name != "fused":
        grouped_module.fused_consumer = lambda root, layer: None
    try:
        yield
    finally:
        kernels.add_low_rank, grouped_module.fused_consumer = add, consumer


def graph_ms(fn, repeat: int = 10) -> float:
    """GPU ms of one fn() as a CUDA graph of `repeat` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    return time_ms(graph.replay, warmup=3, iters=20) / repeat


def bench_layers(rank: int = 64, concepts: int = 2, base_rows: int = 2) -> list[dict]:
    rows, dtype = [], torch.float16
    g = torch.Generator(device="cuda").manual_seed(0)
    for label, (tokens, n_in, n_out, count) in LAYERS.items():
        batch = base_rows + 2 * concepts
        x = torch.randn(batch, tokens, n_in, device="cuda", generator=g).to(dtype)
        w = (torch.randn(n_out, n_in, device="cuda", generator=g) * 0.02).to(dtype)
        bias = torch.zeros(n_out, device="cuda", dtype=dtype)
        down = (torch.randn(concepts, n_in, rank, device="cuda", generator=g) * 0.02).to(dtype)
        up = (torch.randn(concepts, rank, n_out, device="cuda", generator=g) * 0.02).to(dtype)
        first = base_rows * tokens
        gate = label.startswith("ff.net.0")

        def delta(xx):
            low = torch.bmm(xx[base_rows:].reshape(concepts, -1, n_in), down)
            return kernels.LowRankRows(low, up, first)

        def base():
            out = F.linear(x, w, bias)
            return ffn.geglu_triton(out) if gate else out

        def with_add(adder):
            def run():
                out = F.linear(x, w, bias)
                adder(out.view(-1, n_out), delta(x))
                return ffn.geglu_triton(out) if gate else out
            return run

        variants = {"base only": base, "baddbmm": with_add(low_rank.add_low_rank_reference),
                    "kernel": with_add(low_rank.add_low_rank_triton)}
        if gate:
            variants["fused"] = lambda: ffn.geglu_triton(F.linear(x, w, bias), delta(x))
        with torch.no_grad():
            ref = variants["baddbmm"]().float()
            for name, fn in variants.items():
                ms = graph_ms(fn)
                diff = (fn().float() - ref).abs().max().item() if name != "base only" else None
                rows.append({"layer": label, "tokens": tokens, "in": n_in, "out": n_out, "count": count,
                             "variant": name, "ms": round(ms, 4), "ms_per_call": round(ms * count, 3),
                             "max_abs_diff_to_baddbmm": diff})
                print(f"{label:14s} {name:9s} {ms * 1e3:8.1f} us  x{count:3d} = {ms * count:6.2f} ms/call"
                      + ("" if diff is None else f"  (max |diff| to baddbmm {diff:.2e})"), flush=True)
    return rows


def bench_sweep(rank: int = 64) -> list[dict]:
    rows, dtype = [], torch.float16
    for tokens, n_out in ((4096, 640), (1024, 1280), (1024, 10240)):
        p = 2 * tokens
        out = torch.randn(6 * tokens, n_out, device="cuda", dtype=dtype)
        delta = kernels.LowRankRows(torch.randn(2, p, rank, device="cuda", dtype=dtype),
                                    torch.randn(2, rank, n_out, device="cuda", dtype=dtype) * 0.02, 2 * tokens)
        rows.append({"tokens": tokens, "out": n_out, "variant": "baddbmm",
                     "us": round(1e3 * graph_ms(lambda: low_rank.add_low_rank_reference(out, delta)), 2)})
        for bm in (32, 64):
            for bn in (64, 128, 256):
                for warps in (4, 8):
                    def run(bm=bm, bn=bn, warps=warps):
                        grid = (2 * p // bm, -(-n_out // bn))
                        low_rank._add_low_rank_kernel[grid](out, delta.low, delta.up, delta.first_row, p, n_out,
                                                            rank, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=rank,
                                                            num_warps=warps)
                    rows.append({"tokens": tokens, "out": n_out, "variant": f"bm{bm} bn{bn} w{warps}",
                                 "us": round(1e3 * graph_ms(run), 2)})
        best = sorted(rows[-12:], key=lambda r: r["us"])[:3]
        print(f"add kernel tokens {tokens} out {n_out}: baddbmm {rows[-13]['us']} us; best "
              + ", ".join(f"{r['variant']} {r['us']} us" for r in best), flush=True)
    for tokens, width in ((4096, 2560), (1024, 5120)):
        h = torch.randn(6 * tokens, 2 * width, device="cuda", dtype=dtype)
        y = torch.empty(6 * tokens, width, device="cuda", dtype=dtype)
        delta = kernels.LowRankRows(torch.randn(2, 2 * tokens, rank, device="cuda", dtype=dtype),
                                    torch.randn(2, rank, 2 * width, device="cuda", dtype=dtype) * 0.02, 2 * tokens)
        gbytes = 3 * h.numel() // 2 * h.element_size() / 1e9
        found = []
        for fused in (False, True):
            for bm in (16, 32, 64):
                for bn in (64, 128):
                    for warps in (4, 8):
                        def run(bm=bm, bn=bn, warps=warps, fused=fused):
                            grid = (6 * tokens // bm, width // bn)
                            d = delta if fused else kernels.LowRankRows(h, h, 0)
                            ffn._geglu_kernel[grid](h, y, d.low, d.up, 6 * tokens, width, d.first_row, 2 * tokens,
                                                    rank, HAS_DELTA=fused, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=rank,
                                                    num_warps=warps)
                        us = 1e3 * graph_ms(run)
                        found.append({"tokens": tokens, "width": width, "fused": fused,
                                      "variant": f"geglu bm{bm} bn{bn} w{warps}", "us": round(us, 2),
                                      "gb_per_s": round(gbytes / us * 1e6, 1)})
        rows += found
        for fused in (False, True):
            best = sorted((r for r in found if r["fused"] == fused), key=lambda r: r["us"])[:3]
            print(f"geglu tokens {tokens} width {width} delta {fused}: best "
                  + ", ".join(f"{r['variant']} {r['us']} us ({r['gb_per_s']} GB/s)" for r in best), flush=True)
    return rows


def bench_unet(rounds: int, k: int = 2) -> list[dict]:
    unet = random_unet(UNetConfig.sdxl(), "cuda", torch.float16)
    unet.requires_grad_(False)
    unet.to(memory_format=preferred_memory_format("cuda"))
    loras = [bind(unet, load_lora(kohya_lora(unet, 64, locon=False, seed=i + 1), device="cuda")) for i in range(k)]
    grouped = GroupedLora(unet, loras)
    args = inputs(unet, 2 + 2 * k)
    rows, reference = [], None
    for name in BUILDS:
        with build(name), grouped.installed(first_row=2):
            ms, out = graphed_ms(unet, args, rounds)
        reference = out if reference is None else reference
        diff = out - reference
        rows.append({"build": name, "batch": 2 + 2 * k, "graph_ms": ms,
                     "max_abs_diff": round(diff.abs().max().item(), 5),
                     "rms_diff": round(diff.pow(2).mean().sqrt().item(), 6),
                     "out_rms": round(out.pow(2).mean().sqrt().item(), 4)})
        r = rows[-1]
        print(f"stage-2 UNet call k={k} ({name:7s}): {ms:7.2f} ms; output vs baddbmm max {r['max_abs_diff']}, "
              f"RMS {r['rms_diff']} (of {r['out_rms']})", flush=True)
    with torch.no_grad():
        bare, _ = graphed_ms(unet, args, rounds)
    rows.append({"build": "bare UNet (no LoRA)", "batch": 2 + 2 * k, "graph_ms": bare})
    print(f"bare UNet at batch {2 + 2 * k}: {bare:7.2f} ms", flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=["layers", "unet"], choices=["layers", "unet", "sweep"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    payload: dict = {"dtype": "fp16", "resolution": 1024, "rank": 64,
                     "note": "random weights; CUDA graph replays; ms per layer call and per UNet call"}
    if "layers" in args.sections:
        payload["layers"] = bench_layers()
    if "sweep" in args.sections:
        payload["sweep"] = bench_sweep()
    if "unet" in args.sections:
        payload["unet"] = bench_unet(args.rounds)
    path = write_json("lora_deltas", payload)
    print(f"wrote {path} on {device_name()}")
    return payload


if __name__ == "__main__":
    main()
