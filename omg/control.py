"""Spatial conditions for sampling: ControlNets with their condition images, as generate's `control` option.

    controls = [omg.Control("pose.png", "controlnet-openpose-sdxl-1.0", scale=0.8),
                omg.Control("photo.jpg", "controlnet-canny-sdxl-1.0", scale=0.5, canny=True)]
    omg.generate(model, prompt, concepts, control=controls)
    # the same on the command line: --control pose.png@controlnet-openpose-sdxl-1.0:0.8 canny=photo.jpg@...:0.5

Each ControlNet gets its own image and scale, and acts over its own fraction [start, end] of the steps
(diffusers' control_guidance_start/end); their residuals are summed (diffusers' MultiControlNetModel). The
condition image is resized to the output size (Lanczos, as diffusers' control image processor) and embedded
once per run. Guess mode is off: every row gets the residuals of its own prompt.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from omg.canny import canny as canny_edges
from omg.controlnet import ControlNet, ControlNetConfig, check_controlnet, load_controlnet
from omg.errors import ModelError, OptionError, SamplingError
from omg.unet import ControlResiduals, UNetConfig

EpsFn = Callable[[Tensor, Tensor], Tensor]
ImageLike = Union[str, "os.PathLike[str]", Image.Image, np.ndarray, Tensor]


@dataclass(frozen=True)
class Control:
    """One spatial condition: a ControlNet and its condition image (pose skeleton, edge map, depth map)."""

    image: Any  # a path, a PIL image, an (H, W, 3) uint8 array or a (3, H, W) float tensor in [0, 1]
    model: Any  # a ControlNet file or diffusers folder, or a loaded omg.controlnet.ControlNet
    scale: float = 1.0  # conditioning scale (diffusers' controlnet_conditioning_scale)
    start: float = 0.0  # the fraction of the steps after which it starts acting
    end: float = 1.0  # ... and after which it stops
    canny: bool = False  # the image is a photo: its canny edges (omg.canny) are the condition

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise OptionError(f"control scale must be a number, got {self.scale!r}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise OptionError(f"control start and end must satisfy 0 <= start < end <= 1, got {self.start}, {self.end}")
        if not isinstance(self.model, (str, os.PathLike, ControlNet)):
            raise OptionError(f"control model must be a ControlNet path or an omg.controlnet.ControlNet, got "
                              f"{type(self.model).__name__}")

    @classmethod
    def parse(cls, value: Union[str, Mapping[str, Any], "Control"]) -> "Control":
        """'IMAGE@MODEL[:scale]' (IMAGE 'canny=PHOTO' computes the edges), a dict of the fields, or a Control."""
        if isinstance(value, Control):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown or "image" not in value or "model" not in value:
                raise OptionError(f"a control needs 'image' and 'model' (and optionally scale, start, end, canny); "
                                  f"got {sorted(value)}")
            return cls(**value)
        if not isinstance(value, str) or "@" not in value:
            raise OptionError(f"control {value!r}: expected 'IMAGE@CONTROLNET[:scale]' (IMAGE may be canny=PHOTO)")
        image, model = (s.strip() for s in value.rsplit("@", 1))
        scale = 1.0
        head, _, tail = model.rpartition(":")
        if head:
            try:
                scale, model = float(tail), head
            except ValueError:
                pass  # a colon inside the path
        canny = image.startswith("canny=")
        image = image[len("canny="):] if canny else image
        if not image or not model:
            raise OptionError(f"control {value!r}: expected 'IMAGE@CONTROLNET[:scale]'")
        return cls(image, model, scale, canny=canny)

    def describe(self) -> dict[str, Any]:
        """JSON-able fields (for PNG metadata)."""
        name = lambda v: v if isinstance(v, str) else os.fspath(v) if isinstance(v, os.PathLike) else type(v).__name__  # noqa: E731
        return {"image": name(self.image), "model": name(self.model), "scale": self.scale, "start": self.start,
                "end": self.end, "canny": self.canny}


def check_fits(config: ControlNetConfig, unet_config: UNetConfig, name: str) -> None:
    """ModelError unless the residuals fit the UNet's skip connections and it reads the UNet's conditioning."""
    mine, theirs = config.unet, unet_config
    fields = ("in_channels", "model_channels", "channel_mult", "num_res_blocks", "context_dim", "adm_in_channels")
    wrong = [f"{f} {getattr(mine, f)} (the UNet's: {getattr(theirs, f)})" for f in fields
             if getattr(mine, f) != getattr(theirs, f)]
    if wrong:
        raise ModelError(f"{name}: this ControlNet does not fit the base UNet: " + "; ".join(wrong))


def _open_image(image: ImageLike, what: str) -> Union[Image.Image, Tensor]:
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise OptionError(f"{what}: cannot read the condition image {os.fspath(image)!r}: {e}") from e
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
            raise OptionError(f"{what}: a condition image array must be (H, W, 3) uint8, got {image.shape} "
                              f"{image.dtype}")
        return Image.fromarray(np.ascontiguousarray(np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image))
    if isinstance(image, Tensor):
        t = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        if t.ndim != 3 or t.shape[0] not in (1, 3) or not t.is_floating_point():
            raise OptionError(f"{what}: a condition image tensor must be (3, H, W) float in [0, 1], got "
                              f"{tuple(image.shape)} {image.dtype}")
        return t.detach().float().cpu().clamp(0, 1).expand(3, -1, -1)
    raise OptionError(f"{what}: a condition image must be a path, PIL image, array or tensor, not "
                      f"{type(image).__name__}")


def condition_image(image: ImageLike, height: int, width: int, canny: bool = False, what: str = "control") -> Tensor:
    """The condition image as the ControlNet takes it: (1, 3, height, width) float in [0, 1], resized with Lanczos
    when its size differs (diffusers' control image processor), canny edges of it when asked."""
    opened = _open_image(image, what)
    if isinstance(opened, Image.Image):
        if opened.size != (width, height):
            opened = opened.resize((width, height), Image.LANCZOS)
        pixels = torch.from_numpy(np.asarray(opened, dtype=np.float32) / 255.0).permute(2, 0, 1)
    else:
        pixels = opened
        if tuple(pixels.shape[-2:]) != (height, width):
            pixels = torch.nn.functional.interpolate(pixels[None], size=(height, width), mode="bicubic",
                                                     align_corners=False, antialias=True)[0].clamp(0, 1)
    if canny:
        pixels = canny_edges(pixels)
    return pixels[None].contiguous()


def check_controls(controls: Sequence[Control], unet_config: UNetConfig) -> None:
    """Before any weights move: every ControlNet file is valid and fits the UNet, every image can be read."""
    for i, c in enumerate(controls):
        what = f"control {i} ({c.describe()['model']})"
        config = c.model.config if isinstance(c.model, ControlNet) else check_controlnet(c.model)
        check_fits(config, unet_config, what)
        if isinstance(c.image, (str, os.PathLike)) and not os.path.isfile(c.image):
            raise OptionError(f"{what}: no condition image at {os.fspath(c.image)!r}")
        _open_image(c.image, what)


@dataclass
class _Prepared:
    model: ControlNet
    features: Tensor  # the condition image's embedding (1, C, h, w)
    scale: float
    start: float
    end: float


class ControlStack:
    """The ControlNets of a run, loaded, each with its condition image embedded for one output size."""

    def __init__(self, prepared: Sequence[_Prepared], steps: int):
        self.prepared, self.steps = list(prepared), steps

    @classmethod
    def prepare(cls, controls: Sequence[Control], unet: torch.nn.Module, height: int, width: int,
                steps: int) -> Optional["ControlStack"]:
        """Load each ControlNet (a file used twice is loaded once) onto the UNet's device and dtype, embed each
        image; None without controls."""
        if not controls:
            return None
        p = next(unet.parameters())
        loaded: dict[str, ControlNet] = {}
        prepared = []
        for i, c in enumerate(controls):
            what = f"control {i}"
            if isinstance(c.model, ControlNet):
                model = c.model
                q = next(model.parameters())
                if (q.device, q.dtype) != (p.device, p.dtype):
                    raise OptionError(f"{what}: the ControlNet is {q.dtype} on {q.device}, the UNet {p.dtype} on "
                                      f"{p.device}; load it with omg.load_controlnet(path, device, dtype)")
            else:
                key = os.path.abspath(os.fspath(c.model))
                if key not in loaded:
                    loaded[key] = load_controlnet(c.model, p.device, p.dtype)
                model = loaded[key]
            check_fits(model.config, unet.config, what)
            if height % model.hint_downscale or width % model.hint_downscale:
                raise OptionError(f"{what}: the image size {height}x{width} must be a multiple of "
                                  f"{model.hint_downscale} for the ControlNet's condition embedding")
            image = condition_image(c.image, height, width, c.canny, what).to(p.device)
            with torch.no_grad():
                features = model.encode_hint(image)
            prepared.append(_Prepared(model, features, float(c.scale), c.start, c.end))
        return cls(prepared, steps)

    def active(self, step: int) -> tuple[int, ...]:
        """The ControlNets acting at sampler step `step`: diffusers' rule, off while step / steps < start or
        (step + 1) / steps > end."""
        n = self.steps
        return tuple(i for i, c in enumerate(self.prepared) if not (step / n < c.start or (step + 1) / n > c.end))

    def residuals(self, active: Sequence[int], x: Tensor, t: Tensor, context: Tensor, y: Tensor) -> ControlResiduals:
        """The summed residuals of the `active` ControlNets for the rows of x."""
        total: Optional[ControlResiduals] = None
        for i in active:
            c = self.prepared[i]
            r = c.model(x, t, context, y, c.features, c.scale)
            total = r if total is None else total + r
        assert total is not None, "residuals of no ControlNet"
        return total

    def eps_fn(self, unet: torch.nn.Module, active: Sequence[int], context: Tensor, y: Tensor) -> EpsFn:
        """unet_eps_fn with the active ControlNets' residuals on every row (stage 1, omg.sample)."""
        dtype = next(unet.parameters()).dtype
        active = tuple(active)

        def eps_fn(x: Tensor, t: Tensor) -> Tensor:
            if x.shape[0] != context.shape[0]:
                raise SamplingError(f"latent batch {x.shape[0]} != conditioning batch {context.shape[0]}")
            x_ = x.to(dtype)
            residuals = self.residuals(active, x_, t, context, y) if active else None
            return unet(x_, t, context, y, control=residuals).to(x.dtype)
        return eps_fn
