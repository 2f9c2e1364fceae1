"""Training throughput of the demo world's UNet stage: demo.train's loop against the loop it replaced, same run.

    python -m bench.train [--batch 64] [--steps 300] [--legacy-steps 40]

Both loops train the demo UNet config (demo.train.demo_configs) at the same batch on the same scenes:
- legacy: the loop of the previous demo/train.py (captions encoded by a frozen text encoder through a CPU-side
  cache and stacked per step, indices and noise drawn on the CPU and copied over, deterministic algorithms,
  foreach AdamW, loss.item() every step);
- current: demo.train.train_unet (data on the device, the text encoders trained too, the grounding loss, the
  whole step - batch draw, forward, backward, clipping, fused capturable AdamW, EMA - as one CUDA graph, losses
  read back every --log-every steps).
The current loop does more work per step (text-encoder backward, grounding loss, EMA). Prints steps/s and
writes bench/results/train_<gpu>.json.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from bench.common import write_json
from demo import train
from demo.scenes import base_scenes, to_tensor_batch
from omg.model import SDXL
from omg.sampling import NoiseSchedule
from omg.text import sdxl_vector


def legacy_steps_per_s(model: SDXL, latents: torch.Tensor, captions: list[str], batch: int, steps: int,
                       warmup: int = 5) -> float:
    """The previous demo/train.py's UNet loop, as it was (its Conditioner and diffusion_loss inlined)."""
    device = latents.device
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    unet = model.unet.train().requires_grad_(True)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ac = NoiseSchedule.sdxl().alphas_cumprod
    g = torch.Generator().manual_seed(2)
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def cond(caps: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({c for c in caps if c not in cache})
        if missing:
            context, pooled = model.text.encode(missing, zero_if_empty=True)
            y = sdxl_vector(pooled, (256, 256), (0, 0), (256, 256), embed_dim=train.SIZE_EMBED)
            for i, c in enumerate(missing):
                cache[c] = (context[i], y[i])
        return torch.stack([cache[c][0] for c in caps]), torch.stack([cache[c][1] for c in caps])

    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize(device) if device.type == "cuda" else None
            start = time.perf_counter()
        idx = torch.randint(len(latents), (batch,), generator=g)
        keep = torch.rand(batch, generator=g) >= 0.1
        context, y = cond([captions[i] if k else "" for i, k in zip(idx.tolist(), keep.tolist())])
        t = torch.randint(len(ac), (batch,), generator=g).to(device)
        noise = torch.randn((batch, *latents.shape[1:]), generator=g).to(device)
        a = ac.to(device)[t].float().view(-1, 1, 1, 1)
        x0 = latents[idx.to(device)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            eps = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, context, y)
        loss = F.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss.item()
    rate = steps / (time.perf_counter() - start)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    unet.eval().requires_grad_(False)
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=300, help="steps of the current loop; its rate is taken after the "
                   "first third (at most 100: warm-up, CUDA graph capture, compilation), as the legacy loop's after "
                   "its warm-up")
    p.add_argument("--legacy-steps", type=int, default=40)
    p.add_argument("--scenes", type=int, default=512)
    p.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke run)")
    p.add_argument("--require-graphs", action="store_true", help="exit 1 unless the current loop ran as a CUDA graph")
    p.add_argument("--compile", action="store_true",
                   help="also time the current loop with the step compiled (demo.train --compile), same run")
    p.add_argument("--profile", type=int, default=0, help="then profile this many steps of the current loop")
    p.add_argument("--name", default="train")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args()
    device = torch.device(args.device)
    size = 64 if args.tiny else 256
    unet_cfg, vae_cfg, text_cfgs = train.demo_configs(args.tiny)
    model = SDXL.random(unet_cfg, vae_cfg, text_cfgs, seed=0, device=device, size_embed_dim=train.SIZE_EMBED)
    scenes = base_scenes(args.scenes, size, seed=0, workers=min(16, os.cpu_count() or 1))
    latents = train.encode_latents(model, to_tensor_batch(scenes), device) * model.vae.config.scaling_factor
    captions = [s.caption for s in scenes]

    legacy = legacy_steps_per_s(model, latents, captions, args.batch, args.legacy_steps)
    print(f"legacy loop:  {legacy:8.2f} steps/s at batch {args.batch}")
    log: list = []
    window = max(1, min(100, args.steps // 3))  # the first read-back window: warm-up, capture, compilation
    trainer = train.Trainer(device, 0, window, log, lambda m: print(m, flush=True))
    data = train.DeviceData(latents, scenes, train.attention_grids(model.unet.config, size // 8), device)

    def current_loop(steps: int, compile_step: bool = False) -> dict:  # demo.train's UNet stage, no time budget
        return train.train_unet(model, data, trainer, steps, args.batch, 1e-4, 1e-4, 0.3, size, float("inf"),
                                compile_step=compile_step)

    stats = current_loop(args.steps)
    current = stats["steady_steps_per_s"]
    print(f"current loop: {current:8.2f} steps/s at batch {args.batch} ({current / legacy:.1f}x the legacy loop; "
          f"{stats['mode']}; {stats['steps_per_s']:.2f} over all {args.steps} steps, warm-up and capture included)")
    compiled = None
    if args.compile:
        t0 = time.perf_counter()
        cstats = current_loop(args.steps, compile_step=True)
        compiled = {"steps_per_s": cstats["steady_steps_per_s"], "mode": cstats["mode"], "skipped_steps":
                    cstats["skipped_steps"], "seconds_with_compile": time.perf_counter() - t0}
        print(f"compiled:     {compiled['steps_per_s']:8.2f} steps/s at batch {args.batch} "
              f"({compiled['steps_per_s'] / legacy:.1f}x the legacy loop; {cstats['mode']}; "
              f"{compiled['seconds_with_compile']:.0f} s with compilation)")
    best = max(current, compiled["steps_per_s"] if compiled else 0.0)
    profile = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            current_loop(args.profile)
        profile = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
        print(profile)
    n_params = sum(p.numel() for p in model.unet.parameters())
    path = write_json(args.name, {
        "batch": args.batch, "unet_parameters": n_params,
        "legacy_steps_per_s": legacy, "current_steps_per_s": current, "speedup": current / legacy,
        "compiled": compiled, "best_speedup": best / legacy,
        "target_steps_per_s": 37.5, "meets_target": best >= 37.5,
        "rates": f"steps/s after the first {window} steps (the legacy loop: after 5 warm-up steps)",
        "current_steps_per_s_all_steps": stats["steps_per_s"],
        "current_mode": stats["mode"], "skipped_steps": stats["skipped_steps"], "profile": profile,
        "current_losses_first_last": [log[0][2], log[-1][2]] if log else None}, args.out)
    print(f"wrote {path}")
    if args.require_graphs and not stats["mode"].startswith("graph"):
        raise SystemExit(f"the current loop ran as {stats['mode']}, not as a CUDA graph")


if __name__ == "__main__":
    main()
