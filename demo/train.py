"""Train the demo world's weights: a small SDXL-family model (omg's UNet, VAE, both text encoders) and one
kohya LoRA per concept, on demo.scenes.

    python -m demo.train --device cuda --out weights/demo          # the shipped weights (one GPU, minutes)
    python -m demo.train --tiny --out /tmp/demo                    # CPU smoke run (seconds)
    python -m demo.train --init weights/demo/demo_sdxl.safetensors --stages unet,lora --unet-steps 4000
                                                                   # resume from a weights-only checkpoint

Stages (--stages, in this order):
1. vae: the autoencoder on plain scenes and concept images (L1 + L2 + SGM's 1e-6 KL), so the concepts'
   patterns survive the round trip; then frozen, scaling_factor = 1 / std of the training latents.
2. unet: the UNet and both text encoders together (token embeddings and every layer: a frozen random
   encoder is what made an earlier demo model ignore its text), eps-prediction on the SDXL schedule,
   10 % of captions dropped to the zero embedding for classifier-free guidance. A grounding loss in the
   manner of TokenCompose (Wang et al. 2024) pulls each object's colour and class tokens' cross-attention
   onto that object's visible pixels and the background colour word onto the background; that is what a
   12 M-parameter model trained for minutes lacks and SDXL gets from scale, and it is what lets OMG find
   its masks in stage-1 attention.
3. lora: one LoRA per concept (rank --rank on every transformer linear and ResBlock conv of the frozen
   UNet), DreamBooth with prior preservation (Ruiz et al. 2023): instance images "a sks ball on ..." and
   class images of the same class and colour without the pattern, "a red ball on ...", in every batch, so
   the identity is bound to the identifier word. Saved in the kohya layout.

Speed: data and captions live on the device, sampled there; the UNet stage's whole step (batch draw, text
encoders, UNet forward with bf16 autocast, grounding loss, backward, clipping, fused capturable AdamW, EMA) is
one CUDA graph, recorded once and replayed (--compile: inductor's kernels inside it); the LoRA stage's forward
and backward are one (torch.cuda.make_graphed_callables); losses are read back every --log-every steps only.
Seeded; on CUDA not bitwise reproducible (atomics in the backward pass).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file (python demo/train.py): make `demo` and `omg` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demo.scenes import BACKGROUNDS, CONCEPTS, Scene, article, base_scenes, concept_images, to_tensor_batch  # noqa: E402
from omg.atomic import atomic_path  # noqa: E402
from omg.model import SDXL, load_sdxl, save_sgm  # noqa: E402
from omg.sampling import NoiseSchedule  # noqa: E402
from omg.text import PAD_G, PAD_L, TextEncoderConfig, sdxl_vector, tokenize, word_tokens  # noqa: E402
from omg.unet import Attention, UNetConfig  # noqa: E402
from omg.vae import VAEConfig  # noqa: E402

SIZE_EMBED = 16  # width of each of the six size embeddings in y
MAX_TOKENS = 7  # grounded tokens per caption: colour and class word of up to 3 objects, the background colour
STAGES = ("vae", "unet", "lora")


def demo_configs(tiny: bool = False) -> tuple[UNetConfig, VAEConfig, tuple[TextEncoderConfig, TextEncoderConfig]]:
    """The demo model: SDXL's block structure (3 UNet levels, attention on the lower two; 4-level f=8 VAE)."""
    if tiny:
        unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 1),
                          transformer_depth_middle=1, head_dim=16, norm_groups=8)
        vae = VAEConfig(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8)
        l_cfg = TextEncoderConfig(width=32, layers=1, heads=2, mlp_width=64)
        g_cfg = TextEncoderConfig(width=32, layers=1, heads=2, mlp_width=64, act="gelu", projection_dim=32)
    else:
        # fp16 file: UNet 11.9 M parameters, VAE 2.5 M, text 3.3 M (mostly the two 49408-token embeddings)
        unet = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2),
                          transformer_depth_middle=2, head_dim=32, norm_groups=32)
        vae = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=16)
        l_cfg = TextEncoderConfig(width=32, layers=2, heads=2, mlp_width=128)
        g_cfg = TextEncoderConfig(width=32, layers=2, heads=2, mlp_width=128, act="gelu", projection_dim=32)
    return unet, vae, (l_cfg, g_cfg)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)


