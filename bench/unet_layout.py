"""The bare SDXL UNet replayed as a CUDA graph in four builds, side by side in one run: activations contiguous
(NCHW) or channels-last, and the transformer blocks' residual adds + LayerNorms as torch ops or fused
(kernels.residual_norm). Same random weights and the same inputs for every build; the output's max and RMS
difference to the contiguous/torch-ops build beside the time.

Run on the GPU machine:  python -m bench.unet_layout [--batches 2 6] [--rounds 3]
Writes bench/results/unet_layout_<gpu>.json.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager, nullcontext

import torch

import kernels
from bench.common import device_name, write_json
from bench.lora import random_unet
from bench.step_profile import replay_alone_ms
from omg.graphs import GraphedCall
from omg.unet import UNetConfig

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@contextmanager
def torch_norms():
    """The transformer blocks' norms and residual adds as torch ops (what the fused kernels replace)."""
    fused = kernels.layer_norm, kernels.add_layer_norm

    def add_then_norm(norm, x, delta):
        s = x + delta
        return s, norm(s)

    kernels.layer_norm, kernels.add_layer_norm = (lambda norm, x: norm(x)), add_then_norm
    try:
        yield
    finally:
        kernels.layer_norm, kernels.add_layer_norm = fused


def inputs(unet, batch: int) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(batch)
    cfg, dtype = unet.config, next(unet.parameters()).dtype
    return (torch.randn(batch, cfg.in_channels, 128, 128, device="cuda", generator=g).to(dtype),
            torch.linspace(100.0, 900.0, batch, device="cuda"),
            torch.randn(batch, 77, cfg.context_dim, device="cuda", generator=g).to(dtype),
            torch.randn(batch, cfg.adm_in_channels, device="cuda", generator=g).to(dtype))


def graphed_ms(unet, args: tuple, rounds: int) -> tuple[float, torch.Tensor]:
    x, t, ctx, y = args
    call = GraphedCall(lambda x_, t_: unet(x_, t_, ctx, y))
    with torch.no_grad():
        out = call(x.clone(), t.clone()).float().clone()
        ms = min(replay_alone_ms(call) for _ in range(rounds))
    del call
    return ms, out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per build (the fastest is reported)")
    args = parser.parse_args(argv)
    unet = random_unet(UNetConfig.sdxl(), "cuda", torch.float16)
    unet.requires_grad_(False)
    rows, baseline = [], {}
    for layout, fmt in LAYOUTS.items():
        unet.to(memory_format=fmt)
        for norms in ("torch", "fused"):
            for batch in args.batches:
                with torch_norms() if norms == "torch" else nullcontext():
                    ms, out = graphed_ms(unet, inputs(unet, batch), args.rounds)
                base = baseline.setdefault(batch, (ms, out))
                diff = out - base[1]
                rows.append({"layout": layout, "norms": norms, "batch": batch, "graph_ms": ms,
                             "over_contiguous_torch": round(base[0] / ms, 3),
                             "max_abs_diff": round(diff.abs().max().item(), 5),
                             "rms_diff": round(diff.pow(2).mean().sqrt().item(), 6),
                             "out_rms": round(out.pow(2).mean().sqrt().item(), 4)})
                r = rows[-1]
                print(f"{layout:13s} norms {norms:5s} batch {batch}: {ms:7.2f} ms ({r['over_contiguous_torch']:.3f}x); "
                      f"output vs contiguous/torch max {r['max_abs_diff']}, RMS {r['rms_diff']} (of {r['out_rms']})",
                      flush=True)
    payload = {"rows": rows, "dtype": "fp16", "resolution": 1024,
               "note": "random weights, N(0, 0.02); bare UNet (no attention processor, no LoRA), CUDA graph replays"}
    path = write_json("unet_layout", payload)
    print(f"wrote {path} on {device_name()}")
    return payload


if __name__ == "__main__":
    main()
