"""The SDXL bundle (UNet, VAE, both text encoders), loading from any supported layout, and saving SGM files."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from omg import checkpoint, keymap
from omg.atomic import atomic_path
from omg.errors import CheckpointError, ModelError
from omg.sampling import randn_cpu
from omg.unet import UNet, UNetConfig, preferred_memory_format
from omg.vae import AutoencoderKL, VAEConfig

if TYPE_CHECKING:  # omg.text is imported lazily at run time: it pulls in open_clip and transformers
    from omg.text import SDXLTextEncoder


@dataclass
class SDXL:
    """An SDXL model: the UNet always; VAE and text encoders when the checkpoint had them."""

    unet: UNet
    vae: Optional[AutoencoderKL] = None
    text: Optional[SDXLTextEncoder] = None

    def __post_init__(self) -> None:
        # channels-last on CUDA (omg.unet.preferred_memory_format): the same values, faster convolutions
        self.unet.to(memory_format=preferred_memory_format(self.device))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's (and text encoders') dtype; the VAE may differ (never fp16)."""
        return next(self.unet.parameters()).dtype

    @property
    def size_embed_dim(self) -> int:
        """Width of each of the six size embeddings in the UNet's y vector (256 for SDXL)."""
        if self.text is None:
            return 256
        extra = self.unet.config.adm_in_channels - self.text.clip_g.config.projection_dim
        return extra // 6

    # -- what both samplers need: conditioning in, noise, images out ----------------------------------------
    def conditioning(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]], height: int,
                     width: int, encoded: Optional[dict] = None) -> tuple[Tensor, Tensor]:
        """(context, y) for CFG, batched [uncond; cond] (2B first dim) on the UNet's device.

        negative_prompts None gives all-zero uncond embeddings (diffusers force_zeros_for_empty_prompt, SGM
        force_uc_zero_embeddings). Sizes: original = target = (height, width), crop (0, 0).
        encoded: a dict shared by calls that run the same text-encoder weights; each distinct encoding is computed
        once across them (a negative prompt shared by several conditionings).
        """
        from omg.text import CHUNK, sdxl_vector  # lazily: omg.text pulls in open_clip and transformers

        def encode(texts: list[str], zero_if_empty: bool = False, min_chunks: int = 1) -> tuple[Tensor, Tensor]:
            key = (tuple(texts), zero_if_empty, min_chunks)
            if encoded is None:
                return self.text.encode(texts, zero_if_empty=zero_if_empty, min_chunks=min_chunks)
            if key not in encoded:
                encoded[key] = self.text.encode(texts, zero_if_empty=zero_if_empty, min_chunks=min_chunks)
            return encoded[key]

        zero = negative_prompts is None
        negatives = [""] * len(prompts) if zero else list(negative_prompts)
        context, pooled = encode(list(prompts))
        chunk = CHUNK + 2  # positions per chunk (BOS + 75 + EOS); both halves must hold as many chunks
        neg_context, neg_pooled = encode(negatives, zero_if_empty=zero, min_chunks=context.shape[1] // chunk)
        if neg_context.shape[1] > context.shape[1]:  # the negative prompt is the longer one
            context, pooled = encode(list(prompts), min_chunks=neg_context.shape[1] // chunk)
        embed_dim, rest = divmod(self.unet.config.adm_in_channels - pooled.shape[-1], 6)
        if rest or embed_dim <= 0:
            raise ModelError(f"the UNet's y width {self.unet.config.adm_in_channels} does not fit pooled text "
                             f"of width {pooled.shape[-1]} plus six size embeddings")
        size = (height, width)
        y = sdxl_vector(torch.cat([neg_pooled, pooled]), size, (0, 0), size, embed_dim=embed_dim)
        return torch.cat([neg_context, context]).to(self.device), y.to(self.device)

    def noise(self, generators: Sequence[torch.Generator], height: int, width: int) -> Tensor:
        """Initial latents (B, C, H/f, W/f) fp32 on the UNet's device, image b drawn on the CPU from generators[b]
        (seeded per image): a seed gives the same image on any device and in any batch."""
        f = self.vae.config.downscale
        shape = (len(generators), self.unet.config.in_channels, height // f, width // f)
        return randn_cpu(shape, list(generators), device=self.device, dtype=torch.float32)

    def decode(self, latents: Tensor) -> list[Image.Image]:
        """VAE-decode latents and convert [-1, 1] to 8-bit RGB PIL images."""
        return decode_images(self.vae, latents)

    def components(self) -> dict[str, nn.Module]:
        return {k: m for k, m in (("unet", self.unet), ("vae", self.vae), ("text", self.text)) if m is not None}

    def sgm_state_dict(self) -> dict[str, Tensor]:
        """Every tensor under its SGM single-file key (prefixes added)."""
        out = {keymap.SGM_PREFIXES["unet"] + k: t for k, t in self.unet.state_dict().items()}
        if self.vae is not None:
            out.update({keymap.SGM_PREFIXES["vae"] + k: t for k, t in self.vae.state_dict().items()})
        if self.text is not None:
            for k, t in self.text.state_dict().items():
                enc, rest = k.split(".", 1)
                out[keymap.SGM_PREFIXES[enc] + rest] = t
        return out

    def configs(self) -> dict[str, dict]:
        """The configs as plain dicts (what save_sgm stores in the file's metadata)."""
        out = {"unet": dataclasses.asdict(self.unet.config)}
        if self.vae is not None:
            out["vae"] = dataclasses.asdict(self.vae.config)
        if self.text is not None:
            out["clip_l"] = dataclasses.asdict(self.text.clip_l.config)
            out["clip_g"] = dataclasses.asdict(self.text.clip_g.config)
        return out

    @classmethod
    def random(cls, unet_config: Optional[UNetConfig] = None, vae_config: Optional[VAEConfig] = None,
               text_configs: Optional[tuple] = None, seed: int = 0, device: Union[str, torch.device] = "cpu",
               dtype: torch.dtype = torch.float32, size_embed_dim: int = 4, with_vae: bool = True,
               with_text: bool = True) -> "SDXL":
        """A small random model (tiny configs by default) for tests; the UNet's context and y widths follow the
        text encoders: context = CLIP-L width + bigG width, adm = bigG projection + 6 * size_embed_dim.

        Every parameter, norms included, gets a distinct random perturbation so that swapped keys show.
        """
        from omg.text import SDXLTextEncoder, TextEncoderConfig

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text = None
            if with_text:
                l_cfg, g_cfg = text_configs or (TextEncoderConfig.tiny_l(), TextEncoderConfig.tiny_g())
                text = SDXLTextEncoder(l_cfg, g_cfg)
            unet_config = unet_config or UNetConfig.tiny()
            if text is not None:
                unet_config = dataclasses.replace(
                    unet_config, context_dim=l_cfg.width + g_cfg.width,
                    adm_in_channels=g_cfg.projection_dim + 6 * size_embed_dim)
            unet = UNet(unet_config)
            vae = AutoencoderKL(vae_config or VAEConfig.tiny()) if with_vae else None
            for module in (unet, vae, text):
                if module is None:
                    continue
                with torch.no_grad():
                    for p in module.parameters():
                        p.add_(0.02 * torch.randn_like(p))
        for module in (unet, vae, text):
            if module is not None:
                module.to(device=device, dtype=AutoencoderKL.safe_dtype(dtype, device) if module is vae else dtype)
                module.eval()
        return cls(unet, vae, text)


@torch.no_grad()
def decode_images(vae: nn.Module, latents: Tensor) -> list[Image.Image]:
    """VAE-decode latents and convert [-1, 1] to 8-bit RGB PIL images (SDXL.decode; what needs only the VAE)."""
    images = vae.decode(latents).float().clamp(-1, 1)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def build_random_sdxl(**kwargs) -> SDXL:
    """Same as SDXL.random(**kwargs)."""
    return SDXL.random(**kwargs)


def load_sdxl(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
              dtype: Optional[torch.dtype] = None, vae_dtype: Optional[torch.dtype] = None) -> SDXL:
    """Load an SGM single file, a diffusers folder, or a UNet-only file (SGM or diffusers layout).

    Configs come from the tensor shapes; every key and shape is checked against modules built on the meta
    device before any tensor is read, so a bad file raises one CheckpointError and nothing is built.
    Tensors go straight to device: UNet and text encoders in dtype (default: fp16 on CUDA, fp32 elsewhere:
    the CPU has no fast fp16 kernels, fp16 ran 20x slower there), the VAE in vae_dtype (default: the VAE's
    safe dtype for dtype, i.e. bf16 on CUDA / fp32 on CPU instead of fp16).
    """
    device = torch.device(device)
    dtype = default_dtype(device) if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelError(f"dtype must be a floating torch.dtype, not {dtype!r}")
    vae_dtype = AutoencoderKL.safe_dtype(vae_dtype or dtype, device)
    with checkpoint.open_checkpoint(path) as ckpt:
        plans = checkpoint.plan_checkpoint(ckpt)
        _check_consistency(ckpt.path, plans)
        modules = {name: checkpoint.materialize(plan, device, vae_dtype if name == "vae" else dtype)
                   for name, plan in plans.items()}
    return SDXL(modules["unet"], modules.get("vae"), modules.get("text"))


def default_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere (load_sdxl's and the CLI's default)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _check_consistency(path: str, plans: dict[str, checkpoint.Plan]) -> None:
    """The UNet must take what the text encoders produce: context width and the y vector."""
    if "text" not in plans:
        return
    unet, (l_cfg, g_cfg) = plans["unet"].config, plans["text"].config
    problems = []
    if unet.context_dim != l_cfg.width + g_cfg.width:
        problems.append(f"UNet context width {unet.context_dim} != CLIP-L {l_cfg.width} + bigG {g_cfg.width}")
    extra = unet.adm_in_channels - (g_cfg.projection_dim or 0)
    if extra <= 0 or extra % 6:
        problems.append(f"UNet y width {unet.adm_in_channels} is not bigG projection {g_cfg.projection_dim} "
                        f"+ 6 size embeddings")
    if problems:
        raise CheckpointError(f"{path}: the components do not fit together: " + "; ".join(problems))


def save_sgm(model: SDXL, path: Union[str, os.PathLike]) -> None:
    """Write model as one SGM single-file .safetensors (configs in its metadata); atomic (temp file + rename)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    tensors = {k: t.detach().contiguous().cpu() for k, t in model.sgm_state_dict().items()}
    with atomic_path(path, ".safetensors.tmp") as tmp:
        save_file(tensors, tmp, metadata={"omg.config": json.dumps(model.configs())})
