"""Stage alignment: every model call of a sampler run, planned before stage 1 and shared by both stages.

A sampler calls the model once per step (DDIM, Euler, DPM++ 2M, ...) or twice (Heun, DPM2, DPM++ 2S a,
DPM++ SDE: the second call evaluates a trial step). Stage 2 re-enters the same sampler from the first step and
must know, for each of its calls, whether stage 1 already answered it (then the recorded prediction is
returned) or whether it blends. `CallSchedule.plan` finds out by a dry run of the sampler on a 1x1x1x1
latent: it records the timestep of every model call and the step it belongs to (the call that k-diffusion's
per-step callback follows is the first call of that step). The blend start is the first model call of step
`steps - blend_steps`, so a two-call sampler never blends the trial half of the step before it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from omg.errors import ScheduleError
from omg.sampling import NoiseSchedule, StepInfo, get_sampler, run_sampler


@dataclass(frozen=True)
class ModelCall:
    """One model call of a sampler run."""
    index: int  # position among the run's model calls, from 0
    step: int  # the sampler step it belongs to
    t: float  # the (continuous) timestep the UNet sees
    blending: bool  # stage 2 blends this call; before the blend start it is answered from stage 1's record


@dataclass(frozen=True)
class CallSchedule:
    """The model calls of one sampler run over `sigmas`, and which of them stage 2 blends."""
    sampler: str
    steps: int
    blend_start: int  # the first blending step (steps - blend_steps)
    calls: tuple[ModelCall, ...]

    @classmethod
    def plan(cls, sampler: str, sigmas: Tensor, blend_steps: int, schedule: Optional[NoiseSchedule] = None,
             sampler_options: Optional[dict] = None) -> "CallSchedule":
        """Dry-run `sampler` over `sigmas` (zero predictions and noise: a sampler's calls depend on its sigmas and
        options only) and mark the calls of the last `blend_steps` steps as blending."""
        steps = len(sigmas) - 1
        if not 0 <= blend_steps <= steps:
            raise ScheduleError(f"blend_steps must be between 0 and the {steps} steps, got {blend_steps}")
        timesteps: list[float] = []
        first_call_of_step: list[int] = []

        def eps_fn(x: Tensor, t: Tensor) -> Tensor:
            timesteps.append(float(t.reshape(-1)[0]))
            return torch.zeros_like(x)

        def on_step(info: StepInfo) -> None:  # right after the first model call of step info.i
            first_call_of_step.append(len(timesteps) - 1)

        options = dict(sampler_options or {})
        if "noise_sampler" in inspect.signature(get_sampler(sampler)).parameters:  # draw nothing from any RNG
            options["noise_sampler"] = lambda sigma, sigma_next: torch.zeros(1, 1, 1, 1)
        run_sampler(eps_fn, torch.zeros(1, 1, 1, 1), sigmas, sampler, schedule=schedule, callback=on_step,
                    disable=True, **options)
        assert len(first_call_of_step) == steps, (sampler, len(first_call_of_step), steps)
        step_of = [0] * len(timesteps)
        for step, first in enumerate(first_call_of_step):
            for n in range(first, len(timesteps)):
                step_of[n] = step
        blend_start = steps - blend_steps
        calls = tuple(ModelCall(n, step_of[n], t, step_of[n] >= blend_start) for n, t in enumerate(timesteps))
        return cls(sampler, steps, blend_start, calls)

    @property
    def blend_calls(self) -> tuple[int, ...]:
        """Indices of the calls stage 2 blends (and whose cross-attention it replays)."""
        return tuple(c.index for c in self.calls if c.blending)

    @property
    def first_blend_call(self) -> Optional[int]:
        """Index of the first blending call: the first model call of step blend_start (None: nothing blends)."""
        return next((c.index for c in self.calls if c.blending), None)

    def self_replay_calls(self, steps: int) -> tuple[int, ...]:
        """The blending calls of the first `steps` blending steps (self-attention replay)."""
        return tuple(c.index for c in self.calls if c.blending and c.step < self.blend_start + steps)

    def check(self, index: int, t: Tensor, atol: float = 1e-2) -> ModelCall:
        """The planned call at `index`, after checking that the driving sampler calls at its timestep.

        Reads t from its device: stage 2 checks only calls that do no UNet work (see omg.stage2).
        """
        if index >= len(self.calls):
            raise ScheduleError(f"model call {index} of stage 2, but stage 1's {self.sampler} run over {self.steps} "
                                f"steps made {len(self.calls)}: drive stage 2 with stage 1's sampler and sigmas")
        call = self.calls[index]
        seen = float(t.reshape(-1)[0])
        if abs(seen - call.t) > atol:
            raise ScheduleError(f"model call {index} of stage 2 is at timestep {seen:.3f}, but stage 1's "
                                f"{self.sampler} run made it at {call.t:.3f} (step {call.step}): drive stage 2 with "
                                f"stage 1's sampler and sigmas")
        return call

    def describe(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "steps": self.steps, "blend_start": self.blend_start,
                "calls": len(self.calls), "first_blend_call": self.first_blend_call}
