"""The two-stage OMG sampler: `omg.generate`.

    prompt -> conditioning -> stage 1 (omg.stage1) -> masks (omg.masks) -> stage 2 (omg.stage2) -> decode

Stage 1 samples the global prompt with the base model, capturing (for the blending calls) what replays the
conditional cross-attention, and the class tokens' attention heat maps. Masks come from those maps (refined by
SAM, or given by the user). Stage 2 resumes at the blend start: every model call runs the base model with
replayed cross-attention and each concept model with its own prompt, and blends the noise predictions with
the masks before guidance. Which model calls blend is planned once, before stage 1 (omg.schedule). Several
seeds run as one batch through both stages, each image with its own noise, heat maps and masks.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from omg.attention import (AttentionControl, choose_store, free_memory, original_self_replay_queries,
                           outputs_store_bytes)
from omg.callbacks import StepCallback, StepEvent
from omg.concept_weights import GroupedWeights, MergedWeights, StageTwoWeights
from omg.control import ControlStack, check_controls
from omg.errors import LoraError, OptionError, SamplingError
from omg.faces import FaceError, check_face_source, detect_faces
from omg.fp8 import fp8_linears
from omg.instantid import FacePasses, check_instantid, load_faces, load_instantid
from omg.graphs import KeptGraphs, graphs_usable, keep_graphs, kept_graphs, release_graphs
from omg.inputs import check_model
from omg.lora import ConceptWeights, LoraFile, text_encoder_lora
from omg.lora.grouped import merged_copy_bytes, release_kept
from omg.masks import ConceptMasks, SamRefiner, concept_token_indices, make_masks, prepare_user_masks, token_heatmaps
from omg.model import decode_images
from omg.options import DEFAULT_NEGATIVE, LORA_MODES, OMGOptions  # noqa: F401 (re-exported)
from omg.reuse import Reuse, weights_key
from omg.sampling import NoiseSchedule, StepInfo, diffusers_ddim_options, get_sampler, run_sampler
from omg.schedule import CallSchedule
from omg.stage1 import run_stage1
from omg.stage2 import BlendedEps, cfg_rows
from omg.style import load_styles, style_merged


@dataclass
class Concept:
    """One personalised concept: the class noun it replaces in the global prompt, its own prompt and model."""
    class_name: str
    prompt: str
    lora: Union[str, LoraFile, None] = None
    negative_prompt: Optional[str] = None  # None: the global negative prompt
    lora_scale: float = 0.8
    mask: Any = None  # a user mask (image or latent size) or box (x0, y0, x1, y1): overrides attention/SAM
    face: Any = None  # InstantID instead of a LoRA: a face photo, a precomputed face (.safetensors/.npy) or embedding


class Stage1Images:
    """A batch's stage-1 images, VAE-decoded at the first request: stage 2 needs none of them (its masks come from
    stage 1's attention), so a caller that reads only the final images saves a decode (a VAE pass over the batch).
    Until then it holds the VAE and the latents."""

    def __init__(self, vae: torch.nn.Module, latents: Tensor):
        self._vae, self._latents, self._images = vae, latents, None

    def __getitem__(self, image: int) -> Image.Image:
        if self._images is None:
            self._images, self._vae = decode_images(self._vae, self._latents), None
        return self._images[image]


@dataclass
class Result:
    """One image of a generate call. Of a batch, each image has its own; timings, store_bytes and stage2 are the
    batch's, unet_evaluations the image's share."""
    image: Image.Image
    stage1_images: "Stage1Images" = field(repr=False)  # the batch's; read stage1_image
    masks: Tensor  # [k, H/8, W/8] in [0, 1]; zeros for concepts that were not found
    heatmaps: Tensor  # [k, H/8, W/8] class-token attention of stage 1, normalised
    concept_masks: ConceptMasks
    latent: Tensor  # final latent (1, C, H/8, W/8), VP, fp32
    stage1_latent: Tensor
    blend_start_latent: Tensor
    seed: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    unet_evaluations: int = 0  # at batch 1: a CFG pass of one model counts 2
    store_bytes: int = 0
    store: str = "recompute"  # the replay store the run used (what store="auto" chose)
    stage2: Optional[BlendedEps] = None  # kept on request (keep_stage2=True): it holds the store and weights
    index: int = 0  # the image's position in its batch

    @property
    def stage1_image(self) -> Image.Image:
        """Stage 1's image (the global prompt with the base model), decoded at the first read unless the run
        needed it (SAM masks, face detection)."""
        return self.stage1_images[self.index]

    @property
    def mask_sources(self) -> list[str]:
        """How each concept's mask was made: "attention", "split" (similar maps split apart), "sam" or "user"."""
        return self.concept_masks.sources


