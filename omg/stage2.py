"""OMG stage 2: the blended noise prediction (omg.pipeline's second half).

From the blend start on, each model call runs the base model with replayed cross-attention and every active
concept with its own weights and prompt, then blends the unguided predictions with each image's masks before
guidance:

    eps = (1 - sum_i M_i) * eps_base + sum_i M_i * eps_i      (masks do not overlap: sum_i M_i <= 1)

Stage 2 re-enters the sampler from its first step but answers every call before the blend start with the
stage-1 prediction it recorded (no UNet work), so any sampler, multistep and ancestral ones included, arrives
at the blend start in exactly the stage-1 state and draws the same noise. Which call is which comes from the
record's CallSchedule (omg.schedule), planned once before stage 1.
"""
from __future__ import annotations

import dataclasses
import weakref
from contextlib import nullcontext
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import Tensor

import kernels
from omg.attention import RowLayout
from omg.concept_weights import FaceRows, Role, StageTwoWeights, UNetPass
from omg.crop import CropBox, concept_boxes, unet_multiple
from omg.errors import OptionError, ScheduleError
from omg.graphs import GraphedCall, GraphSet
from omg.sampling import EpsDenoiser, NoiseSchedule, apply_guidance
from omg.schedule import CallSchedule
from omg.stage1 import Stage1Record
from omg.unet import CrossKV, UNet

if TYPE_CHECKING:
    from omg.control import ControlStack
    from omg.instantid import FacePasses

Conditioning = tuple[Tensor, Tensor]  # (context, y) of a UNet call's rows


def cfg_rows(cond: Conditioning, images: int) -> Conditioning:
    """[uncond; cond] conditioning (2 rows) for a batch of images: [uncond x images; cond x images]."""
    context, y = cond
    return context.repeat_interleave(images, dim=0), y.repeat_interleave(images, dim=0)


