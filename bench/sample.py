"""Text to image with full-size SDXL (random weights), 1024x1024, 50 DDIM steps: seconds per image and
peak memory, omg vs the same loop driven through diffusers' UNet2DConditionModel + DDIMScheduler.

Both use the same weights, the same conditioning and the same initial noise; the diffusers side decodes
with diffusers' AutoencoderKL upcast to fp32 (what its SDXL pipeline does for the stock VAE), ours in bf16.
Run on the GPU machine:  python -m bench.sample [--steps 50] [--dtype fp16]  -> bench/results/sample_<gpu>.json
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from bench.common import DTYPES, device_name, write_json
from bench.unet import build_diffusers, random_sgm_state_dict
from omg.model import SDXL
from omg.sampling import randn_cpu
from omg.text import SDXLTextEncoder
from omg.txt2img import sample_latents
from omg.unet import UNet, UNetConfig
from omg.vae import AutoencoderKL, VAEConfig


def random_sdxl(dtype: torch.dtype) -> SDXL:
    """Full-size SDXL on the GPU: UNet N(0, 0.02) (bench/unet.py), VAE and text encoders default-initialised."""
    cfg = UNetConfig.sdxl()
    sd = random_sgm_state_dict(cfg)
    with torch.device("meta"):
        unet = UNet(cfg)
    unet.load_state_dict({k: v.to("cuda", dtype) for k, v in sd.items()}, assign=True)
    with torch.device("cuda"):
        vae = AutoencoderKL(VAEConfig.sdxl()).to(torch.bfloat16)
        text = SDXLTextEncoder.sdxl().to(dtype)
    return SDXL(unet.eval(), vae.eval(), text.eval()), sd


def seconds(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    model, sd = random_sdxl(dtype)
    prompt, negative = "a man and a woman walking in a park", "blurry"
    rows = {}

    # --- omg: text -> our DDIM loop -> VAE ---------------------------------------------------------
    def ours():
        latents = sample_latents(model, prompt, negative, steps=args.steps, guidance=7.5, seed=0,
                                 height=1024, width=1024, progress=False)
        return latents, model.decode(latents)
    seconds(ours)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    runs = [seconds(ours) for _ in range(args.repeats)]
    rows["omg"] = dict(seconds=min(r[0] for r in runs), peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    ours_latents = runs[-1][1][0]

    # --- diffusers: UNet2DConditionModel + DDIMScheduler, same conditioning and noise --------------
    from diffusers import AutoencoderKL as DAutoencoderKL, DDIMScheduler
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    dunet = build_diffusers(UNetConfig.sdxl(), sd, dtype)
    vae_cfg = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                   up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4,
                   scaling_factor=0.13025)
    dvae = DAutoencoderKL(**vae_cfg)
    dvae.load_state_dict(convert_ldm_vae_checkpoint(
        {"first_stage_model." + k: v for k, v in model.vae.state_dict().items()}, vae_cfg))
    dvae = dvae.to("cuda", torch.float32).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")

    @torch.no_grad()
    def theirs():
        context, y = model.conditioning([prompt], [negative], 1024, 1024)  # our UNet is parked on the CPU
        context, pooled = context.to("cuda"), y[:, :1280].to("cuda")
        time_ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2, device="cuda", dtype=dtype)
        scheduler.set_timesteps(args.steps)
        latents = randn_cpu((1, 4, 128, 128), torch.Generator().manual_seed(0), "cuda")
        for t in scheduler.timesteps:
            eps = dunet(torch.cat([latents, latents]).to(dtype), t, context.to(dtype),
                        added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids}).sample.float()
            u, c = eps.chunk(2)
            latents = scheduler.step(u + 7.5 * (c - u), t, latents).prev_sample
        image = dvae.decode(latents / 0.13025).sample
        return latents, image
    model.unet.to("cpu")  # out of the diffusers run's peak memory
    gc.collect()
    torch.cuda.empty_cache()
    seconds(theirs)
    torch.cuda.reset_peak_memory_stats()
    runs = [seconds(theirs) for _ in range(args.repeats)]
    rows["diffusers"] = dict(seconds=min(r[0] for r in runs), peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    diff = (runs[-1][1][0].float() - ours_latents.float()).abs().max().item()
    for name, row in rows.items():
        print(f"{name:9s} {args.steps} DDIM steps 1024x1024 {args.dtype}: {row['seconds']:.2f} s/image, "
              f"peak {row['peak_gib']:.2f} GiB")
    ratio = rows["diffusers"]["seconds"] / rows["omg"]["seconds"]
    print(f"speed-up vs diffusers {ratio:.3f}x; max |latent omg - diffusers| = {diff:.3g}")
    path = write_json("sample", {"steps": args.steps, "dtype": args.dtype, "resolution": 1024, "rows": rows,
                                 "speedup_vs_diffusers": ratio, "max_abs_latent_diff": diff,
                                 "note": "text encode + 50 DDIM steps (CFG batch 2) + VAE decode; random weights"})
    print("wrote", path, "on", device_name())


if __name__ == "__main__":
    main()
