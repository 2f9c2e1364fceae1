"""Cross-attention capture and replay for the OMG sampler (attention processors for omg.unet).

Stage 1 samples the global prompt with the base model. Stage 2 must run the base model on its own
(blended) latent while its conditional cross-attention maps are the ones stage 1 had at the same step
(prompt-to-prompt "replace"). Because the global prompt is the same in both stages, K and V of every
attn2 layer are the same too, so the replayed output  A_stage1 · V  *is* stage 1's attn2 output. That
gives three interchangeable ways to replay:

- ``store="outputs"``: keep stage 1's attn2 outputs (conditional rows) for the replay steps and return
  them in stage 2. They are kept in one preallocated buffer per layer, a slot per replayed call, written and
  read at a slot index held on the device: the processors then make the same Python decisions at every call,
  so stage 1 and stage 2 still run as CUDA graphs (omg.graphs) while each call reaches its own slot.
- ``store="maps"``: keep the probability maps A (all heads) and compute A · V in stage 2 (what the paper
  describes; needed when the replay prompt differs, and the oracle for the outputs store).
- ``store="recompute"``: keep nothing but the stage-1 latents; stage 2 re-runs the stage-1 conditional
  rows in the same batch and copies their attention into the target rows as it goes (the original
  code's in-batch source/target copy, without its duplicated unconditional half).

The same controller also accumulates, over the capture steps, the head-averaged cross-attention maps
of chosen prompt tokens (the class nouns), from which the concept masks are made.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import kernels
from omg.errors import OptionError, SamplingError
from omg.unet import Attention, UNet, UNetConfig

STORES = ("outputs", "maps", "recompute")
STORE_CHOICES = ("auto",) + STORES  # generate's option: "auto" picks one of STORES (choose_store)
SELF_REPLAY_LAYERS = ("original", "all")


def original_self_replay_queries(height: int, width: int) -> int:
    """The most queries a self-attention layer may have for the original OMG code to replace it:
    (width // 32) * (height // 32) of the image size (kongzhecn/OMG inference_lora.py passes width // 32 and
    height // 32 to p2p_attention.AttentionReplace, which replaces layers with at most their product of
    queries): at 1024x1024 the 32x32 level and the middle block, not the 64x64 level."""
    return (height // 32) * (width // 32)


def attention_probs(q: Tensor, k: Tensor) -> Tensor:
    """softmax(q kᵀ / √d) in fp32: (B, h, N, d) x (B, h, T, d) -> (B, h, N, T)."""
    scores = torch.einsum("bhnd,bhtd->bhnt", q.float(), k.float()) * (q.shape[-1] ** -0.5)
    return scores.softmax(dim=-1)


@dataclass
class TokenHeatmaps:
    """Running sums of head-averaged attn2 maps for selected tokens, one sum per token resolution."""
    token_indices: list[int]
    latent_hw: tuple[int, int]
    sums: dict[int, Tensor] = field(default_factory=dict)  # tokens-per-map N -> (rows, N, n_tok) float32
    counts: dict[int, int] = field(default_factory=dict)
    _tokens: Optional[Tensor] = field(default=None, repr=False)

    def tokens(self, device: torch.device) -> Tensor:
        """The token columns, int32 on `device` (made once: no copy per layer)."""
        if self._tokens is None or self._tokens.device != device:
            self._tokens = torch.tensor(self.token_indices, dtype=torch.int32, device=device)
        return self._tokens

    def accumulator(self, n: int, rows: int, device: torch.device) -> Tensor:
        """The running sum (rows, N, n_tok) that one more layer's head-averaged maps are added to."""
        acc = self.sums.get(n)
        if acc is None:
            acc = self.sums[n] = torch.zeros(rows, n, len(self.token_indices), device=device)
        self.counts[n] = self.counts.get(n, 0) + 1
        return acc

    def add_counts(self, delta: dict[int, int]) -> None:
        """Count more layers without running them (omg.graphs: a replayed graph adds to the sums on the GPU)."""
        for n, d in delta.items():
            self.counts[n] = self.counts.get(n, 0) + d

    def reset(self, token_indices: Sequence[int]) -> None:
        """Empty again, for another run with as many tokens (omg.graphs.KeptGraphs): the sums zeroed and the token
        columns set in place, as a kept CUDA graph adds into those very tensors."""
        if len(token_indices) != len(self.token_indices):
            raise SamplingError(f"heat maps of {len(self.token_indices)} tokens cannot be reset to "
                                f"{len(token_indices)}")
        self.token_indices = list(token_indices)
        for acc in self.sums.values():
            acc.zero_()
        self.counts = {}
        if self._tokens is not None:
            self._tokens.copy_(torch.tensor(self.token_indices, dtype=torch.int32))

    def add(self, probs: Tensor) -> None:
        """probs (B, heads, N, T) of the conditional rows."""
        acc = self.accumulator(probs.shape[2], probs.shape[0], probs.device)
        acc += probs[..., self.token_indices].float().mean(dim=1)

    def result(self, row: Optional[int] = None) -> Tensor:
        """Average over layers, heads and steps at latent resolution: (n_tok, H, W), each map sums to 1.

        row: the captured conditional row (an image of the batch) to average; None averages all rows.
        """
        if not self.sums:
            raise SamplingError("no cross-attention was captured: run a UNet call in capture mode first")
        grids = level_grids(self.latent_hw)
        total = 0
        for n, s in self.sums.items():
            assert n in grids, f"{n} query tokens are no UNet level of the latent {self.latent_hw}"
            h, w = grids[n]
            rows = s.mean(dim=0) if row is None else s[row]
            maps = rows.T.reshape(len(self.token_indices), h, w) / self.counts[n]
            total = total + F.interpolate(maps[None], size=self.latent_hw, mode="bilinear", align_corners=False)[0]
        return total / total.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def level_grids(latent_hw: tuple[int, int]) -> dict[int, tuple[int, int]]:
    """Token count -> (h, w) of every UNet level for a latent size: each level halves the one above, rounding up
    (a stride-2 convolution with padding 1), so the grids are distinct in size down to 1x1."""
    h, w = latent_hw
    grids = {h * w: (h, w)}
    while (h, w) != (1, 1):
        h, w = -(-h // 2), -(-w // 2)
        grids[h * w] = (h, w)
    return grids


def outputs_store_bytes(config: UNetConfig, latent_hw: tuple[int, int], images: int, replay_calls: int,
                        dtype: torch.dtype) -> int:
    """Bytes of store="outputs" for a run: every cross-attention layer's output (queries x channels) for the
    conditional row of each image, in a slot per replayed call plus the slot the other calls write to."""
    tokens = list(level_grids(latent_hw))  # queries per UNet level, level 0 first
    width = lambda level: config.model_channels * config.channel_mult[level]  # noqa: E731
    per_row = sum((2 * config.num_res_blocks + 1) * depth * tokens[level] * width(level)
                  for level, depth in enumerate(config.transformer_depth) if depth)
    last = len(config.channel_mult) - 1
    per_row += config.transformer_depth_middle * tokens[last] * width(last)
    return per_row * images * (replay_calls + 1) * dtype.itemsize


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes the device can still allocate (None: unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def choose_store(store: str, store_bytes: int, device: torch.device, reclaimable: int = 0) -> str:
    """The store a run uses: `store`, or for "auto" "outputs" (a stage-2 base pass of 2 rows a image, no attention
    recomputed) when its `store_bytes` take at most half of what the device can still allocate plus `reclaimable`
    (a kept store the run would reuse or free; the other half is for sampling), else "recompute" (nothing kept;
    3 rows a image)."""
    if store != "auto":
        return store
    free = free_memory(device)
    return "outputs" if free is not None and 2 * store_bytes <= free + reclaimable else "recompute"


@dataclass(frozen=True)
class RowLayout:
    """Which rows of a base-model UNet call play which role, for a batch of `images` latents under CFG.

        without the source rows:  [uncond x images | cond x images]
        with the source rows:     [uncond x images | stage-1 cond (source) x images | cond x images]

    ``cond`` rows are the global prompt's conditional rows: captured in stage 1, replayed in stage 2. The
    source rows (store="recompute") carry stage 1's latents through stage 2's base pass, and their attention is
    copied into the cond rows. A call may have more rows after these (the concept passes of a grouped call):
    the processors leave them alone.
    """
    images: int = 1
    with_source: bool = False

    @property
    def rows(self) -> int:
        return (3 if self.with_source else 2) * self.images

    @property
    def uncond(self) -> slice:
        return slice(0, self.images)

    @property
    def source(self) -> Optional[slice]:
        return slice(self.images, 2 * self.images) if self.with_source else None

    @property
    def cond(self) -> slice:
        return slice(self.rows - self.images, self.rows)


MODES = ("plain", "capture", "replay")


@dataclass(frozen=True)
class AttentionCall:
    """What the processors do during one UNet call: `mode` at model-call `index` over the rows of `rows`."""
    mode: str = "plain"
    index: int = -1  # the sampler's model-call index (stores are keyed by it)
    rows: RowLayout = RowLayout()


class AttentionControl:
    """Attention processor for every attention layer of a UNet: plain, capture, or replay.

    Before each UNet call the sampler says what the call is, in one call: ``set_call("capture", index, rows)``
    (stage 1), ``set_call("replay", index, rows)`` (stage 2's base pass) or ``set_call("plain")``. `index` is
    the sampler's model-call index; ``replay_calls`` are the calls whose cross-attention stage 2 replays
    (stored in stage 1 when the store keeps anything) and ``self_replay_calls`` those whose self-attention
    queries and keys it replays as well.
    """

    def __init__(self, unet: UNet, store: str = "outputs", replay_calls: Sequence[int] = (),
                 store_dtype: torch.dtype = torch.bfloat16,
                 self_replay_calls: Sequence[int] = (), heatmap_tokens: Sequence[int] = (),
                 latent_hw: Optional[tuple[int, int]] = None, map_format: Optional[str] = None,
                 self_replay_max_queries: Optional[int] = None):
        if store not in STORES:
            raise OptionError(f"store must be one of {STORES}, not {store!r}")
        if map_format is not None and map_format not in kernels.MAP_FORMATS:
            raise OptionError(f"map_format must be one of {kernels.MAP_FORMATS} or None, not {map_format!r}")
        self._unet = weakref.ref(unet)  # a kept controller (omg.graphs.KeptGraphs) must not keep its UNet alive
        self.map_format = map_format  # store="maps": None keeps probabilities in store_dtype, else kernels' format
        self.store = store
        self.replay_calls = frozenset(replay_calls)
        self.self_replay_calls = frozenset(self_replay_calls)
        # self-attention is replayed only in layers with at most this many queries (None: in every layer)
        self.self_replay_max_queries = self_replay_max_queries
        self.store_dtype = store_dtype
        self._call = AttentionCall()
        self.saved: dict[tuple[int, str], object] = {}  # store="maps" and self-attention replay, by (call, layer)
        # store="outputs": layer path -> (slots, cond rows, queries, channels); the replayed calls' slots, then one
        # that the other calls write to; self._slot (on the device) is the current call's slot
        self.outputs: dict[str, Tensor] = {}
        self._slots = {index: i for i, index in enumerate(sorted(self.replay_calls))}
        self._slot: Optional[Tensor] = None
        self.heatmaps = (TokenHeatmaps(list(heatmap_tokens), latent_hw)
                         if heatmap_tokens and latent_hw else None)

    @property
    def unet(self) -> UNet:
        return self._unet()

    @property
    def call(self) -> AttentionCall:
        return self._call

    def set_call(self, mode: str, index: int = -1, rows: RowLayout = RowLayout()) -> None:
        """Say what the next UNet calls are: `mode` ("plain", "capture", "replay") at model call `index`."""
        if mode not in MODES:
            raise OptionError(f"attention mode must be one of {MODES}, not {mode!r}")
        self._call = AttentionCall(mode, index, rows)
        if self._slot is not None:
            self._slot.fill_(self._slot_of(index))  # a kernel on the stream, before the call that reads it

    def _slot_of(self, index: int) -> int:
        return self._slots.get(index, len(self._slots))

    def _slot_on(self, device: torch.device) -> Tensor:
        if self._slot is None:
            self._slot = torch.full((1,), self._slot_of(self._call.index), dtype=torch.long, device=device)
        return self._slot

    def reset(self, heatmap_tokens: Sequence[int] = ()) -> None:
        """Ready for another run of the same configuration (a kept CUDA graph reads and writes this controller's
        tensors: omg.graphs.KeptGraphs): the heat sums zeroed in place and their token columns set; the outputs
        store's buffers and slot kept (every replayed call overwrites its slot in stage 1)."""
        self._call = AttentionCall()
        self.saved.clear()
        if self.heatmaps is not None:
            self.heatmaps.reset(heatmap_tokens)

    # -- installation ---------------------------------------------------------------------------
    def __enter__(self) -> "AttentionControl":
        self.unet.set_attention_processor(self)
        return self

    def __exit__(self, *exc) -> None:
        self.unet.set_attention_processor(None)

    def stored_bytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.outputs.values())
        for value in self.saved.values():
            for t in value if isinstance(value, tuple) else (value,):
                total += t.numel() * t.element_size()
        return total

    # -- the processor --------------------------------------------------------------------------
    def __call__(self, layer: Attention, x: Tensor, context: Optional[Tensor]) -> Tensor:
        if self._call.mode == "capture":
            return self._capture(layer, x, context)
        if self._call.mode == "replay":
            return self._replay(layer, x, context)
        return layer.out(F.scaled_dot_product_attention(*layer.qkv(x, context)))

    def _replays_self(self, x: Tensor) -> bool:
        """Whether this call replays the self-attention of a layer whose input x is (B, queries, C)."""
        return self._call.index in self.self_replay_calls and (
            self.self_replay_max_queries is None or x.shape[1] <= self.self_replay_max_queries)

    def _keep(self, t: Tensor) -> Tensor:
        return t.to(dtype=self.store_dtype)

    def _capture(self, layer: Attention, x: Tensor, context: Optional[Tensor]) -> Tensor:
        q, k, v = layer.qkv(x, context)
        call = self._call
        rows, key = call.rows.cond, (call.index, layer.path)
        if not layer.is_cross:
            if self._replays_self(x) and self.store != "recompute":
                self.saved[key] = (self._keep(q[rows]), self._keep(k[rows]))
            return layer.out(F.scaled_dot_product_attention(q, k, v))
        keep_maps = self.store == "maps" and call.index in self.replay_calls
        attended = F.scaled_dot_product_attention(q, k, v)  # SDPA's output: capturing changes nothing
        if keep_maps and self.map_format is None:  # probabilities in store_dtype
            probs = attention_probs(q[rows], k[rows])
            if self.heatmaps is not None:
                self.heatmaps.add(probs)
            self.saved[key] = self._keep(probs)
        elif keep_maps or self.heatmaps is not None:  # one kernel pass over the rows (the reference off CUDA)
            tokens = heat = None
            if self.heatmaps is not None:
                tokens = self.heatmaps.tokens(q.device)
                heat = self.heatmaps.accumulator(q.shape[2], len(range(q.shape[0])[rows]), q.device)
            captured = kernels.capture_maps(q, k, rows, self.map_format if keep_maps else None, tokens, heat)
            if keep_maps:
                self.saved[key] = captured.maps
        out = layer.out(attended)
        if self.store == "outputs" and self._slots:  # every call writes (the others to the spare slot): no branch
            kept = out[rows]
            buffer = self.outputs.get(layer.path)
            if buffer is None:
                buffer = self.outputs[layer.path] = kept.new_zeros((len(self._slots) + 1, *kept.shape),
                                                                   dtype=self.store_dtype)
            buffer.index_copy_(0, self._slot_on(kept.device), kept.unsqueeze(0).to(buffer.dtype))
        return out

    def _replay(self, layer: Attention, x: Tensor, context: Optional[Tensor]) -> Tensor:
        call = self._call
        rows, key = call.rows.cond, (call.index, layer.path)
        if not layer.is_cross:
            if not self._replays_self(x):
                return layer.out(F.scaled_dot_product_attention(*layer.qkv(x, context)))
            q, k, v = layer.qkv(x, context)
            q_ref, k_ref = self._reference_qk(q, k, key)
            q, k = q.clone(), k.clone()
            q[rows], k[rows] = q_ref.to(q.dtype), k_ref.to(k.dtype)
            return layer.out(F.scaled_dot_product_attention(q, k, v))
        if call.index not in self.replay_calls:
            return layer.out(F.scaled_dot_product_attention(*layer.qkv(x, context)))
        # every row is computed as in stage 1 (same batch, same kernels), then the conditional rows are
        # overwritten: with nothing blended, stage 2 reproduces stage 1 bit for bit
        q, k, v = layer.qkv(x, context)
        attended = F.scaled_dot_product_attention(q, k, v)
        if self.store == "maps":
            # A_stage1 · V(current context) replaces the conditional rows before the output projection, which
            # then runs once over the whole batch: a row-grouped to_out (omg.lora.GroupedLora) needs every row
            if self.map_format is None:
                attended[rows] = torch.einsum("bhnt,bhtd->bhnd", self.saved[key].to(v.dtype), v[rows])
            else:  # a kernels map format (bf16 / log8)
                attended[rows] = kernels.replay_maps(self.saved[key].to(v.device), v[rows]).to(attended.dtype)
            return layer.out(attended)
        out = layer.out(attended)
        if self.store == "recompute":
            out[rows] = out[call.rows.source]
        elif self.store == "outputs":
            out[rows] = self.outputs[layer.path].index_select(0, self._slot_on(out.device))[0].to(out.dtype)
        return out

    def _reference_qk(self, q: Tensor, k: Tensor, key: tuple[int, str]) -> tuple[Tensor, Tensor]:
        if self.store == "recompute":
            return q[self._call.rows.source], k[self._call.rows.source]
        return self.saved[key]
