"""The two-stage OMG sampler: `omg.generate`.

Stage 1 samples the global prompt with the base model, capturing (for the blending steps) what replays
the conditional cross-attention, and the class tokens' attention heat maps. Masks come from those maps
(refined by SAM, or given by the user). Stage 2 resumes at the blend start: every UNet call runs the base
model with replayed cross-attention and each concept model with its own prompt, then blends the noise
predictions with the masks before guidance:

    eps = (1 - sum_i M_i) * eps_base + sum_i M_i * eps_i      (masks do not overlap: sum_i M_i <= 1)

Stage 2 re-enters the sampler from its first step but answers every call before the blend start with the
stage-1 noise prediction it recorded (no UNet work), so any sampler, multistep and ancestral ones included,
arrives at the blend start in exactly the stage-1 state and draws the same noise.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from PIL import Image
from torch import Tensor

import kernels
from omg.attention import SELF_REPLAY_LAYERS, STORES, AttentionControl, original_self_replay_queries
from omg.errors import SamplingError
from omg.graphs import GraphedCall, graphs_usable
from omg.lora import ConceptWeights, GroupedLora, LoraFile, bind, load_lora, text_encoder_lora
from omg.masks import ConceptMasks, SamRefiner, concept_token_indices, make_masks, prepare_user_masks
from omg.sampling import (SAMPLERS, EpsDenoiser, NoiseSchedule, apply_guidance, guided_eps, randn_cpu,
                          run_sampler, unet_eps_fn)
from omg.txt2img import latents_to_images, sdxl_conditioning

LORA_MODES = ("grouped", "merged")
DEFAULT_NEGATIVE = "noisy, blurry, soft, deformed, ugly"  # the original code's global negative prompt


@dataclass
class Concept:
    """One personalised concept: the class noun it replaces in the global prompt, its own prompt and model."""
    class_name: str
    prompt: str
    lora: Union[str, LoraFile, None] = None
    negative_prompt: Optional[str] = None  # None: the global negative prompt
    lora_scale: float = 0.8
    mask: Any = None  # a user mask (image or latent size) or box (x0, y0, x1, y1): overrides attention/SAM


@dataclass
class Result:
    image: Image.Image
    stage1_image: Image.Image
    masks: Tensor  # [k, H/8, W/8] in [0, 1]; zeros for concepts that were not found
    heatmaps: Tensor  # [k, H/8, W/8] class-token attention of stage 1, normalised
    concept_masks: ConceptMasks
    latent: Tensor  # final latent (VP, fp32)
    stage1_latent: Tensor
    blend_start_latent: Tensor
    timings: dict[str, float] = field(default_factory=dict)
    unet_evaluations: int = 0  # at batch 1: a CFG pass of one model counts 2
    store_bytes: int = 0
    stage2: Optional["BlendedEps"] = None  # kept on request (keep_stage2=True): it holds the store and weights


class _Timer:
    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    def lap(self, name: str, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[name] = now - start
        return now


def _validate(model: Any, prompt: str, concepts: Sequence[Concept], steps: int, blend_steps: int,
              height: int, width: int, sampler: str, store: str, lora_mode: str) -> None:
    for name in ("unet", "vae", "text"):
        if getattr(model, name, None) is None:
            raise SamplingError(f"the model has no {name}; load a full SDXL checkpoint")
    if model.vae.config.downscale != 8:
        raise SamplingError(f"the VAE downscales by {model.vae.config.downscale}; OMG's masks assume SDXL's 8")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SamplingError(f"prompt must be a non-empty string, got {prompt!r}")
    if steps < 1:
        raise SamplingError(f"steps must be at least 1, got {steps}")
    if not 0 <= blend_steps <= steps:
        raise SamplingError(f"blend_steps must be between 0 and steps ({steps}), got {blend_steps}")
    if height <= 0 or width <= 0 or height % 8 or width % 8:
        raise SamplingError(f"height and width must be positive multiples of 8, got {height}x{width}")
    if sampler not in SAMPLERS:
        raise SamplingError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if store not in STORES:
        raise SamplingError(f"store must be one of {STORES}, got {store!r}")
    if lora_mode not in LORA_MODES:
        raise SamplingError(f"lora_mode must be one of {LORA_MODES}, got {lora_mode!r}")
    for i, c in enumerate(concepts):
        if not isinstance(c, Concept):
            raise SamplingError(f"concept {i} must be an omg.Concept, got {type(c).__name__}")


def _load_loras(concepts: Sequence[Concept]) -> list[Optional[LoraFile]]:
    return [None if c.lora is None else c.lora if isinstance(c.lora, LoraFile) else load_lora(c.lora)
            for c in concepts]


def _concept_conditioning(model: Any, concept: Concept, lora: Optional[LoraFile], negative: Optional[str],
                          height: int, width: int) -> tuple[Tensor, Tensor]:
    """[uncond; cond] context and y of a concept, encoded with its text-encoder LoRA (if it has one)."""
    negative = concept.negative_prompt if concept.negative_prompt is not None else negative
    negatives = None if negative is None else [negative]
    if lora is None:
        return sdxl_conditioning(model, [concept.prompt], negatives, height, width)
    with text_encoder_lora(model.text, (lora, concept.lora_scale)):
        return sdxl_conditioning(model, [concept.prompt], negatives, height, width)


class Stage1Record:
    """What stage 1 leaves for stage 2: the replay store (inside `control`), the guided noise predictions of
    the calls before the blend start, and the stage-1 latents of the blending calls (recompute store)."""

    def __init__(self, control: AttentionControl):
        self.control = control
        self.eps_before_blend: list[Tensor] = []
        self.source_latents: dict[int, Tensor] = {}
        self.blend_call: Optional[int] = None  # index of the first UNet call of the blending steps


class BlendedEps:
    """Stage 2's guided noise prediction, eps_fn(x, t) of omg.sampling's contract.

    Drive it over the same sigmas and sampler as stage 1, from the first step: calls before the blend start
    are answered from the stage-1 record (no UNet work); from the blend start on, each call runs the base
    model with replayed cross-attention and each found concept with its own weights and prompt, and blends
    the unguided predictions with the masks before guidance. ``denoiser()`` wraps it for k-diffusion samplers:

        with blended.record.control:       # the replay processors on the UNet
            x = k_diffusion.sampling.sample_euler(blended.denoiser(), noise * sigmas[0], sigmas)

    Concept weights: ``grouped`` (a GroupedLora over the active concepts, in order) adds each concept's
    low-rank delta to its own rows of a call on the shared base weights, and when every prompt encodes to
    the same number of tokens the base pass and all concept passes are one UNet call; ``weights`` (merged
    ConceptWeights, indexed like concept_cond) swaps each concept's merged tensors in for its own call.
    """

    def __init__(self, unet: Any, record: Stage1Record, base_cond: tuple[Tensor, Tensor],
                 concept_cond: Sequence[tuple[Tensor, Tensor]], weights: Optional[Sequence[Optional[ConceptWeights]]],
                 masks: Tensor, active: Sequence[int], guidance: float, guidance_rescale: float = 0.0,
                 replay: bool = True, cuda_graphs: bool = False, grouped: Optional[GroupedLora] = None):
        self.unet, self.record = unet, record
        # one CUDA graph per role (base pass, each concept, or all in one), captured at its first call
        self.cuda_graphs, self.graphs, self.graph_pool = cuda_graphs, {}, None
        self.replay = replay  # False: the base pass runs plain attention (ablation: no layout preservation)
        self.base_cond, self.concept_cond = base_cond, list(concept_cond)
        self.weights = list(weights) if weights is not None else [None] * len(self.concept_cond)
        self.grouped = grouped
        self.masks, self.active = masks, list(active)
        if grouped is not None and grouped.count != len(self.active):
            raise ValueError(f"the grouped LoRA holds {grouped.count} concepts, {len(self.active)} are active")
        self.guidance, self.guidance_rescale = guidance, guidance_rescale
        self.dtype = next(unet.parameters()).dtype
        shapes = {(c.shape[1:], y.shape[1:]) for c, y in [base_cond] + [self.concept_cond[i] for i in self.active]}
        self.one_call = grouped is not None and len(shapes) == 1  # one UNet call per step
        self.conds: dict[str, tuple[Tensor, Tensor]] = {}
        self.calls = 0
        self.evaluations = 0

    def reset(self) -> None:
        self.calls = 0

    def denoiser(self, schedule: Optional[NoiseSchedule] = None) -> EpsDenoiser:
        """k-diffusion's model(x, sigma) -> denoised over this blended prediction."""
        return EpsDenoiser(self, schedule)

    def _forward(self, x: Tensor, t: Tensor, ctx: Tensor, y: Tensor, role: Any) -> Tensor:
        """One UNet call with the role's concept weights: "base", a concept index, or ("rows", first_row,
        members) for grouped LoRA rows."""
        if isinstance(role, tuple):
            with self.grouped.installed(role[1], role[2]):
                return self.unet(x, t, ctx, y)
        if role != "base" and self.weights[role] is not None:
            with self.weights[role].applied(self.unet):  # a captured graph keeps these tensors' pointers
                return self.unet(x, t, ctx, y)
        return self.unet(x, t, ctx, y)

    def _unet(self, x: Tensor, t: Tensor, ctx: Tensor, y: Tensor, role: Any) -> tuple[Tensor, ...]:
        self.evaluations += x.shape[0]
        x, t = x.to(self.dtype), t.expand(x.shape[0])
        if not self.cuda_graphs:
            return self._forward(x, t, ctx, y, role).float().chunk(x.shape[0])
        call = self.graphs.get(role)
        if call is None:
            if self.graph_pool is None:
                self.graph_pool = torch.cuda.graph_pool_handle()  # the roles run one after another: one pool
            call = self.graphs[role] = GraphedCall(lambda x_, t_: self._forward(x_, t_, ctx, y, role),
                                                   pool=self.graph_pool)
        return call(x, t.contiguous()).float().chunk(x.shape[0])

    def _cond(self, key: str, parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        if key not in self.conds:  # made once: a captured graph keeps its inputs' pointers
            self.conds[key] = torch.cat([c for c, _ in parts]), torch.cat([y for _, y in parts])
        return self.conds[key]

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        n, record, control = self.calls, self.record, self.record.control
        self.calls += 1
        if record.blend_call is None or n < record.blend_call:
            return record.eps_before_blend[n]
        t = t.reshape(-1)[:1]
        context, y = self.base_cond
        control.mode, control.step = ("replay" if self.replay else "plain"), n
        if self.replay and control.store == "recompute":  # rows [uncond, stage-1 cond (source), cond]
            control.cond_rows, control.source_rows = slice(2, 3), slice(1, 2)
            base_x, base_key = [x, record.source_latents[n], x], "recompute"
            base_cond = [(context, y), (context[1:], y[1:])]
        else:
            control.cond_rows = slice(1, 2)
            base_x, base_key, base_cond = [x, x], "base", [(context, y)]
        concept_cond = [self.concept_cond[i] for i in self.active]
        if self.one_call:
            out = self._unet(torch.cat(base_x + [x, x] * len(self.active)), t,
                             *self._cond(f"{base_key}+concepts", base_cond + concept_cond),
                             ("rows", len(base_x), range(len(self.active))))
            base, rest = out[:len(base_x)], out[len(base_x):]
            concept_eps = [rest[2 * j:2 * j + 2] for j in range(len(self.active))]
        else:
            base = self._unet(torch.cat(base_x), t, *self._cond(base_key, base_cond), "base")
            concept_eps = []
            control.mode = "plain"
            for j, (i, cond) in enumerate(zip(self.active, concept_cond)):
                role = ("rows", 0, range(j, j + 1)) if self.grouped is not None else i
                concept_eps.append(self._unet(torch.cat([x, x]), t, *cond, role))
        control.mode = "plain"
        base_u, base_c = base[0], base[-1]
        masks = self.masks[self.active]
        if self.guidance_rescale:  # the kernel blends; the rescale needs the blended halves
            eps_u, eps_c = kernels.blend_eps(base_u, base_c, concept_eps, masks)
            return apply_guidance(eps_u, eps_c, self.guidance, self.guidance_rescale)
        return kernels.blend_guided(base_u, base_c, concept_eps, masks, self.guidance)


def run_stage1(unet: Any, noise: Tensor, sigmas: Tensor, base_cond: tuple[Tensor, Tensor], control: AttentionControl,
               blend_start: int, guidance: float, guidance_rescale: float = 0.0, sampler: str = "ddim",
               self_replay_steps: int = 0, seed: int = 0, schedule: Optional[NoiseSchedule] = None,
               progress: bool = True, sampler_options: Optional[dict] = None,
               cuda_graphs: bool = False) -> tuple[Tensor, Tensor, Stage1Record, int]:
    """Sample the global prompt with the base model, capturing for steps >= blend_start.

    cuda_graphs: replay the UNet call as one CUDA graph (valid with store="recompute" and no self-attention
    replay: then every stage-1 call runs the same processors; see omg.graphs).
    Returns (final latent, latent entering the blend start, record, UNet evaluations at batch 1).
    """
    record = Stage1Record(control)
    unet_call = unet_eps_fn(unet, *base_cond)
    if cuda_graphs:
        unet_call = GraphedCall(unet_call, heat=control.heatmaps)
    guided = guided_eps(unet_call, guidance, guidance_rescale)  # what omg.sample runs
    state = {"calls": 0, "steps_done": 0, "evaluations": 0}
    kept: dict[str, Tensor] = {}

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        n = state["calls"]
        state["calls"] += 1
        blending = state["steps_done"] >= blend_start
        if blending and record.blend_call is None:
            record.blend_call = n
        control.mode, control.step, control.cond_rows = "capture", n, slice(1, 2)
        if blending:
            control.steps.add(n)
            if n - record.blend_call < self_replay_steps:
                control.self_replay_steps.add(n)
            if control.store == "recompute":
                record.source_latents[n] = x
        state["evaluations"] += 2
        eps = guided(x, t)
        if not blending:
            record.eps_before_blend.append(eps)
        return eps

    def on_step(info) -> None:  # runs after the first UNet call of step i
        state["steps_done"] = info.i + 1
        if info.i == blend_start:
            kept["x"] = info.x.clone()

    with control:
        final = run_sampler(eps_fn, noise, sigmas, sampler, schedule=schedule, callback=on_step,
                            disable=not progress, generator=torch.Generator().manual_seed(seed),
                            **(sampler_options or {}))
    return final, kept.get("x", final), record, state["evaluations"]


@torch.no_grad()
def generate(model: Any, prompt: str, concepts: Sequence[Concept] = (), *, negative_prompt: Optional[str] =
             DEFAULT_NEGATIVE, steps: int = 50, guidance: float = 7.5, guidance_rescale: float = 0.0,
             blend_steps: int = 35, seed: int = 0, height: int = 1024, width: int = 1024, sampler: str = "ddim",
             spacing: str = "leading", sampler_options: Optional[dict] = None, store: str = "recompute",
             store_dtype: Optional[torch.dtype] = torch.bfloat16, map_format: Optional[str] = None,
             self_replay_steps: int = 0, self_replay_layers: str = "original",
             sam: Union[str, SamRefiner, None] = None, dilate: int = 0, feather: float = 0.0,
             strict: bool = False, progress: bool = True, keep_stage2: bool = False, replay: bool = True,
             cuda_graphs: Optional[bool] = None, lora_mode: str = "grouped") -> Result:
    """Render `prompt` with every concept's identity inside its region (OMG, Kong et al. 2024).

    concepts: omg.Concept list; each class_name must occur in the prompt (twice for two concepts of one
    class). blend_steps: blending runs over the last blend_steps of steps (0: the stage-1 image).
    store: how stage 2 replays stage 1's cross-attention ("recompute", "outputs" or "maps"; see
    omg.attention); "recompute" is the default: at 1024x1024 it keeps no store, where "outputs" holds 6.8 GiB
    and "maps" 8.2 GiB (one H100, two merged concepts: peak 17.5 against 24.3 and 25.9 GiB,
    bench/results/omg_h100.json), for about 12 ms more per blending step (its base pass runs at batch 3:
    64.5 against 52.3 ms for the outputs replay; bench/results/kernels_unet_h100.json), about 0.4 s an image.
    store_dtype (for "outputs"/"maps") None keeps the model dtype. map_format (store="maps"): None keeps the
    probabilities in store_dtype; "bf16" or "log8" (1 byte an entry) use the kernels' map formats.
    self_replay_steps: also replay self-attention
    (queries and keys) for this many first blending steps; off by default: the paper replays the
    cross-attention maps, the original code's 4 self-attention steps come from prompt-to-prompt's editing
    default, they only touch the base pass (used outside the masks), and with a stored replay they cost
    1.6 GiB of queries and keys at 1024x1024 and 0.7 s (H100, bench/results/omg_h100.json; every layer).
    self_replay_layers: where self-attention is replayed. "original" (default, since the option exists to
    reproduce the original code): as the original, only in layers with at most (height // 32) * (width // 32)
    queries, i.e. at 1024x1024 the 32x32 level and the middle block (omg.attention.original_self_replay_queries),
    which also keeps the 64x64 level's queries and keys out of a stored replay; "all": every self-attention
    layer. sam: a segment-anything checkpoint path or
    SamRefiner to refine the attention masks. Stage 1 and stage 2 use the same seed. keep_stage2: return
    stage 2's BlendedEps in result.stage2 so that another sampler can drive it (see BlendedEps).
    replay=False (an ablation, the paper's blending without layout preservation): stage 2's base pass runs
    plain attention on the blended latent instead of replaying stage 1's cross-attention; stage 1, its masks
    and the concept passes are unchanged.
    cuda_graphs: run each repeated UNet call (stage 1; stage 2's call, or its base pass and each concept pass
    when they do not share one call) as a replayed CUDA graph. None (default): on when the model is on CUDA, store="recompute" and
    self_replay_steps=0, the cases where every call of a role runs the same processors; the output is the
    same as without (tested on the GPU).
    lora_mode: how stage 2 holds the concept models. "grouped" (default): the base weights are shared and each
    concept keeps only its LoRA factors (325 MiB for rank 64 on every kohya SDXL target), added to its own
    rows; when all prompts encode to the same token count, the base pass and every concept pass of a step
    are one UNet call (omg.lora.GroupedLora). "merged": each concept's touched tensors are merged (4.1 GiB
    for the same LoRA) and swapped in for its own call. Both give the same image up to float rounding
    (tested); bench/omg.py compares their speed and memory.
    """
    concepts = list(concepts)
    _validate(model, prompt, concepts, steps, blend_steps, height, width, sampler, store, lora_mode)
    if self_replay_layers not in SELF_REPLAY_LAYERS:
        raise SamplingError(f"self_replay_layers must be one of {SELF_REPLAY_LAYERS}, not {self_replay_layers!r}")
    unet, device = model.unet, model.device
    graphable = graphs_usable(torch.device(device)) and store == "recompute" and self_replay_steps == 0
    if cuda_graphs and not graphable:
        raise SamplingError("cuda_graphs needs a CUDA model, store='recompute' and self_replay_steps=0")
    cuda_graphs = graphable if cuda_graphs is None else cuda_graphs
    dtype = next(unet.parameters()).dtype
    names = [c.class_name for c in concepts]
    token_indices = concept_token_indices(prompt, names) if concepts else []
    user_masks = prepare_user_masks([c.mask for c in concepts], (height, width), names)
    refiner = SamRefiner(sam, device=device) if isinstance(sam, str) else sam
    timer = _Timer(device)
    start = time.perf_counter()
    # every LoRA is loaded and merged before sampling: one for another base fails here, the model untouched
    loras = _load_loras(concepts)
    if lora_mode == "grouped":  # matched and validated now; the factors are stacked once the masks are known
        patches = [None if lora is None else bind(unet, (lora, c.lora_scale)) for c, lora in zip(concepts, loras)]
        weights = None
    else:
        weights = [None if lora is None else ConceptWeights.merge(unet, (lora, c.lora_scale))
                   for c, lora in zip(concepts, loras)]
    schedule = NoiseSchedule.sdxl()
    sigmas = schedule.sampling_sigmas(steps, spacing, to_zero=sampler != "ddim")
    negatives = None if negative_prompt is None else [negative_prompt]
    base_cond = sdxl_conditioning(model, [prompt], negatives, height, width)
    concept_cond = [_concept_conditioning(model, c, lora, negative_prompt, height, width)
                    for c, lora in zip(concepts, loras)]
    latent_hw = (height // 8, width // 8)
    noise = randn_cpu((1, unet.config.in_channels, *latent_hw), torch.Generator().manual_seed(seed), device)
    flat_tokens = sorted({i for idx in token_indices for i in idx})
    control = AttentionControl(unet, store, store_dtype=store_dtype or dtype, heatmap_tokens=flat_tokens,
                               latent_hw=latent_hw, map_format=map_format,
                               self_replay_max_queries=(original_self_replay_queries(height, width)
                                                        if self_replay_layers == "original" else None))
    start = timer.lap("setup", start)

    # ---- stage 1 ------------------------------------------------------------------------------------------
    stage1, blend_start_latent, record, evaluations = run_stage1(
        unet, noise, sigmas, base_cond, control, steps - blend_steps, guidance, guidance_rescale, sampler,
        self_replay_steps, seed, schedule, progress, sampler_options, cuda_graphs)
    start = timer.lap("stage1", start)
    stage1_image = latents_to_images(model.vae, stage1)[0]
    start = timer.lap("decode_stage1", start)

    # ---- masks ------------------------------------------------------------------------------------------
    heat = None
    if concepts:
        maps = control.heatmaps.result()  # [len(flat_tokens), H/8, W/8]
        heat = torch.stack([maps[[flat_tokens.index(i) for i in idx]].mean(0) for idx in token_indices])
    concept_masks = make_masks(names, (height, width), heat, classes=names, image=stage1_image, sam=refiner,
                               user_masks=user_masks, dilate_px=dilate, feather_px=feather, strict=strict)
    active = [i for i, found in enumerate(concept_masks.found) if found]
    start = timer.lap("masks", start)

    # ---- stage 2 (with no concept found it still runs: the replayed base pass alone reproduces stage 1) --
    final, blended = stage1, None
    if blend_steps > 0:
        grouped = GroupedLora(unet, [patches[i] for i in active]) if lora_mode == "grouped" else None
        blended = BlendedEps(unet, record, base_cond, concept_cond, weights, concept_masks.masks.to(device),
                             active, guidance, guidance_rescale, replay, cuda_graphs, grouped)
        with control:
            final = run_sampler(blended, noise, sigmas, sampler, schedule=schedule, disable=not progress,
                                generator=torch.Generator().manual_seed(seed), **(sampler_options or {}))
        evaluations += blended.evaluations
    start = timer.lap("stage2", start)
    image = latents_to_images(model.vae, final)[0] if blend_steps > 0 else stage1_image
    timer.lap("decode", start)
    timer.times["total"] = sum(timer.times.values())
    return Result(image=image, stage1_image=stage1_image, masks=concept_masks.masks,
                  heatmaps=concept_masks.heatmaps, concept_masks=concept_masks, latent=final,
                  stage1_latent=stage1, blend_start_latent=blend_start_latent, timings=timer.times,
                  unet_evaluations=evaluations, store_bytes=control.stored_bytes(),
                  stage2=blended if keep_stage2 else None)
