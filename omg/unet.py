"""The SDXL UNet, written from scratch with the parameter names of the SGM single-file layout.

Every attention layer is addressable by its SGM module path (``input_blocks.4.1.transformer_blocks.0.attn2``)
and can be given a processor, which is how the OMG sampler captures and replays cross-attention. The transformers'
Linear layers are omg.fp8.Linear (nn.Linear that can run in e4m3 under omg.fp8.fp8_linears: the `fp8` option).
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

import kernels
from kernels.norm import memory_format_of
from omg.errors import ModelError, UnknownLayerError
from omg.fp8 import Linear

# processor(layer, x, context) -> output of the layer (after to_out); context is None for self-attention.
AttentionProcessor = Callable[["Attention", Tensor, Optional[Tensor]], Tensor]
# every cross-attention layer's (to_k(context), to_v(context)), (B, T, C) each, by SGM path (UNet.cross_kv)
CrossKV = dict[str, tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320  # channels of level 0; level l has model_channels * channel_mult[l]
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    transformer_depth: tuple[int, ...] = (0, 2, 10)  # transformer blocks per attention at each level; 0 = none
    transformer_depth_middle: int = 10
    head_dim: int = 64  # SGM num_head_channels: heads = channels // head_dim
    context_dim: int = 2048  # text context width (CLIP-L 768 + bigG 1280)
    adm_in_channels: int = 2816  # the "y" vector: pooled bigG 1280 + 6 size embeddings of 256
    norm_groups: int = 32

    @classmethod
    def sdxl(cls) -> "UNetConfig":
        """SDXL base 1.0 (sd_xl_base.yaml)."""
        return cls()

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """A few-hundred-thousand-parameter UNet with every block type of SDXL, for CPU tests."""
        return cls(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2),
                   transformer_depth_middle=2, head_dim=16, context_dim=48, adm_in_channels=64,
                   norm_groups=8)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], head_dim: int = 64, norm_groups: int = 32) -> "UNetConfig":
        """Infer the config from tensor shapes (SGM keys, no prefix).

        Head width and group count leave no trace in the shapes; SDXL's values are the defaults.
        Raises KeyError for keys that every SDXL-family UNet has; the loader turns that into a
        CheckpointError naming the file.
        """
        conv_in = sd["input_blocks.0.0.weight"]
        model_channels, in_channels = conv_in.shape[0], conv_in.shape[1]
        blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))})
        downsamples = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in sd]
        num_res_blocks = downsamples[0] - 1 if downsamples else len(blocks) - 1
        levels = len(downsamples) + 1
        channel_mult, depth = [], []
        for level in range(levels):
            first = 1 + level * (num_res_blocks + 1)
            channel_mult.append(sd[f"input_blocks.{first}.0.in_layers.2.weight"].shape[0] // model_channels)
            depth.append(_count_transformer_blocks(sd, f"input_blocks.{first}.1."))
        attn2 = next(k for k in sd if k.endswith("attn2.to_k.weight"))
        # a ControlNet (the encoder half) has no output convolution
        out_channels = sd["out.2.weight"].shape[0] if "out.2.weight" in sd else in_channels
        return cls(in_channels=in_channels, out_channels=out_channels,
                   model_channels=model_channels, channel_mult=tuple(channel_mult),
                   num_res_blocks=num_res_blocks, transformer_depth=tuple(depth),
                   transformer_depth_middle=_count_transformer_blocks(sd, "middle_block.1."),
                   head_dim=head_dim, context_dim=sd[attn2].shape[1],
                   adm_in_channels=sd["label_emb.0.0.weight"].shape[1], norm_groups=norm_groups)


def _count_transformer_blocks(sd: Mapping[str, Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if k.startswith(prefix)
             and (m := re.match(re.escape(prefix) + r"transformer_blocks\.(\d+)\.", k))}
    return len(found)


def preferred_memory_format(device: Union[str, torch.device]) -> torch.memory_format:
    """The layout a UNet's (or ControlNet's) activations should have on `device`: channels-last on CUDA, where
    cuDNN's convolutions run in it natively (contiguous NCHW activations cost a transpose in and out of every
    convolution) and a transformer's (B, H*W, C) tokens are a view of them; contiguous elsewhere.
    Apply with ``module.to(memory_format=...)``: the forward passes follow the convolution weights' layout."""
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