def cosine_lr(step: int, total: int, peak: float, warmup: int = 200, floor: float = 0.1,
              progress: Optional[float] = None) -> float:
    """Linear warm-up, then cosine decay to floor * peak; progress (0..1) overrides step / total, so that a stage
    stopped by its time budget still ends its schedule (Trainer.progress)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---------------------------------------------------------------------------------------------- data

def grounded_tokens(scene: Scene) -> list[tuple[int, int]]:
    """(token position, target) pairs of a caption: target i >= 0 is object i's visible mask, -1 the background.

    Positions count BOS, so they index the encoders' 77-token sequence as the pipeline's heat maps do."""
    words = [w.rstrip(",") for w in scene.caption.split()]  # "box," is the class token and a comma token
    starts, pos = [], 1
    for tokens in word_tokens(scene.caption):
        starts.append(pos)
        pos += len(tokens)
    out, w = [], 0
    for i, obj in enumerate(scene.objects):
        while words[w] != obj.class_name:  # "a red ball": the class word, and the colour or identifier before it
            w += 1
        out += [(starts[w - 1], i), (starts[w], i)]
        w += 1
    out.append((starts[words.index("background") - 1], -1))
    return out


def grounding_targets(scenes: Sequence[Scene], grids: Sequence[int]) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """Token positions (N, J) int64, weights (N, J) (0 pads) and, per grid side g, the targets' visible masks
    as area fractions (N, J, g*g)."""
    n = len(scenes)
    positions = torch.zeros(n, MAX_TOKENS, dtype=torch.long)
    weights = torch.zeros(n, MAX_TOKENS)
    masks = {g: torch.zeros(n, MAX_TOKENS, g * g) for g in grids}
    for s, scene in enumerate(scenes):
        full = torch.from_numpy(scene.masks).float()  # (k, H, W)
        layers = torch.cat([full, (1 - full.sum(0, keepdim=True)).clamp(min=0)])  # objects, then background
        for j, (position, target) in enumerate(grounded_tokens(scene)):
            positions[s, j], weights[s, j] = position, 1.0
            for g in grids:
                masks[g][s, j] = F.adaptive_avg_pool2d(layers[target][None, None], g).flatten()
    return positions, weights, masks


class DeviceData:
    """Everything the UNet stage samples from, on the device: latents, token ids, grounding targets."""

    def __init__(self, latents: Tensor, scenes: Sequence[Scene], grids: Sequence[int], device: torch.device):
        captions = [s.caption for s in scenes]
        self.latents = latents.to(device)
        self.ids_l = tokenize(captions, PAD_L)[:, 0].to(device)
        self.ids_g = tokenize(captions, PAD_G)[:, 0].to(device)
        positions, weights, masks = grounding_targets(scenes, grids)
        self.positions, self.weights = positions.to(device), weights.to(device)
        self.masks = {g: m.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
                      for g, m in masks.items()}

    def __len__(self) -> int:
        return len(self.latents)


# ---------------------------------------------------------------------------------------------- text

def size_embedding(size: int, device: torch.device) -> Tensor:
    """The size part of SDXL's y for square training images (original = target = size, no crop): (1, 6 * E)."""
    return sdxl_vector(torch.zeros(1, 0, device=device), (size, size), (0, 0), (size, size), embed_dim=SIZE_EMBED)


def drop_captions(context: Tensor, y: Tensor, keep: Tensor, pooled_width: int) -> tuple[Tensor, Tensor]:
    """Rows where keep is False get the zero embedding (context and the pooled part of y), as encode_text."""
    k = keep.to(context.dtype)
    y = torch.cat([y[:, :pooled_width] * k[:, None], y[:, pooled_width:]], -1)
    return context * k[:, None, None], y


def encode_text(text: nn.Module, ids_l: Tensor, ids_g: Tensor, keep: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
    """(context, y) with gradients (SDXLTextEncoder.encode is no-grad); dropped captions give zeros. sizes is
    size_embedding(...), made once: building it here would copy host numbers to the device inside a graph."""
    hidden_l = text.clip_l(ids_l)
    hidden_g, pooled = text.clip_g(ids_g)
    context = torch.cat([hidden_l, hidden_g.to(hidden_l)], -1)
    pooled = pooled.to(hidden_l)
    y = torch.cat([pooled, sizes.to(pooled).expand(len(pooled), -1)], -1)
    return drop_captions(context, y, keep, pooled.shape[-1])


# ---------------------------------------------------------------------------------------------- grounding

class GroundingProcessor:
    """attn2 processor for training: explicit softmax (T = 77 keys), output as torch SDPA, and the
    TokenCompose token loss (1 - share of a token's attention inside its target)^2 of the grounded tokens."""

    def __init__(self):
        self.positions: Optional[Tensor] = None  # (B, J) set per call by GroundedUNet
        self.weights: Optional[Tensor] = None
        self.masks: dict[int, Tensor] = {}  # tokens per map -> (B, J, N)
        self.losses: list[Tensor] = []

    def __call__(self, layer: Attention, x: Tensor, context: Optional[Tensor]) -> Tensor:
        q, k, v = layer.qkv(x, context)
        probs = (torch.einsum("bhnd,bhtd->bhnt", q, k) * q.shape[-1] ** -0.5).float().softmax(-1)
        out = layer.out(torch.einsum("bhnt,bhtd->bhnd", probs.to(v.dtype), v))
        if self.positions is not None:
            heat = probs.mean(1)  # (B, N, T)
            index = self.positions[:, None, :].expand(-1, heat.shape[1], -1)
            share = heat.gather(2, index).transpose(1, 2)  # (B, J, N)
            share = share / share.sum(-1, keepdim=True).clamp(min=1e-8)
            inside = (share * self.masks[heat.shape[1]].float()).sum(-1)
            self.losses.append(((1 - inside) ** 2 * self.weights).sum() / self.weights.sum().clamp(min=1))
        return out


class GroundedUNet(nn.Module):
    """(x_t, t, context, y, positions, weights, *masks) -> (eps, grounding loss): one graphable callable."""

    def __init__(self, unet: nn.Module, grids: Sequence[int], grounding: bool):
        super().__init__()
        self.unet, self.grids, self.grounding = unet, tuple(grids), grounding
        self.processor = GroundingProcessor()
        unet.set_attention_processor(self.processor, kind="cross")

    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor, positions: Tensor, weights: Tensor,
                *masks: Tensor) -> tuple[Tensor, Tensor]:
        p = self.processor
        p.losses = []
        p.positions, p.weights = (positions, weights) if self.grounding else (None, None)
        p.masks = {g * g: m for g, m in zip(self.grids, masks)}
        with autocast(x.device):
            eps = self.unet(x, t, context, y).float()
        loss = torch.stack(p.losses).mean() if p.losses else eps.new_zeros(())
        p.losses, p.positions, p.weights, p.masks = [], None, None, {}
        return eps, loss

    def detach_processor(self) -> None:
        self.unet.set_attention_processor(None, kind="cross")


