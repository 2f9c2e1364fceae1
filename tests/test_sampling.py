"""omg.sampling: schedule and DDIM against diffusers, k-diffusion wrapper and samplers on an analytic denoiser,
guidance, the step hook, resuming, NaN detection."""
import math

import numpy as np
import pytest
import torch

from omg.errors import SamplingError
from omg.sampling import (EpsDenoiser, NoiseSchedule, StepInfo, apply_guidance, ddim_sample, get_sampler,
                          guided_eps, karras_sigmas, randn_cpu, rescale_guidance, run_sampler, sample_ddim,
                          unet_eps_fn)

SCHEDULE = NoiseSchedule.sdxl()
F64 = torch.float64


def k_diffusion():
    pytest.importorskip("setuptools")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("k_diffusion")


def make_eps_fn(channels: int = 4, seed: int = 1):
    """A fixed nonlinear eps(x, t): mixes channels, depends on t smoothly, so a wrong t or x scaling shows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(channels, channels, generator=g, dtype=F64) / math.sqrt(channels)
    b = torch.randn(channels, generator=g, dtype=F64)

    def eps_fn(x, t, **extra):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        mixed = torch.einsum("oc,bchw->bohw", w.to(x), x)
        return torch.tanh(mixed + b.to(x).view(1, -1, 1, 1) * t / 500) + 0.3 * x * torch.cos(t / 137)
    return eps_fn


def gaussian_eps_fn(mu: float, s: float):
    """Exact eps for data ~ N(mu, s^2) per element: D(x~, sigma) = (s^2 x~ + sigma^2 mu) / (s^2 + sigma^2)."""
    def eps_fn(x, t, **extra):
        sigma = SCHEDULE.t_to_sigma(t).to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        x_ve = x * (1 + sigma ** 2).sqrt()
        return (x_ve - mu) * sigma / (s ** 2 + sigma ** 2)
    return eps_fn


def ode_endpoint(noise, sigmas, mu: float, s: float):
    """Probability-flow ODE for N(mu, s^2): (x~ - mu) / sqrt(s^2 + sigma^2) is constant; returns the VP latent."""
    hi, lo = float(sigmas[0]), float(sigmas[-1])
    x_ve = noise * math.sqrt(1 + hi ** 2)
    end = mu + (x_ve - mu) * math.sqrt(s ** 2 + lo ** 2) / math.sqrt(s ** 2 + hi ** 2)
    return end / math.sqrt(1 + lo ** 2)


# ------------------------------------------------------------------------------------------- schedule

def test_schedule_matches_reference_values_and_diffusers():
    from diffusers import DDIMScheduler
    assert SCHEDULE.sigma_min == pytest.approx(0.029167, abs=1e-6)
    assert SCHEDULE.sigma_max == pytest.approx(14.614641, abs=1e-6)
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(SCHEDULE.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 30, 50, 1000 - 1])
def test_timesteps_match_diffusers(spacing, steps):
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(steps_offset=1, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    assert SCHEDULE.timesteps(steps, spacing).tolist() == ref.timesteps.tolist()


def test_timesteps_reject_bad_arguments():
    with pytest.raises(SamplingError, match="steps"):
        SCHEDULE.timesteps(0)
    with pytest.raises(SamplingError, match="spacing"):
        SCHEDULE.timesteps(10, "cosine")
    with pytest.raises(SamplingError, match="leave"):
        SCHEDULE.timesteps(1000, "leading")  # 999 + steps_offset 1 is past the end


def test_sigmas_and_t_match_k_diffusion():
    kd = k_diffusion()
    from k_diffusion.external import DiscreteEpsDDPMDenoiser
    ref = DiscreteEpsDDPMDenoiser(None, SCHEDULE.alphas_cumprod, quantize=False)
    torch.testing.assert_close(SCHEDULE.sigmas, ref.sigmas, rtol=1e-12, atol=0)
    sigma = torch.cat([torch.rand(200, dtype=F64) * 16, SCHEDULE.sigmas[[0, 1, 500, 998, 999]],
                       torch.tensor([1e-3, 100.0], dtype=F64)])  # out of range both ways: clamped
    torch.testing.assert_close(SCHEDULE.sigma_to_t(sigma), ref.sigma_to_t(sigma), rtol=0, atol=1e-9)
    t = torch.rand(200, dtype=F64) * 999
    torch.testing.assert_close(SCHEDULE.t_to_sigma(t), ref.t_to_sigma(t).double(), rtol=1e-6, atol=0)
    assert SCHEDULE.sigma_to_t(SCHEDULE.sigmas).tolist() == list(range(1000))  # integer t exactly
    torch.testing.assert_close(karras_sigmas(20, 0.0292, 14.6146),
                               kd.sampling.get_sigmas_karras(20, 0.0292, 14.6146).double(), rtol=1e-6, atol=0)


def test_sampling_sigmas_ends():
    ts = SCHEDULE.timesteps(50, "leading")
    assert SCHEDULE.sampling_sigmas(50)[-1] == 0
    ddim = SCHEDULE.sampling_sigmas(50, to_zero=False)
    assert ddim[-1] == SCHEDULE.sigmas[0] and torch.equal(ddim[:-1], SCHEDULE.sigmas[ts])
    k = SCHEDULE.sampling_sigmas(12, "karras", to_zero=False)
    assert len(k) == 13 and k[0] == pytest.approx(SCHEDULE.sigma_max) and k[-1] == pytest.approx(SCHEDULE.sigma_min)


# ------------------------------------------------------------------------------------------- DDIM vs diffusers

@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("to_zero", [False, True])
def test_deterministic_ddim_lands_on_the_next_sigma_exactly(dtype, to_zero):
    """eta = 0 skips the sigma_up / sigma_down kernels: sqrt(land^2 - 0^2) is land exactly in binary floating point,
    so the step is x0 + sigma_next * eps, bit for bit, the formula with eta's terms computed."""
    from omg.sampling import sample_ddim
    sigmas = SCHEDULE.sampling_sigmas(30, to_zero=to_zero).to(dtype)
    land = sigmas[1:]
    assert torch.equal((land ** 2 - (0.0 * land) ** 2).sqrt(), land)
    eps_fn = make_eps_fn()
    model = EpsDenoiser(lambda x, t: eps_fn(x.double(), t).to(x.dtype), SCHEDULE)
    x0 = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(3), dtype=dtype) * sigmas[0]
    x = x0
    for i in range(len(sigmas) - 1):  # the eq. 12 step with eta's terms written out (eta = 0)
        sigma, nxt = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * x.new_ones([x.shape[0]]))
        up = (0.0 * nxt * (1 - (nxt / sigma) ** 2).sqrt()).clamp(max=nxt)
        x = denoised + (nxt ** 2 - up ** 2).sqrt() * ((x - denoised) / sigma)
    assert torch.equal(sample_ddim(model, x0, sigmas, disable=True), x)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_equals_diffusers_step_by_step(spacing, eta):
    from diffusers import DDIMScheduler
    steps = 25
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                        timestep_spacing=spacing, set_alpha_to_one=False, clip_sample=False)
    ref.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()  # diffusers keeps fp32; compare the step rule in fp64
    ref.final_alpha_cumprod = ref.alphas_cumprod[0]
    ref.set_timesteps(steps)
    eps_fn = make_eps_fn()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 6, 5, generator=g, dtype=F64)
    zs = [torch.randn(2, 4, 6, 5, generator=g, dtype=F64) for _ in range(steps)]

    theirs, x = [x0], x0
    for i, t in enumerate(ref.timesteps):
        x = ref.step(eps_fn(x, t), t, x, eta=eta, variance_noise=zs[i]).prev_sample
        theirs.append(x)

    infos, noise = [], iter(zs)
    out = ddim_sample(eps_fn, x0, SCHEDULE.timesteps(steps, spacing), eta=eta, callback=infos.append,
                      disable=True, noise_sampler=lambda s, s_next: next(noise))
    ours = [info.x for info in infos] + [out]
    assert [info.i for info in infos] == list(range(steps))
    assert [info.t for info in infos] == ref.timesteps.tolist()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().max() <= 1e-6, f"step {i}: {(a - b).abs().max():.3g}"
    # eps in the hook is the prediction at that step
    torch.testing.assert_close(infos[3].eps, eps_fn(theirs[3], ref.timesteps[3]), rtol=0, atol=1e-9)