@torch.no_grad()
def generate(model: Any, prompt: str, concepts: Sequence[Concept] = (), options: Optional[OMGOptions] = None, *,
             callback: Optional[StepCallback] = None, noise: Optional[Tensor] = None,
             latents: Optional[Tensor] = None, **overrides: Any) -> Union[Result, list[Result]]:
    """Render `prompt` with every concept's identity inside its region (OMG, Kong et al. 2024).

    concepts: omg.Concept list; each class_name must occur in the prompt (twice for two concepts of one class).
    options: an omg.OMGOptions (default: OMGOptions.paper()); keyword overrides change single options
    (``generate(model, prompt, concepts, steps=30, seed=4)``). Every option is described on OMGOptions.
    Returns one Result, or, when several images are asked for (num_images > 1 or seeds), a list of Results in
    seed order, rendered as one batch: each equals the single call of its seed up to float rounding.

    callback(omg.StepEvent) runs after the model call of every stage-1 step and every blending step of stage 2
    (event.preview() is a cheap RGB preview). noise (or its diffusers name, latents): the initial latents
    (B, C, H/8, W/8), one per image, instead of drawing them from the seeds (which still seed the noise of
    stochastic samplers); options.noise_device chooses where seeded noise is drawn.
    """
    options = (options if options is not None else OMGOptions()).replace(**overrides)
    concepts = list(concepts)
    if noise is not None and latents is not None:
        raise OptionError("give noise or latents (the same thing, diffusers' name), not both")
    noise = noise if noise is not None else latents
    inputs = _Inputs.check(model, prompt, concepts, options, noise)  # all that can fail before any weights move
    timer = _Timer(model.device)
    reuse = Reuse.begin()  # what the last call kept: LoRA files, bound patches, prompt encodings (omg.reuse)
    # every LoRA is loaded before sampling; the style LoRAs are in the base weights for the whole call (omg.style)
    loras = reuse.loras(concepts)
    styles = load_styles(options.style_lora)
    # InstantID: every face (photos detected now) and both models before sampling
    faces = {i: f for i, f in zip([i for i, c in enumerate(concepts) if c.face is not None],
                                  load_faces([c.face for c in concepts if c.face is not None], options.face_models))}
    instantid = load_instantid(options.face_adapter, options.identitynet, model.unet) if faces else None
    # fp8: the styled weights quantised on entry, before any CUDA graph is recorded (omg.fp8)
    with style_merged(model.unet, styles), fp8_linears(model.unet, options.fp8), \
            (instantid.adapter.installed(model.unet) if instantid else nullcontext()):
        return _generate(model, prompt, concepts, loras, styles, options, inputs, timer, reuse, noise, callback,
                         (instantid, faces))


