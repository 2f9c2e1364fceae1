"""Full-size SDXL UNet forward: ms per forward and peak memory, ours vs diffusers' UNet2DConditionModel.

Random weights (the same for both), 1024x1024 (128x128 latent), fp16 and bf16, batch 2 and 8.
Run on the GPU machine:  python -m bench.unet  [--batches 2 8] [--dtypes fp16 bf16]
Writes bench/results/unet_<gpu>.json.
"""
from __future__ import annotations

import argparse
import gc

import torch

from bench.common import DTYPES, device_name, peak_memory_gib, time_ms, write_json
from omg.unet import UNet, UNetConfig, timestep_embedding


def diffusers_sdxl_config(cfg: UNetConfig) -> dict:
    return dict(sample_size=128, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
                layers_per_block=cfg.num_res_blocks, transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=tuple(cfg.model_channels * m // cfg.head_dim for m in cfg.channel_mult),
                cross_attention_dim=cfg.context_dim, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=cfg.adm_in_channels, norm_num_groups=cfg.norm_groups)


def random_sgm_state_dict(cfg: UNetConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the SGM layout, fp32 on CPU: N(0, 0.02) for matrices, norms at identity."""
    with torch.device("meta"):
        model = UNet(cfg)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        if p.ndim >= 2:
            sd[name] = torch.randn(p.shape, generator=gen) * 0.02
        elif "norm" in name or name.endswith(("in_layers.0.weight", "out_layers.0.weight", "out.0.weight")):
            sd[name] = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
        else:
            sd[name] = torch.zeros(p.shape)
    return sd


def build_ours(cfg, sd, dtype):
    with torch.device("meta"):
        model = UNet(cfg)
    model.load_state_dict({k: v.to("cuda", dtype) for k, v in sd.items()}, assign=True, strict=True)
    return model.eval()


def build_diffusers(cfg, sd, dtype):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    with torch.device("meta"):
        model = UNet2DConditionModel(**diffusers_sdxl_config(cfg))
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in sd.items()}, model.config)
    model.load_state_dict({k: v.to("cuda", dtype) for k, v in converted.items()}, assign=True, strict=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--extra", nargs="*", default=[], choices=["channels_last", "compile"],
                        help="also time our UNet in channels-last memory format / under torch.compile")
    parser.add_argument("--name", default="unet", help="JSON name: bench/results/<name>_<gpu>.json")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "bench/unet.py measures the GPU"
    cfg = UNetConfig.sdxl()
    sd = random_sgm_state_dict(cfg)
    flops_per_sample = 6.76e12  # torch.utils.flop_counter.FlopCounterMode on one batch-1 forward at 1024x1024
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for batch in args.batches:
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(batch, 4, 128, 128, generator=gen).to("cuda", dtype)
            t = torch.full((batch,), 500.0, device="cuda")
            ctx = torch.randn(batch, 77, 2048, generator=gen).to("cuda", dtype)
            pooled = torch.randn(batch, 1280, generator=gen).to("cuda", dtype)
            time_ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, dtype=torch.float32, device="cuda")
            y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(batch, -1).to(dtype)], 1)
            models = {"omg": build_ours(cfg, sd, dtype), "diffusers": build_diffusers(cfg, sd, dtype)}
            calls = {"omg": lambda: models["omg"](x, t, ctx, y),
                     "diffusers": lambda: models["diffusers"](x, t, ctx, added_cond_kwargs={
                         "text_embeds": pooled, "time_ids": time_ids}).sample}
            if "channels_last" in args.extra:
                models["omg_channels_last"] = build_ours(cfg, sd, dtype).to(memory_format=torch.channels_last)
                x_cl = x.contiguous(memory_format=torch.channels_last)
                calls["omg_channels_last"] = lambda: models["omg_channels_last"](x_cl, t, ctx, y)
            if "compile" in args.extra:
                models["omg_compile"] = build_ours(cfg, sd, dtype)
                compiled = torch.compile(models["omg_compile"])
                calls["omg_compile"] = lambda: compiled(x, t, ctx, y)
            times = {impl: [] for impl in calls}
            outputs, peaks = {}, {}
            with torch.inference_mode():
                for _ in range(3):  # interleaved rounds: both see the same clocks and neighbours
                    for impl, call in calls.items():
                        times[impl].append(time_ms(call, iters=args.iters))
                for impl, call in calls.items():
                    weights = sum(p.numel() * p.element_size() for p in models[impl].parameters())
                    before = torch.cuda.memory_allocated()
                    # the peak this model alone would need: its weights plus what the forward allocates
                    peaks[impl] = (peak_memory_gib(call) * 2**30 - before + weights) / 2**30
                    outputs[impl] = call().float()
            for impl in calls:
                ms, peak = min(times[impl]), peaks[impl]
                tflops = flops_per_sample * batch / (ms / 1e3) / 1e12
                rows.append(dict(impl=impl, dtype=dtype_name, batch=batch, ms=round(ms, 2),
                                 ms_rounds=[round(v, 2) for v in times[impl]], peak_gib=round(peak, 2),
                                 tflops=round(tflops, 1)))
                print(f"{impl:9s} {dtype_name} batch {batch}: {ms:8.2f} ms/forward  peak {peak:6.2f} GiB  "
                      f"{tflops:6.1f} TFLOP/s", flush=True)
            impls = list(calls)
            del models, calls
            gc.collect()
            torch.cuda.empty_cache()
            diff = (outputs["omg"] - outputs["diffusers"]).abs().max().item()
            scale = outputs["diffusers"].abs().max().item()
            mine = {r["impl"]: r for r in rows[-len(impls):]}
            ratio = mine["diffusers"]["ms"] / mine["omg"]["ms"]
            mine["omg"].update(speedup_vs_diffusers=round(ratio, 3), max_abs_diff_vs_diffusers=diff, output_max=scale)
            for impl in impls:
                if impl.startswith("omg_"):
                    mine[impl].update(speedup_vs_diffusers=round(mine["diffusers"]["ms"] / mine[impl]["ms"], 3),
                                      max_abs_diff_vs_omg=(outputs[impl] - outputs["omg"]).abs().max().item())
                    print(f"  {impl}: {mine['diffusers']['ms'] / mine[impl]['ms']:.3f}x diffusers")
            print(f"  speed-up vs diffusers {ratio:.3f}x; max |omg - diffusers| = {diff:.3g} (|out| max {scale:.3g})")
    path = write_json(args.name, {"resolution": 1024, "rows": rows,
                               "note": "eager PyTorch, SDPA attention, random weights N(0,0.02)"})
    print("wrote", path, "on", device_name())


if __name__ == "__main__":
    main()