def diffusers_ddim_run(spacing, steps, eta, x0, zs, eps_fn):
    """diffusers' DDIMScheduler driven step by step (its alphas in fp64, so the step rule is what is compared)."""
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                        timestep_spacing=spacing, set_alpha_to_one=False, clip_sample=False)
    ref.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
    ref.final_alpha_cumprod = ref.alphas_cumprod[0]
    ref.set_timesteps(steps)
    xs, x = [x0], x0
    for i, t in enumerate(ref.timesteps):
        x = ref.step(eps_fn(x, t), t, x, eta=eta, variance_noise=zs[i]).prev_sample
        xs.append(x)
    return ref.timesteps, xs


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_follows_diffusers_prev_timestep_when_steps_do_not_divide_1000(spacing, eta):
    """diffusers steps from t to t - 1000 // N, not to the next listed timestep: at N = 37 "trailing" and
    "linspace" timesteps are spaced by 27 or 28, so its steps land between them; ddim_sample's default follows."""
    steps = 37
    eps_fn = make_eps_fn()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 6, 5, generator=g, dtype=F64)
    zs = [torch.randn(2, 4, 6, 5, generator=g, dtype=F64) for _ in range(steps)]
    ref_ts, theirs = diffusers_ddim_run(spacing, steps, eta, x0, zs, eps_fn)
    ts = SCHEDULE.timesteps(steps, spacing)
    assert ts.tolist() == ref_ts.tolist()

    def run(**kw):
        infos, noise = [], iter(zs)
        out = ddim_sample(eps_fn, x0, ts, eta=eta, callback=infos.append, disable=True,
                          noise_sampler=lambda s, s_next: next(noise), **kw)
        return infos, [info.x for info in infos] + [out]

    infos, ours = run()
    assert [info.t for info in infos] == ref_ts.tolist()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().max() <= 1e-6, f"step {i}: {(a - b).abs().max():.3g}"
    # resuming mid-run keeps diffusers' rule (the landing sigmas are sliced with the steps)
    resumed = ddim_sample(eps_fn, theirs[20], ts, eta=eta, start=20, disable=True,
                          noise_sampler=(lambda it: lambda s, s_next: next(it))(iter(zs[20:])))
    assert (resumed - theirs[-1]).abs().max() <= 1e-6

    # "listed" is DDIM over sampling_sigmas (run_sampler, generate): equal to diffusers only for "leading"
    _, listed = run(prev_timestep="listed")
    noise = iter(zs)
    via_sigmas = run_sampler(eps_fn, x0, SCHEDULE.sampling_sigmas(steps, spacing, to_zero=False), "ddim",
                             eta=eta, disable=True, noise_sampler=lambda s, s_next: next(noise))
    assert torch.equal(listed[-1], via_sigmas)
    rel = float((listed[-1] - theirs[-1]).norm() / theirs[-1].norm())
    if spacing == "leading":
        assert torch.equal(listed[-1], ours[-1])  # both rules take the same code path, bit for bit
    else:
        assert rel > 1e-3, rel


