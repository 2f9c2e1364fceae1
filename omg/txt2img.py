"""Text to image with SDXL (omg.sample): prompts -> [uncond; cond] conditioning -> sampler -> VAE -> PIL images."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image
from torch import Tensor

from omg.errors import OptionError
from omg.inputs import Prompts, check_image_size, check_model, check_seeds, image_seeds, prompt_list
from omg.sampling import NoiseSchedule, StepInfo, diffusers_ddim_options, guided_eps, run_sampler, unet_eps_fn


def _batch(prompts: list[str], negatives: Optional[list[str]], seed: int, num_images: int,
           seeds: Optional[Sequence[int]]) -> tuple[list[str], Optional[list[str]], list[int]]:
    """One prompt, negative prompt and seed per image: a single prompt (or negative) serves every seed."""
    check_seeds(seed, num_images, seeds)
    per_image = list(seeds) if seeds is not None else image_seeds(seed, max(num_images, len(prompts)))
    if len(prompts) == 1:
        prompts = prompts * len(per_image)
    if len(prompts) != len(per_image):
        raise OptionError(f"{len(prompts)} prompts for {len(per_image)} seeds; give one prompt or one per seed")
    if negatives is not None and len(negatives) == 1:
        negatives = negatives * len(prompts)
    if negatives is not None and len(negatives) != len(prompts):
        raise OptionError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    return prompts, negatives, per_image


@torch.no_grad()
def sample_latents(model: Any, prompt: Prompts, negative_prompt: Optional[Prompts] = None, *, steps: int = 50,
                   guidance: float = 7.5, guidance_rescale: float = 0.0, seed: int = 0, num_images: int = 1,
                   seeds: Optional[Sequence[int]] = None, height: int = 1024, width: int = 1024,
                   sampler: str = "ddim", spacing: str = "leading", sampler_options: Optional[dict] = None,
                   schedule: Optional[NoiseSchedule] = None, callback: Optional[Callable[[StepInfo], None]] = None,
                   progress: bool = True, noise: Optional[Tensor] = None, noise_device: str = "cpu") -> Tensor:
    """Final VP latents (B, 4, H/8, W/8) in fp32 for a prompt or a batch of prompts; see `sample`."""
    check_model(model)
    prompts = prompt_list(prompt, "prompt")
    negatives = None if negative_prompt is None else prompt_list(negative_prompt, "negative_prompt")
    prompts, negatives, per_image = _batch(prompts, negatives, seed, num_images, seeds)
    check_image_size(height, width, model.vae.config.downscale)
    schedule = schedule if schedule is not None else NoiseSchedule.sdxl()

    context, y = model.conditioning(prompts, negatives, height, width)
    eps_fn = guided_eps(unet_eps_fn(model.unet, context, y), guidance, guidance_rescale)
    # DDIM ends on alphas_cumprod[0] (diffusers' SDXL DDIM, set_alpha_to_one=False); the others on sigma 0
    sigmas = schedule.sampling_sigmas(steps, spacing, to_zero=sampler != "ddim")
    # one CPU generator per image, for its initial noise and then the sampler's: image i of a batch is the
    # single image of its seed
    generators = [torch.Generator(noise_device).manual_seed(s) for s in per_image]
    shape = (len(per_image), model.unet.config.in_channels, height // 8, width // 8)
    if noise is not None and tuple(noise.shape) != shape:
        raise OptionError(f"noise must have shape {shape} (images, latent channels, height / 8, width / 8), "
                          f"got {tuple(noise.shape)}")
    noise = model.noise(generators, height, width) if noise is None else noise.to(model.device, torch.float32)
    options = diffusers_ddim_options(schedule, steps, spacing, sampler, sampler_options)
    return run_sampler(eps_fn, noise, sigmas, sampler, schedule=schedule, callback=callback,
                       disable=not progress, generator=generators, **(options or {}))


def sample(model: Any, prompt: Prompts, negative_prompt: Optional[Prompts] = None, *, steps: int = 50,
           guidance: float = 7.5, guidance_rescale: float = 0.0, seed: int = 0, num_images: int = 1,
           seeds: Optional[Sequence[int]] = None, height: int = 1024, width: int = 1024, sampler: str = "ddim",
           spacing: str = "leading", sampler_options: Optional[dict] = None,
           schedule: Optional[NoiseSchedule] = None, callback: Optional[Callable[[StepInfo], None]] = None,
           progress: bool = True, noise: Optional[Tensor] = None, noise_device: str = "cpu") -> list[Image.Image]:
    """Text to image: one PIL image per prompt or per seed, all rendered as one batch.

    model: an SDXL bundle (.unet, .vae, .text). Seeds: image i of a list of prompts gets seed + i; one prompt
    renders num_images images (seeds seed, seed + 1, ...) or one per entry of `seeds`; noise is drawn on the
    CPU per image, so a seed gives the same image on CPU and GPU and in any batch. negative_prompt None gives
    zero uncond embeddings; a string applies to every prompt. height and width: positive multiples of the
    VAE's downscale (8 for SDXL). sampler: "ddim" (ours) or a k-diffusion name ("euler", "euler_ancestral",
    "heun", "dpmpp_2m", "dpmpp_2m_sde", ...); spacing: "leading" (diffusers' SDXL default), "trailing",
    "linspace" or "karras"; sampler_options go to the sampler (e.g. {"eta": 0.5}). callback(StepInfo) runs
    every step. noise: the initial latents instead of the seeded ones; noise_device: where seeded noise is drawn
    ("cuda": as diffusers with a CUDA generator).
    """
    latents = sample_latents(model, prompt, negative_prompt, steps=steps, guidance=guidance,
                             guidance_rescale=guidance_rescale, seed=seed, num_images=num_images, seeds=seeds,
                             height=height, width=width, sampler=sampler, spacing=spacing,
                             sampler_options=sampler_options, schedule=schedule, callback=callback,
                             progress=progress, noise=noise, noise_device=noise_device)
    return model.decode(latents)
