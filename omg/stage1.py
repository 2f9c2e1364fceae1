"""OMG stage 1: the global prompt with the base model, recording what stage 2 needs (omg.pipeline's first half).

Every model call of the sampler runs the base UNet in capture mode (the class tokens' heat maps accumulate
over all calls; the replay store keeps the blending calls). What the record keeps per call of the schedule:
the guided noise prediction of each call before the blend start (stage 2 answers those calls with it), and
for store="recompute" the latent of each blending call (stage 2 carries it through its base pass).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor

from omg.attention import AttentionControl, RowLayout
from omg.graphs import GraphedCall, GraphSet
from omg.sampling import NoiseSchedule, StepInfo, guided_eps, run_sampler, unet_eps_fn
from omg.schedule import CallSchedule
from omg.unet import UNet

if TYPE_CHECKING:
    from omg.control import ControlStack


@dataclass
class Stage1Record:
    """What stage 1 leaves for stage 2, by model-call index of `schedule`."""
    schedule: CallSchedule
    control: AttentionControl  # holds the replay store and the heat maps
    sigmas: Tensor  # the run's sigmas (fp64, CPU)
    noise: Tensor  # the initial latents (B, C, h, w), VP
    eps: dict[int, Tensor] = field(default_factory=dict)  # guided predictions of the calls before the blend start
    latents: dict[int, Tensor] = field(default_factory=dict)  # the latent each call saw, for the blending calls
    evaluations: int = 0  # UNet evaluations at batch 1 (a CFG pass of one image counts 2)

    @property
    def blend_start_latent(self) -> Optional[Tensor]:
        """The latent entering the blend start as the model saw it (None when nothing blends)."""
        first = self.schedule.first_blend_call
        return None if first is None else self.latents[first]


@dataclass
class Stage1Result:
    latent: Tensor  # final latents (B, C, h, w), VP, fp32
    blend_start_latent: Tensor  # latents entering the blend start step (the final ones when nothing blends)
    record: Stage1Record


def run_stage1(unet: torch.nn.Module, noise: Tensor, sigmas: Tensor, sampler: str, calls: CallSchedule,
               base_cond: tuple[Tensor, Tensor], control: AttentionControl, guidance: float,
               guidance_rescale: float = 0.0, schedule: Optional[NoiseSchedule] = None,
               generators: Optional[list[torch.Generator]] = None, sampler_options: Optional[dict] = None,
               cuda_graphs: bool = False, progress: bool = True,
               callback: Optional[Callable[[StepInfo], None]] = None,
               controls: Optional["ControlStack"] = None, graphs: Optional[GraphSet] = None) -> Stage1Result:
    """Sample the global prompt for noise (B, C, h, w) with base_cond [uncond x B; cond x B].

    cuda_graphs: replay the UNet call as one CUDA graph (valid with a store other than "maps" and no self-attention
    replay: then every stage-1 call runs the same processors; see omg.graphs). callback(StepInfo) runs every step.
    controls: ControlNets whose residuals feed every call of the steps where they act (omg.control).
    graphs: where the CUDA graphs are kept (a KeptGraphs' stage1: those of an earlier run are replayed); their
    inputs are the latents, timesteps and conditioning.
    """
    record = Stage1Record(calls, control, torch.as_tensor(sigmas, dtype=torch.float64).cpu(), noise)
    rows = RowLayout(images=noise.shape[0])
    guided_by_active: dict[tuple[int, ...], Callable[[Tensor, Tensor], Tensor]] = {}
    graphs = graphs if graphs is not None else GraphSet()

    run = object()  # names this run's values in `graphs`
    # the global prompt's cross-attention keys and values, computed once (the UNet's calls read them)
    kv = graphs.constant(("cross_kv", base_cond[0].shape), run,
                         lambda into: unet.cross_kv(base_cond[0], into)) if isinstance(unet, UNet) else None

    def eps_for(active: tuple[int, ...]) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        def eps(x: Tensor, t: Tensor, context: Tensor, y: Tensor) -> Tensor:
            fn = controls.eps_fn(unet, active, context, y) if active else unet_eps_fn(unet, context, y)
            with unet.using_cross_kv(kv) if kv is not None else nullcontext():
                return fn(x, t)
        return eps

    def guided_for(step: int) -> Callable[[Tensor, Tensor], Tensor]:
        active = controls.active(step) if controls is not None else ()
        if active not in guided_by_active:
            plain = eps_for(active)
            # one graph per set of acting ControlNets (their windows may differ); guidance reads the output before
            # the next replay: no copy of it per call
            eps = graphs.get((active, base_cond[0].shape, base_cond[1].shape), lambda pool: GraphedCall(
                plain, heat=control.heatmaps, pool=pool, copy_output=False)) if cuda_graphs else plain
            guided_by_active[active] = guided_eps(lambda x, t, eps=eps: eps(x, t, *base_cond), guidance,
                                                  guidance_rescale)  # what omg.sample runs
        return guided_by_active[active]

    kept: dict[str, Tensor] = {}
    next_call = iter(calls.calls)

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        call = next(next_call)
        control.set_call("capture", call.index, rows)
        if call.blending:
            record.latents[call.index] = x
        record.evaluations += rows.rows
        eps = guided_for(call.step)(x, t)
        if not call.blending:
            record.eps[call.index] = eps
        return eps

    def on_step(info: StepInfo) -> None:
        if info.i == calls.blend_start:
            kept["x"] = info.x.clone()
        if callback is not None:
            callback(info)

    with control:
        final = run_sampler(eps_fn, noise, sigmas, sampler, schedule=schedule, callback=on_step, disable=not progress,
                            generator=generators, label="stage 1", **(sampler_options or {}))
    return Stage1Result(final, kept.get("x", final), record)