class TextAndUNet(nn.Module):
    """(ids_l, ids_g, keep, x_t, t, positions, weights, *masks) -> (eps, grounding loss): the text encoders and the
    grounded UNet as one callable, so that one CUDA graph holds both (forward and backward)."""

    def __init__(self, text: nn.Module, grounded: GroundedUNet, size: int, device: torch.device):
        super().__init__()
        self.text, self.grounded = text, grounded
        self.register_buffer("sizes", size_embedding(size, device), persistent=False)

    def forward(self, ids_l: Tensor, ids_g: Tensor, keep: Tensor, x: Tensor, t: Tensor, positions: Tensor,
                weights: Tensor, *masks: Tensor) -> tuple[Tensor, Tensor]:
        with autocast(x.device):
            context, y = encode_text(self.text, ids_l, ids_g, keep, self.sizes)
        return self.grounded(x, t, context.float(), y.float(), positions, weights, *masks)


def give_own_grads(params: Sequence[nn.Parameter]) -> None:
    """Give every parameter a .grad of its own before the first backward.

    A graphed backward (make_graphed_callables) returns its static gradient buffers; a parameter whose .grad
    is None adopts ("steals") that buffer, which lives in the graph's private memory pool and is reused there
    for forward activations. The next step's forward then writes activations into .grad and zero_grad wipes
    them before the backward reads them: non-finite gradients from the second step on, every step skipped
    (measured on the H200; pytorch/pytorch#181723). With a .grad of its own, autograd adds into it instead."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


class StepGuard:
    """A training step's safety net, with no per-step host sync: a step whose gradient norm is not finite is
    skipped on the device (fused AdamW reads found_inf), and when a logged window has more than 10 % of them, or
    a non-finite loss, under a CUDA graph, the rest of the stage runs the eager call instead."""

    def __init__(self, tag: str, call: Callable, mode: str, eager: Callable[[], Callable], trainer: "Trainer"):
        self.tag, self.call, self.mode, self.eager, self.trainer = tag, call, mode, eager, trainer
        self.skipped = torch.zeros((), device=trainer.device)
        self.seen = 0.0

    def clip(self, opt: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> Tensor:
        """Clip the gradients to norm 1; returns the device flag `bad` (1.0: this step is skipped)."""
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        bad = (~torch.isfinite(norm)).float()  # 0-dim
        self.skipped.add_(bad)
        if self.trainer.device.type == "cuda":
            opt.found_inf = bad  # read by fused AdamW (it subtracts it from each 0-dim step count)
        return bad

    def on_log(self, values: list[float]) -> None:
        total = float(self.skipped)  # a sync, once per log_every steps
        new, self.seen = total - self.seen, total
        if self.mode != "eager" and (new > 0.1 * len(values) or not all(math.isfinite(v) for v in values)):
            self.trainer.say(f"{self.tag}: {new:.0f} of {len(values)} steps non-finite under {self.mode} (skipped); "
                             "the rest runs eagerly")
            self.mode, self.call = "eager", self.eager()

    @property
    def skipped_steps(self) -> int:
        return int(self.skipped.item())


def graphed(module: nn.Module, sample_args: tuple, log: Callable[[str], None]) -> Optional[Callable]:
    """The module as a CUDA graph (forward and backward; torch.cuda.make_graphed_callables), or None when capture
    fails (the caller falls back). The sample arguments are detached: the graph's inputs must be leaves."""
    sample_args = tuple(a.detach().requires_grad_(a.requires_grad) for a in sample_args)
    try:
        # allow_unused_input: CLIP-L's last layer and final norm feed nothing (SDXL takes its penultimate layer)
        return torch.cuda.make_graphed_callables(module, sample_args, num_warmup_iters=3, allow_unused_input=True)
    except Exception as e:  # a capture failure costs speed, not correctness
        import traceback

        lines = traceback.format_exception(e)
        log(f"CUDA graph capture of {type(module).__name__} failed: {type(e).__name__}: {str(e).splitlines()[0]}; "
            + " | ".join(line.strip().replace("\n", " ") for line in lines[-6:-1]))
        torch.cuda.synchronize()
        return None


# ---------------------------------------------------------------------------------------------- stages

