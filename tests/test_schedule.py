"""Stage alignment (omg.schedule): stage 2 enters the blend start exactly in stage 1's state for every sampler, and
driving stage 2 from another sampler loop works as BlendedEps documents, or is refused."""
import inspect
import textwrap
import warnings

import pytest
import torch

import omg
from omg.errors import ScheduleError
from omg.sampling import SAMPLERS, NoiseSchedule, get_sampler
from omg.schedule import CallSchedule
from omg.stage2 import BlendedEps
from test_pipeline import BLEND, H, PROMPT, STEPS, W, model  # noqa: F401 (fixture)

MAN = dict(class_name="man", prompt="a photo of sks man", mask=(0, 0, 48, 64))


def first_calls_of_steps(sampler, sigmas):
    """Each step's first model-call index and the number of calls, from the sampler's own loop (no omg code
    between): its per-step callback follows the step's first model call."""
    calls, firsts = [0], []

    def denoiser(x, sigma, **kwargs):
        calls[0] += 1
        return torch.zeros_like(x)

    fn = get_sampler(sampler)
    kwargs = {"noise_sampler": lambda s, s_next: torch.zeros(1, 1, 1, 1)} \
        if "noise_sampler" in inspect.signature(fn).parameters else {}
    fn(denoiser, torch.zeros(1, 1, 1, 1), sigmas.float(), callback=lambda d: firsts.append(calls[0] - 1),
       disable=True, **kwargs)
    return firsts, calls[0]


def unet_calls(model, fn):
    """(row-0 latent, timestep) of every UNet call that fn makes."""
    seen = []
    handle = model.unet.register_forward_pre_hook(lambda m, args: seen.append((args[0][0].clone(), args[1][0].item())))
    try:
        result = fn()
    finally:
        handle.remove()
    return result, seen


def generate(model, concepts, **kw):
    args = dict(steps=STEPS, blend_steps=BLEND, height=H, width=W, seed=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return omg.generate(model, PROMPT, concepts, **{**args, **kw})


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_stage2_enters_the_blend_start_in_stage1s_state(model, sampler):
    """The blend start is the first model call of step steps - blend_steps; stage 2's first UNet call is that call,
    with stage 1's latent and timestep there, exactly (two-call samplers used to start half a step early)."""
    sigmas = NoiseSchedule.sdxl().sampling_sigmas(STEPS, "leading", to_zero=sampler != "ddim")
    firsts, total = first_calls_of_steps(sampler, sigmas)
    result, seen = unet_calls(model, lambda: generate(model, [omg.Concept(**MAN)], sampler=sampler))
    stage1, stage2 = seen[:total], seen[total:]
    assert len(stage2) == total - firsts[STEPS - BLEND]  # one UNet call per blending model call (grouped)
    x1, t1 = stage1[firsts[STEPS - BLEND]]
    x2, t2 = stage2[0]
    assert t2 == t1
    assert torch.equal(x2, x1)  # exact
    # the callback's VP latent (what run_sampler(start=...) resumes from) divides by sqrt(1 + sigma^2) on the host
    torch.testing.assert_close(result.blend_start_latent[0], x1, rtol=1e-6, atol=1e-6)


def test_the_schedule_marks_whole_steps():
    sigmas = NoiseSchedule.sdxl().sampling_sigmas(4, "leading")
    calls = CallSchedule.plan("heun", sigmas, 2)
    assert [(c.step, c.blending) for c in calls.calls] == [
        (0, False), (0, False), (1, False), (1, False), (2, True), (2, True), (3, True)]
    assert calls.first_blend_call == 4 and calls.blend_calls == (4, 5, 6)
    assert calls.self_replay_calls(1) == (4, 5)


def _documented_recipe() -> str:
    """The code block of BlendedEps' docstring, as written."""
    doc = BlendedEps.__doc__
    block = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    return textwrap.dedent(block)


def test_the_documented_recipe_reproduces_stage2_with_k_diffusion(model):
    """BlendedEps' docstring code, run as written (k-diffusion's sample_euler drives stage 2), twice in a row."""
    result = generate(model, [omg.Concept(**MAN)], sampler="euler", keep_stage2=True)
    assert (result.latent - result.stage1_latent).abs().max() > 1e-3  # the concept did change the image
    code = _documented_recipe()
    assert "k_diffusion.sampling.sample_euler" in code and "with stage2:" in code
    for _ in range(2):  # a second run needs no reset
        scope = {"result": result, "model": model}
        with torch.no_grad():
            exec(code, scope)
        assert (scope["latent"] - result.latent).abs().max().item() <= 1e-5


def test_driving_stage2_over_another_schedule_is_refused(model):
    from k_diffusion.sampling import sample_dpmpp_2m, sample_euler, sample_heun
    result = generate(model, [omg.Concept(**MAN)], sampler="euler", keep_stage2=True)
    stage2 = result.stage2
    sigmas = stage2.sigmas
    start = stage2.noise * (1 + sigmas[0] ** 2).sqrt()
    with torch.no_grad():
        with pytest.raises(ScheduleError, match="timestep"), stage2:  # two calls a step: another timestep at call 2
            sample_heun(stage2.denoiser(), start, sigmas)
        with pytest.raises(ScheduleError, match="blend start"), stage2:  # another trajectory to the blend start
            sample_dpmpp_2m(stage2.denoiser(), start, sigmas)
        with pytest.raises(ScheduleError, match="blend start"), stage2:  # k-diffusion's VE start on SDXL's VP latent
            sample_euler(stage2.denoiser(), stage2.noise * sigmas[0], sigmas)
        other = NoiseSchedule.sdxl().sampling_sigmas(STEPS, "trailing").to(sigmas)
        with pytest.raises(ScheduleError, match="timestep"), stage2:
            sample_euler(stage2.denoiser(), stage2.noise * (1 + other[0] ** 2).sqrt(), other)