class BlendedEps:
    """Stage 2's guided noise prediction, eps_fn(x, t) of omg.sampling's contract, for the latents (B, C, h, w).

    Drive it with stage 1's sampler over stage 1's sigmas from the first step, inside ``with stage2:`` (which
    puts the replay processors on the UNet and starts at the first model call); the calls before the blend
    start are answered from the stage-1 record. ``denoiser()`` wraps it for k-diffusion samplers. Driving stage
    2 from another sampler loop (k-diffusion's here), after
    ``result = omg.generate(model, prompt, concepts, sampler="euler", keep_stage2=True)``::

        import k_diffusion
        stage2 = result.stage2
        sigmas = stage2.sigmas  # stage 1's sigmas, fp32 on the model's device
        noise = stage2.noise  # stage 1's initial noise (VP latents at sigmas[0])
        with stage2:  # replay processors on the UNet; the next call is the run's first
            x = k_diffusion.sampling.sample_euler(stage2.denoiser(), noise * (1 + sigmas[0] ** 2).sqrt(), sigmas)
        latent = x / (1 + sigmas[-1] ** 2).sqrt()  # k-diffusion's x is the VP latent times sqrt(1 + sigma^2)

    A driver whose calls are not stage 1's (another sampler, other sigmas, another starting latent) raises
    ScheduleError: at a recorded call's timestep, on entering the blend start with another latent, or, for the
    blending calls (checked on the device, read once), at the run's last call.

    masks: (B, k, h, w) for the k active concepts (those found in some image); present[b]: the active concepts
    found in image b (the others are left out of its blend: their masks are zero there).

    controls: ControlNets (omg.control) whose residuals feed the base pass, as in stage 1: they run once per
    blending call over the base rows only, also in a grouped call (its concept rows get none), unless
    control_concepts, when every concept pass gets them too (computed with the concept's prompt).

    crop_margin: None runs every concept pass on the whole latent (the exact path); a number of latent pixels runs
    each LoRA concept's pass on its mask's bounding box (over the images) plus that margin (omg.crop), one pass per
    concept (the crops differ in shape); the base pass, with its replay, and face passes stay on the whole latent.
    faces: the InstantID concepts (omg.instantid.FacePasses, by active position): they run in passes of their own
    (role FaceRows: the base weights, their face tokens, their IdentityNet), one per conditioning shape; `weights`
    then holds the other active concepts only, in order.
    """

    def __init__(self, unet: torch.nn.Module, record: Stage1Record, base_cond: Conditioning,
                 concept_cond: Sequence[Conditioning], weights: StageTwoWeights, masks: Tensor,
                 present: Sequence[Sequence[int]], guidance: float, guidance_rescale: float = 0.0,
                 replay: bool = True, cuda_graphs: bool = False, controls: Optional["ControlStack"] = None,
                 control_concepts: bool = False, crop_margin: Optional[int] = None,
                 faces: Optional["FacePasses"] = None, graphs: Optional[GraphSet] = None):
        self.unet, self.record, self.weights = unet, record, weights
        self.controls, self.control_concepts = controls, control_concepts
        self.images = masks.shape[0]
        self.replay = replay  # False: the base pass runs plain attention (ablation: no layout preservation)
        self.rows = RowLayout(self.images, with_source=replay and record.control.store == "recompute")
        self.masks, self.present = masks, [list(p) for p in present]
        self.guidance, self.guidance_rescale = guidance, guidance_rescale
        self.dtype = next(unet.parameters()).dtype
        count = masks.shape[1]
        self.faces = faces
        face_js = faces.concepts if faces is not None else []
        others = [j for j in range(count) if j not in face_js]
        shape = lambda cond: (cond[0].shape[1:], cond[1].shape[1:])  # noqa: E731
        shapes = {shape(c) for c in [base_cond, *(concept_cond[j] for j in others)]}
        # crops are for the LoRA concepts: a face pass's IdentityNet residuals are for the whole latent
        crops = self._crop_boxes(unet, masks, crop_margin, control_concepts, self.present)
        self.crops = {j: box for j, box in crops.items() if j not in face_js}
        self.passes = [dataclasses.replace(p, concepts=tuple(others[j] for j in p.concepts))
                       for p in weights.passes(len(others), self.rows.rows,
                                               one_call_possible=len(shapes) == 1 and not self.crops)]
        by_shape: dict = {}
        for j in face_js:
            by_shape.setdefault(shape(concept_cond[j]), []).append(j)
        self.passes += [UNetPass(FaceRows(tuple(js)), False, tuple(js)) for js in by_shape.values()]
        # conditioning of each pass, made once: a captured graph keeps its inputs' pointers
        base_rows = cfg_rows(base_cond, self.images)
        if self.rows.with_source:  # the source rows run the global prompt's cond
            cond_only = cfg_rows((base_cond[0][1:], base_cond[1][1:]), self.images)
            base_rows = tuple(torch.cat([a, b]) for a, b in zip(base_rows, cond_only))
        concept_rows = [cfg_rows(c, self.images) for c in concept_cond]
        self.conds = [self._pass_cond(p, base_rows, concept_rows) for p in self.passes]
        # one CUDA graph per role (base pass, each concept, or all in one), captured at its first call, or kept
        # from an earlier run (graphs: a KeptGraphs' stage2)
        self.cuda_graphs, self.graphs = cuda_graphs, graphs if graphs is not None else GraphSet()
        self.run = object()  # names this stage's values in self.graphs (cross-attention keys and values)
        self.next_call = 0
        self.pending_checks: list[Tensor] = []  # the blending calls' timestep checks, read at the run's end
        self.evaluations = 0

    @staticmethod
    def _crop_boxes(unet: torch.nn.Module, masks: Tensor, crop_margin: Optional[int], control_concepts: bool,
                    present: Sequence[Sequence[int]]) -> dict[int, CropBox]:
        """The crop of each active concept whose box is smaller than the latent (none: the exact path)."""
        if crop_margin is None:
            return {}
        if control_concepts:
            raise OptionError("concept_crop does not combine with control_concepts: the ControlNets' residuals are "
                              "for the whole latent")
        size = tuple(masks.shape[-2:])
        boxes = concept_boxes(masks, present, crop_margin, unet_multiple(unet))
        return {j: box for j, box in enumerate(boxes) if box is not None and not box.covers(size)}

    @property
    def one_call(self) -> bool:
        """The base pass and every concept pass of a step are one UNet call."""
        return len(self.passes) == 1

    @property
    def schedule(self) -> CallSchedule:
        return self.record.schedule

    @property
    def sigmas(self) -> Tensor:
        """Stage 1's sigmas, fp32 on the UNet's device (what a k-diffusion sampler takes)."""
        return self.record.sigmas.to(next(self.unet.parameters()).device, torch.float32)

    @property
    def noise(self) -> Tensor:
        """Stage 1's initial noise (B, C, h, w): the VP latents entering its first step."""
        return self.record.noise

    # -- driving -----------------------------------------------------------------------------------------
    def __enter__(self) -> "BlendedEps":
        self.reset()
        self.record.control.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.record.control.__exit__(*exc)

    def reset(self) -> None:
        """Start again at the run's first model call (entering ``with stage2:`` does this)."""
        self.next_call, self.pending_checks = 0, []

    def denoiser(self, schedule: Optional[NoiseSchedule] = None) -> EpsDenoiser:
        """k-diffusion's model(x, sigma) -> denoised over this blended prediction."""
        return EpsDenoiser(self, schedule)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        schedule, index = self.record.schedule, self.next_call
        if index >= len(schedule.calls):
            raise ScheduleError(f"stage 2 was called {index + 1} times, but stage 1's {schedule.sampler} run made "
                                f"{len(schedule.calls)} model calls: drive it with stage 1's sampler and sigmas, "
                                f"and enter `with stage2:` (or call reset()) before each run")
        self.next_call += 1
        call = schedule.calls[index]
        if not call.blending:  # no UNet work is queued here, so reading t from the device costs nothing
            schedule.check(index, t)
            return self.record.eps[index]
        if index == schedule.first_blend_call:
            schedule.check(index, t)
            self._check_entry(index, x)
        else:
            self.pending_checks.append((t.reshape(-1)[0].float() - call.t).abs() <= 1e-2)
        eps = self._blend(index, x, t)
        if self.next_call == len(schedule.calls):
            self._read_pending_checks()
        return eps

    def _check_entry(self, index: int, x: Tensor) -> None:
        stage1 = self.record.latents[index]
        if x.shape != stage1.shape:
            raise ScheduleError(f"stage 2 entered the blend start with latents of shape {tuple(x.shape)}, stage 1 "
                                f"with {tuple(stage1.shape)}")
        error = float((x.float() - stage1.float()).abs().max())
        scale = max(1.0, float(stage1.abs().max()))
        if error > 1e-3 * scale:
            raise ScheduleError(f"stage 2 entered the blend start (model call {index}) {error:.4g} away from stage 1's "
                                f"latent (max abs; largest value {scale:.3g}): drive it with stage 1's sampler, sigmas "
                                f"and seeds, starting from the noise times sqrt(1 + sigmas[0]^2)")

    def _read_pending_checks(self) -> None:
        checks, self.pending_checks = self.pending_checks, []
        if checks and not bool(torch.stack(checks).all()):  # one device read per run
            raise ScheduleError(f"stage 2's blending calls were not at the timesteps of stage 1's "
                                f"{self.record.schedule.sampler} run: drive it with stage 1's sampler and sigmas")

    # -- one blending call -------------------------------------------------------------------------------
    @staticmethod
    def _pass_cond(p: UNetPass, base_rows: Conditioning, concept_rows: Sequence[Conditioning]) -> Conditioning:
        parts = ([base_rows] if p.base else []) + [concept_rows[j] for j in p.concepts]
        return torch.cat([c for c, _ in parts]), torch.cat([y for _, y in parts])

    def _blend(self, index: int, x: Tensor, t: Tensor) -> Tensor:
        t = t.reshape(-1)[:1]
        control, rows, n = self.record.control, self.rows, self.images
        size = tuple(x.shape[-2:])
        base_x = [x, self.record.latents[index], x] if rows.with_source else [x, x]
        base = x  # replaced by the base pass's rows
        # each pass's concept rows as (concepts, 2, images, C, h, w): [uncond x images; cond x images] per concept
        blocks: list[tuple[tuple[int, ...], Tensor]] = []
        acting = self.controls.active(self.schedule.calls[index].step) if self.controls is not None else ()
        for p, cond in zip(self.passes, self.conds):
            control.set_call("replay" if p.base and self.replay else "plain", index, rows)
            # a cropped concept runs alone (never with the base rows): its crop of x, its eps pasted back
            crop = self.crops.get(p.concepts[0]) if not p.base and len(p.concepts) == 1 else None
            concept_x = x if crop is None else crop.crop(x)
            batch = torch.cat((base_x if p.base else []) + [concept_x, concept_x] * len(p.concepts))
            # the rows the ControlNets feed: the base rows first in the call, or all of them
            control_rows = batch.shape[0] if self.control_concepts else rows.rows if p.base else 0
            out = self._unet(batch, t, cond, p.role, acting if control_rows else (), control_rows)
            if crop is not None:
                out = crop.paste(out, size)
            if p.base:
                base, out = out[:rows.rows], out[rows.rows:]
            blocks.append((p.concepts, out.view(len(p.concepts), 2, n, *out.shape[1:])))
        control.set_call("plain")
        eps = []
        for b in range(n):  # each image with its own masks and the concepts found in it
            found = self.present[b]
            base_u = base[rows.uncond.start + b:rows.uncond.start + b + 1]
            base_c = base[rows.cond.start + b:rows.cond.start + b + 1]
            concepts = self._concept_rows(blocks, found, b)
            masks = self.masks[b] if found == list(range(self.masks.shape[1])) else self.masks[b][found]
            if self.guidance_rescale:  # the kernel blends; the rescale needs the blended halves
                eps_u, eps_c = kernels.blend_eps(base_u, base_c, concepts, masks)
                eps.append(apply_guidance(eps_u, eps_c, self.guidance, self.guidance_rescale))
            else:
                eps.append(kernels.blend_guided(base_u, base_c, concepts, masks, self.guidance))
        return eps[0] if n == 1 else torch.cat(eps)

    @staticmethod
    def _concept_rows(blocks: Sequence[tuple[tuple[int, ...], Tensor]], found: Sequence[int],
                      image: int) -> "kernels.ConceptEps":
        """Image `image`'s [uncond, cond] rows of the concepts `found`, in order, for kernels.blend_*: a view of the
        UNet output (k, 2, C, h, w) when they are one pass's concepts and the batch has one image (the grouped
        call's usual case: no copy), else a list of (2, C, h, w) views that the blend stacks."""
        for concepts, rows in blocks:
            if rows.shape[2] == 1 and concepts == tuple(found):
                return rows[:, :, 0]
        by_concept = {j: rows[i] for concepts, rows in blocks for i, j in enumerate(concepts)}
        return [by_concept[j][:, image] for j in found]

    def _cross_kv(self, role: Role, context: Tensor) -> Optional[CrossKV]:
        """The role's cross-attention keys and values of its context, computed at its first call of this run under
        its weights (None for face passes: their calls project the context)."""
        if isinstance(role, FaceRows) or not isinstance(self.unet, UNet):
            return None

        def make(into: Optional[CrossKV]) -> CrossKV:
            with self.weights.applied(role):
                return self.unet.cross_kv(context, into)
        return self.graphs.constant(("cross_kv", role, context.shape), self.run, make)

    def _forward(self, x: Tensor, t: Tensor, cond: Conditioning, role: Role, acting: tuple[int, ...] = (),
                 control_rows: int = 0, kv: Optional[CrossKV] = None) -> Tensor:
        residuals = None
        if acting:  # the ControlNets run outside the role's weights: concept LoRAs are the UNet's alone
            r = control_rows
            residuals = self.controls.residuals(acting, x[:r], t[:r], cond[0][:r], cond[1][:r])
        if isinstance(role, FaceRows):  # IdentityNet on every row, attending to the face tokens
            face = self.faces.residuals(role.concepts, x, t, cond)
            residuals = face if residuals is None else face + residuals
            with self.faces.applied(role.concepts):
                return self.unet(x, t, *cond, control=residuals)
        with self.weights.applied(role), self.unet.using_cross_kv(kv) if kv is not None else nullcontext():
            return self.unet(x, t, *cond, control=residuals)

    def _unet(self, x: Tensor, t: Tensor, cond: Conditioning, role: Role, acting: tuple[int, ...] = (),
              control_rows: int = 0) -> Tensor:
        """One UNet call under the role's weights (and the acting ControlNets' residuals on its first control_rows
        rows): its output (rows, C, h, w) in fp32."""
        self.evaluations += x.shape[0]
        # the graph keeps this function: through a proxy, so that self.graphs -> graph -> function -> self is no
        # reference cycle (one would keep stage 1's store, gigabytes, alive after generate until the next gc); a
        # kept graph's function is called no more (GraphSet makes a call whose capture failed anew)
        this = weakref.proxy(self)

        kv = self._cross_kv(role, cond[0])

        def forward(x_: Tensor, t_: Tensor, context: Tensor, y: Tensor) -> Tensor:  # x (rows, C, h, w) fp32, t (1,)
            return this._forward(x_.to(this.dtype), t_.expand(x_.shape[0]), (context, y), role, acting,
                                 control_rows, kv).float()
        if not self.cuda_graphs:
            return forward(x, t, *cond)
        # the casts run inside the graph. One pass a step: the blend reads its output before the next replay, so no
        # copy of it. Several: the step's other graphs replay before the blend, and they share one memory pool in
        # which a graph recorded later (a ControlNet's window opening mid-run) may place its output where an
        # earlier graph keeps temporaries: each output is copied out (seen as graphs != eager, merged concepts with
        # two ControlNet windows)
        key = (role, acting, control_rows, x.shape, cond[0].shape, cond[1].shape)
        call = self.graphs.get(key, lambda pool: GraphedCall(forward, pool=pool, copy_output=not self.one_call))
        return call(x, t, *cond)