def _generate(model: Any, prompt: str, concepts: list[Concept], loras: list[Optional[LoraFile]],
              styles: list[tuple[LoraFile, float]], o: OMGOptions, inputs: "_Inputs", timer: "_Timer",
              reuse: Reuse, noise: Optional[Tensor], callback: Optional[StepCallback],
              instantid: tuple = (None, {})) -> Union[Result, list[Result]]:
    unet, n = model.unet, len(inputs.seeds)
    instantid_models, faces = instantid

    # ---- setup: concept weights, conditioning, ControlNets, noise, the model-call schedule ---------------------
    # every LoRA is matched before sampling: one for another base fails here, the model untouched
    merge_linears = o.lora_mode == "grouped" and o.merge_linears and not o.fp8
    concept_models = _ConceptModels.load(unet, concepts, loras, o.lora_mode, merge_linears, reuse)
    if not merge_linears:  # merged copies kept from an earlier call would sit idle through this one
        release_kept(unet, stacking=False)
    negatives = None if o.negative_prompt is None else [o.negative_prompt]
    text_key = weights_key(model.text)  # the text encoder's weights before any LoRA is merged on it

    def encodings(text_loras: Sequence[tuple[LoraFile, float]]) -> dict:
        """What the text encoder with text_loras merged encodes, shared by this call's conditionings and the next
        call's (a negative prompt is encoded once)."""
        return reuse.encodings(text_key, text_loras)
    with text_encoder_lora(model.text, styles):
        base_cond = model.conditioning([prompt], negatives, o.height, o.width, encoded=encodings(styles))
    concept_cond = [_concept_conditioning(model, c, lora, o, styles, encodings) for c, lora in zip(concepts, loras)]
    controls = ControlStack.prepare(o.control, unet, o.height, o.width, o.steps)
    noise_schedule = NoiseSchedule.sdxl()
    # DDIM ends on alphas_cumprod[0] (diffusers' SDXL DDIM, set_alpha_to_one=False); the others on sigma 0
    sigmas = noise_schedule.sampling_sigmas(o.steps, o.spacing, to_zero=o.sampler != "ddim")
    # DDIM with trailing/linspace spacing steps as diffusers' DDIMScheduler does (omg.sampling.ddim_sample)
    o = o.replace(sampler_options=diffusers_ddim_options(noise_schedule, o.steps, o.spacing, o.sampler,
                                                         o.sampler_options))
    calls = CallSchedule.plan(o.sampler, sigmas, o.blend_steps, noise_schedule, o.sampler_options)
    if noise is None:
        noise = model.noise(_generators(inputs.seeds, o.noise_device), o.height, o.width)
    noise = noise.to(model.device, torch.float32)
    latent_hw = tuple(noise.shape[-2:])
    control, kept = _attention_control(model, calls, latent_hw, n, o, inputs,
                                       keepable=inputs.cuda_graphs and o.keep_graphs and controls is None
                                       and not styles and not o.fp8 and not faces)
    reuse.keep()
    timer.lap("setup")

    # ---- stage 1: the global prompt with the base model -----------------------------------------------------
    stage1 = run_stage1(unet, noise, sigmas, o.sampler, calls, cfg_rows(base_cond, n), control, o.guidance,
                        o.guidance_rescale, noise_schedule, _generators(inputs.seeds, o.noise_device),
                        o.sampler_options, inputs.cuda_graphs, o.progress, _reporter(callback, "stage1", o.steps),
                        controls, kept.stage1 if kept is not None else None)
    timer.lap("stage1")
    stage1_images = Stage1Images(model.vae, stage1.latent)  # decoded here only when SAM or faces need it
    timer.lap("decode_stage1")

    # ---- masks: each image's concept regions from its class-token attention (or SAM, or the user) ------------
    concept_masks = [_masks(control, inputs, stage1_images, b, o)
                     for b in tqdm(range(n), desc="masks", disable=not o.progress or not concepts)]
    active = [i for i in range(len(concepts)) if any(m.found[i] for m in concept_masks)]
    timer.lap("masks")

    # ---- stage 2: blending from the blend start (with no concept found the replayed base pass reproduces
    # stage 1) -------------------------------------------------------------------------------------------------
    final, stage2 = stage1.latent, None
    if o.blend_steps > 0:
        face_passes = None
        if any(i in faces for i in active):
            masks_active = torch.stack([m.masks[active] for m in concept_masks])
            detected = [detect_faces(stage1_images[b], o.face_models) for b in range(n)] if o.face_models else ()
            by_position = {j: faces[i] for j, i in enumerate(active) if i in faces}
            face_passes = FacePasses.prepare(instantid_models, by_position, masks_active, (o.width, o.height),
                                             o.ip_adapter_scale, o.identitynet_scale, detected)
        weights = concept_models.for_stage2([i for i in active if i not in faces], n)
        stage2 = BlendedEps(unet, stage1.record, base_cond, [concept_cond[i] for i in active], weights,
                            torch.stack([m.masks[active] for m in concept_masks]).to(model.device),
                            [[j for j, i in enumerate(active) if m.found[i]] for m in concept_masks],
                            o.guidance, o.guidance_rescale, o.replay, inputs.cuda_graphs, controls,
                            o.control_concepts, o.crop_margin if o.concept_crop else None, face_passes,
                            kept.stage2_for(weights.identity()) if kept is not None else None)
        with stage2:
            # steps before the blend start are answered from stage 1's record: the bar counts the blending ones
            final = run_sampler(stage2, noise, sigmas, o.sampler, schedule=noise_schedule, disable=not o.progress,
                                generator=_generators(inputs.seeds, o.noise_device), label="stage 2",
                                count_from=o.blend_start, callback=_reporter(callback, "stage2", o.steps,
                                                                             o.blend_start),
                                **(o.sampler_options or {}))
    timer.lap("stage2")

    # ---- decode ---------------------------------------------------------------------------------------------
    images = model.decode(final) if o.blend_steps > 0 else [stage1_images[b] for b in range(n)]
    timer.lap("decode")
    evaluations = stage1.record.evaluations + (stage2.evaluations if stage2 is not None else 0)
    results = [Result(image=images[b], stage1_images=stage1_images, index=b, masks=concept_masks[b].masks,
                      heatmaps=concept_masks[b].heatmaps, concept_masks=concept_masks[b], latent=final[b:b + 1],
                      stage1_latent=stage1.latent[b:b + 1], blend_start_latent=stage1.blend_start_latent[b:b + 1],
                      seed=inputs.seeds[b], timings=timer.totals(), unet_evaluations=evaluations // n,
                      store_bytes=control.stored_bytes(), store=control.store, stage2=stage2 if o.keep_stage2 else None)
               for b in range(n)]
    return results if o.batched else results[0]


