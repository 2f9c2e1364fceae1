"""Text to image with SDXL (omg.sample): prompts -> [uncond; cond] conditioning -> sampler -> VAE -> PIL images."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import SamplingError
from .sampling import (NoiseSchedule, StepInfo, guided_eps, randn_cpu, run_sampler, unet_eps_fn)

Prompts = Union[str, Sequence[str]]


def _as_list(prompts: Prompts, what: str) -> list[str]:
    out = [prompts] if isinstance(prompts, str) else list(prompts)
    if not out or not all(isinstance(p, str) for p in out):
        raise SamplingError(f"{what} must be a string or a non-empty list of strings, got {prompts!r}")
    return out


def sdxl_conditioning(model: Any, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]],
                      height: int, width: int) -> tuple[Tensor, Tensor]:
    """(context, y) for CFG, batched [uncond; cond] (2B first dim) on the UNet's device.

    negative_prompts None gives all-zero uncond embeddings (diffusers force_zeros_for_empty_prompt, SGM
    force_uc_zero_embeddings). Sizes: original = target = (height, width), crop (0, 0).
    """
    from .text import CHUNK, sdxl_vector  # lazily: omg.text pulls in open_clip and transformers

    zero = negative_prompts is None
    negatives = [""] * len(prompts) if zero else list(negative_prompts)
    context, pooled = model.text.encode(list(prompts))
    chunk = CHUNK + 2  # positions per chunk (BOS + 75 + EOS); both halves must hold as many chunks
    neg_context, neg_pooled = model.text.encode(negatives, zero_if_empty=zero, min_chunks=context.shape[1] // chunk)
    if neg_context.shape[1] > context.shape[1]:  # the negative prompt is the longer one
        context, pooled = model.text.encode(list(prompts), min_chunks=neg_context.shape[1] // chunk)
    embed_dim, rest = divmod(model.unet.config.adm_in_channels - pooled.shape[-1], 6)
    if rest or embed_dim <= 0:
        raise SamplingError(f"the UNet's y width {model.unet.config.adm_in_channels} does not fit pooled text "
                            f"of width {pooled.shape[-1]} plus six size embeddings")
    size = (height, width)
    y = sdxl_vector(torch.cat([neg_pooled, pooled]), size, (0, 0), size, embed_dim=embed_dim)
    device = next(model.unet.parameters()).device
    return torch.cat([neg_context, context]).to(device), y.to(device)


@torch.no_grad()
def sample_latents(model: Any, prompt: Prompts, negative_prompt: Optional[Prompts] = None, *, steps: int = 50,
                   guidance: float = 7.5, guidance_rescale: float = 0.0, seed: int = 0, height: int = 1024,
                   width: int = 1024, sampler: str = "ddim", spacing: str = "leading",
                   sampler_options: Optional[dict] = None, schedule: Optional[NoiseSchedule] = None,
                   callback: Optional[Callable[[StepInfo], None]] = None, progress: bool = True) -> Tensor:
    """Final VP latents (B, 4, H/8, W/8) in fp32 for a prompt or a batch of prompts; see `sample`."""
    for name in ("unet", "vae", "text"):
        if getattr(model, name, None) is None:
            raise SamplingError(f"the model has no {name}; load a checkpoint that holds it")
    prompts = _as_list(prompt, "prompt")
    negatives = None if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
    if negatives is not None and len(negatives) == 1:
        negatives = negatives * len(prompts)
    if negatives is not None and len(negatives) != len(prompts):
        raise SamplingError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    multiple = model.vae.config.downscale * 2 ** (len(model.unet.config.channel_mult) - 1)
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise SamplingError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
    schedule = schedule if schedule is not None else NoiseSchedule.sdxl()

    context, y = sdxl_conditioning(model, prompts, negatives, height, width)
    eps_fn = guided_eps(unet_eps_fn(model.unet, context, y), guidance, guidance_rescale)
    # DDIM ends on alphas_cumprod[0] (diffusers' SDXL DDIM, set_alpha_to_one=False); the others on sigma 0
    sigmas = schedule.sampling_sigmas(steps, spacing, to_zero=sampler != "ddim")
    # one CPU generator per image, seeds seed, seed+1, ...: image i of a batch is the single image of seed+i
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    shape = (len(prompts), model.unet.config.in_channels, height // model.vae.config.downscale,
             width // model.vae.config.downscale)
    noise = randn_cpu(shape, generators, device=context.device, dtype=torch.float32)
    return run_sampler(eps_fn, noise, sigmas, sampler, schedule=schedule, callback=callback,
                       disable=not progress, generator=generators, **(sampler_options or {}))


@torch.no_grad()
def latents_to_images(vae: Any, latents: Tensor) -> list[Image.Image]:
    """VAE-decode latents and convert [-1, 1] to 8-bit RGB PIL images."""
    images = vae.decode(latents).float().clamp(-1, 1)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def sample(model: Any, prompt: Prompts, negative_prompt: Optional[Prompts] = None, *, steps: int = 50,
           guidance: float = 7.5, guidance_rescale: float = 0.0, seed: int = 0, height: int = 1024,
           width: int = 1024, sampler: str = "ddim", spacing: str = "leading",
           sampler_options: Optional[dict] = None, schedule: Optional[NoiseSchedule] = None,
           callback: Optional[Callable[[StepInfo], None]] = None, progress: bool = True) -> list[Image.Image]:
    """Text to image: one PIL image per prompt.

    model: an SDXL bundle (.unet, .vae, .text). negative_prompt None gives zero uncond embeddings; a string
    applies to every prompt. Noise is drawn on the CPU (image i from seed + i), so a seed gives the same image
    on CPU and GPU. sampler: "ddim" (ours) or a k-diffusion name ("euler", "euler_ancestral", "heun",
    "dpmpp_2m", "dpmpp_2m_sde", ...); spacing: "leading" (diffusers' SDXL default), "trailing", "linspace"
    or "karras"; sampler_options go to the sampler (e.g. {"eta": 0.5}). callback(StepInfo) runs every step.
    """
    latents = sample_latents(model, prompt, negative_prompt, steps=steps, guidance=guidance,
                             guidance_rescale=guidance_rescale, seed=seed, height=height, width=width,
                             sampler=sampler, spacing=spacing, sampler_options=sampler_options,
                             schedule=schedule, callback=callback, progress=progress)
    return latents_to_images(model.vae, latents)
