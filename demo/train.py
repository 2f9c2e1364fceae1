"""Train the demo world's weights: a small SDXL-family model (omg's UNet, VAE, both text encoders) and one
kohya LoRA per concept, on demo.scenes.

    python -m demo.train --device cuda --minutes 15 --out weights/demo     # the shipped weights (one GPU)
    python -m demo.train --tiny --out /tmp/demo                            # CPU smoke run (seconds)

Choices (why):
- Text encoders stay frozen at their seeded random init: the tokenizer gives each word its own token, so a
  random CLIP-L / bigG still maps distinct captions to distinct contexts; training them would cost time
  for no new capability in this world. Their vocabulary embeddings dominate their size, hence small widths.
- The VAE is trained first as a plain autoencoder (L1 + small KL), then frozen; its scaling_factor is set
  to 1 / std of the training latents (stored in the checkpoint metadata by save_sgm).
- The UNet learns eps-prediction on the SDXL DDPM schedule, conditioned on (context, y) from the encoders
  with sdxl_vector; 10 % of captions are dropped to the zero embedding for classifier-free guidance.
- LoRAs: rank-r adapters on every attention projection (attn1/attn2 to_q, to_k, to_v, to_out.0) of the
  frozen UNet, trained DreamBooth style on 16 images of the concept alone, saved in the kohya layout.
Everything is seeded: on CPU the same arguments give byte-identical files (tested); on CUDA deterministic
kernels are requested, and the step counts must be fixed (--steps/--vae-steps/--lora-steps with a generous
--minutes), since the budget alone stops on wall-clock time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file (python demo/train.py): make `demo` and `omg` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch.nn.functional as F
from torch import Tensor, nn

from demo.scenes import CONCEPTS, base_scenes, concept_images, to_tensor_batch
from omg.atomic import atomic_path
from omg.model import SDXL, save_sgm
from omg.sampling import NoiseSchedule
from omg.text import TextEncoderConfig, sdxl_vector
from omg.unet import UNetConfig
from omg.vae import VAEConfig

SIZE_EMBED = 16  # width of each of the six size embeddings in y


def demo_configs(tiny: bool = False) -> tuple[UNetConfig, VAEConfig, tuple[TextEncoderConfig, TextEncoderConfig]]:
    """The demo model: SDXL's block structure (3 UNet levels, attention on the lower two; 4-level f=8 VAE)."""
    if tiny:
        unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 1),
                          transformer_depth_middle=1, head_dim=16, norm_groups=8)
        vae = VAEConfig(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8)
        l_cfg = TextEncoderConfig(width=32, layers=1, heads=2, mlp_width=64)
        g_cfg = TextEncoderConfig(width=32, layers=1, heads=2, mlp_width=64, act="gelu", projection_dim=32)
    else:
        # sizes chosen for the <= 40 MB budget (fp16): UNet 11.9 M, VAE ~2.5 M, text 3.3 M (mostly the
        # 49408-token embeddings), three rank-4 LoRAs ~0.4 M each
        unet = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2),
                          transformer_depth_middle=2, head_dim=32, norm_groups=32)
        vae = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=16)
        l_cfg = TextEncoderConfig(width=32, layers=2, heads=2, mlp_width=128)
        g_cfg = TextEncoderConfig(width=32, layers=2, heads=2, mlp_width=128, act="gelu", projection_dim=32)
    return unet, vae, (l_cfg, g_cfg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class Conditioner:
    """Caches (context, y) per caption from the frozen text encoders; "" gives the zero (dropped) condition."""

    def __init__(self, model: SDXL, size: int):
        self.model, self.size, self.cache = model, size, {}

    def __call__(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            context, pooled = self.model.text.encode(missing, zero_if_empty=True)
            y = sdxl_vector(pooled, (self.size, self.size), (0, 0), (self.size, self.size), embed_dim=SIZE_EMBED)
            for i, c in enumerate(missing):
                self.cache[c] = (context[i], y[i])
        return (torch.stack([self.cache[c][0] for c in captions]), torch.stack([self.cache[c][1] for c in captions]))


def train_vae(model: SDXL, images: Tensor, steps: int, batch: int, lr: float, device: torch.device,
              deadline: float, log: list) -> None:
    """Autoencoder training: L1 reconstruction + 1e-6 KL (SGM's KL weight), on random crops-free batches."""
    vae = model.vae
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        if time.monotonic() > deadline:
            break
        x = images[torch.randint(len(images), (batch,), generator=g)].to(device)
        with autocast(device):
            moments = vae.quant_conv(vae.encoder(x))
            mean, logvar = moments.float().chunk(2, dim=1)
            logvar = logvar.clamp(-30, 20)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g).to(device)
            rec = vae.decoder(vae.post_quant_conv(z))
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = F.l1_loss(rec.float(), x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append(("vae", step, loss.item()))
    vae.eval()


@torch.no_grad()
def encode_latents(model: SDXL, images: Tensor, device: torch.device, batch: int = 64) -> Tensor:
    """Posterior means (unscaled), fp32, on device."""
    vae, out = model.vae, []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device)
        with autocast(device):
            out.append(vae.quant_conv(vae.encoder(x)).float().chunk(2, dim=1)[0])
    return torch.cat(out)


def set_scaling_factor(model: SDXL, latents: Tensor) -> float:
    """SDXL convention: latents * scaling_factor has unit std (Rombach et al. 2022, sec. 4.3.2)."""
    factor = float(1.0 / latents.std())
    model.vae.config = dataclasses.replace(model.vae.config, scaling_factor=round(factor, 6))
    return model.vae.config.scaling_factor


def diffusion_loss(unet: nn.Module, latents: Tensor, context: Tensor, y: Tensor, schedule_ac: Tensor,
                   g: Optional[torch.Generator], t: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> Tensor:
    """DDPM eps-prediction MSE: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (Ho et al. 2020, eq. 14)."""
    device = latents.device
    if t is None:
        t = torch.randint(len(schedule_ac), (len(latents),), generator=g)
    if noise is None:
        noise = torch.randn(latents.shape, generator=g)
    t, noise = t.to(device), noise.to(device)
    a = schedule_ac.to(device)[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
    with autocast(device):
        eps = unet(x_t, t, context, y)
    return F.mse_loss(eps.float(), noise)


def train_unet(model: SDXL, latents: Tensor, captions: list[str], cond: Conditioner, steps: int, batch: int,
               lr: float, deadline: float, log: list, tag: str = "unet", params=None, drop: float = 0.1,
               seed: int = 2) -> None:
    unet, device = model.unet, latents.device
    params = list(unet.parameters()) if params is None else params
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ac = NoiseSchedule.sdxl().alphas_cumprod
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        if time.monotonic() > deadline:
            break
        idx = torch.randint(len(latents), (batch,), generator=g)
        keep = torch.rand(batch, generator=g) >= drop
        caps = [captions[i] if k else "" for i, k in zip(idx.tolist(), keep.tolist())]
        context, y = cond(caps)
        loss = diffusion_loss(unet, latents[idx.to(device)], context, y, ac, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.append((tag, step, loss.item()))


@torch.no_grad()
def eval_loss(model: SDXL, latents: Tensor, captions: list[str], cond: Conditioner, n: int = 8) -> float:
    """The diffusion loss on fixed samples, fixed timesteps and fixed noise: comparable across training."""
    g = torch.Generator().manual_seed(1234)
    n = min(n, len(latents))
    ac = NoiseSchedule.sdxl().alphas_cumprod
    t = torch.linspace(50, 950, n).long()
    noise = torch.randn(latents[:n].shape, generator=g)
    context, y = cond(captions[:n])
    return float(diffusion_loss(model.unet, latents[:n], context, y, ac, None, t, noise))


class LoraLinear(nn.Module):
    """W x + (alpha / r) * up(down(x)), up initialised to zero (Hu et al. 2021)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.up.weight)
        self.to(base.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (self.alpha / self.rank) * self.up(self.down(x))


def attention_projections(unet: nn.Module) -> dict[str, nn.Linear]:
    """SGM module path -> Linear of every attention projection (attn1/attn2 to_q, to_k, to_v, to_out.0)."""
    return {f"{path}.{name}": (layer.to_out[0] if name == "to_out.0" else getattr(layer, name))
            for path, layer in unet.attention_layers().items() for name in ("to_q", "to_k", "to_v", "to_out.0")}


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def add_lora(unet: nn.Module, rank: int, alpha: float) -> dict[str, LoraLinear]:
    wrapped = {}
    for path, linear in attention_projections(unet).items():
        wrapped[path] = LoraLinear(linear, rank, alpha)
        _set_submodule(unet, path, wrapped[path])
    return wrapped


def remove_lora(unet: nn.Module, wrapped: dict[str, LoraLinear]) -> None:
    for path, w in wrapped.items():
        _set_submodule(unet, path, w.base)


def kohya_state_dict(wrapped: dict[str, LoraLinear]) -> dict[str, Tensor]:
    """kohya SDXL keys: lora_unet_<SGM module path, dots as underscores>.lora_down/.lora_up/.alpha."""
    sd = {}
    for path, w in wrapped.items():
        key = "lora_unet_" + path.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = w.down.weight.detach().float().cpu().half().contiguous()
        sd[f"{key}.lora_up.weight"] = w.up.weight.detach().float().cpu().half().contiguous()
        sd[f"{key}.alpha"] = torch.tensor(float(w.alpha)).half()
    return sd


def save_atomic(tensors: dict[str, Tensor], path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="weights/demo")
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget for all training stages")
    p.add_argument("--steps", type=int, default=None, help="UNet steps (others scale with it); default: budget-bound")
    p.add_argument("--vae-steps", type=int, default=None, help="default: steps // 3 (budget-bound without --steps)")
    p.add_argument("--lora-steps", type=int, default=None, help="per concept; default: steps // 4, else 400")
    p.add_argument("--tiny", action="store_true", help="tiny model and data for a CPU smoke run")
    p.add_argument("--size", type=int, default=None, help="image size (default 256, tiny 64)")
    p.add_argument("--scenes", type=int, default=None, help="base training scenes (default 4000, tiny 16)")
    p.add_argument("--concept-images", type=int, default=16)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--batch", type=int, default=64, help="UNet and VAE batch (LoRAs: all concept images)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run every stage; returns a summary (losses, eval losses, paths), also written to <out>/train_log.json."""
    args = parse_args(argv)
    device = torch.device(args.device)
    size = args.size or (64 if args.tiny else 256)
    n_scenes = args.scenes or (16 if args.tiny else 4000)
    unet_steps = args.steps if args.steps is not None else (30 if args.tiny else 10 ** 9)
    vae_steps = max(1, unet_steps // 3) if args.steps is not None or args.tiny else 10 ** 9
    lora_steps = max(1, unet_steps // 4) if args.steps is not None or args.tiny else 400
    vae_steps = args.vae_steps if args.vae_steps is not None else vae_steps
    lora_steps = args.lora_steps if args.lora_steps is not None else lora_steps
    batch = 4 if args.tiny else args.batch
    budget = args.minutes * 60
    t0 = time.monotonic()
    seed_everything(args.seed)
    if device.type == "cuda":
        # reproducible files need fixed step counts (the time budget is wall-clock) and deterministic kernels
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    unet_cfg, vae_cfg, text_cfgs = demo_configs(args.tiny)
    model = SDXL.random(unet_cfg, vae_cfg, text_cfgs, seed=args.seed, device=device, size_embed_dim=SIZE_EMBED)
    model.text.requires_grad_(False)
    scenes = base_scenes(n_scenes, size, seed=args.seed, workers=min(16, os.cpu_count() or 1))
    images = to_tensor_batch(scenes)
    captions = [s.caption for s in scenes]
    log: list = []

    # budget split: VAE 20 %, UNet 60 %, LoRAs the rest
    stage_seconds = {"scenes": time.monotonic() - t0}
    t_stage = time.monotonic()
    train_vae(model, images, vae_steps, min(batch, 32), 1e-3 if args.tiny else 6e-4, device, t0 + 0.2 * budget, log)
    stage_seconds["vae"] = time.monotonic() - t_stage
    model.vae.requires_grad_(False)
    raw = encode_latents(model, images, device)
    scale = set_scaling_factor(model, raw)
    latents = raw * scale
    cond = Conditioner(model, size)
    model.unet.train()
    eval_before = eval_loss(model, latents, captions, cond)
    t_stage = time.monotonic()
    train_unet(model, latents, captions, cond, unet_steps, batch, 1e-3 if args.tiny else 5e-4,
               t0 + 0.8 * budget, log)
    model.unet.eval()
    stage_seconds["unet"] = time.monotonic() - t_stage
    eval_after = eval_loss(model, latents, captions, cond)
    model.unet.requires_grad_(False)

    os.makedirs(args.out, exist_ok=True)
    loras, lora_evals = {}, {}
    per_concept = (budget - (time.monotonic() - t0)) / len(CONCEPTS)
    for i, (name, spec) in enumerate(sorted(CONCEPTS.items())):
        c_scenes = concept_images(name, args.concept_images, size, seed=args.seed)
        c_lat = encode_latents(model, to_tensor_batch(c_scenes), device) * scale
        c_caps = [s.caption for s in c_scenes]
        wrapped = add_lora(model.unet, args.rank, float(args.rank))
        t_stage = time.monotonic()
        params = [p for w in wrapped.values() for p in (w.down.weight, w.up.weight)]
        before = eval_loss(model, c_lat, c_caps, cond)
        train_unet(model, c_lat, c_caps, cond, lora_steps, min(batch, len(c_lat)), 1e-3, time.monotonic() +
                   per_concept, log, tag=f"lora:{name}", params=params, drop=0.0, seed=10 + i)
        stage_seconds[f"lora:{name}"] = time.monotonic() - t_stage
        lora_evals[name] = (before, eval_loss(model, c_lat, c_caps, cond))
        path = os.path.join(args.out, f"{name}.safetensors")
        # one metadata key: safetensors writes metadata in hash-map order, so several keys would make the
        # file bytes differ between runs (rank and alpha are in the tensors: lora_down rows, .alpha)
        save_atomic(kohya_state_dict(wrapped), path, {"omg.demo.concept": json.dumps(
            {**dataclasses.asdict(spec), "prompt": f"a {spec.phrase}", "rank": args.rank}, sort_keys=True)})
        remove_lora(model.unet, wrapped)
        loras[name] = path

    model.unet.to(torch.float16)  # halves the file; load_sdxl casts to the requested dtype anyway
    model.text.to(torch.float16)
    model.vae.to(torch.float16)
    ckpt = os.path.join(args.out, "demo_sdxl.safetensors")
    save_sgm(model, ckpt)
    summary = {"checkpoint": ckpt, "loras": loras, "size": size, "scaling_factor": scale,
               "unet_eval_loss": [eval_before, eval_after], "lora_eval_loss": lora_evals,
               "steps": {tag: sum(1 for t, _, _ in log if t == tag) for tag in {t for t, _, _ in log}},
               "seconds": time.monotonic() - t0, "stage_seconds": stage_seconds, "args": vars(args),
               "concepts": {n: {"class_name": s.class_name, "phrase": s.phrase} for n, s in CONCEPTS.items()}}
    with atomic_path(os.path.join(args.out, "train_log.json")) as tmp, open(tmp, "w") as f:
        json.dump({**summary, "log": log}, f, indent=1)
    print(json.dumps(summary, indent=1), file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
