"""IP-Adapter (Ye et al. 2023) as InstantID uses it: decoupled cross-attention over image tokens, and the
perceiver resampler of IP-Adapter Plus that makes those tokens from a face embedding.

    adapter = load_ip_adapter("ip-adapter.bin", unet.config, device="cuda", dtype=torch.float16)
    tokens = adapter.image_tokens(face_embedding)            # (B, 512) -> (B, 16, context_dim)
    with adapter.installed(unet), adapter.tokens(tokens, scale=0.8):
        eps = unet(x, t, context, y)                          # every attn2 adds 0.8 * attention over the tokens

Decoupled cross-attention: each attn2 layer keeps its text attention and adds, with its own scale, a second
attention of the same queries over the image tokens, with its own key and value projections (to_k_ip, to_v_ip):

    out = to_out(softmax(q k_text^T) v_text + scale * softmax(q k_ip^T) v_ip)

Files: the published ``ip-adapter.bin`` (a pickle of {"image_proj": resampler state, "ip_adapter": {"1.to_k_ip.weight",
...}}, read only with torch.load(weights_only=True)) or the same tensors in a .safetensors with keys
``image_proj.*`` and ``ip_adapter.*``. The ip_adapter entries are numbered over every attention processor of
diffusers' UNet (attn1 and attn2 alternating, down blocks, then up blocks, then the middle block): attn2 layer j of
that order is entry 2j + 1.
"""
from __future__ import annotations

import os
import pickle
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from omg.errors import CheckpointError, ModelError
from omg.tensorfile import PathLike, _first
from omg.unet import Attention, UNet, UNetConfig


