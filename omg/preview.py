"""A cheap latent preview: a linear map from the 4 latent channels to RGB, no VAE (for per-step callbacks, UIs).

The factors approximate SDXL's VAE decoder on its scaled latents (the latents the UNet sees), the least-squares
fit that ComfyUI and the web UIs use for SDXL previews; `fit_latent_rgb` fits them for another VAE (the demo
model's, a test model's) from decodes of its own.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from omg.errors import ModelError

# rows: latent channels; columns: R, G, B contributions in [-1, 1] pixel units
SDXL_LATENT_RGB = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                   (-0.3165, -0.2492, -0.2188))
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def latent_preview(latent: Tensor, factors: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   scale: int = 1) -> Union[Image.Image, list[Image.Image]]:
    """RGB image(s) at latent size (times `scale`) from latents (C, h, w) or (B, C, h, w): one PIL image, or a list.

    factors (C, 3) and bias (3,): the linear map (default SDXL's); costs one tiny matmul, no VAE call.
    """
    if latent.ndim not in (3, 4):
        raise ModelError(f"latent_preview takes (C, h, w) or (B, C, h, w) latents, got shape {tuple(latent.shape)}")
    batch = latent.ndim == 4
    x = latent.detach().float().cpu()
    x = x if batch else x[None]
    factors = torch.tensor(SDXL_LATENT_RGB) if factors is None else torch.as_tensor(factors).float().cpu()
    bias = (torch.tensor(SDXL_LATENT_RGB_BIAS) if bias is None else torch.as_tensor(bias).float().cpu())
    if factors.shape != (x.shape[1], 3):
        raise ModelError(f"the preview factors are {tuple(factors.shape)}; latents with {x.shape[1]} channels need "
                         f"({x.shape[1]}, 3) factors (fit_latent_rgb fits them for a VAE)")
    rgb = torch.einsum("bchw,cr->bhwr", x, factors) + bias  # [-1, 1]
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    images = [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]
    if scale != 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    return images if batch else images[0]


@torch.no_grad()
def fit_latent_rgb(vae: Any, samples: int = 4, size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(factors (C, 3), bias (3,)) fitted by least squares to `vae`'s decodes of random latents, each latent
    pixel against the mean of its f x f block of pixels (f the VAE's downscale)."""
    g = torch.Generator().manual_seed(seed)
    channels = vae.config.embed_dim
    latents = torch.randn(samples, channels, size, size, generator=g)
    param = next(vae.parameters())
    images = vae.decode(latents.to(param.device, param.dtype)).float().cpu()  # (B, 3, H, W) in [-1, 1]
    f = images.shape[-1] // size
    target = torch.nn.functional.avg_pool2d(images, f).permute(0, 2, 3, 1).reshape(-1, 3)
    inputs = torch.cat([latents.permute(0, 2, 3, 1).reshape(-1, channels), torch.ones(len(target), 1)], 1)
    solution = torch.linalg.lstsq(inputs, target).solution  # (C + 1, 3)
    return solution[:-1], solution[-1]
