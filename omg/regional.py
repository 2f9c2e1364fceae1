"""Regional sampling: the baseline that OMG is compared against (Mix-of-Show's regionally controllable
sampling, Gu et al. 2023, sec. 3.3), on one model with every concept's LoRA merged at once.

    images = regional_sample(model, "a ball and a box on a green background", concepts, masks,
                             seeds=range(16), negative_prompt="blurry")   # masks [16, k, h, w]

What it does
- One model: every concept's LoRA (UNet and text-encoder parts) merged into the base at once, each at its
  concept's lora_scale, as W + sum_i s_i dW_i (the quality bench's "simultaneous" model). The model is
  restored bit for bit when the call returns or raises.
- One sampling run from noise (omg.sampling's samplers, CPU-seeded noise, one generator per image: image b
  of a batch is the single image of seeds[b]), classifier-free guidance as omg.txt2img does it.
- Every cross-attention (attn2) layer, in the conditional rows, mixes attention over k + 1 contexts:

      out = (1 - sum_i m_i) * Attn(q, K_g, V_g) + sum_i m_i * Attn(q, K_i, V_i)

  with K_g, V_g from the global prompt, K_i, V_i from concept i's prompt (encoded by the merged text encoder)
  and m_i concept i's mask at the layer's grid. Softmax runs over each query's keys, so with binary masks this
  is "the queries inside region i attend to prompt i, the others to the global prompt". The mix is taken
  before the output projection (to_out is affine and the weights sum to 1, so it is the same as mixing
  after it). The unconditional rows attend to the negative (or empty) prompt everywhere; self-attention is
  untouched. SDXL's pooled-text and size vector y is the global prompt's.
- Masks come from the caller ([k, h, w] or per image [n, k, h, w], latent size, in [0, 1], disjoint: at most
  1 summed over concepts): the quality bench passes OMG's own stage-1 masks, so both methods use the same
  regions. A layer knows its grid only through its token count; level l's grid is (ceil(h / 2^l),
  ceil(w / 2^l)), as the UNet's stride-2 convolutions round up. Masks are resized to each grid by area
  averaging (F.interpolate mode="area", i.e. adaptive average pooling): a coarse cell's weight is the share
  of it that the region covers, so borders are soft at coarse layers, the weights of a cell still sum to at
  most 1, and a full (empty) mask stays exactly 1 (0). Mix-of-Show's code instead rounds box edges inward
  per layer (a hard box).

What Mix-of-Show does that this does not
- Region-aware negative prompts: its unconditional rows inside region i attend to region i's negative
  prompt; here they attend to the global negative prompt everywhere (Concept.negative_prompt is ignored).
- Gradient fusion of the ED-LoRAs into one model, and ED-LoRA's layer-wise token embeddings: here the
  concepts' ordinary LoRA deltas are added at their scales (the same merge as the bench's simultaneous model).
- Any global/regional weighting inside a region: its code replaces the features inside a region entirely
  (replace_ratio = 1), as here; a global-then-local blend or schedule is not implemented.
- Overlapping regions (its code averages the regional outputs where boxes overlap) and box inputs: masks
  must be disjoint here.
- Spatial conditions (its T2I-Adapter keypose/sketch inputs with per-region weights).

Cost: each attn2 layer runs one more attention per concept over the conditional rows (skipped at a grid
where that concept's mask is empty in every image of the batch); the concept prompts' keys and values are
projected once per layer and call. Memory: the merged model costs the touched tensors' backups (merged_lora).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor

from omg.errors import SamplingError
from omg.lora import LoraFile, load_lora, merged_lora, text_encoder_lora
from omg.sampling import SAMPLERS, NoiseSchedule, StepInfo, guided_eps, randn_cpu, run_sampler, unet_eps_fn
from omg.unet import Attention, UNet

if TYPE_CHECKING:
    from omg.pipeline import Concept

MASK_SUM_TOLERANCE = 1e-4  # disjoint masks may still sum a little over 1 after a resize or a dtype cast


def layer_grids(latent_hw: tuple[int, int], levels: int) -> dict[int, tuple[int, int]]:
    """{token count: (h, w)} of every UNet level: level l is (ceil(h / 2^l), ceil(w / 2^l)).

    Two levels with the same token count have the same grid (both sides shrink monotonically), so the token
    count identifies the grid.
    """
    h, w = latent_hw
    grids: dict[int, tuple[int, int]] = {}
    for level in range(levels):
        hl, wl = -(-h // 2 ** level), -(-w // 2 ** level)  # ceil, in integers
        grids.setdefault(hl * wl, (hl, wl))
    return grids


class _Grid:
    """One layer grid's mask weights, laid out to broadcast over attention outputs (n, heads, tokens, d)."""

    def __init__(self, masks: Tensor, hw: tuple[int, int], dtype: torch.dtype):
        n, k = masks.shape[:2]
        resized = F.interpolate(masks, size=hw, mode="area") if tuple(masks.shape[2:]) != hw else masks
        weights = resized.reshape(n, k, 1, hw[0] * hw[1], 1)
        self.weights = weights.to(dtype)  # (n, k, 1, N, 1)
        self.background = (1 - weights.sum(1)).clamp_min(0).to(dtype)  # (n, 1, N, 1)
        # concepts with some weight somewhere in the batch: one host read per grid and call, none per layer
        present = weights.reshape(n, k, -1).gt(0).any(-1).any(0).tolist()
        self.active = [i for i in range(k) if present[i]]