# ------------------------------------------------------------------------------------------------- the steps

def _attention_control(model: Any, calls: CallSchedule, latent_hw: tuple[int, int], images: int, o: OMGOptions,
                       inputs: "_Inputs", keepable: bool) -> tuple[AttentionControl, Optional[KeptGraphs]]:
    """The run's attention controller and, when its CUDA graphs can be kept (keepable), where they are: those an
    earlier call kept on the UNet when its configuration is this one's (the controller reset), else new ones (what
    was kept is freed first)."""
    unet = model.unet
    store_dtype = o.store_dtype or model.dtype
    kept = kept_graphs(unet)
    store = choose_store(o.store, outputs_store_bytes(unet.config, latent_hw, images, len(calls.blend_calls),
                                                      store_dtype),
                         model.device, reclaimable=kept.control.stored_bytes() if kept is not None else 0)
    self_replay_calls = tuple(calls.self_replay_calls(o.self_replay_steps))
    max_queries = original_self_replay_queries(o.height, o.width) if o.self_replay_layers == "original" else None
    config = None
    if keepable:
        # what a kept graph depends on besides its inputs: the controller's configuration, whether stage 2's base
        # pass replays (a Python decision inside its graph), the UNet's weights (only a keepable run pays for reading
        # every parameter's address)
        config = (store, store_dtype, tuple(calls.blend_calls), self_replay_calls, len(inputs.heat_tokens),
                  latent_hw, images, o.map_format, max_queries, o.replay,
                  tuple(p.data_ptr() for p in unet.parameters()))
        if kept is not None and kept.key == config:
            kept.control.reset(inputs.heat_tokens)
            return kept.control, kept
    release_graphs(unet)
    control = AttentionControl(unet, store, replay_calls=calls.blend_calls, self_replay_calls=self_replay_calls,
                               store_dtype=store_dtype, heatmap_tokens=inputs.heat_tokens, latent_hw=latent_hw,
                               map_format=o.map_format, self_replay_max_queries=max_queries)
    if config is None:
        return control, None
    kept = KeptGraphs(config, control)
    keep_graphs(unet, kept)
    return control, kept


