"""Input checks shared by omg.sample and omg.generate, run before any weights are touched."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from omg.errors import OptionError, SamplingError

Prompts = Union[str, Sequence[str]]


def check_model(model: Any, purpose: str = "sampling") -> None:
    """The bundle holds a UNet, a VAE and text encoders (omg.load_sdxl of a full checkpoint)."""
    for name in ("unet", "vae", "text"):
        if getattr(model, name, None) is None:
            raise SamplingError(f"the model has no {name}, which {purpose} needs; load a full SDXL checkpoint "
                                f"(UNet, VAE and both text encoders)")


def prompt_list(prompts: Prompts, what: str = "prompt") -> list[str]:
    """A prompt or a non-empty list of them, as a list."""
    try:
        out = [prompts] if isinstance(prompts, str) else list(prompts)
    except TypeError:  # not iterable
        out = None
    if not out or not all(isinstance(p, str) for p in out):
        raise OptionError(f"{what} must be a string or a non-empty list of strings, got {prompts!r}")
    return out


def check_image_size(height: Any, width: Any, multiple: int = 8) -> None:
    """One size rule for omg.sample and omg.generate: positive multiples of the VAE's downscale (8 for SDXL).

    The UNet takes any latent size (its stride-2 convolutions round up and each upsampling meets its skip
    connection's size), so nothing else constrains the image size.
    """
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % multiple == 0 for v in (height, width))
    if not ok:
        raise OptionError(f"height and width must be positive multiples of {multiple} (the VAE's downscale), "
                          f"got {height}x{width}")


def check_seeds(seed: Any, num_images: Any, seeds: Optional[Sequence[Any]]) -> None:
    """seed an integer; num_images >= 1; seeds None or a non-empty list of integers, with num_images 1 or its length."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(seed):
        raise OptionError(f"seed must be an integer, got {seed!r}")
    if not is_int(num_images) or num_images < 1:
        raise OptionError(f"num_images must be an integer >= 1, got {num_images!r}")
    if seeds is not None:
        if isinstance(seeds, (str, bytes)) or not len(seeds) or not all(is_int(s) for s in seeds):
            raise OptionError(f"seeds must be a non-empty list of integers, got {seeds!r}")
        if num_images not in (1, len(seeds)):
            raise OptionError(f"num_images={num_images} with {len(seeds)} seeds: give one or the other")


def image_seeds(seed: int, num_images: int = 1, seeds: Optional[Sequence[int]] = None) -> list[int]:
    """The seed of each image of a batch: `seeds`, or seed, seed + 1, ..., num_images of them."""
    check_seeds(seed, num_images, seeds)
    return list(seeds) if seeds is not None else list(range(seed, seed + num_images))