class RegionalCrossAttention:
    """attn2 processor (omg.unet's processor(layer, x, context) contract) for regional prompts.

    contexts: each concept's prompt embedding (1, T_i, context_dim); token counts may differ from the global
    prompt's and from each other. masks: (n, k, h, w) at latent size, one row per image of the batch. The
    UNet's context is the global [uncond; cond] conditioning: its batch is n (no CFG) or 2n, and the last n
    rows are the conditional ones (omg.sampling.guided_eps's order). Keys and values of the concept prompts
    are cached per layer, so use one instance for one sampling call (the weights must not change under it).
    """

    def __init__(self, contexts: Sequence[Tensor], masks: Tensor, levels: int,
                 dtype: Optional[torch.dtype] = None):
        if masks.ndim != 4 or masks.shape[1] != len(contexts):
            raise SamplingError(f"masks must be (n, {len(contexts)}, h, w) for {len(contexts)} contexts, "
                                f"got {tuple(masks.shape)}")
        dtype = dtype or (contexts[0].dtype if contexts else masks.dtype)
        self.contexts = [c.to(device=masks.device, dtype=dtype) for c in contexts]
        self.batch = masks.shape[0]
        self.latent_hw = tuple(masks.shape[2:])
        masks = masks.float()
        self.grids = {tokens: _Grid(masks, hw, dtype)
                      for tokens, hw in layer_grids(self.latent_hw, levels).items()}
        self._kv: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}

    @contextmanager
    def installed(self, unet: UNet) -> Iterator["RegionalCrossAttention"]:
        """This processor on every attn2 layer of unet for the with-block; the previous ones back on exit."""
        layers = unet.attention_layers("cross")
        previous = {path: layer.processor for path, layer in layers.items()}
        unet.set_attention_processor(self, kind="cross")
        try:
            yield self
        finally:
            for path, layer in layers.items():
                layer.processor = previous[path]

    def _keys_values(self, layer: Attention, i: int) -> tuple[Tensor, Tensor]:
        key = (layer.path, i)
        if key not in self._kv:
            split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=layer.heads)  # noqa: E731
            context = self.contexts[i]
            self._kv[key] = split(layer.to_k(context)), split(layer.to_v(context))
        return self._kv[key]

    def __call__(self, layer: Attention, x: Tensor, context: Optional[Tensor]) -> Tensor:
        if context is None:
            raise SamplingError(f"{layer.path}: the regional processor is for cross-attention layers only")
        grid = self.grids.get(x.shape[1])
        if grid is None:
            raise SamplingError(f"{layer.path}: {x.shape[1]} tokens match no layer grid of the "
                                f"{self.latent_hw[0]}x{self.latent_hw[1]} latent ({sorted(self.grids)})")
        q, k, v = layer.qkv(x, context)
        attended = F.scaled_dot_product_attention(q, k, v)  # every row over the global context
        if not grid.active:
            return layer.out(attended)
        n = self.batch
        if x.shape[0] not in (n, 2 * n):
            raise SamplingError(f"{layer.path}: batch {x.shape[0]} for masks of {n} images (need {n} or {2 * n})")
        q_cond = q[-n:]
        mixed = attended[-n:] * grid.background
        for i in grid.active:
            k_i, v_i = self._keys_values(layer, i)
            regional = F.scaled_dot_product_attention(q_cond, k_i.expand(n, -1, -1, -1), v_i.expand(n, -1, -1, -1))
            mixed = mixed + grid.weights[:, i] * regional
        if x.shape[0] > n:
            mixed = torch.cat([attended[:-n], mixed])
        return layer.out(mixed)