def check_request(prompt: str, concepts: Sequence[Concept], options: OMGOptions) -> None:
    """The checks of a generate call that need no model: the CLI runs them before loading any weights.

    The prompt, each concept and its class noun in the prompt, user masks, LoRA and SAM files, and that the
    sampler's and SAM's packages import.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise OptionError(f"prompt must be a non-empty string, got {prompt!r}")
    for i, c in enumerate(concepts):
        if not isinstance(c, Concept):
            raise OptionError(f"concept {i} must be an omg.Concept, got {type(c).__name__}")
        if isinstance(c.lora, (str, os.PathLike)) and not os.path.exists(c.lora):
            raise LoraError(f"concept {i} ({c.class_name!r}): no LoRA file {os.fspath(c.lora)}")
        if c.face is not None:
            if c.lora is not None:
                raise OptionError(f"concept {i} ({c.class_name!r}): a concept is a LoRA or an InstantID face, not both")
            try:
                check_face_source(c.face, options.face_models)
            except FaceError as e:
                raise FaceError(f"concept {i} ({c.class_name!r}): {e}") from e
    names = [c.class_name for c in concepts]
    if concepts:
        concept_token_indices(prompt, names)
    prepare_user_masks([c.mask for c in concepts], (options.height, options.width), names)
    try:
        get_sampler(options.sampler)
    except ImportError as e:  # k-diffusion installs with omg: this is a broken environment
        raise OptionError(str(e)) from e
    if isinstance(options.sam, (str, os.PathLike)):
        if not os.path.isfile(options.sam):
            raise OptionError(f"sam: no segment-anything checkpoint {os.fspath(options.sam)}")
        try:
            import segment_anything  # noqa: F401
        except ImportError as e:
            raise OptionError(f"sam needs the segment-anything package (it installs with omg: pip install -e .); "
                              f"import failed with: {e}") from e


@dataclass(frozen=True)
class _Inputs:
    """generate's inputs, checked and prepared before any weights are loaded."""
    seeds: list[int]
    names: list[str]  # class nouns
    token_indices: list[list[int]]  # each concept's class-noun positions in the prompt's context
    heat_tokens: list[int]  # every such position, sorted: the tokens whose heat maps stage 1 keeps
    user_masks: list[Optional[Tensor]]
    sam: Optional[SamRefiner]
    cuda_graphs: bool

    @classmethod
    def check(cls, model: Any, prompt: str, concepts: Sequence[Concept], o: OMGOptions,
              noise: Optional[Tensor] = None) -> "_Inputs":
        check_model(model, "omg.generate")
        if model.vae.config.downscale != 8:
            raise SamplingError(f"the VAE downscales by {model.vae.config.downscale}; OMG's masks assume SDXL's 8")
        check_request(prompt, concepts, o)
        seeds = list(o.image_seeds)
        expected = (len(seeds), model.unet.config.in_channels, o.height // 8, o.width // 8)
        if noise is not None and (not isinstance(noise, Tensor) or tuple(noise.shape) != expected):
            raise OptionError(f"noise must be a tensor of shape {expected} (images, latent channels, height / 8, "
                              f"width / 8), got {tuple(noise.shape) if isinstance(noise, Tensor) else noise!r}")
        graphable = graphs_usable(torch.device(model.device)) and o.store != "maps" and o.self_replay_steps == 0
        if o.cuda_graphs and not graphable:
            raise OptionError("cuda_graphs needs a CUDA model, a store other than 'maps' and self_replay_steps=0")
        names = [c.class_name for c in concepts]
        token_indices = concept_token_indices(prompt, names) if concepts else []
        user_masks = prepare_user_masks([c.mask for c in concepts], (o.height, o.width), names)
        check_controls(o.control, model.unet.config)
        if any(c.face is not None for c in concepts):
            check_instantid(o.face_adapter, o.identitynet, model.unet.config)
        sam = SamRefiner(o.sam, device=model.device) if isinstance(o.sam, str) else o.sam
        return cls(seeds, names, token_indices, sorted({i for idx in token_indices for i in idx}),
                   user_masks, sam, graphable if o.cuda_graphs is None else o.cuda_graphs)


class _ConceptModels:
    """The concepts' weights, matched (grouped: bound patches) or merged (merged: ConceptWeights) before sampling;
    stage 2 gets those of the concepts found."""

    def __init__(self, unet: torch.nn.Module, mode: str, per_concept: list, merge_linears: bool = False):
        self.unet, self.mode, self.per_concept, self.merge_linears = unet, mode, per_concept, merge_linears

    @classmethod
    def load(cls, unet: torch.nn.Module, concepts: Sequence[Concept], loras: Sequence[Optional[LoraFile]],
             mode: str, merge_linears: bool = False, reuse: Optional[Reuse] = None) -> "_ConceptModels":
        assert mode in LORA_MODES, mode
        reuse = reuse or Reuse()

        def prepare(lora: LoraFile, scale: float):
            # grouped: matched and validated now; the factors are stacked (or merged) once the masks are known
            return reuse.bound(unet, lora, scale) if mode == "grouped" else ConceptWeights.merge(unet, (lora, scale))
        return cls(unet, mode, [None if lora is None else prepare(lora, c.lora_scale)
                                for c, lora in zip(concepts, loras)], merge_linears)

    def for_stage2(self, active: Sequence[int], images: int) -> StageTwoWeights:
        chosen = [self.per_concept[i] for i in active]
        if self.mode == "grouped":
            return GroupedWeights(self.unet, chosen, images, self.merge_linears and self._copies_fit(chosen))
        return MergedWeights(self.unet, chosen)

    def _copies_fit(self, chosen: list) -> bool:
        """merge_linears' copies take at most a quarter of what the device can still allocate (with the copies kept
        from the last call, which they replace); else the factors alone run (on an unknown device too)."""
        needed, kept = merged_copy_bytes(self.unet, chosen)
        free = free_memory(next(self.unet.parameters()).device)
        return free is not None and 4 * needed <= free + kept


def _concept_conditioning(model: Any, concept: Concept, lora: Optional[LoraFile], o: OMGOptions,
                          styles: Sequence[tuple[LoraFile, float]] = (),
                          encodings: Optional[Callable[[Sequence[tuple[LoraFile, float]]], dict]] = None
                          ) -> tuple[Tensor, Tensor]:
    """[uncond; cond] context and y of a concept, encoded with its text-encoder LoRA (if it has one) and the styles'.

    encodings(loras): SDXL.conditioning's `encoded` for the text encoder with those LoRAs merged (None: encode
    anew); a concept whose LoRA has no text-encoder part shares the base's (styles only)."""
    negative = concept.negative_prompt if concept.negative_prompt is not None else o.negative_prompt
    negatives = None if negative is None else [negative]
    own = lora is not None and bool(lora.families & {"te1", "te2"})  # text_encoder_lora matches and checks them
    loras = ([(lora, concept.lora_scale)] if own else []) + list(styles)
    with text_encoder_lora(model.text, loras) if loras else nullcontext():
        return model.conditioning([concept.prompt], negatives, o.height, o.width,
                                  encoded=encodings(loras) if encodings is not None else None)


def _masks(control: AttentionControl, inputs: _Inputs, stage1_images: Stage1Images, image: int,
           o: OMGOptions) -> ConceptMasks:
    """One image's concept masks from its stage-1 class-token attention (row `image` of the batch)."""
    heat = None
    if inputs.names:  # the mean of each concept's token maps; make_masks blurs nothing and normalises
        heat = token_heatmaps(control.heatmaps.result(row=image), inputs.token_indices,
                              map_tokens=inputs.heat_tokens, sigma=0)
    return make_masks(inputs.names, (o.height, o.width), heat, classes=inputs.names,
                      image=stage1_images[image] if inputs.sam is not None else None,
                      sam=inputs.sam, user_masks=inputs.user_masks, dilate_px=o.dilate, feather_px=o.feather,
                      strict=o.strict)


def _generators(seeds: Sequence[int], device: str = "cpu") -> list[torch.Generator]:
    """One generator per image on `device` (the CPU by default), seeded afresh for the initial noise, stage 1's
    sampler and stage 2's sampler: both stages draw the same noise."""
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def _reporter(callback: Optional[StepCallback], stage: str, steps: int,
              first: int = 0) -> Optional[Callable[[StepInfo], None]]:
    """run_sampler's per-step callback that hands the caller a StepEvent for the steps from `first` on."""
    if callback is None:
        return None

    def report(info: StepInfo) -> None:
        if info.i >= first:
            callback(StepEvent(stage, info.i, steps, info.sigma, info.x, info.denoised))
    return report


class _Timer:
    def __init__(self, device: torch.device):
        self.device, self.times, self.last = device, {}, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[name], self.last = now - self.last, now

    def totals(self) -> dict[str, float]:
        return {**self.times, "total": sum(self.times.values())}
