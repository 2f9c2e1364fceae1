"""The original OMG code's schedule, rebuilt from diffusers + peft, as the baseline for bench/generate.py.

What the original does (see the project's notes on kongzhecn/OMG): the base UNet runs every attention
with an explicit softmax at batch 4 = [source, target] x [uncond, cond] (same prompt, same noise), copying
the source's conditional attention probabilities into the target as it goes (cross-attention every step,
self-attention for the first 40 % of steps); stage 1 runs all steps, stage 2 runs all steps again, and from
step index 16 on adds one batch-2 (CFG) pass per concept through a second UNet holding every LoRA as a peft
adapter, switched with set_adapters before each pass; the noise predictions of the target are blended with
the masks before guidance. No ControlNet, no segmentation, no text encoding here (random conditioning).

    python -m bench.reference [--k 2] [--config sdxl|mid] [--latent 128] [--steps 50]
Writes bench/results/reference_<gpu>.json.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from bench.common import DTYPES, device_name, write_json
from bench.lora import CONFIGS, kohya_lora, random_unet
from bench.unet import diffusers_sdxl_config
from omg.unet import UNet


class SourceToTarget:
    """diffusers attention processor with an explicit softmax (diffusers' AttnProcessor math) over rows
    [src_u, tgt_u, src_c, tgt_c]; the target's conditional probabilities are replaced by the source's."""

    def __init__(self, state: dict):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        cross = encoder_hidden_states is not None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)  # (batch * heads, n, t)
        if self.state["replace"] and (cross or self.state["step"] < self.state["self_steps"]):
            b = hidden_states.shape[0]
            probs = probs.view(b, attn.heads, *probs.shape[1:]).clone()
            probs[3] = probs[2]
            probs = probs.view(b * attn.heads, *probs.shape[2:])
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def diffusers_unet(unet, dtype):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    cfg = dict(diffusers_sdxl_config(unet.config),
               transformer_layers_per_block=tuple(max(d, 1) for d in unet.config.transformer_depth))
    with torch.device("meta"):
        d = UNet2DConditionModel(**cfg)
    sd = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()},
                                     d.config)
    d.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True, strict=True)
    return d.to(dtype).eval()


def run_reference(k: int = 2, config: str = "sdxl", latent: int = 128, steps: int = 50, blend_after: int = 15,
                  dtype: torch.dtype = torch.float16, device: str = "cuda") -> dict:
    """Time the original's schedule once (stage 1 and stage 2); returns the figures."""
    from diffusers import DDIMScheduler
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from safetensors.torch import save_file

    device = torch.device(device)
    ours = random_unet(CONFIGS[config], device, dtype)
    base, concept_unet = diffusers_unet(ours, dtype), diffusers_unet(ours, dtype)
    del ours
    with torch.device("meta"):
        shapes = UNet(CONFIGS[config])  # names and shapes for the LoRA files
    with tempfile.TemporaryDirectory() as tmp:
        for j in range(k):  # every concept's LoRA as a peft adapter of the second UNet
            path = os.path.join(tmp, f"c{j}.safetensors")
            save_file(kohya_lora(shapes, 64, locon=False, seed=j + 1), path)
            state, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(path, unet_config=concept_unet.config)
            concept_unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name=f"c{j}")
    state = {"replace": True, "step": 0, "self_steps": int(0.4 * steps)}
    base.set_attn_processor(SourceToTarget(state))
    cfg = base.config
    gen = torch.Generator().manual_seed(0)
    lat = (1, 4, latent, latent)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=gen).to(device, dtype)  # [negative, prompt]
    pooled = torch.randn(2, 1280, generator=gen).to(device, dtype)
    concept_ctx = [torch.randn(2, 77, cfg.cross_attention_dim, generator=gen).to(device, dtype)
                   for _ in range(k)]
    size = latent * 8
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 4, device=device, dtype=dtype)
    masks = torch.zeros(k, 1, latent, latent, device=device)
    for j in range(k):  # vertical strips
        masks[j, :, :, j * latent // k:(j + 1) * latent // k] = 1
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    noise = torch.randn(lat, generator=torch.Generator().manual_seed(1)).to(device)
    guidance = 7.5

    def base_eps(src, tgt, t):
        x = torch.cat([src, tgt, src, tgt]).to(dtype)
        out = base(x, t, ctx[[0, 0, 1, 1]], added_cond_kwargs={"text_embeds": pooled[[0, 0, 1, 1]],
                                                               "time_ids": time_ids}).sample.float()
        return out[0:1], out[1:2], out[2:3], out[3:4]  # src_u, tgt_u, src_c, tgt_c

    @torch.no_grad()
    def stage(blend: bool):
        src = tgt = noise.clone()
        for i, t in enumerate(scheduler.timesteps):
            state["step"] = i
            src_u, tgt_u, src_c, tgt_c = base_eps(src, tgt, t)
            if blend and i > blend_after:
                union = masks.sum(0, keepdim=True)
                tgt_u, tgt_c = tgt_u * (1 - union), tgt_c * (1 - union)
                for j in range(k):
                    concept_unet.set_adapters([f"c{j}"], [0.8])
                    e = concept_unet(torch.cat([tgt, tgt]).to(dtype), t, concept_ctx[j], added_cond_kwargs={
                        "text_embeds": pooled, "time_ids": time_ids[:2]}).sample.float()
                    tgt_u, tgt_c = tgt_u + masks[j] * e[0:1], tgt_c + masks[j] * e[1:2]
            src = scheduler.step(src_u + guidance * (src_c - src_u), t, src).prev_sample
            tgt = scheduler.step(tgt_u + guidance * (tgt_c - tgt_u), t, tgt).prev_sample
        return tgt

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stage1 = timed(lambda: stage(False))
    stage2 = timed(lambda: stage(True))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    evals = 4 * steps * 2 + 2 * k * (steps - blend_after - 1)
    result = dict(k=k, steps=steps, latent=latent, dtype=str(dtype).removeprefix("torch."),
                  stage1_s=stage1, stage2_s=stage2, total_s=stage1 + stage2, unet_evaluations=evals, peak_gib=peak)
    print(f"reference schedule k={k}, {steps} steps, latent {latent}: stage 1 {stage1:.2f} s, "
          f"stage 2 {stage2:.2f} s, total {stage1 + stage2:.2f} s; {evals} UNet evaluations; peak {peak:.2f} GiB")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sdxl")
    parser.add_argument("--latent", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--blend-after", type=int, default=15, help="blending for step indices > this")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    result = run_reference(args.k, args.config, args.latent, args.steps, args.blend_after, DTYPES[args.dtype],
                           args.device)
    if torch.device(args.device).type == "cuda":
        path = write_json("reference", {**result, "note": NOTE})
        print("wrote", path, "on", device_name())


NOTE = ("diffusers 0.42 + peft, explicit-softmax attention with in-batch source->target copy, adapters switched "
        "per pass")


if __name__ == "__main__":
    main()