@dataclass(frozen=True)
class ResamplerConfig:
    dim: int = 1280  # width inside the resampler
    depth: int = 4
    dim_head: int = 64
    heads: int = 20
    num_queries: int = 16  # image tokens out
    embedding_dim: int = 512  # the face embedding (insightface antelopev2 recognition)
    output_dim: int = 2048  # the UNet's context width
    ff_mult: int = 4

    @classmethod
    def instantid(cls, context_dim: int = 2048) -> "ResamplerConfig":
        """InstantID's image projection (its pipeline's set_image_proj_model)."""
        return cls(output_dim=context_dim)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], dim_head: int = 64) -> "ResamplerConfig":
        """From the shapes of a resampler state dict (the file's layout); KeyError for a key every resampler has."""
        latents = sd["latents"]
        depth = len({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.0\.to_q\.weight$", k))})
        inner = sd["layers.0.0.to_q.weight"].shape[0]
        return cls(dim=latents.shape[2], depth=depth, dim_head=dim_head, heads=inner // dim_head,
                   num_queries=latents.shape[1], embedding_dim=sd["proj_in.weight"].shape[1],
                   output_dim=sd["proj_out.weight"].shape[0],
                   ff_mult=sd["layers.0.1.1.weight"].shape[0] // latents.shape[2])


class PerceiverAttention(nn.Module):
    """The latents attend to [image features; latents] (keys and values from both), pre-normed."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)  # image features
        self.norm2 = nn.LayerNorm(dim)  # latents
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head * heads, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads)  # noqa: E731
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        attended = F.scaled_dot_product_attention(split(self.to_q(latents)), split(k), split(v))
        return self.to_out(rearrange(attended, "b h n d -> b n (h d)"))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm, Linear, GELU, Linear (no biases): keys .0, .1, .3 as the file has them."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """IP-Adapter Plus's perceiver resampler: (B, n, embedding_dim) features -> (B, num_queries, output_dim) tokens."""

    def __init__(self, config: ResamplerConfig = ResamplerConfig()):
        super().__init__()
        c = self.config = config
        self.latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) / c.dim ** 0.5)
        self.proj_in = nn.Linear(c.embedding_dim, c.dim)
        self.layers = nn.ModuleList([nn.ModuleList([PerceiverAttention(c.dim, c.dim_head, c.heads),
                                                    feed_forward(c.dim, c.ff_mult)]) for _ in range(c.depth)])
        self.proj_out = nn.Linear(c.dim, c.output_dim)
        self.norm_out = nn.LayerNorm(c.output_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj_in(x)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attention, ff in self.layers:
            latents = attention(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class DecoupledKV(nn.Module):
    """One attn2 layer's image-token key and value projections."""

    def __init__(self, context_dim: int, dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, dim, bias=False)
        self.to_v_ip = nn.Linear(context_dim, dim, bias=False)


def cross_attention_order(config: UNetConfig) -> list[str]:
    """SGM paths of the attn2 layers in the order of diffusers' attn_processors (down, up, middle): the order the
    published files number their ip_adapter entries in."""
    with torch.device("meta"):
        paths = list(UNet(config).attention_layers("cross"))
    group = lambda p: 0 if p.startswith("input_blocks") else 1 if p.startswith("output_blocks") else 2  # noqa: E731
    return sorted(paths, key=lambda p: group(p))  # stable: module order within each group


@dataclass
class _Tokens:
    tokens: Tensor  # (R, T, context_dim) for rows [start, start + R) of the UNet call
    start: int
    scale: float
    kv: dict  # layer path -> (k, v) heads, made once per token set


class IPAdapter(nn.Module):
    """The image projection and every attn2 layer's decoupled key/value projections of one adapter file."""

    def __init__(self, unet_config: UNetConfig, resampler: ResamplerConfig):
        super().__init__()
        self.unet_config, self.paths = unet_config, cross_attention_order(unet_config)
        if resampler.output_dim != unet_config.context_dim:
            raise ModelError(f"the resampler's tokens are {resampler.output_dim} wide, the UNet's context "
                             f"{unet_config.context_dim}")
        self.image_proj = Resampler(resampler)
        widths = _attn2_widths(unet_config)
        self.ip_layers = nn.ModuleList([DecoupledKV(unet_config.context_dim, widths[p]) for p in self.paths])
        self._active: Optional[_Tokens] = None

    @property
    def embedding_dim(self) -> int:
        return self.image_proj.config.embedding_dim

    def image_tokens(self, embedding: Tensor) -> Tensor:
        """(B, embedding_dim) or (B, n, embedding_dim) face embeddings -> (B, num_queries, context_dim) tokens."""
        if embedding.shape[-1] != self.embedding_dim:
            raise ModelError(f"a face embedding must have {self.embedding_dim} values, got shape "
                             f"{tuple(embedding.shape)}")
        p = self.image_proj.latents
        x = embedding.to(p.device, p.dtype)
        return self.image_proj(x[:, None] if x.ndim == 2 else x)

    def cfg_tokens(self, embedding: Tensor) -> Tensor:
        """[uncond; cond] tokens of one embedding (embedding_dim,): the uncond row is the zero embedding's tokens,
        as InstantID's pipeline makes it."""
        e = embedding.reshape(1, -1)
        return self.image_tokens(torch.cat([torch.zeros_like(e), e]))

    @contextmanager
    def installed(self, unet: UNet) -> Iterator["IPAdapter"]:
        """The decoupled branch on every attn2 layer of `unet` for a with-block (no tokens set: it adds nothing)."""
        if unet.config != self.unet_config:
            raise ModelError("this IP-Adapter was made for another UNet config: "
                             f"context {self.unet_config.context_dim} vs the UNet's {unet.config.context_dim}")
        layers = unet.attention_layers("cross")
        taken = [p for p in self.paths if layers[p].extra is not None]
        if taken:
            raise ModelError(f"attention layers {taken[:3]} already have a decoupled branch installed")
        try:
            for i, p in enumerate(self.paths):
                layers[p].extra = _Branch(self, i)
            yield self
        finally:
            for p in self.paths:
                layers[p].extra = None

    @contextmanager
    def tokens(self, tokens: Tensor, scale: float, start: int = 0) -> Iterator[None]:
        """Image tokens (R, T, context_dim) for rows [start, start + R) of the UNet calls in the with-block."""
        previous, self._active = self._active, _Tokens(tokens, start, float(scale), {})
        try:
            yield
        finally:
            self._active = previous

    def branch(self, index: int, layer: Attention, x: Tensor, out: Tensor) -> Tensor:
        a = self._active
        if a is None or a.scale == 0.0:
            return out
        rows = slice(a.start, a.start + a.tokens.shape[0])
        kv = a.kv.get(index)
        if kv is None:
            ip = self.ip_layers[index]
            ctx = a.tokens.to(x.dtype)
            split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=layer.heads)  # noqa: E731
            kv = a.kv[index] = (split(ip.to_k_ip(ctx)), split(ip.to_v_ip(ctx)))
        q = rearrange(layer.to_q(x[rows]), "b n (h d) -> b h n d", h=layer.heads)
        attended = rearrange(F.scaled_dot_product_attention(q, *kv), "b h n d -> b n (h d)")
        # to_out is linear: to_out(a + s b) = to_out(a) + s W b
        out = out.clone()
        out[rows] += a.scale * F.linear(attended, layer.to_out[0].weight)
        return out


class _Branch:
    """An attn2 layer's hook into its adapter (a plain object: it adds no keys to the UNet's state dict)."""

    def __init__(self, adapter: IPAdapter, index: int):
        self.adapter, self.index = adapter, index

    def __call__(self, layer: Attention, x: Tensor, out: Tensor) -> Tensor:
        return self.adapter.branch(self.index, layer, x, out)


def _attn2_widths(config: UNetConfig) -> dict[str, int]:
    with torch.device("meta"):
        return {p: m.to_q.out_features for p, m in UNet(config).attention_layers("cross").items()}


# ---------------------------------------------------------------------------------------------------- files

def read_adapter_file(path: PathLike) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(image_proj, ip_adapter) state dicts of an adapter file: the published pickle (weights-only loading) or a
    .safetensors with image_proj.* and ip_adapter.* keys."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file (expected InstantID's ip-adapter.bin or .safetensors)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            flat = load_file(path)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read as safetensors: {e}") from e
        parts: dict[str, dict[str, Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for k, v in flat.items():
            head, _, rest = k.partition(".")
            if head in parts:
                parts[head][rest] = v
        obj: Mapping = parts
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: refused: not loadable with torch.load(weights_only=True): {e}") from e
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read as a PyTorch file: {type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping) or not all(isinstance(obj.get(k), Mapping) and obj.get(k) for k in
                                               ("image_proj", "ip_adapter")):
        keys = list(obj) if isinstance(obj, Mapping) else []
        raise CheckpointError(f"{path}: not an IP-Adapter file: expected 'image_proj' and 'ip_adapter' state dicts "
                              f"(or image_proj.* / ip_adapter.* keys), found {_first(keys[:6])}")
    return dict(obj["image_proj"]), dict(obj["ip_adapter"])


def adapter_from_state_dicts(image_proj: Mapping[str, Tensor], ip_adapter: Mapping[str, Tensor],
                             unet_config: UNetConfig, path: str = "IP-Adapter") -> IPAdapter:
    """An IPAdapter (on the meta device) with every key and shape checked against the UNet, then its tensors."""
    if "proj_in.weight" not in image_proj or "layers.0.0.to_q.weight" not in image_proj:
        what = ("a plain IP-Adapter (a linear image projection), not IP-Adapter Plus / InstantID"
                if "proj.weight" in image_proj else "an unknown image projection")
        raise CheckpointError(f"{path}: image_proj is {what}; expected latents, proj_in.weight and "
                              f"layers.N.0.to_q.weight (the perceiver resampler)")
    try:
        rcfg = ResamplerConfig.from_state_dict(image_proj)
    except KeyError as e:
        raise CheckpointError(f"{path}: image_proj lacks {e.args[0]!r}") from e
    k1 = ip_adapter.get("1.to_k_ip.weight")
    if k1 is None:
        raise CheckpointError(f"{path}: ip_adapter lacks '1.to_k_ip.weight' (found {_first(list(ip_adapter)[:4])})")
    width = k1.shape[1]
    if width != unet_config.context_dim or rcfg.output_dim != unet_config.context_dim:
        era = {768: "SD 1.5", 1024: "SD 2.x"}.get(width, "not this UNet")
        raise CheckpointError(f"{path}: an adapter for another base ({era}): its tokens are {rcfg.output_dim} wide "
                              f"and ip_adapter.1.to_k_ip.weight reads {width}; the UNet's context is "
                              f"{unet_config.context_dim} (SDXL: 2048)")
    with torch.device("meta"):
        adapter = IPAdapter(unet_config, rcfg)
    expected = {**{f"image_proj.{k}": v for k, v in adapter.image_proj.state_dict().items()},
                **{f"ip_adapter.{2 * i + 1}.{name}.weight": getattr(m, name).weight
                   for i, m in enumerate(adapter.ip_layers) for name in ("to_k_ip", "to_v_ip")}}
    given = {**{f"image_proj.{k}": v for k, v in image_proj.items()},
             **{f"ip_adapter.{k}": v for k, v in ip_adapter.items()}}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        n = sum(1 for k in ip_adapter if k.endswith("to_k_ip.weight"))
        raise CheckpointError(f"{path}: the adapter has {n} decoupled layers, the UNet {len(adapter.paths)} attn2 "
                              f"layers; missing {_first(missing)}; unexpected {_first(unexpected)}")
    wrong = [f"{k} {tuple(given[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if tuple(given[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{path}: mis-shaped tensors: {_first(wrong)}")
    adapter = adapter.to_empty(device="cpu")
    adapter.image_proj.load_state_dict(dict(image_proj), strict=True)
    for i, m in enumerate(adapter.ip_layers):
        m.to_k_ip.weight.data.copy_(ip_adapter[f"{2 * i + 1}.to_k_ip.weight"])
        m.to_v_ip.weight.data.copy_(ip_adapter[f"{2 * i + 1}.to_v_ip.weight"])
    return adapter.eval()


def load_ip_adapter(path: PathLike, unet_config: UNetConfig, device: Union[str, torch.device] = "cpu",
                    dtype: torch.dtype = torch.float16) -> IPAdapter:
    """InstantID's ip-adapter.bin (or the same tensors as .safetensors) for a UNet of `unet_config`, checked."""
    image_proj, ip_adapter = read_adapter_file(path)
    return adapter_from_state_dicts(image_proj, ip_adapter, unet_config, os.fspath(path)).to(device, dtype)


def check_ip_adapter(path: PathLike, unet_config: UNetConfig) -> ResamplerConfig:
    """Validate an adapter file against a UNet config (keys, shapes, base model); its resampler config."""
    image_proj, ip_adapter = read_adapter_file(path)
    return adapter_from_state_dicts(image_proj, ip_adapter, unet_config, os.fspath(path)).image_proj.config


def adapter_state_dicts(adapter: IPAdapter) -> dict[str, dict[str, Tensor]]:
    """The published layout: {"image_proj": ..., "ip_adapter": {"1.to_k_ip.weight": ...}} (for tests and tools)."""
    ip = {}
    for i, m in enumerate(adapter.ip_layers):
        ip[f"{2 * i + 1}.to_k_ip.weight"] = m.to_k_ip.weight.detach().cpu().contiguous()
        ip[f"{2 * i + 1}.to_v_ip.weight"] = m.to_v_ip.weight.detach().cpu().contiguous()
    proj = {k: v.detach().cpu().contiguous() for k, v in adapter.image_proj.state_dict().items()}
    return {"image_proj": proj, "ip_adapter": ip}
