"""The SDXL AutoencoderKL (SGM ``autoencoder.py`` / ``diffusionmodules/model.py``), written from scratch
with the parameter names of the SGM single-file layout (``first_stage_model.`` stripped).

The SDXL VAE overflows in fp16 (NaN / black images), so it never computes in fp16: ``.half()`` or
``.to(torch.float16)`` leave its parameters in bf16 (CUDA with bf16) or fp32, and encode/decode map an
fp16 request the same way (:meth:`AutoencoderKL.safe_dtype`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

import kernels


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128  # channels of level 0; level l has ch * ch_mult[l]
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (one more per decoder level)
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.13025  # SDXL scale_factor; SD1.5 uses 0.18215

    @classmethod
    def sdxl(cls) -> "VAEConfig":
        """SDXL base 1.0 (sd_xl_base.yaml first_stage_config)."""
        return cls()

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """Every block type of the SDXL VAE (nin_shortcut, downsample, upsample, mid attention), small."""
        return cls(ch=32, ch_mult=(1, 2, 2), norm_groups=8)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], norm_groups: int = 32,
                        scaling_factor: float = 0.13025) -> "VAEConfig":
        """Infer the config from tensor shapes (SGM keys, no prefix); group count and scale leave no trace.

        Raises KeyError for keys every AutoencoderKL has; the loader turns that into a CheckpointError.
        """
        conv_in = sd["encoder.conv_in.weight"]
        ch = conv_in.shape[0]
        levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
        return cls(in_channels=conv_in.shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
                   ch=ch, ch_mult=ch_mult, num_res_blocks=len(blocks),
                   z_channels=sd["decoder.conv_in.weight"].shape[1],
                   embed_dim=sd["post_quant_conv.weight"].shape[1],
                   norm_groups=norm_groups, scaling_factor=scaling_factor)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(kernels.norm_act(self.norm1, x))  # GroupNorm + SiLU, one kernel on CUDA
        h = self.conv2(kernels.norm_act(self.norm2, h))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w tokens, scale 1/sqrt(C); q/k/v/proj_out are 1x1 convs."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        h = kernels.norm_act(self.norm, x, silu=False)
        tokens = lambda t: rearrange(t, "b c h w -> b 1 (h w) c")  # noqa: E731
        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=x.shape[2]))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # SGM pads right/bottom only, then convolves unpadded


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: ``block.{j}`` then an optional ``downsample`` (encoder) or ``upsample`` (decoder)."""

    def __init__(self, blocks: list[ResnetBlock], resample_name: str, resample: Optional[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, h: Tensor) -> Tensor:
        for block in self.block:
            h = block(h)
        resample = getattr(self, self.resample_name, None)
        return h if resample is None else resample(h)


class Mid(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1, self.attn_1 = ResnetBlock(ch, ch, groups), AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, last = cfg.norm_groups, len(cfg.ch_mult) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down, ch = nn.ModuleList(), cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            blocks = [ResnetBlock(ch if j == 0 else cfg.ch * mult, cfg.ch * mult, g) for j in range(cfg.num_res_blocks)]
            ch = cfg.ch * mult
            self.down.append(Level(blocks, "downsample", Downsample(ch) if level != last else None))
        self.mid = Mid(ch, g)
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)  # double_z: mean and logvar

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(kernels.norm_act(self.norm_out, self.mid(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, ch = cfg.norm_groups, cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch, g)
        levels: list[Level] = []
        for level in reversed(range(len(cfg.ch_mult))):  # built coarse to fine, stored as up.{level}
            out = cfg.ch * cfg.ch_mult[level]
            blocks = [ResnetBlock(ch if j == 0 else out, out, g) for j in range(cfg.num_res_blocks + 1)]
            ch = out
            levels.insert(0, Level(blocks, "upsample", Upsample(ch) if level != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):  # up.{n-1} first, up.0 last
            h = level(h)
        return self.conv_out(kernels.norm_act(self.norm_out, h))


class AutoencoderKL(nn.Module):
    """SDXL VAE: latents = encode(images in [-1,1]); images = decode(latents). Never computes in fp16."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @staticmethod
    def safe_dtype(requested: torch.dtype, device: torch.device | str) -> torch.dtype:
        """The dtype to compute in: fp16 becomes bf16 on CUDA with bf16 support, else fp32."""
        if not requested.is_floating_point:
            raise ValueError(f"the VAE computes in a floating dtype, not {requested}")
        if requested != torch.float16:
            return requested
        cuda_bf16 = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32

    @property
    def compute_dtype(self) -> torch.dtype:
        """What encode/decode compute in by default: the parameters' dtype, made safe."""
        p = next(self.parameters())
        return self.safe_dtype(p.dtype, p.device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "AutoencoderKL":
        # .half()/.to(fp16) (also through a parent module) would overflow: cast straight to the safe dtype.
        def never_fp16(t: Tensor) -> Tensor:
            out = fn(t)
            if out.dtype != torch.float16:
                return out
            return t.to(device=out.device, dtype=self.safe_dtype(torch.float16, out.device))
        return super()._apply(never_fp16, recurse)

    def _run(self, module: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
        """module(x) in dtype; weights stored in another dtype (e.g. fp16 via assign=True) are cast per call."""
        x = x.to(dtype)
        if all(p.dtype == dtype for p in module.parameters()):
            return module(x)
        weights = {name: p.to(dtype) for name, p in module.named_parameters()}
        return torch.func.functional_call(module, weights, (x,))

    def _check(self, x: Tensor, channels: int, what: str, multiple: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(f"{what} must be (B, {channels}, H, W) with H, W multiples of {multiple}, "
                             f"got {tuple(x.shape)}")

    def encode(self, images: Tensor, sample: bool = False, generator: Optional[torch.Generator] = None,
               dtype: Optional[torch.dtype] = None) -> Tensor:
        """Images (B,3,H,W) in [-1,1] -> latents (B,4,H/8,W/8) = posterior mean (or a sample) * scaling_factor.

        Computes and returns in safe_dtype(dtype or the parameters' dtype).
        """
        self._check(images, self.config.in_channels, "images", self.config.downscale)
        dtype = self.safe_dtype(dtype, images.device) if dtype is not None else self.compute_dtype
        moments = self._run(self.quant_conv, self._run(self.encoder, images, dtype), dtype)
        mean, logvar = moments.chunk(2, dim=1)
        if sample:  # SGM DiagonalGaussianDistribution: logvar clamped to [-30, 20]
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + std * noise
        return mean * self.config.scaling_factor

    def decode(self, latents: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Latents (B,4,h,w) -> images (B,3,8h,8w) in about [-1,1]: decoder(post_quant_conv(z / scaling_factor)).

        Computes and returns in safe_dtype(dtype or the parameters' dtype): never fp16.
        """
        self._check(latents, self.config.embed_dim, "latents", 1)
        dtype = self.safe_dtype(dtype, latents.device) if dtype is not None else self.compute_dtype
        z = latents.to(dtype) / self.config.scaling_factor
        return self._run(self.decoder, self._run(self.post_quant_conv, z, dtype), dtype)