def in_layout_of(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """x in the layout of conv's weight (channels-last or contiguous), so every activation after it keeps it."""
    return x.contiguous(memory_format=memory_format_of(conv.weight))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding, cos first (SGM util.timestep_embedding); t of shape (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class Attention(nn.Module):
    """Multi-head attention; self-attention when context is None. ``path`` is its SGM module path."""

    def __init__(self, dim: int, heads: int, context_dim: Optional[int] = None):
        super().__init__()
        self.heads = heads
        self.is_cross = context_dim is not None
        context_dim = context_dim or dim
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(context_dim, dim, bias=False)
        self.to_v = Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([Linear(dim, dim)])
        self.path = ""
        self.processor: Optional[AttentionProcessor] = None
        # an additive branch (omg.ip_adapter's decoupled cross-attention): extra(layer, x, out) -> out
        self.extra: Optional[Callable[["Attention", Tensor, Tensor], Tensor]] = None
        # this layer's keys and values of the calls' context, computed beforehand (UNet.using_cross_kv)
        self.kv: Optional[tuple[Tensor, Tensor]] = None

    def qkv(self, x: Tensor, context: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Projected queries, keys, values, each (B, heads, tokens, head_dim)."""
        split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads)  # noqa: E731
        if self.kv is not None:
            k, v = self.kv
            if k.shape[0] != x.shape[0]:
                raise ModelError(f"{self.path}: keys and values computed for {k.shape[0]} rows, called with "
                                 f"{x.shape[0]}")
        else:
            context = x if context is None else context
            k, v = self.to_k(context), self.to_v(context)
        return split(self.to_q(x)), split(k), split(v)

    def out(self, attended: Tensor) -> Tensor:
        """(B, heads, tokens, head_dim) -> output projection."""
        return self.to_out[0](rearrange(attended, "b h n d -> b n (h d)"))

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        if self.processor is not None:
            out = self.processor(self, x, context)
        else:
            out = self.out(F.scaled_dot_product_attention(*self.qkv(x, context)))
        return out if self.extra is None else self.extra(self, x, out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return kernels.geglu(self.proj(x))  # x · gelu(gate) of the two halves, one pass on CUDA


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # index 1 is SGM's dropout; kept as a placeholder so the keys read ff.net.0 / ff.net.2
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), Linear(mult * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        # x = x + attn1(norm1(x)); x = x + attn2(norm2(x), context); x + ff(norm3(x)), each residual add fused
        # with the norm after it on CUDA
        h = kernels.layer_norm(self.norm1, x)
        x, h = kernels.add_layer_norm(self.norm2, x, self.attn1(h))
        x, h = kernels.add_layer_norm(self.norm3, x, self.attn2(h, context))
        return x + self.ff(h)


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(rearrange(kernels.norm_act(self.norm, x, silu=False), "b c h w -> b (h w) c"))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + rearrange(self.proj_out(tokens), "b (h w) c -> b c h w", h=h, w=w)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # in_layers / out_layers = (GroupNorm, SiLU, [dropout,] conv): the norm, the activation and the timestep
        # embedding added before out_layers' norm run as one kernel on CUDA
        h = self.in_layers[2](kernels.norm_act(self.in_layers[0], x))
        h = kernels.norm_act(self.out_layers[0], h, shift=self.emb_layers(emb))
        return self.out_layers[3](h) + self.skip_connection(x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: Optional[tuple[int, int]] = None) -> Tensor:
        # size: the next skip connection's, for latents whose sides are not multiples of 2**levels
        if size is None:
            size = (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Block(nn.ModuleList):
    """One SGM input/middle/output block: each layer gets what it needs (emb, context, or neither)."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor,  # type: ignore[override]
                upsample_size: Optional[tuple[int, int]] = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


@dataclass
class ControlResiduals:
    """What ControlNets add to a UNet call: one tensor per skip connection (SGM input block) and one to the middle
    block's output, for the call's first ``rows`` rows (a grouped stage-2 call adds nothing to its concept rows)."""

    skips: list[Tensor]
    middle: Tensor

    @property
    def rows(self) -> int:
        return self.middle.shape[0]

    def __add__(self, other: "ControlResiduals") -> "ControlResiduals":
        """Several ControlNets: their residuals summed (diffusers' MultiControlNetModel)."""
        return ControlResiduals([a + b for a, b in zip(self.skips, other.skips)], self.middle + other.middle)


def time_embeddings(cfg: UNetConfig) -> tuple[nn.Sequential, nn.Sequential]:
    """SGM time_embed (sinusoidal timestep -> emb) and label_emb (the y vector -> emb)."""
    mc, emb_dim = cfg.model_channels, cfg.time_embed_dim
    time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
    label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                            nn.Linear(emb_dim, emb_dim)))
    return time_embed, label_emb


def _transformer(cfg: UNetConfig, ch: int, depth: int) -> SpatialTransformer:
    return SpatialTransformer(ch, ch // cfg.head_dim, depth, cfg.context_dim, cfg.norm_groups)


def encoder_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The encoder half (SGM input_blocks: conv_in, then per level ResBlocks [+ transformer] and a downsampler)
    and each block's output channels (the skip connections). The ControlNet has the same blocks."""
    if len(cfg.transformer_depth) != len(cfg.channel_mult):
        raise ModelError(f"transformer_depth {cfg.transformer_depth} needs one entry per level "
                         f"of channel_mult {cfg.channel_mult}")
    mc, groups, emb_dim = cfg.model_channels, cfg.norm_groups, cfg.time_embed_dim
    blocks = nn.ModuleList([Block([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
    skip_channels, ch = [mc], mc
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb_dim, mc * mult, groups)]
            ch = mc * mult
            if cfg.transformer_depth[level]:
                layers.append(_transformer(cfg, ch, cfg.transformer_depth[level]))
            blocks.append(Block(layers))
            skip_channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(Block([Downsample(ch)]))
            skip_channels.append(ch)
    return blocks, skip_channels


def middle_block(cfg: UNetConfig) -> Block:
    """SGM middle_block at the lowest level: ResBlock, transformer, ResBlock."""
    ch, emb_dim = cfg.model_channels * cfg.channel_mult[-1], cfg.time_embed_dim
    return Block([ResBlock(ch, emb_dim, ch, cfg.norm_groups), _transformer(cfg, ch, cfg.transformer_depth_middle),
                  ResBlock(ch, emb_dim, ch, cfg.norm_groups)])


def embed(time_embed: nn.Sequential, label_emb: nn.Sequential, x: Tensor, timesteps: Tensor, y: Tensor) -> Tensor:
    """The timestep and y embedding (B, time_embed_dim) of a UNet or a ControlNet, for latents x."""
    timesteps = torch.as_tensor(timesteps, device=x.device).expand(x.shape[0])
    emb = time_embed(timestep_embedding(timesteps, time_embed[0].in_features).to(x.dtype))
    return emb + label_emb(y.to(x.dtype))


class UNet(nn.Module):
    """SDXL UNet: eps = unet(x, timesteps, context, y)."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg = config
        mc, groups, emb_dim = cfg.model_channels, cfg.norm_groups, cfg.time_embed_dim
        self.time_embed, self.label_emb = time_embeddings(cfg)
        self.input_blocks, skip_channels = encoder_blocks(cfg)
        ch = skip_channels[-1]
        self.middle_block = middle_block(cfg)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, groups)]
                ch = mc * mult
                if cfg.transformer_depth[level]:
                    layers.append(_transformer(cfg, ch, cfg.transformer_depth[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(layers))

        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        # the attention layers by SGM path, found once: every generate call routes them (a walk of the 1877 modules of
        # SDXL's tree, about 2 ms of host time, several times a call)
        self._attention_list = tuple((name, m) for name, m in self.named_modules() if isinstance(m, Attention))
        for name, module in self._attention_list:
            module.path = name
        self._cross_layer_list = tuple((name, m) for name, m in self._attention_list if m.is_cross)

    # --- attention hook -------------------------------------------------------------------------
    def attention_layers(self, kind: Optional[str] = None) -> dict[str, Attention]:
        """Attention layers by SGM path; kind = "self" (attn1), "cross" (attn2) or None for both."""
        if kind not in (None, "self", "cross"):
            raise ModelError(f"kind must be 'self', 'cross' or None, not {kind!r}")
        return {name: m for name, m in self._attention_list if kind is None or m.is_cross == (kind == "cross")}

    def set_attention_processor(self, processor: Optional[AttentionProcessor], kind: Optional[str] = None,
                                paths: Optional[Sequence[str]] = None) -> None:
        """Route attention layers through processor (None restores torch SDPA).

        Applies to every layer of `kind`, or only to the SGM `paths` given.
        """
        layers = self.attention_layers(kind)
        if paths is not None:
            unknown = sorted(set(paths) - set(layers))
            if unknown:
                raise UnknownLayerError(f"no {kind or ''} attention layer at {unknown[:5]}; the layers are SGM "
                                        f"paths such as {next(iter(layers), '(none)')!r}")
            layers = {p: layers[p] for p in paths}
        for layer in layers.values():
            layer.processor = processor

    # --- cross-attention keys and values ---------------------------------------------------------
    def cross_kv(self, context: Tensor, into: Optional[CrossKV] = None) -> CrossKV:
        """Every cross-attention layer's keys and values of `context` (B, T, context_dim), under the weights and
        hooks installed now (a grouped call's concept LoRAs). They are the same at every step of a sampler: a
        sampler computes them once and runs its steps in ``with unet.using_cross_kv(kv)``, which saves each step 140
        small GEMMs (and their LoRA deltas) on SDXL. into: an earlier result for a context of the same shape,
        overwritten in place and returned (a kept CUDA graph reads those tensors)."""
        context = context.to(self.input_blocks[0][0].weight.dtype)
        kv = {}
        for path, layer in self._cross_layer_list:
            k, v = layer.to_k(context), layer.to_v(context)
            if into is not None:
                into[path][0].copy_(k)
                into[path][1].copy_(v)
            kv[path] = (k, v)
        return into if into is not None else kv

    @contextmanager
    def using_cross_kv(self, kv: Optional[CrossKV]) -> Iterator[None]:
        """The UNet calls of the with-block read their cross-attention keys and values from kv (cross_kv of their
        context, with as many rows) instead of projecting the context; kv None: they project it."""
        layers = self._cross_layer_list if kv is not None else ()
        for path, layer in layers:
            layer.kv = kv[path]
        try:
            yield
        finally:
            for _, layer in layers:
                layer.kv = None

    # --- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor,
                control: Optional[ControlResiduals] = None) -> Tensor:
        """x (B, C, H, W) latent; timesteps (B,) or scalar; context (B, T, context_dim); y (B, adm_in).

        control: ControlNet residuals added to the skip connections and the middle block's output (diffusers'
        down_block_additional_residuals / mid_block_additional_residual) of the first control.rows rows.
        """
        emb = embed(self.time_embed, self.label_emb, x, timesteps, y)
        context = context.to(x.dtype)
        skips = []
        h = in_layout_of(self.input_blocks[0][0], x)
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)  # (B, C_l, H_l, W_l)
        h = self.middle_block(h, emb, context)
        if control is not None:
            # in place, after the middle block: every skip is a block's own fresh output that nothing reads again
            # before the decoder, and the last one is the middle block's input
            rows = control.rows
            for skip, residual in zip(skips, control.skips, strict=True):
                skip[:rows] += residual.to(skip.dtype)
            h[:rows] += control.middle.to(h.dtype)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out[2](kernels.norm_act(self.out[0], h)).contiguous()  # the samplers' layout