def test_prev_timestep_rule_is_checked():
    with pytest.raises(SamplingError, match="prev_timestep"):
        ddim_sample(make_eps_fn(), torch.zeros(1, 4, 2, 2), SCHEDULE.timesteps(5), prev_timestep="next")
    with pytest.raises(SamplingError, match="DDIM option"):
        run_sampler(make_eps_fn(), torch.zeros(1, 4, 2, 2), SCHEDULE.sampling_sigmas(5), "euler",
                    landing_sigmas=SCHEDULE.sampling_sigmas(5)[1:])


def test_ddim_is_euler_and_ancestral_euler_of_k_diffusion():
    kd = k_diffusion()
    model = EpsDenoiser(make_eps_fn())
    sigmas = SCHEDULE.sampling_sigmas(20, "trailing", to_zero=False)
    x = torch.randn(1, 4, 5, 5, dtype=F64) * sigmas[0]
    ours = sample_ddim(model, x, sigmas, disable=True)
    theirs = kd.sampling.sample_euler(model, x, sigmas, disable=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    zs = torch.randn(20, 1, 4, 5, 5, dtype=F64)
    noise = lambda: (lambda it: lambda s, sn: next(it))(iter(zs))  # noqa: E731
    ours = sample_ddim(model, x, sigmas, disable=True, eta=0.7, noise_sampler=noise())
    theirs = kd.sampling.sample_euler_ancestral(model, x, sigmas, disable=True, eta=0.7, noise_sampler=noise())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------- denoiser

def test_eps_denoiser_matches_k_diffusion_wrapper():
    k_diffusion()
    from k_diffusion.external import DiscreteEpsDDPMDenoiser
    eps_fn = make_eps_fn()
    ref = DiscreteEpsDDPMDenoiser(eps_fn, SCHEDULE.alphas_cumprod, quantize=False)
    ours = EpsDenoiser(eps_fn, SCHEDULE)
    x = torch.randn(3, 4, 4, 4, dtype=F64) * 5
    sigma = torch.tensor([14.6, 0.7, 0.03], dtype=F64)
    torch.testing.assert_close(ours(x, sigma), ref(x, sigma), rtol=0, atol=1e-10)
    x32 = x.float()
    torch.testing.assert_close(ours(x32, sigma.float()), ref(x32, sigma.float()), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- analytic denoiser

MU, S = 0.4, 0.5


@pytest.mark.parametrize("sampler,spacing,steps,order", [
    ("ddim", "trailing", 200, 1), ("ddim", "karras", 200, 1), ("euler", "karras", 200, 1),
    ("heun", "karras", 40, 2), ("dpmpp_2m", "karras", 40, 2)])
def test_ode_samplers_converge_to_the_exact_endpoint(sampler, spacing, steps, order):
    """Sigmas end at sigma_min (no last jump to 0), where the exact ODE endpoint is known: the error
    vanishes at the sampler's order (x4 steps: /4 first order, /16 second)."""
    if sampler != "ddim":
        k_diffusion()
    noise = torch.randn(1, 4, 8, 8, dtype=F64)
    errs = []
    for n in (steps, 4 * steps):
        sigmas = SCHEDULE.sampling_sigmas(n, spacing, to_zero=False)
        out = run_sampler(gaussian_eps_fn(MU, S), noise, sigmas, sampler, disable=True)
        errs.append((out - ode_endpoint(noise, sigmas, MU, S)).abs().max().item())
    ratio = errs[0] / errs[1]
    assert 0.75 * 4 ** order < ratio < 1.5 * 4 ** order, f"{sampler}: errors {errs}"
    assert errs[1] < (1e-2 if order == 1 else 1e-3), f"{sampler}: errors {errs}"


@pytest.mark.parametrize("sampler,steps,opts", [("ddim", 400, {"eta": 1.0}), ("euler_ancestral", 400, {}),
                                                ("dpmpp_2m_sde", 40, {})])
def test_stochastic_samplers_reach_the_data_distribution(sampler, steps, opts):
    """20000 independent samples end near N(MU, S^2) (first-order samplers need many steps: their std is biased low)."""
    if sampler != "ddim":
        k_diffusion()
    sigmas = SCHEDULE.sampling_sigmas(steps, "karras")
    g = torch.Generator().manual_seed(3)
    noise = randn_cpu((1, 1, 100, 200), g, dtype=F64)
    out = run_sampler(gaussian_eps_fn(MU, S), noise, sigmas, sampler, generator=g, disable=True, **opts)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S, rel=0.03)
    assert not torch.allclose(out, ode_endpoint(noise, sigmas, MU, S), atol=0.05)  # noise was injected


def test_samplers_are_seeded_by_the_generator():
    k_diffusion()
    sigmas = SCHEDULE.sampling_sigmas(10, "karras")
    runs = [run_sampler(gaussian_eps_fn(MU, S), torch.zeros(2, 4, 4, 4), sigmas, "euler_ancestral",
                        generator=torch.Generator().manual_seed(seed), disable=True) for seed in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    # one generator per batch item: item 1 of a batch equals a batch of one with item 1's generator
    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8)]  # noqa: E731
    batch = run_sampler(gaussian_eps_fn(MU, S), torch.zeros(2, 4, 4, 4), sigmas, "ddim", eta=1.0,
                        generator=gens(), disable=True)
    single = run_sampler(gaussian_eps_fn(MU, S), torch.zeros(1, 4, 4, 4), sigmas, "ddim", eta=1.0,
                         generator=gens()[1:], disable=True)
    torch.testing.assert_close(batch[1:], single, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- hooks, resume, errors

def test_resume_from_the_latent_saved_at_a_step():
    eps_fn = make_eps_fn()
    sigmas = SCHEDULE.sampling_sigmas(20, "leading", to_zero=False)
    noise = torch.randn(1, 4, 6, 6, dtype=F64)
    saved = {}
    full = run_sampler(eps_fn, noise, sigmas, callback=lambda info: saved.setdefault(info.i, info.x), disable=True)
    steps_seen = []
    resumed = run_sampler(eps_fn, saved[7], sigmas, start=7, callback=lambda info: steps_seen.append(info.i),
                          disable=True)
    assert steps_seen == list(range(7, 20))
    torch.testing.assert_close(resumed, full, rtol=0, atol=1e-12)
    head = run_sampler(eps_fn, noise, sigmas, stop=7, disable=True)
    torch.testing.assert_close(head, saved[7], rtol=0, atol=1e-12)


def test_eps_hook_sees_every_step_and_can_modify_eps():
    eps_fn = make_eps_fn()
    seen = []

    def hooked(x, t, **extra):
        seen.append(float(t[0]))
        return eps_fn(x, t) * 0.0  # a modification must show in the result
    ts = SCHEDULE.timesteps(10, "leading")
    noise = torch.randn(1, 4, 4, 4, dtype=F64)
    out = ddim_sample(hooked, noise, ts, disable=True)
    assert seen == ts.tolist()
    # eps = 0 everywhere: x0 = x_vp / sqrt(abar_t), so DDIM just rescales the latent
    abar = SCHEDULE.alphas_cumprod
    torch.testing.assert_close(out, noise * (abar[0] / abar[ts[0]]).sqrt(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_nan_stops_sampling_naming_the_step(sampler):
    if sampler != "ddim":
        k_diffusion()
    eps_fn = make_eps_fn()
    ts = SCHEDULE.timesteps(10, "leading")

    def broken(x, t, **extra):
        eps = eps_fn(x, t)
        return eps.fill_(float("nan")) if float(t[0]) == ts[4] else eps
    sigmas = SCHEDULE.sigmas_at(ts, to_zero=sampler != "ddim")
    with pytest.raises(SamplingError, match=rf"step 4 \(t={int(ts[4])}\.00"):
        run_sampler(broken, torch.randn(1, 4, 4, 4), sigmas, sampler, disable=True)


def test_progress_bar_can_be_turned_off(capsys):
    sigmas = SCHEDULE.sampling_sigmas(7)
    run_sampler(make_eps_fn(), torch.randn(1, 4, 2, 2), sigmas, disable=False)
    assert "7/7" in capsys.readouterr().err
    run_sampler(make_eps_fn(), torch.randn(1, 4, 2, 2), sigmas, disable=True)
    assert capsys.readouterr().err == ""


def test_unet_eps_fn_runs_the_unet_in_its_dtype_and_keeps_fp32_latents():
    class HalfUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1, dtype=torch.bfloat16))

        def forward(self, x, t, context, y):
            assert x.dtype == torch.bfloat16 and t.dtype == torch.float32 and context.shape[0] == x.shape[0]
            return x * self.w * 0.5
    eps_fn = unet_eps_fn(HalfUNet(), torch.zeros(2, 3, 8), torch.zeros(2, 5))
    out = run_sampler(guided_eps(eps_fn, 2.0), torch.randn(1, 4, 2, 2), SCHEDULE.sampling_sigmas(3), disable=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(SamplingError, match="conditioning batch"):
        eps_fn(torch.randn(3, 4, 2, 2), torch.ones(3))


def test_run_sampler_rejects_bad_arguments():
    sigmas = SCHEDULE.sampling_sigmas(5)
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(SamplingError, match="unknown sampler"):
        run_sampler(make_eps_fn(), x, sigmas, "dpmpp_9m", disable=True)
    with pytest.raises(SamplingError, match="start"):
        run_sampler(make_eps_fn(), x, sigmas, start=4, stop=2, disable=True)
    with pytest.raises(SamplingError, match="non-increasing"):
        run_sampler(make_eps_fn(), x, sigmas.flip(0), disable=True)


def test_get_sampler_returns_k_diffusion_functions():
    kd = k_diffusion()
    assert get_sampler("ddim") is sample_ddim
    assert get_sampler("dpmpp_2m") is kd.sampling.sample_dpmpp_2m


# ------------------------------------------------------------------------------------------- guidance

def test_guidance_rescale_against_independent_formula():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(3, 4, 5, 5, generator=g, dtype=F64), torch.randn(3, 4, 5, 5, generator=g, dtype=F64) * 2
    guidance, phi = 7.5, 0.7
    got = apply_guidance(u, c, guidance, phi).numpy()
    un, cn = u.numpy(), c.numpy()
    for b in range(3):
        cfg = un[b] + guidance * (cn[b] - un[b])
        scaled = cfg * np.std(cn[b], ddof=1) / np.std(cfg, ddof=1)
        np.testing.assert_allclose(got[b], phi * scaled + (1 - phi) * cfg, rtol=1e-12, atol=0)
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg
    cfg = u + guidance * (c - u)
    torch.testing.assert_close(rescale_guidance(cfg, c, phi), rescale_noise_cfg(cfg, c, phi), rtol=0, atol=1e-12)
    torch.testing.assert_close(apply_guidance(u, c, guidance), cfg, rtol=0, atol=0)


def test_guided_eps_runs_one_batched_call_uncond_first():
    calls = []
    cond_sign = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=F64).view(-1, 1, 1, 1)  # [uncond; cond] for B = 2

    def batched(x, t, **extra):
        calls.append((x.shape[0], t.tolist()))
        return x * cond_sign
    x, t = torch.randn(2, 4, 3, 3, dtype=F64), torch.tensor([500.0, 500.0], dtype=F64)
    out = guided_eps(batched, 3.0)(x, t)
    assert calls == [(4, [500.0] * 4)]
    torch.testing.assert_close(out, -x + 3.0 * (x - -x), rtol=0, atol=1e-12)
    with pytest.raises(SamplingError, match="rescale"):
        guided_eps(batched, 3.0, rescale=1.5)


def test_step_info_eps_and_x_from_sampler_coordinates():
    x_ve, denoised = torch.randn(1, 4, 2, 2, dtype=F64) * 3, torch.randn(1, 4, 2, 2, dtype=F64)
    info = StepInfo(i=0, sigma=3.0, t=900.0, x_sampler=x_ve, denoised=denoised)
    torch.testing.assert_close(info.eps, (x_ve - denoised) / 3.0)
    torch.testing.assert_close(info.x, x_ve / math.sqrt(10.0))


def test_randn_cpu_is_device_independent_and_per_item():
    a = randn_cpu((2, 4, 3, 3), [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    b = randn_cpu((1, 4, 3, 3), [torch.Generator().manual_seed(2)], dtype=F64)
    torch.testing.assert_close(a[1:].double(), b, rtol=0, atol=0)
    with pytest.raises(SamplingError, match="generators"):
        randn_cpu((3, 4), [torch.Generator()])


@pytest.mark.gpu
def test_seed_gives_the_same_latents_on_cpu_and_gpu():
    eps_fn = make_eps_fn()

    def run(device):
        noise = randn_cpu((1, 4, 8, 8), torch.Generator().manual_seed(0), device=device)
        return run_sampler(lambda x, t: eps_fn(x, t.to(x.dtype)), noise, SCHEDULE.sampling_sigmas(10),
                           "ddim", eta=1.0, generator=torch.Generator().manual_seed(1), disable=True).cpu()
    torch.testing.assert_close(run("cpu"), run("cuda"), rtol=0, atol=1e-4)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_sample_and_generate_step_ddim_as_diffusers_for_every_spacing(spacing):
    """omg.sample and omg.generate (no concepts, blend_steps=0) at a step count that does not divide 1000: the
    same latents as ddim_sample's diffusers rule (t -> t - T // N), which test_ddim_follows_diffusers_... checks
    against diffusers' DDIMScheduler; the "listed" rule gives other latents."""
    import omg
    from omg.model import SDXL
    from omg.sampling import ddim_sample, guided_eps, unet_eps_fn
    from omg.txt2img import sample_latents
    from omg.vae import VAEConfig

    model = SDXL.random(vae_config=VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), norm_groups=8), seed=5)
    steps, prompt, size = 7, "a photo of a cat", 64
    schedule = NoiseSchedule.sdxl()
    timesteps = schedule.timesteps(steps, spacing)
    context, y = model.conditioning([prompt], None, size, size)
    eps_fn = guided_eps(unet_eps_fn(model.unet, context, y), 5.0)
    noise = model.noise([torch.Generator().manual_seed(3)], size, size)
    expected = ddim_sample(eps_fn, noise, timesteps, schedule)
    listed = ddim_sample(eps_fn, noise, timesteps, schedule, prev_timestep="listed")
    got = sample_latents(model, prompt, steps=steps, guidance=5.0, seed=3, height=size, width=size,
                         spacing=spacing, progress=False)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (got - listed).abs().max() > 1e-3
    result = omg.generate(model, prompt, [], steps=steps, blend_steps=0, guidance=5.0, seed=3, height=size,
                          width=size, spacing=spacing, negative_prompt=None, progress=False)
    assert (result.latent - expected).abs().max() <= 1e-5 * expected.abs().max()
