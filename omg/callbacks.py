"""What omg.generate's per-step callback sees: one StepEvent per sampler step of each stage.

    def show(step: omg.StepEvent) -> None:
        print(step.stage, step.step, "/", step.steps, step.sigma)
        step.preview().save(f"preview_{step.stage}_{step.step}.png")   # linear latent-to-RGB, no VAE

    omg.generate(model, prompt, concepts, callback=show)

Stage 1 reports steps 0 .. steps - 1; stage 2 only its blending steps, blend_start .. steps - 1 (the steps
before are stage 1's, replayed from its record).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

from PIL import Image
from torch import Tensor

from omg.preview import latent_preview

STAGES = ("stage1", "stage2")


@dataclass(frozen=True, eq=False)
class StepEvent:
    stage: str  # "stage1" or "stage2"
    step: int  # index of the sampler step (0 .. steps - 1)
    steps: int  # steps of the run
    sigma: float  # noise level the model saw at this step
    latent: Tensor  # (B, C, h, w) the latent entering the step, in the UNet's (VP) coordinates
    denoised: Tensor  # (B, C, h, w) the step's prediction of the clean latent (after blending and guidance)

    def preview(self, image: Optional[int] = 0, scale: int = 1) -> Union[Image.Image, list[Image.Image]]:
        """The prediction of image `image` (None: all, as a list) through the linear latent-to-RGB map."""
        return latent_preview(self.denoised if image is None else self.denoised[image], scale=scale)


StepCallback = Callable[[StepEvent], None]