# ---------------------------------------------------------------------------------------------- sampling

def _check_inputs(model: Any, prompt: str, negative_prompt: Optional[str], concepts: Sequence[Any],
                  masks: Any, seeds: list[int], height: Optional[int], width: Optional[int],
                  sampler: Any) -> tuple[Tensor, int, int]:
    """The masks as (n, k, h, w) float on the UNet's device, and the image size; SamplingError otherwise."""
    for name in ("unet", "text"):
        if getattr(model, name, None) is None:
            raise SamplingError(f"the model has no {name}; load a checkpoint that holds it")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SamplingError(f"prompt must be a non-empty string, got {prompt!r}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise SamplingError(f"negative_prompt must be a string or None, got {negative_prompt!r}")
    for i, c in enumerate(concepts):
        if not all(hasattr(c, a) for a in ("prompt", "lora", "lora_scale")):
            raise SamplingError(f"concept {i} must be an omg.Concept, got {type(c).__name__}")
        if not isinstance(c.prompt, str) or not c.prompt.strip():
            raise SamplingError(f"concept {i}'s prompt must be a non-empty string, got {c.prompt!r}")
    if isinstance(sampler, str) and sampler not in SAMPLERS:
        raise SamplingError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise SamplingError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    masks = torch.as_tensor(masks)
    if masks.ndim == 3:
        masks = masks[None]
    k = len(concepts)
    if masks.ndim != 4 or masks.shape[1] != k or masks.shape[0] not in (1, len(seeds)):
        raise SamplingError(f"masks must be [{k}, h, w] or [{len(seeds)}, {k}, h, w] for {k} concepts and "
                            f"{len(seeds)} seeds, got {list(masks.shape)}")
    masks = masks.float().expand(len(seeds), -1, -1, -1)
    if not bool(torch.isfinite(masks).all()) or masks.min() < 0 or masks.max() > 1:
        raise SamplingError("masks must hold values in [0, 1]")
    if k and masks.sum(1).max() > 1 + MASK_SUM_TOLERANCE:
        raise SamplingError(f"masks overlap: they sum to {float(masks.sum(1).max()):.3f} at some latent pixel "
                            f"(regions must be disjoint)")
    downscale = model.vae.config.downscale if getattr(model, "vae", None) is not None else 8
    size = (masks.shape[2] * downscale, masks.shape[3] * downscale)
    if (height is not None and height != size[0]) or (width is not None and width != size[1]):
        raise SamplingError(f"{height}x{width} does not fit latent masks of {masks.shape[2]}x{masks.shape[3]} "
                            f"(the image is {size[0]}x{size[1]})")
    return masks.to(model.device), size[0], size[1]


@contextmanager
def all_loras_merged(model: Any, concepts: Sequence[Any]) -> Iterator[Any]:
    """model with every concept's LoRA merged at its lora_scale into the UNet and the text encoders at once;
    restored exactly on exit, also after an error. A LoRA that does not fit raises before anything is merged
    into that component."""
    specs = [(c.lora if isinstance(c.lora, LoraFile) else load_lora(c.lora), float(c.lora_scale))
             for c in concepts if c.lora is not None]
    with ExitStack() as stack:
        if specs:
            stack.enter_context(merged_lora(model.unet, specs))
            stack.enter_context(text_encoder_lora(model.text, specs))
        yield model


@torch.no_grad()
def regional_sample_latents(model: Any, prompt: str, concepts: Sequence["Concept"], masks: Tensor, *,
                            negative_prompt: Optional[str] = None, steps: int = 50, guidance: float = 7.5,
                            guidance_rescale: float = 0.0, seed: int = 0, seeds: Optional[Sequence[int]] = None,
                            height: Optional[int] = None, width: Optional[int] = None, sampler: str = "ddim",
                            spacing: str = "leading", sampler_options: Optional[dict] = None,
                            schedule: Optional[NoiseSchedule] = None,
                            callback: Optional[Callable[[StepInfo], None]] = None,
                            progress: bool = True) -> Tensor:
    """Final VP latents (n, 4, h, w) in fp32 of regional sampling; see `regional_sample`."""
    if seeds is not None and seed != 0:
        raise SamplingError("give seed (one image) or seeds (a batch), not both")
    seeds = [seed] if seeds is None else [int(s) for s in seeds]
    concepts = list(concepts)
    masks, height, width = _check_inputs(model, prompt, negative_prompt, concepts, masks, seeds, height, width,
                                         sampler)
    n, unet = len(seeds), model.unet
    schedule = schedule if schedule is not None else NoiseSchedule.sdxl()
    sigmas = schedule.sampling_sigmas(steps, spacing, to_zero=sampler != "ddim")
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    noise = randn_cpu((n, unet.config.in_channels, *masks.shape[2:]), generators, device=masks.device)

    with all_loras_merged(model, concepts):
        negatives = None if negative_prompt is None else [negative_prompt]
        context, y = model.conditioning([prompt], negatives, height, width)  # [uncond; cond] of one image
        # each concept prompt at its own token count: it is attended to on its own, never batched with another
        contexts = [model.text.encode([c.prompt])[0] for c in concepts]
        # one encoding for the whole batch: rows [uncond x n; cond x n]
        context = torch.cat([context[:1].expand(n, -1, -1), context[1:].expand(n, -1, -1)])
        y = torch.cat([y[:1].expand(n, -1), y[1:].expand(n, -1)])
        processor = RegionalCrossAttention(contexts, masks, len(unet.config.channel_mult),
                                           dtype=next(unet.parameters()).dtype)
        eps_fn = guided_eps(unet_eps_fn(unet, context, y), guidance, guidance_rescale)
        with processor.installed(unet):
            return run_sampler(eps_fn, noise, sigmas, sampler, schedule=schedule, callback=callback,
                               disable=not progress, generator=generators, **(sampler_options or {}))


def regional_sample(model: Any, prompt: str, concepts: Sequence["Concept"], masks: Tensor, *,
                    negative_prompt: Optional[str] = None, steps: int = 50, guidance: float = 7.5,
                    guidance_rescale: float = 0.0, seed: int = 0, seeds: Optional[Sequence[int]] = None,
                    height: Optional[int] = None, width: Optional[int] = None, sampler: str = "ddim",
                    spacing: str = "leading", sampler_options: Optional[dict] = None,
                    schedule: Optional[NoiseSchedule] = None, callback: Optional[Callable[[StepInfo], None]] = None,
                    progress: bool = True) -> list[Image.Image]:
    """Regional sampling (Mix-of-Show sec. 3.3) on the model with all concept LoRAs merged: one PIL image per seed.

    prompt: the global prompt, attended to outside every region. concepts: omg.Concept list (prompt, lora,
    lora_scale; class_name and negative_prompt are not used). masks: latent-size regions in [0, 1], disjoint,
    [k, h, w] for every image or [n, k, h, w] per image (n = len(seeds)); the image size follows from them
    (height and width, when given, must agree). seed: one image; seeds: a batch, image b drawn from seeds[b]
    exactly as a single call with seed=seeds[b] would (up to float rounding of batched kernels).
    negative_prompt None gives zero uncond embeddings (as omg.sample); it is used everywhere in the image.
    The other arguments are omg.sample's. The module docstring says what is and is not Mix-of-Show's.
    """
    if getattr(model, "vae", None) is None:
        raise SamplingError("the model has no vae to decode with; use regional_sample_latents")
    latents = regional_sample_latents(model, prompt, concepts, masks, negative_prompt=negative_prompt, steps=steps,
                                      guidance=guidance, guidance_rescale=guidance_rescale, seed=seed, seeds=seeds,
                                      height=height, width=width, sampler=sampler, spacing=spacing,
                                      sampler_options=sampler_options, schedule=schedule, callback=callback,
                                      progress=progress)
    return model.decode(latents)
