"""Every knob of `omg.generate` in one frozen dataclass, with named presets.

    options = omg.OMGOptions.paper(steps=30)                  # a preset with changes
    result = omg.generate(model, prompt, concepts, options)
    result = omg.generate(model, prompt, concepts, steps=30)  # the same: keywords override the defaults

An option is defined once, here: its type, default, range check and help text. The command line (`omg
generate --steps 30`) and spec files (`steps: 30`) are derived from these fields (see `cli_options`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union

import torch

from kernels import MAP_FORMATS
from omg.attention import SELF_REPLAY_LAYERS, STORE_CHOICES
from omg.control import Control
from omg.errors import OptionError
from omg.inputs import check_image_size, check_seeds, image_seeds
from omg.sampling import SAMPLERS, SPACINGS
from omg.style import StyleLora

if TYPE_CHECKING:
    from omg.controlnet import ControlNet
    from omg.ip_adapter import IPAdapter
    from omg.sam import SamRefiner

DEFAULT_NEGATIVE = "noisy, blurry, soft, deformed, ugly"  # the original code's global negative prompt
LORA_MODES = ("grouped", "merged")


def _option(default: Any, help: str, *, parse: Optional[Callable[[str], Any]] = str,
            choices: Optional[Sequence[str]] = None, many: bool = False) -> Any:
    """A field with what the CLI and spec files need: parse (None: not a CLI/spec option), choices, many (a list)."""
    return field(default=default, metadata={"help": help, "parse": parse, "choices": choices, "many": many})


@dataclass(frozen=True)
class OMGOptions:
    """The options of one `omg.generate` call. Checked when made: a bad value raises OptionError at once."""

    # -- sampling --------------------------------------------------------------------------------------------
    steps: int = _option(50, "sampler steps", parse=int)
    guidance: float = _option(7.5, "classifier-free guidance scale", parse=float)
    guidance_rescale: float = _option(0.0, "guidance rescale in [0, 1] (Lin et al. 2023, sec. 3.4)", parse=float)
    sampler: str = _option("ddim", "'ddim' (ours) or a k-diffusion sampler name", choices=SAMPLERS)
    spacing: str = _option("leading", "timestep spacing ('leading' is diffusers' SDXL default)",
                           choices=SPACINGS)
    sampler_options: Optional[Mapping[str, Any]] = _option(
        None, "extra arguments of the sampler, e.g. {\"eta\": 0.5} (JSON on the command line)", parse=json.loads)
    negative_prompt: Optional[str] = _option(DEFAULT_NEGATIVE, "global negative prompt (None: zero uncond embeddings)")
    height: int = _option(1024, "image height in pixels, a multiple of 8", parse=int)
    width: int = _option(1024, "image width in pixels, a multiple of 8", parse=int)
    seed: int = _option(0, "seed of the first image (stage 1 and stage 2 draw the same noise)", parse=int)
    num_images: int = _option(1, "images rendered as one batch, seeds seed, seed + 1, ...", parse=int)
    seeds: Optional[tuple[int, ...]] = _option(None, "explicit seeds, one image each, rendered as one batch "
                                                     "(instead of seed and num_images)", parse=int, many=True)
    # -- the OMG method --------------------------------------------------------------------------------------
    blend_steps: int = _option(35, "blending runs over the last blend_steps steps (0: the stage-1 image)", parse=int)
    store: str = _option("auto", "how stage 2 replays stage 1's cross-attention (see omg.attention): 'auto' keeps "
                                 "stage 1's attention outputs ('outputs') when they take at most half the free "
                                 "device memory, else recomputes them ('recompute', no memory)",
                         choices=STORE_CHOICES)
    store_dtype: Optional[torch.dtype] = _option(None, "dtype of the outputs/maps store (None: the model's)",
                                                 parse=None)
    map_format: Optional[str] = _option(None, "store='maps': None keeps probabilities in store_dtype; 'bf16' or "
                                              "'log8' (one byte an entry) use the kernels' formats",
                                        choices=MAP_FORMATS)
    self_replay_steps: int = _option(0, "also replay self-attention (queries and keys) for this many first blending "
                                        "steps (the original code: 4)", parse=int)
    self_replay_layers: str = _option("original", "where self-attention is replayed: 'original' (as the original code, "
                                                  "only layers with at most (height//32)*(width//32) queries) or "
                                                  "'all'", choices=SELF_REPLAY_LAYERS)
    replay: bool = _option(True, "replay stage 1's cross-attention in stage 2's base pass (off: the paper's "
                                 "ablation without layout preservation)", parse=bool)
    lora_mode: str = _option("grouped", "concept weights in stage 2: LoRA factors on the shared base weights, one "
                                        "UNet call a step (grouped), or merged tensors swapped in per concept",
                             choices=LORA_MODES)
    merge_linears: bool = _option(True, "grouped lora_mode: each concept's rows of the Linear layers its LoRA "
                                        "patches run a merged copy of the layer's weight instead of the low-rank "
                                        "delta (faster; the copies cost what merging costs: 4.1 GiB a concept for a "
                                        "rank-64 LoRA on every kohya target of SDXL), where they take at most a "
                                        "quarter of the free memory; off: only the LoRA factors (with "
                                        "store='recompute' the low-memory configuration); not with fp8", parse=bool)
    concept_crop: bool = _option(False, "fast mode: run each concept pass of stage 2 on its mask's bounding box plus "
                                        "crop_margin (omg.crop), not on the whole latent", parse=bool)
    crop_margin: int = _option(8, "concept_crop: latent pixels around each mask's box (widened to the UNet's "
                                  "downsampling multiple)", parse=int)
    fp8: bool = _option(False, "fast mode: e4m3 matmuls for the base UNet's transformer Linear layers (per-token and "
                               "per-channel scales, omg.fp8; torch._scaled_mm on sm89+ GPUs, elsewhere the dequantised "
                               "formulation); LoRA deltas, convolutions and embeddings stay 16-bit", parse=bool)
    # -- spatial conditions and style -------------------------------------------------------------------------
    control: tuple[Control, ...] = _option((), "ControlNets 'IMAGE@CONTROLNET[:scale]' (IMAGE canny=PHOTO: its edges), "
                                               "feeding stage 1 and stage 2's base pass (omg.Control)", many=True)
    control_concepts: bool = _option(False, "also feed the ControlNets to the concept passes (the original: only "
                                            "the base model)", parse=bool)
    style_lora: tuple[StyleLora, ...] = _option((), "style LoRAs 'FILE[:scale]' (default scale 0.5) on the base and "
                                                    "every concept model (the original then runs concepts at 0.7)",
                                                many=True)
    # -- InstantID concepts (a concept with face=...) ----------------------------------------------------------
    face_adapter: Union[str, "IPAdapter", None] = _option(
        None, "InstantID's face adapter ip-adapter.bin (or the same tensors as .safetensors), for concepts with a face")
    identitynet: Union[str, "ControlNet", None] = _option(
        None, "InstantID's IdentityNet: its ControlNetModel folder (diffusers layout) or file")
    face_models: Optional[str] = _option(None, "folder of insightface's antelopev2 ONNX models "
                                               "(e.g. checkpoints/models/antelopev2) to detect faces in photos; "
                                               "not needed for precomputed faces")
    ip_adapter_scale: float = _option(0.8, "scale of the face tokens' decoupled cross-attention (InstantID's "
                                           "ip_adapter_scale)", parse=float)
    identitynet_scale: float = _option(0.8, "IdentityNet's conditioning scale", parse=float)
    # -- masks -----------------------------------------------------------------------------------------------
    sam: Union[str, "SamRefiner", None] = _option(None, "segment-anything checkpoint (vit_b/l/h, or any size: "
                                                        "its config is read from the shapes) to refine the masks")
    dilate: int = _option(0, "grow each mask by this many latent pixels into unclaimed ones", parse=int)
    feather: float = _option(0.0, "soften mask edges over this many latent pixels", parse=float)
    strict: bool = _option(False, "fail when a concept is not found in the stage-1 image (else: skip it)",
                           parse=bool)
    # -- running ---------------------------------------------------------------------------------------------
    cuda_graphs: Optional[bool] = _option(None, "replay repeated UNet calls as CUDA graphs; None: where valid "
                                                "(CUDA, store not 'maps', no self-attention replay)", parse=bool)
    keep_graphs: bool = _option(True, "keep the CUDA graphs and the replay store they write on the model for the next "
                                      "call of the same configuration, which then records none (not with ControlNets, "
                                      "InstantID, style LoRAs or fp8); omg.release(model) frees them",
                                parse=bool)
    noise_device: str = _option("cpu", "device the noise is drawn on: 'cpu' gives a seed the same image on every "
                                       "device; 'cuda' draws as diffusers with a CUDA generator and A1111's GPU RNG "
                                       "do, to reproduce their seeds")
    progress: bool = _option(True, "show progress bars", parse=bool)
    keep_stage2: bool = _option(False, "return stage 2's BlendedEps in result.stage2 (to drive it with another "
                                       "sampler loop)", parse=None)

    def __post_init__(self) -> None:
        if self.seeds is not None:
            object.__setattr__(self, "seeds", tuple(self.seeds))
        if self.sampler_options is not None:
            object.__setattr__(self, "sampler_options", dict(self.sampler_options))
        for name, kind in (("control", Control), ("style_lora", StyleLora)):  # strings, dicts or objects
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                value = (value,)
            object.__setattr__(self, name, tuple(kind.parse(v) for v in value))
        _validate(self)

    # -- presets ---------------------------------------------------------------------------------------------
    @classmethod
    def paper(cls, **changes: Any) -> "OMGOptions":
        """The paper's setting (Kong et al. 2024): 1024x1024, 50 DDIM steps, guidance 7.5, blending over the last
        35 steps (its best initiation point). These are also the defaults."""
        return cls(**changes)

    @classmethod
    def original(cls, **changes: Any) -> "OMGOptions":
        """The original code's LoRA mode (kongzhecn/OMG): SDXL's Euler scheduler with "leading" spacing, 50 steps,
        guidance 7.5, blending from step index 16 (the last 34 steps), self-attention replayed until step 20
        (prompt-to-prompt's self_replace_steps=0.4: the first 4 blending steps), the in-batch copy of the
        stage-1 rows (store "recompute"), its global negative prompt, binary masks."""
        return cls(**{"sampler": "euler", "spacing": "leading", "steps": 50, "guidance": 7.5, "blend_steps": 34,
                      "self_replay_steps": 4, "store": "recompute", "negative_prompt": DEFAULT_NEGATIVE,
                      "dilate": 0, "feather": 0.0, **changes})

    @classmethod
    def instantid(cls, **changes: Any) -> "OMGOptions":
        """The original code's InstantID mode (kongzhecn/OMG inference_instantid.py): its LoRA-mode settings with
        guidance 3.0, IdentityNet at 0.8 and the face adapter at 0.8."""
        return cls.original(**{"guidance": 3.0, "identitynet_scale": 0.8, "ip_adapter_scale": 0.8, **changes})

    # -- changes ---------------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "OMGOptions":
        """A copy with some options changed (checked like a new one); an unknown name raises OptionError."""
        unknown = sorted(set(changes) - set(option_names()))
        if unknown:
            raise OptionError(f"unknown option(s) {unknown}; known: {', '.join(option_names())}")
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def image_seeds(self) -> tuple[int, ...]:
        """The seed of each image of the batch: `seeds`, or seed, seed + 1, ... for num_images."""
        return tuple(image_seeds(self.seed, self.num_images, self.seeds))

    @property
    def batched(self) -> bool:
        """Several images asked for (num_images > 1 or explicit seeds): generate returns a list of results."""
        return self.seeds is not None or self.num_images > 1

    @property
    def blend_start(self) -> int:
        """Index of the first blending step."""
        return self.steps - self.blend_steps


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(OMGOptions)]


def cli_options() -> list[dataclasses.Field]:
    """The fields a command line or spec file can set (those with a parser), in declaration order."""
    return [f for f in dataclasses.fields(OMGOptions) if f.metadata["parse"] is not None]


def _validate(o: OMGOptions) -> None:
    def fail(what: str, expected: str) -> None:
        raise OptionError(f"{what} must be {expected}, got {getattr(o, what)!r}")

    if not isinstance(o.steps, int) or o.steps < 1:
        fail("steps", "an integer >= 1")
    if not isinstance(o.blend_steps, int) or not 0 <= o.blend_steps <= o.steps:
        fail("blend_steps", f"an integer between 0 and steps ({o.steps})")
    if not 0.0 <= o.guidance_rescale <= 1.0:
        fail("guidance_rescale", "in [0, 1]")
    for name in ("sampler", "spacing", "store", "lora_mode", "self_replay_layers"):
        choices = OMGOptions.__dataclass_fields__[name].metadata["choices"]
        if getattr(o, name) not in choices:
            fail(name, "one of " + ", ".join(repr(c) for c in choices))
    if o.map_format is not None and o.map_format not in MAP_FORMATS:
        fail("map_format", f"None or one of {MAP_FORMATS}")
    if o.store_dtype is not None and not (isinstance(o.store_dtype, torch.dtype) and o.store_dtype.is_floating_point):
        fail("store_dtype", "None or a floating torch.dtype")
    if o.negative_prompt is not None and not isinstance(o.negative_prompt, str):
        fail("negative_prompt", "a string or None")
    for name in ("self_replay_steps", "dilate", "crop_margin"):
        if not isinstance(getattr(o, name), int) or getattr(o, name) < 0:
            fail(name, "an integer >= 0")
    for name in ("ip_adapter_scale", "identitynet_scale"):
        if isinstance(getattr(o, name), bool) or not isinstance(getattr(o, name), (int, float)):
            fail(name, "a number")
    if o.feather < 0:
        fail("feather", ">= 0")
    if o.sampler_options is not None and not all(isinstance(k, str) for k in o.sampler_options):
        fail("sampler_options", "a mapping of argument names to values")
    try:
        torch.device(o.noise_device)
    except (RuntimeError, TypeError):
        fail("noise_device", "a device name such as 'cpu' or 'cuda'")
    check_image_size(o.height, o.width)
    check_seeds(o.seed, o.num_images, o.seeds)