class Trainer:
    """Shared loop machinery: device-side sampling, fused AdamW, EMA, loss read-back every log_every steps."""

    def __init__(self, device: torch.device, seed: int, log_every: int, log: list, say: Callable[[str], None],
                 offset_noise: float = 0.0):
        self.device, self.log_every, self.log, self.say = device, log_every, log, say
        self.offset_noise = offset_noise
        self.window = (time.monotonic(), float("inf"))  # (start, deadline) of the running stage
        self.generator = torch.Generator(device).manual_seed(seed)

    def optimizer(self, groups: list[dict], capturable: bool = False) -> torch.optim.Optimizer:
        """AdamW, fused on CUDA. capturable: its step counts live on the device and the learning rates are the
        groups' 0-dim tensors (set them in place), so that a CUDA graph can hold the whole step."""
        fused = {"fused": True, "capturable": capturable} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.0, **fused)

    def randint(self, high: int, n: int) -> Tensor:
        return torch.randint(high, (n,), device=self.device, generator=self.generator)

    def randn(self, shape: Sequence[int]) -> Tensor:
        return torch.randn(tuple(shape), device=self.device, generator=self.generator)

    def rand(self, n: int) -> Tensor:
        return torch.rand(n, device=self.device, generator=self.generator)

    def progress(self, step: int, steps: int) -> float:
        """How far the running stage is: the larger of its step share and its time-budget share."""
        now, (start, deadline) = time.monotonic(), self.window
        return max(step / max(steps, 1), (now - start) / max(deadline - start, 1e-9))

    def run(self, tag: str, steps: int, step_fn: Callable[[int], Tensor], deadline: float,
            on_log: Optional[Callable[[list[float]], None]] = None) -> dict:
        """step_fn(i) -> loss tensors (no sync); on_log(values) after each read-back; returns the throughput."""
        pending, start, done = [], time.perf_counter(), 0
        first_window: Optional[tuple[int, float]] = None  # (steps, seconds) at the first read-back
        self.window = (time.monotonic(), deadline)
        for i in range(steps):
            if time.monotonic() > deadline:
                self.say(f"{tag}: time budget reached after {i} of {steps} steps")
                break
            pending.append(step_fn(i).detach())
            done = i + 1
            if done % self.log_every == 0 or done == steps:
                values = torch.stack(pending).float().cpu().tolist()  # the one host sync per log_every steps
                self.log.extend((tag, done - len(values) + j, v) for j, v in enumerate(values))
                pending = []
                elapsed = time.perf_counter() - start
                if first_window is None:
                    first_window = (done, elapsed)
                self.say(f"{tag}: step {done}/{steps} loss {float(np.mean(values)):.4f} ({done / elapsed:.1f} steps/s)")
                if on_log is not None:
                    on_log(values)
        if pending:
            values = torch.stack(pending).float().cpu().tolist()
            self.log.extend((tag, done - len(values) + j, v) for j, v in enumerate(values))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        stats = {"steps": done, "seconds": seconds, "steps_per_s": done / max(seconds, 1e-9)}
        if first_window is not None and done > first_window[0]:  # without warm-up, capture and compilation
            stats["steady_steps_per_s"] = (done - first_window[0]) / max(seconds - first_window[1], 1e-9)
        return stats


def train_vae(model: SDXL, images: Tensor, trainer: Trainer, steps: int, batch: int, lr: float,
              deadline: float) -> dict:
    """Autoencoder: L1 + L2 reconstruction + 1e-6 KL (SGM's KL weight)."""
    vae, device = model.vae, trainer.device
    vae.train().requires_grad_(True)
    images = images.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    opt = trainer.optimizer([{"params": list(vae.parameters()), "lr": lr}])

    def step(i: int) -> Tensor:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(i, steps, lr, progress=trainer.progress(i, steps))
        x = images[trainer.randint(len(images), batch)].float()
        with autocast(device):
            moments = vae.quant_conv(vae.encoder(x))
            mean, logvar = moments.float().chunk(2, dim=1)
            logvar = logvar.clamp(-30, 20)
            z = mean + torch.exp(0.5 * logvar) * trainer.randn(mean.shape)
            rec = vae.decoder(vae.post_quant_conv(z)).float()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    stats = trainer.run("vae", steps, step, deadline)
    vae.eval().requires_grad_(False)
    return stats


@torch.no_grad()
def encode_latents(model: SDXL, images: Tensor, device: torch.device, batch: int = 128) -> Tensor:
    """Posterior means (unscaled), fp32, on device."""
    vae, out = model.vae, []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device).float()
        with autocast(device):
            out.append(vae.quant_conv(vae.encoder(x)).float().chunk(2, dim=1)[0])
    return torch.cat(out)


def set_scaling_factor(model: SDXL, latents: Tensor) -> float:
    """SDXL convention: latents * scaling_factor has unit std (Rombach et al. 2022, sec. 4.3.2)."""
    factor = float(1.0 / latents.std())
    model.vae.config = dataclasses.replace(model.vae.config, scaling_factor=round(factor, 6))
    return model.vae.config.scaling_factor


