"""The FP8 fast mode (option `fp8`): e4m3 matmuls for the base UNet's transformer Linear layers.

    with fp8_linears(unet):        # every eligible Linear runs kernels.fp8_linear; restored on exit
        eps = unet(x, t, context, y)

Which layers: the Linear layers of the UNet's transformers (omg.unet builds them as `Linear` below: attention
q/k/v/out, the GEGLU and output projections of the feed-forward, proj_in/proj_out), where nearly all of the
UNet's matmul FLOPs are, and only those whose in and out features are multiples of 16 (what torch._scaled_mm
takes); the timestep/label embeddings, every convolution and every other layer stay 16-bit.
Numerics: the weight is quantised per output channel (fp32 scale = channel amax / 448), once per weight tensor
and cached on the module; each call's activation per token (row) by kernels.quantize_rows (one fused pass). The
16-bit weight is kept and never modified: outside the with-block the layer is the plain nn.Linear bit for bit.

How it composes:
- grouped LoRA (omg.lora.GroupedLora) hooks the Linear's output: the base GEMM runs in e4m3, the concepts'
  low-rank deltas are added on top in 16-bit from the layer's 16-bit input.
- merged LoRA (omg.lora.ConceptWeights) swaps a concept's merged tensor into the parameter: a new tensor is a new
  cache entry, quantised at its first use (each concept's merged set once per generate call; the entries other
  than the base weights' are dropped when the with-block ends).
- style LoRAs merged in place (omg.style) bump the weight's version counter: the styled weight is quantised anew.
- CUDA graphs: entering quantises every base weight, and omg.graphs.GraphedCall runs each call eagerly before it
  records it, so a graph records no quantisation of a weight; one that would (inside a capture) raises instead of
  recording a quantisation that would read the weight only at replay. The forward makes no host sync.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from kernels.fp8 import MULTIPLE


class Linear(nn.Linear):
    """nn.Linear that runs as an e4m3 GEMM while `fp8` is set (by fp8_linears); else exactly nn.Linear."""

    fp8 = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.fp8:
            return F.linear(x, self.weight, self.bias)
        w_q, w_scale = quantised_weight(self)
        return kernels.fp8_linear(x, w_q, w_scale, self.bias)


def eligible(m: nn.Module) -> bool:
    """An omg Linear whose matmul _scaled_mm can run (in and out features multiples of 16)."""
    return isinstance(m, Linear) and m.in_features % MULTIPLE == 0 and m.out_features % MULTIPLE == 0


def fp8_layers(root: nn.Module) -> dict[str, Linear]:
    """The layers fp8_linears switches, by module path."""
    return {name: m for name, m in root.named_modules() if eligible(m)}


def _key(w: Tensor) -> tuple:
    # the storage (data pointer) and its in-place writes (version): a swapped-in tensor or an in-place merge is a
    # new key; the entry holds the tensor, so its address cannot be reused by another while it is cached
    return w.data_ptr(), w._version, w.dtype, w.device


def quantised_weight(m: Linear) -> tuple[Tensor, Tensor]:
    """(w_q (N, K) e4m3, scale (1, N) fp32) of m's current weight, quantised at its first use and cached on m."""
    w = m.weight
    cache = m.__dict__.setdefault("_fp8_cache", {})
    key = _key(w)
    entry = cache.get(key)
    if entry is None:
        if w.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"fp8: the weight of a {m.in_features}x{m.out_features} Linear would be quantised "
                               "inside a CUDA graph capture (run the call eagerly once first)")
        entry = cache[key] = (w.detach(), *kernels.quantize_weight(w))
    return entry[1], entry[2]


def _keep_current(m: Linear) -> None:
    """Drop every cached quantisation but that of m's current weight (a base model's stays for later calls)."""
    cache = m.__dict__.get("_fp8_cache", {})
    key = _key(m.weight)
    for k in [k for k in cache if k != key]:
        del cache[k]


@contextmanager
def fp8_linears(root: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """root with its eligible Linear layers in e4m3 for the with-block (enabled=False: unchanged)."""
    if not enabled:
        yield root
        return
    layers = list(fp8_layers(root).values())
    before = [m.fp8 for m in layers]
    with torch.no_grad():
        for m in layers:  # before any CUDA graph records a call
            _keep_current(m)
            quantised_weight(m)
    for m in layers:
        m.fp8 = True
    try:
        yield root
    finally:
        for m, was in zip(layers, before):
            if was:
                m.fp8 = True
            else:
                m.__dict__.pop("fp8", None)  # back to the class default
                _keep_current(m)