def attention_grids(unet_config: UNetConfig, latent: int) -> list[int]:
    """Grid sides of the levels that have cross-attention (the UNet halves with ceil)."""
    sides, side = [], latent
    for level, depth in enumerate(unet_config.transformer_depth):
        if depth and side not in sides:
            sides.append(side)
        side = -(-side // 2) if level < len(unet_config.transformer_depth) - 1 else side
    if unet_config.transformer_depth_middle and side not in sides:
        sides.append(side)
    return sides


class EMA:
    """Exponential moving average of parameters (three foreach kernels a step), warmed up as (1 + n) / (10 + n).
    The update count lives on the device, so that a CUDA graph of the whole step advances it on every replay."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.updates = torch.zeros((), device=self.params[0].device)

    @torch.no_grad()
    def update(self, ok: Optional[Tensor] = None) -> None:
        """ok: a device bool; False leaves the average as it is (a skipped step), with no host sync."""
        self.updates.add_(1)
        decay = ((1 + self.updates) / (10 + self.updates)).clamp(max=self.decay)
        weight = 1 - decay if ok is None else ok.float() * (1 - decay)
        # shadow += weight * (p - shadow): _foreach_lerp_ takes a Scalar weight, and a tensor there is read back
        # to the host (.item(): a sync every step, and a failed CUDA graph capture)
        diff = torch._foreach_sub([p.detach() for p in self.params], self.shadow)
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(self.shadow, diff)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def diffusion_inputs(trainer: Trainer, latents: Tensor, ac: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (Ho et al. 2020, eq. 14), t uniform; returns (x_t, t, eps).

    eps carries offset noise (a random constant per image and channel, trainer.offset_noise std; Guttenberg
    2023): SDXL's schedule ends at signal-to-noise 0.005 a pixel, and over a 32 x 32 latent the image's mean
    colour is still legible in x_T (Lin et al. 2024), so a model trained without it takes the background's
    colour from the seed's noise instead of from its caption (measured on an earlier demo model)."""
    t = trainer.randint(len(ac), len(latents))
    noise = trainer.randn(latents.shape)
    if trainer.offset_noise:
        noise = noise + trainer.offset_noise * trainer.randn((*latents.shape[:2], 1, 1))
    a = ac[t].view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise, t, noise


def train_unet(model: SDXL, data: DeviceData, trainer: Trainer, steps: int, batch: int, lr: float, text_lr: float,
               grounding_weight: float, size: int, deadline: float, drop: float = 0.1,
               compile_step: bool = False, cuda_graph: bool = True) -> dict:
    """UNet + text encoders, eps-prediction + grounding loss; EMA weights are what is kept. On CUDA the whole step
    (batch draw, forward, losses, backward, clipping, AdamW, EMA) is one CUDA graph (cuda_graph=False: eager).
    compile_step: the forward and backward through torch.compile (inductor) inside that graph."""
    unet, text, device = model.unet, model.text, trainer.device
    unet.train().requires_grad_(True)
    text.train().requires_grad_(True)
    grids = sorted(data.masks, reverse=True)
    net = GroundedUNet(unet, grids, grounding=grounding_weight > 0)
    params = list(unet.parameters()) + list(text.parameters())
    capture = cuda_graph and device.type == "cuda"
    peaks = (lr, text_lr)
    # capturable: the learning rates are device tensors the graph reads, set in place before each replay
    rates = [torch.tensor(peak, device=device) if capture else peak for peak in peaks]
    opt = trainer.optimizer([{"params": list(unet.parameters()), "lr": rates[0]},
                             {"params": list(text.parameters()), "lr": rates[1]}], capturable=capture)
    ema = EMA(params, decay=0.999)
    ac = NoiseSchedule.sdxl().alphas_cumprod.to(device, torch.float32)
    whole = TextAndUNet(text, net, size, device)
    forward = torch.compile(whole, dynamic=False) if compile_step else whole
    guard: Optional[StepGuard] = None

    def body() -> Tensor:  # one step, with no host sync: what the graph records
        b = _draw(trainer, data, batch, drop, ac)
        eps, grounding = forward(*b[:7], *b[7])
        diffusion = F.mse_loss(eps, b[8])
        loss = diffusion + grounding_weight * grounding
        # fresh .grad tensors, not accumulated into: no add kernel a parameter; under capture they are allocated
        # once in the graph's pool, at the addresses every replay writes
        opt.zero_grad(set_to_none=True)
        loss.backward()
        bad = guard.clip(opt, params)
        opt.step()
        ema.update(~bad.bool())
        return torch.stack([diffusion.detach(), grounding.detach()])

    call: Callable[[], Tensor] = CapturedStep(body, trainer) if capture else body
    compiled = " (compiled)" if compile_step else ""
    mode = ("graph: whole step" if capture else "eager") + compiled
    guard = StepGuard("unet", call, mode, lambda: body, trainer)
    trainer.say(f"unet stage runs as {mode}")

    def step(i: int) -> Tensor:
        for group, peak in zip(opt.param_groups, peaks):
            rate = cosine_lr(i, steps, peak, progress=trainer.progress(i, steps))
            if capture:
                group["lr"].fill_(rate)
            else:
                group["lr"] = rate
        return guard.call()

    stats = _run_two(trainer, steps, step, deadline, guard.on_log)
    if isinstance(call, CapturedStep) and call.eager:  # the capture failed: the steps ran eagerly
        mode = guard.mode = "eager" + compiled
    stats = {**stats, "mode": mode, "final_mode": guard.mode, "skipped_steps": guard.skipped_steps}
    ema.copy_to_params()
    net.detach_processor()
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    return stats


class CapturedStep:
    """fn() -> Tensor, a whole training step, as one CUDA graph: `warmup` eager calls on a side stream (as torch
    asks: lazy initialisation, autotuning, compilation), then one capture, then a replay a step: no kernel
    launches and no Python per step. The graph owns fn's random draws through the trainer's generator,
    registered with it, so every replay draws new numbers. A capture that fails (a host sync in fn) leaves every
    later call eager (speed, not correctness) and gives the trainer a fresh generator (the registered one stays
    in capture mode). Returns a copy of the graph's output, so callers may keep it."""

    def __init__(self, fn: Callable[[], Tensor], trainer: "Trainer", warmup: int = 3):
        self.fn, self.trainer, self.warmup = fn, trainer, warmup
        self.calls, self.eager = 0, False
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.out: Optional[Tensor] = None

    def __call__(self) -> Tensor:
        if self.eager:
            return self.fn()
        if self.graph is None:
            self.calls += 1
            if self.calls <= self.warmup:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self.fn()
                torch.cuda.synchronize()  # the warm-up steps' tensors are read on the default stream
                return out
            if not self._capture():
                return self.fn()
        self.graph.replay()
        return self.out.clone()

    def _capture(self) -> bool:
        graph, generator, first = torch.cuda.CUDAGraph(), self.trainer.generator, None
        graph.register_generator_state(generator)
        try:
            with torch.cuda.graph(graph):
                try:
                    self.out = self.fn()
                except Exception as e:  # noqa: BLE001 - the cause; ending the capture raises a vaguer error
                    first = e
                    raise
        except Exception as e:  # noqa: BLE001 - a capture failure costs speed, not correctness
            cause = first or e
            torch.cuda.synchronize()
            fresh = torch.Generator(generator.device)
            fresh.set_state(generator.get_state())
            self.trainer.generator = fresh
            self.trainer.say(f"CUDA graph capture of the training step failed ({type(cause).__name__}: "
                             f"{str(cause).splitlines()[0] if str(cause) else ''}); it runs eagerly")
            self.eager = True
            return False
        self.graph = graph
        return True


def _run_two(trainer: Trainer, steps: int, step: Callable[[int], Tensor], deadline: float,
             on_log: Optional[Callable[[list[float]], None]] = None) -> dict:
    """Trainer.run for a step returning (diffusion, grounding): both logged, the first as 'unet'."""
    grounding: list[Tensor] = []

    def first(i: int) -> Tensor:
        both = step(i)
        grounding.append(both[1])
        return both[0]

    stats = trainer.run("unet", steps, first, deadline, on_log)
    if grounding:
        values = torch.stack(grounding).float().cpu().tolist()
        every = max(1, len(values) // 50)
        trainer.log.extend(("grounding", j, v) for j, v in enumerate(values) if j % every == 0)
    return stats


def _draw(trainer: Trainer, data: DeviceData, batch: int, drop: float, ac: Tensor) -> tuple:
    """One batch, drawn on the device: (ids_l, ids_g, keep, x_t, t, positions, weights, masks, noise)."""
    idx = trainer.randint(len(data), batch)
    keep = (trainer.rand(batch) >= drop).float()
    x_t, t, noise = diffusion_inputs(trainer, data.latents[idx], ac)
    masks = tuple(data.masks[g][idx] for g in sorted(data.masks, reverse=True))
    return (data.ids_l[idx], data.ids_g[idx], keep, x_t, t, data.positions[idx], data.weights[idx] * keep[:, None],
            masks, noise)


# ---------------------------------------------------------------------------------------------- LoRA

class LoraAdapter(nn.Module):
    """base(x) + (alpha / r) * up(down(x)) for a Linear or a Conv2d (LoCon: a k x k down, 1 x 1 up), up = 0 at
    init (Hu et al. 2021); kohya stores down/up under lora_down/lora_up."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.up.weight)
        self.to(base.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (self.alpha / self.rank) * self.up(self.down(x))


def lora_targets(unet: nn.Module) -> dict[str, nn.Module]:
    """SGM module path -> layer: every Linear inside the spatial transformers (attention q/k/v/out, feed-forward,
    proj_in/out) and every 3x3 conv of the ResBlocks (the level-0 ResBlocks draw the finest marks)."""
    out = {}
    for name, m in unet.named_modules():
        in_transformer = ".transformer_blocks." in name or name.endswith((".proj_in", ".proj_out"))
        if isinstance(m, nn.Linear) and in_transformer:
            out[name] = m
        elif isinstance(m, nn.Conv2d) and name.endswith(("in_layers.2", "out_layers.3")):
            out[name] = m
    return out


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def add_lora(unet: nn.Module, rank: int, alpha: float) -> dict[str, LoraAdapter]:
    wrapped = {}
    for path, layer in lora_targets(unet).items():
        wrapped[path] = LoraAdapter(layer, rank, alpha)
        _set_submodule(unet, path, wrapped[path])
    return wrapped


def remove_lora(unet: nn.Module, wrapped: dict[str, LoraAdapter]) -> None:
    for path, w in wrapped.items():
        _set_submodule(unet, path, w.base)


def kohya_state_dict(wrapped: dict[str, LoraAdapter]) -> dict[str, Tensor]:
    """kohya SDXL keys: lora_unet_<SGM module path, dots as underscores>.lora_down/.lora_up/.alpha."""
    sd = {}
    for path, w in wrapped.items():
        key = "lora_unet_" + path.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = w.down.weight.detach().float().cpu().half().contiguous()
        sd[f"{key}.lora_up.weight"] = w.up.weight.detach().float().cpu().half().contiguous()
        sd[f"{key}.alpha"] = torch.tensor(float(w.alpha)).half()
    return sd


def train_lora(model: SDXL, name: str, instance: Sequence[Scene], prior: Sequence[Scene], trainer: Trainer,
               steps: int, batch: int, rank: int, lr: float, size: int, deadline: float,
               drop: float = 0.1) -> tuple[dict, dict]:
    """DreamBooth with prior preservation: each batch half instance images, half class images (loss weight 1).

    Captions are dropped to the zero embedding as often as in the base model's training: the LoRA also changes
    the unconditional branch, and a branch it never trained on, amplified by guidance, turned a third to two
    thirds of the seeds into a flat field at guidance 5 (all seeds right at guidance 1)."""
    unet, device = model.unet, trainer.device
    scenes = list(instance) + list(prior)
    latents = encode_latents(model, to_tensor_batch(scenes), device) * model.vae.config.scaling_factor
    context, pooled = model.text.encode([s.caption for s in scenes])
    y = sdxl_vector(pooled, (size, size), (0, 0), (size, size), embed_dim=SIZE_EMBED)
    context, y = context.to(device).float(), y.to(device).float()
    pooled_width = pooled.shape[-1]  # y = [pooled, size embedding]: a dropped caption keeps its size part
    n_inst = len(instance)
    wrapped = add_lora(unet, rank, float(rank))
    params = [p for w in wrapped.values() for p in (w.down.weight, w.up.weight)]
    for p in params:
        p.requires_grad_(True)
    opt = trainer.optimizer([{"params": params, "lr": lr}])
    give_own_grads(params)
    ac = NoiseSchedule.sdxl().alphas_cumprod.to(device, torch.float32)
    net = GroundedUNet(unet, [], grounding=False)
    half = batch // 2

    def sample() -> tuple[Tensor, ...]:
        idx = torch.cat([trainer.randint(n_inst, half), n_inst + trainer.randint(len(scenes) - n_inst, half)])
        x_t, t, noise = diffusion_inputs(trainer, latents[idx], ac)
        c, yy = drop_captions(context[idx], y[idx], trainer.rand(batch) >= drop, pooled_width)
        dummy = torch.zeros(batch, 1, dtype=torch.long, device=device)
        return x_t, t, c, yy, dummy, dummy.float(), noise

    graph = graphed(net, sample()[:6], trainer.say) if device.type == "cuda" else None
    guard = StepGuard(f"lora:{name}", graph if graph is not None else net, "eager" if graph is None else "graph",
                      lambda: net, trainer)

    def step(i: int) -> Tensor:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(i, steps, lr, warmup=50, progress=trainer.progress(i, steps))
        x_t, t, c, yy, pos, w, noise = sample()
        eps, _ = guard.call(x_t, t, c, yy, pos, w)
        loss = F.mse_loss(eps[:half], noise[:half]) + F.mse_loss(eps[half:], noise[half:])
        opt.zero_grad(set_to_none=False)
        loss.backward()
        guard.clip(opt, params)
        opt.step()
        return loss

    stats = {**trainer.run(f"lora:{name}", steps, step, deadline, guard.on_log), "mode": guard.mode,
             "skipped_steps": guard.skipped_steps}
    net.detach_processor()
    state = kohya_state_dict(wrapped)
    remove_lora(unet, wrapped)
    return state, stats


def save_half(model: SDXL, path: str) -> None:
    """The model as an SGM single file in fp16 (half the bytes; load_sdxl casts to what is asked), atomically;
    the model in memory keeps its dtype."""
    import copy

    half = copy.deepcopy(model)
    for module in half.components().values():
        module.to(torch.float16)
    save_sgm(half, path)


def save_atomic(tensors: dict[str, Tensor], path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="weights/demo")
    p.add_argument("--tiny", action="store_true", help="tiny model and data for a CPU smoke run")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--init", default=None, help="start from this checkpoint (weights only), e.g. to resume")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget; a stage past it stops early")
    p.add_argument("--size", type=int, default=None, help="image size (default 256, tiny 64)")
    p.add_argument("--scenes", type=int, default=None, help="base training scenes (default 8000, tiny 16)")
    p.add_argument("--vae-steps", type=int, default=None, help="default 3000 (tiny 4)")
    p.add_argument("--unet-steps", type=int, default=None, help="default 12000 (tiny 6)")
    p.add_argument("--lora-steps", type=int, default=None, help="per concept; default 1000 (tiny 3)")
    p.add_argument("--batch", type=int, default=128, help="UNet batch (VAE: 32, LoRA: 32)")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--text-lr", type=float, default=1e-3)
    p.add_argument("--grounding", type=float, default=0.3, help="weight of the grounding loss (0: off)")
    p.add_argument("--concept-images", type=int, default=48, help="instance images per concept")
    p.add_argument("--class-images", type=int, default=None,
                   help="class (prior-preservation) images per concept (default: as many as instance images)")
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--lora-drop", type=float, default=0.1,
                   help="share of LoRA captions dropped to the zero embedding (as the base model's 10 %%)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--concepts", nargs="+", default=sorted(CONCEPTS), choices=sorted(CONCEPTS),
                   help="the concepts whose LoRAs are trained")
    p.add_argument("--lora-batch", type=int, default=32, help="LoRA batch: half instance, half class images")
    p.add_argument("--log-every", type=int, default=200)
    p.add_argument("--compile", action="store_true",
                   help="UNet stage: torch.compile the step inside its CUDA graph (fewer kernels; minutes to compile)")
    p.add_argument("--offset-noise", type=float, default=0.1, help="std of the offset noise (0: none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {STAGES}")
    if "vae" not in stages and args.init is None:
        p.error("without the vae stage, --init must give the checkpoint to start from")
    args.stages = stages
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the stages; returns a summary (losses, throughput, paths), also written to <out>/train_log.json."""
    args = parse_args(argv)
    device = torch.device(args.device)
    tiny = args.tiny
    size = args.size or (64 if tiny else 256)
    n_scenes = args.scenes or (16 if tiny else 8000)
    vae_steps = args.vae_steps if args.vae_steps is not None else (4 if tiny else 3000)
    unet_steps = args.unet_steps if args.unet_steps is not None else (6 if tiny else 12000)
    lora_steps = args.lora_steps if args.lora_steps is not None else (3 if tiny else 1000)
    batch = 4 if tiny else args.batch
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    log: list = []

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    trainer = Trainer(device, args.seed, 2 if tiny else args.log_every, log, say, args.offset_noise)
    unet_cfg, vae_cfg, text_cfgs = demo_configs(tiny)
    if args.init:
        model = load_sdxl(args.init, device=device, dtype=torch.float32)
        say(f"initialised from {args.init}")
    else:
        model = SDXL.random(unet_cfg, vae_cfg, text_cfgs, seed=args.seed, device=device, size_embed_dim=SIZE_EMBED)
    for module in model.components().values():
        module.float().requires_grad_(False)
        for p in module.parameters():  # fresh contiguous storage: a loaded checkpoint may hand out views
            p.data = p.data.contiguous().clone()

    workers = min(16, os.cpu_count() or 1)
    stats, stage_seconds = {}, {}
    if "vae" in args.stages or "unet" in args.stages:  # the LoRAs train on their own images only
        scenes = base_scenes(n_scenes, size, seed=args.seed, workers=workers)
        say(f"{len(scenes)} scenes rendered")
        stage_seconds["scenes"] = time.monotonic() - t0
        images = to_tensor_batch(scenes)

    if "vae" in args.stages:
        t_stage = time.monotonic()
        n_concept = 4 if tiny else 400
        concept_scenes = [s for name in sorted(CONCEPTS) for s in concept_images(name, n_concept, size, seed=99)]
        vae_images = torch.cat([images[:max(1, len(images) // 2)], to_tensor_batch(concept_scenes)])
        vae_deadline = t0 + 0.3 * (deadline - t0)
        stats["vae"] = train_vae(model, vae_images, trainer, vae_steps, 8 if tiny else 32, 6e-4, vae_deadline)
        stage_seconds["vae"] = time.monotonic() - t_stage
        raw = encode_latents(model, images, device)
        set_scaling_factor(model, raw)
    scale = model.vae.config.scaling_factor

    if "unet" in args.stages:
        t_stage = time.monotonic()
        latents = encode_latents(model, images, device) * scale
        finite = torch.isfinite(latents).flatten(1).all(1).cpu()
        if not finite.all():  # one read: a bad latent would poison every step that draws it
            say(f"dropping {int((~finite).sum())} scenes whose latents are not finite")
        keep = finite.nonzero().flatten().tolist()
        grids = attention_grids(model.unet.config, size // 8)
        data = DeviceData(latents[finite.to(latents.device)], [scenes[i] for i in keep], grids, device)
        reserve = 0.25 * (deadline - t0) if "lora" in args.stages else 0.0  # what the LoRAs keep of the budget
        stats["unet"] = train_unet(model, data, trainer, unet_steps, batch, args.lr, args.text_lr, args.grounding,
                                   size, deadline - reserve, compile_step=args.compile)
        stage_seconds["unet"] = time.monotonic() - t_stage

    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.out, "demo_sdxl.safetensors")
    if "lora" in args.stages and ("vae" in args.stages or "unet" in args.stages):
        save_half(model, ckpt)  # the base model is safe before the LoRAs train (their stage can fail alone)
    loras = {}
    if "lora" in args.stages:
        n_img = 2 if tiny else args.concept_images
        for k, name in enumerate(args.concepts):
            spec = CONCEPTS[name]
            share = (deadline - time.monotonic()) / (len(args.concepts) - k)  # each LoRA its share of the time
            t_stage = time.monotonic()
            instance = concept_images(name, n_img, size, seed=args.seed)
            n_class = n_img if tiny or args.class_images is None else args.class_images
            prior = concept_images(name, n_class, size, seed=args.seed, plain=True)
            state, stats[f"lora:{name}"] = train_lora(model, name, instance, prior, trainer, lora_steps,
                                                      4 if tiny else args.lora_batch, args.rank, args.lora_lr, size,
                                                      time.monotonic() + share, args.lora_drop)
            path = os.path.join(args.out, f"{name}.safetensors")
            # one metadata key: safetensors writes metadata in hash-map order, so several keys would make the
            # file bytes differ between runs (rank and alpha are in the tensors: lora_down rows, .alpha)
            prompt = f"{article(spec.phrase)} {spec.phrase}"
            save_atomic(state, path, {"omg.demo.concept": json.dumps(
                {**dataclasses.asdict(spec), "prompt": prompt, "rank": args.rank}, sort_keys=True)})
            loras[name] = path
            stage_seconds[f"lora:{name}"] = time.monotonic() - t_stage

    save_half(model, ckpt)
    summary = {"checkpoint": ckpt, "loras": loras, "size": size, "scaling_factor": scale, "stats": stats,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "seconds": time.monotonic() - t0, "stage_seconds": stage_seconds, "args": vars(args),
               "backgrounds": sorted(BACKGROUNDS),
               "concepts": {n: {"class_name": s.class_name, "phrase": s.phrase} for n, s in CONCEPTS.items()}}
    with atomic_path(os.path.join(args.out, "train_log.json")) as tmp, open(tmp, "w") as f:
        json.dump({**summary, "log": log}, f, indent=1)
    say(json.dumps({k: summary[k] for k in ("stats", "stage_seconds", "seconds")}))
    return summary


if __name__ == "__main__":
    main()
