"""Noise schedule, the DDIM loop, k-diffusion samplers over our UNet, classifier-free guidance, step hooks.

One sampler contract (k-diffusion's) for every sampler, ours and k-diffusion's alike:

    sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts) -> x

`model(x, sigma, **extra_args)` returns the denoised x, in k-diffusion's coordinates x = x0 + sigma * noise.
SDXL predicts eps on the "VP" latent x_vp = x / sqrt(1 + sigma^2) at timestep t(sigma); `EpsDenoiser`
adapts one to the other, and DDIM is written against the same contract (`sample_ddim`), so DDIM, Euler,
DPM++ ... are interchangeable and checked against each other.

Layers, bottom up (each a thin wrapper; the UNet stays a pure nn.Module):
    eps_fn(x_vp, t, **extra) -> eps        `unet_eps_fn` (UNet + fixed conditioning); `guided_eps` (CFG);
                                           the OMG sampler blends eps here, before guidance
    model(x, sigma, **extra) -> denoised   `EpsDenoiser(eps_fn, schedule)`
    sampler(model, x, sigmas, ...)         `sample_ddim`, or k_diffusion.sampling.sample_* (imported lazily)
    run_sampler(eps_fn, x_vp, sigmas, ...) VP latents in and out, steps [start, stop), CPU-seeded noise,
                                           NaN/inf check, progress bar, callback(StepInfo) per step

A custom sampler (the OMG method) plugs in at two places: an eps_fn wrapper sees (x, t) of every UNet
call and may change the noise prediction (blending goes before `guided_eps`); callback(StepInfo) sees
(step i, t, latent x, x0 prediction, guided eps) of every step, e.g. to keep the latent entering a step.
`run_sampler(..., start=i)` resumes from such a latent; `stop=i` ends a run at step i.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm, trange

from .errors import SamplingError

EpsFn = Callable[..., Tensor]  # eps_fn(x_vp, t, **extra_args) -> eps; t: (B,) float timesteps
Denoiser = Callable[..., Tensor]  # model(x, sigma, **extra_args) -> denoised; sigma: (B,)
Sampler = Callable[..., Tensor]  # sampler(model, x, sigmas, extra_args, callback, disable, **opts) -> x
Generators = Union[torch.Generator, Sequence[torch.Generator], None]

SPACINGS = ("leading", "trailing", "linspace", "karras")
# k-diffusion samplers with the common signature (dpm_fast / dpm_adaptive take sigma_min/max instead)
KDIFFUSION_SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms",
                       "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde")
SAMPLERS = ("ddim",) + KDIFFUSION_SAMPLERS


# ---------------------------------------------------------------------------------------------- schedule

@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Discrete DDPM schedule: alphas_cumprod[t] for t = 0..T-1 (fp64), sigma_t = sqrt((1 - a_t) / a_t)."""
    alphas_cumprod: Tensor  # (T,) fp64, decreasing, in (0, 1)

    def __post_init__(self) -> None:
        ac = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).cpu()
        if ac.ndim != 1 or len(ac) < 2 or not ((ac > 0) & (ac < 1)).all() or not (ac[1:] < ac[:-1]).all():
            raise ValueError(f"alphas_cumprod must be 1-D, decreasing, in (0, 1); got shape {tuple(ac.shape)}")
        object.__setattr__(self, "alphas_cumprod", ac)
        object.__setattr__(self, "_log_sigmas", {})  # per device: a host-to-device copy per call would sync

    def log_sigmas(self, device: torch.device) -> Tensor:
        """log sigmas (T,) fp64 on `device`, made once per device."""
        key = str(device)
        if key not in self._log_sigmas:
            self._log_sigmas[key] = self.sigmas.log().to(device)
        return self._log_sigmas[key]

    @classmethod
    def sdxl(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
             beta_end: float = 0.012) -> "NoiseSchedule":
        """SDXL/SD "scaled_linear" betas = linspace(sqrt(b0), sqrt(b1), T)^2 (SGM LegacyDDPMDiscretization)."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def sigmas(self) -> Tensor:
        """(T,) fp64, increasing with t (k-diffusion DiscreteSchedule.sigmas)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep by linear interpolation in log sigma, clamped to [0, T-1] (k-diffusion sigma_to_t).

        Computed in fp64 on sigma's device; returned as fp64 for fp64 sigma, else fp32.
        """
        log_sigmas = self.log_sigmas(sigma.device)
        ls = sigma.to(torch.float64).log().clamp(log_sigmas[0], log_sigmas[-1])
        low = (torch.searchsorted(log_sigmas, ls, right=True) - 1).clamp(0, len(log_sigmas) - 2)
        w = (ls - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
        return (low + w).to(torch.float64 if sigma.dtype == torch.float64 else torch.float32)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at a continuous timestep, log-linear between the integer ones (k-diffusion t_to_sigma); fp64."""
        log_sigmas = self.log_sigmas(t.device)
        t = t.to(torch.float64).clamp(0, len(log_sigmas) - 1)
        low = t.floor().long().clamp(max=len(log_sigmas) - 2)
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()

    def timesteps(self, steps: int, spacing: str = "leading", steps_offset: int = 1) -> Tensor:
        """Integer timesteps, descending (diffusers DDIMScheduler.set_timesteps; Lin et al. 2023 Table 2).

        leading: arange(N) * (T // N) + steps_offset; trailing: round(arange(T, 0, -T / N)) - 1;
        linspace: round(linspace(0, T - 1, N)).
        """
        T = self.num_train_timesteps
        if not isinstance(steps, int) or not 1 <= steps <= T:
            raise SamplingError(f"steps must be an integer in [1, {T}], got {steps!r}")
        if spacing == "leading":
            ts = torch.arange(steps, dtype=torch.float64) * (T // steps) + steps_offset
        elif spacing == "trailing":
            ts = torch.arange(T, 0, -T / steps, dtype=torch.float64).round() - 1
        elif spacing == "linspace":
            ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round()
        else:
            raise SamplingError(f"timestep spacing must be 'leading', 'trailing' or 'linspace', not {spacing!r}")
        ts = ts.long().sort(descending=True).values
        if ts.max() >= T or ts.min() < 0:
            raise SamplingError(f"{steps} {spacing} steps with steps_offset {steps_offset} leave [0, {T - 1}]")
        return ts

    def sigmas_at(self, timesteps: Tensor, to_zero: bool = True) -> Tensor:
        """(N+1,) fp64: sigma at each integer timestep, then 0, or sigma(t=0) when not to_zero.

        to_zero=False is diffusers' DDIM with set_alpha_to_one=False (SDXL): the last step lands on
        alphas_cumprod[0], not on 1.
        """
        timesteps = torch.as_tensor(timesteps).long().cpu()
        if timesteps.ndim != 1 or timesteps.min() < 0 or timesteps.max() >= self.num_train_timesteps:
            raise SamplingError(f"timesteps must be 1-D integers in [0, {self.num_train_timesteps - 1}]")
        last = torch.zeros(1, dtype=torch.float64) if to_zero else self.sigmas[:1]
        return torch.cat([self.sigmas[timesteps], last])

    def prev_sigmas(self, timesteps: Tensor, to_zero: bool = True) -> Tensor:
        """(N,) fp64: the sigma each step of diffusers' DDIMScheduler lands on, N = len(timesteps).

        diffusers steps from t to prev_timestep = t - T // N (DDIMScheduler.step), not to the next listed
        timestep; where that is negative, to the final sigma (0, or sigma(t=0) when not to_zero). For
        "leading" timesteps (spaced by T // N) this is the next listed timestep.
        """
        timesteps = torch.as_tensor(timesteps).long().cpu()
        if timesteps.ndim != 1 or len(timesteps) == 0:
            raise SamplingError(f"timesteps must be 1-D and non-empty, got shape {tuple(timesteps.shape)}")
        prev = timesteps - self.num_train_timesteps // len(timesteps)
        final = torch.zeros((), dtype=torch.float64) if to_zero else self.sigmas[0]
        return torch.where(prev >= 0, self.sigmas[prev.clamp(min=0)], final)

    def sampling_sigmas(self, steps: int, spacing: str = "leading", to_zero: bool = True) -> Tensor:
        """(steps+1,) fp64 sigmas for a sampler: timesteps of `spacing` (see sigmas_at), or Karras et al. 2022.

        Karras sigmas run from sigma_max to sigma_min, then 0; when not to_zero they end at sigma_min instead.
        """
        if spacing == "karras":
            if to_zero:
                return karras_sigmas(steps, self.sigma_min, self.sigma_max)
            return karras_sigmas(steps + 1, self.sigma_min, self.sigma_max)[:-1]
        return self.sigmas_at(self.timesteps(steps, spacing), to_zero)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """(steps+1,) fp64: (s_max^(1/rho) + ramp * (s_min^(1/rho) - s_max^(1/rho)))^rho, then 0 (Karras 2022 eq. 5)."""
    if steps < 1:
        raise SamplingError(f"steps must be >= 1, got {steps}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


# ---------------------------------------------------------------------------------------------- eps level

def unet_eps_fn(unet: torch.nn.Module, context: Tensor, y: Tensor) -> EpsFn:
    """eps_fn over an SDXL UNet with fixed conditioning: runs in the UNet's dtype, returns in x's dtype."""
    dtype = next(unet.parameters()).dtype

    def eps_fn(x: Tensor, t: Tensor, **extra_args: Any) -> Tensor:
        if x.shape[0] != context.shape[0]:
            raise SamplingError(f"latent batch {x.shape[0]} != conditioning batch {context.shape[0]}")
        return unet(x.to(dtype), t, context, y, **extra_args).to(x.dtype)
    return eps_fn


def rescale_guidance(eps: Tensor, eps_cond: Tensor, rescale: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, sec. 3.4, eqs. 15-16; diffusers rescale_noise_cfg).

    Per sample: eps_r = eps * std(eps_cond) / std(eps) (unbiased std over all but the batch dim),
    returned as rescale * eps_r + (1 - rescale) * eps.
    """
    dims = list(range(1, eps.ndim))
    rescaled = eps * (eps_cond.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * eps


def apply_guidance(eps_uncond: Tensor, eps_cond: Tensor, guidance: float, rescale: float = 0.0) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + g * (eps_c - eps_u), optionally rescaled."""
    eps = eps_uncond + guidance * (eps_cond - eps_uncond)
    return rescale_guidance(eps, eps_cond, rescale) if rescale else eps


def guided_eps(eps_fn: EpsFn, guidance: float, rescale: float = 0.0) -> EpsFn:
    """CFG as an eps_fn wrapper: one eps_fn call on [x; x], whose conditioning is [uncond; cond] (diffusers' order)."""
    if not 0.0 <= rescale <= 1.0:
        raise SamplingError(f"guidance rescale must be in [0, 1], got {rescale}")

    def cfg_eps_fn(x: Tensor, t: Tensor, **extra_args: Any) -> Tensor:
        t2 = torch.cat([t, t]) if t.ndim else t
        eps_uncond, eps_cond = eps_fn(torch.cat([x, x]), t2, **extra_args).chunk(2)
        return apply_guidance(eps_uncond, eps_cond, guidance, rescale)
    return cfg_eps_fn


# ---------------------------------------------------------------------------------------------- denoiser

class EpsDenoiser:
    """k-diffusion denoiser over an eps model: D(x, sigma) = x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma)).

    k-diffusion DiscreteEpsDDPMDenoiser (c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2+1)); SGM EpsScaling.
    t(sigma) is interpolated in log sigma, so the sigmas of integer timesteps give exactly those timesteps.
    """

    def __init__(self, eps_fn: EpsFn, schedule: Optional[NoiseSchedule] = None):
        self.eps_fn = eps_fn
        self.schedule = schedule if schedule is not None else NoiseSchedule.sdxl()

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args: Any) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])  # (B,)
        s = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        eps = self.eps_fn(x / (s * s + 1).sqrt(), self.schedule.sigma_to_t(sigma), **extra_args)
        return x - s * eps


# ---------------------------------------------------------------------------------------------- samplers

@torch.no_grad()
def sample_ddim(model: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                callback: Optional[Callable[[dict], None]] = None, disable: Optional[bool] = None,
                eta: float = 0.0, s_noise: float = 1.0,
                noise_sampler: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                landing_sigmas: Optional[Tensor] = None) -> Tensor:
    """DDIM (Song et al. 2020, eq. 12) in k-diffusion's coordinates x = x_vp * sqrt(1 + sigma^2).

    Dividing eq. 12 by sqrt(alpha_prev) gives x_next = x0 + sigma_down * eps + sigma_up * z, with
    sigma_up = eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2) (= DDIM's sigma_t / sqrt(alpha_prev))
    and sigma_down = sqrt(sigma_next^2 - sigma_up^2): eta = 0 is Euler, eta > 0 ancestral Euler with
    eta-scaled noise. sigma_up is capped at sigma_next (eta > 1), as k-diffusion does.

    landing_sigmas (len(sigmas) - 1,): step i lands on landing_sigmas[i] instead of sigmas[i + 1], and the VP
    latent it lands on enters step i + 1 as is, as if it were at sigmas[i + 1] (diffusers' DDIM rule, see
    ddim_sample; NoiseSchedule.prev_sigmas).
    """
    if eta < 0:
        raise SamplingError(f"DDIM eta must be >= 0, got {eta}")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = (lambda s, s_next: torch.randn_like(x)) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    if landing_sigmas is not None:
        landing_sigmas = torch.as_tensor(landing_sigmas).to(sigmas)
        if landing_sigmas.shape != (len(sigmas) - 1,):
            raise SamplingError(f"landing_sigmas must have shape ({len(sigmas) - 1},), "
                                f"got {tuple(landing_sigmas.shape)}")
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        land = sigma_next if landing_sigmas is None else landing_sigmas[i]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        eps = (x - denoised) / sigma
        if eta:
            sigma_up = (eta * land * (1 - (land / sigma) ** 2).sqrt()).clamp(max=land)
            sigma_down = (land ** 2 - sigma_up ** 2).sqrt()
        else:  # sigma_up = 0: sigma_down = sqrt(land^2) = land exactly (binary floating point), 11 kernels fewer
            sigma_down = land
        x = denoised + sigma_down * eps  # the deterministic part of eq. 12, over sqrt(alpha_prev)
        if eta and land > 0:
            x = x + noise_sampler(sigma, land) * (s_noise * sigma_up)
        if landing_sigmas is not None:  # the VP latent at `land` taken as at sigma_next (factor 1 when equal)
            x = x * ((1 + sigma_next ** 2) / (1 + land ** 2)).sqrt()
    return x


def get_sampler(sampler: Union[str, Sampler]) -> Sampler:
    """A sampler of the contract by name ("ddim" is ours; the others k-diffusion's, imported on first use)."""
    if callable(sampler):
        return sampler
    if sampler == "ddim":
        return sample_ddim
    if sampler not in KDIFFUSION_SAMPLERS:
        raise SamplingError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    try:
        with warnings.catch_warnings():  # k-diffusion -> clip warns about pkg_resources on import
            warnings.simplefilter("ignore")
            from k_diffusion import sampling as k_sampling
    except ImportError as e:
        raise ImportError(f"sampler {sampler!r} needs the k-diffusion package "
                          f"(pip install 'k-diffusion==0.1.1.post1' 'setuptools<81'); "
                          f"'ddim' needs nothing extra. Import failed with: {e}") from e
    return getattr(k_sampling, f"sample_{sampler}")


# ---------------------------------------------------------------------------------------------- noise

def randn_cpu(shape: Sequence[int], generator: Generators = None, device: Union[str, torch.device] = "cpu",
              dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise drawn in fp32 on the generator's device, then moved to `device`.

    With CPU generators (the default, and the global CPU RNG for None) a seed gives the same noise on any device;
    CUDA generators draw as diffusers with a CUDA generator does. A list of generators draws item b of the batch
    from generator b (an image keeps its noise in any batch).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise SamplingError(f"{len(generator)} generators for a batch of {shape[0]}")
        noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32, device=g.device)
                             for g in generator])
    else:
        noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else "cpu")
    return noise.to(device=device, dtype=dtype)


def cpu_noise_sampler(x: Tensor, generator: Generators = None) -> Callable[[Tensor, Tensor], Tensor]:
    """k-diffusion noise_sampler(sigma, sigma_next) drawing with randn_cpu (global CPU RNG when generator is None)."""
    return lambda sigma, sigma_next: randn_cpu(x.shape, generator, x.device, x.dtype)


# ---------------------------------------------------------------------------------------------- driver

@dataclass(frozen=True, eq=False)
class StepInfo:
    """What the per-step callback sees: step i (index into the full sigmas), after the model call, before the update."""
    i: int  # step index into the sigmas given to run_sampler (start offset included)
    sigma: float  # noise level the model saw (k-diffusion sigma_hat)
    t: float  # continuous timestep of sigma (an integer for the timesteps of a spacing)
    x_sampler: Tensor  # latent entering step i, in the sampler's coordinates x = x0 + sigma * noise
    denoised: Tensor  # the model's x0 prediction (after guidance)

    @property
    def x(self) -> Tensor:
        """Latent entering step i in the UNet's (VP) coordinates; run_sampler(..., start=i) resumes from it."""
        return self.x_sampler / math.sqrt(1 + self.sigma ** 2)

    @property
    def eps(self) -> Tensor:
        """The noise prediction used at this step (after guidance): (x - denoised) / sigma."""
        return (self.x_sampler - self.denoised) / self.sigma


def run_sampler(eps_fn: EpsFn, x: Tensor, sigmas: Tensor, sampler: Union[str, Sampler] = "ddim", *,
                schedule: Optional[NoiseSchedule] = None, start: int = 0, stop: Optional[int] = None,
                extra_args: Optional[dict] = None, callback: Optional[Callable[[StepInfo], None]] = None,
                disable: Optional[bool] = None, generator: Generators = None,
                landing_sigmas: Optional[Tensor] = None, label: Optional[str] = None, count_from: int = 0,
                **opts: Any) -> Tensor:
    """Run steps [start, stop) of `sampler` over sigmas with eps_fn; x and the result are VP latents.

    x is the latent entering step `start` (pure noise N(0, I) for start 0); returns the latent at sigmas[stop]
    (stop defaults to the end). Steps [start, stop) of two runs compose exactly for one-step samplers (DDIM,
    Euler, ancestral ones); multistep ones (dpmpp_2m, lms, ...) restart their history at `start`.
    callback(StepInfo) runs every step; a non-finite latent or prediction raises SamplingError naming the first
    such step, when the run ends (the checks stay on the device until then: no host-device sync per step).
    Stochastic samplers draw noise on the CPU from `generator` (one per batch item, or one for all) unless
    opts has a noise_sampler. The progress bar (titled `label`) counts the steps from max(start, count_from) on;
    disable turns it off (None: off when not a terminal).
    Latents are carried in fp32 at least (fp64 stays fp64), whatever the UNet's dtype.
    landing_sigmas (len(sigmas) - 1,), "ddim" only: the sigma each step lands on when it is not the next
    one (diffusers' DDIM rule: NoiseSchedule.prev_sigmas, ddim_sample); sliced to [start, stop) here.
    """
    schedule = schedule if schedule is not None else NoiseSchedule.sdxl()
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    stop = len(sigmas) - 1 if stop is None else stop
    if sigmas.ndim != 1 or not 0 <= start <= stop <= len(sigmas) - 1:
        raise SamplingError(f"need 0 <= start <= stop <= {len(sigmas) - 1} over 1-D sigmas; "
                            f"got start={start}, stop={stop}, sigmas of shape {tuple(sigmas.shape)}")
    if not (sigmas[1:] <= sigmas[:-1]).all() or sigmas[-1] < 0:
        raise SamplingError(f"sigmas must be non-negative and non-increasing, got {sigmas.tolist()}")
    # latents are carried in at least fp32, and the sigmas in the latents' dtype (k-diffusion's append_dims
    # would otherwise promote the latents to fp64)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    run_sigmas = sigmas[start:stop + 1].to(x.device, x.dtype)
    sample_fn = get_sampler(sampler)
    if landing_sigmas is not None:
        landing_sigmas = torch.as_tensor(landing_sigmas, dtype=torch.float64)
        if "landing_sigmas" not in inspect.signature(sample_fn).parameters:
            raise SamplingError(f"landing_sigmas is a DDIM option; sampler {sampler!r} does not take it")
        if landing_sigmas.shape != (len(sigmas) - 1,) or not (
                (landing_sigmas >= 0) & (landing_sigmas <= sigmas[:-1])).all():
            raise SamplingError(f"landing_sigmas must be ({len(sigmas) - 1},) values in [0, sigmas[i]], "
                                f"got {landing_sigmas.tolist()}")
        opts["landing_sigmas"] = landing_sigmas[start:stop].to(x.device, x.dtype)
    if "noise_sampler" in inspect.signature(sample_fn).parameters and opts.get("noise_sampler") is None:
        opts["noise_sampler"] = cpu_noise_sampler(x, generator)

    # The finiteness checks stay on the device until the end: a check per step would make the host wait for
    # every step before queueing the next, and a replayed CUDA graph takes milliseconds to launch.
    finite: list[tuple[Tensor, int, float]] = []

    def check(x_now: Tensor, denoised: Optional[Tensor], i: int, sigma: float) -> None:
        flags = torch.stack([torch.isfinite(x_now).all()] +
                            ([torch.isfinite(denoised).all()] if denoised is not None else []))
        finite.append((flags, i, sigma))

    def raise_if_not_finite() -> None:
        if not finite:
            return
        ok = torch.stack([flags.all() for flags, _, _ in finite]).cpu()  # one device read for all steps
        if bool(ok.all()):
            return
        flags, i, sigma = finite[int((~ok).nonzero()[0])]
        bad = [name for name, good in zip(("latent", "model prediction"), flags.tolist()) if not good]
        t = float(schedule.sigma_to_t(torch.tensor(max(sigma, 1e-12), dtype=torch.float64)))
        raise SamplingError(f"sampling stopped at step {i} (t={t:.2f}, sigma={sigma:.5g}): the "
                            f"{' and the '.join(bad)} hold NaN or inf. With fp16 weights try bf16 or fp32, "
                            f"or lower the guidance.")

    counted_from = max(start, count_from)
    bar = tqdm(total=max(stop - counted_from, 0), desc=label, disable=disable)

    def on_step(d: dict) -> None:
        i = start + int(d["i"])
        if i >= counted_from:
            bar.update(1)
        # no churn: the exact (fp64) host sigma, so integer t stay integers; our DDIM passes the same tensor
        # for both, which needs no device read
        no_churn = d["sigma_hat"] is d["sigma"] or float(d["sigma_hat"]) == float(d["sigma"])
        sigma = float(sigmas[i]) if no_churn else float(d["sigma_hat"])
        check(d["x"], d["denoised"], i, sigma)
        if callback is not None:
            t = float(schedule.sigma_to_t(torch.tensor(sigma, dtype=torch.float64)))
            callback(StepInfo(i=i, sigma=sigma, t=t, x_sampler=d["x"], denoised=d["denoised"]))

    x = x * math.sqrt(1 + float(sigmas[start]) ** 2)
    try:  # the sampler's own bar is off: ours is labelled and counts only the steps that do work
        x = sample_fn(EpsDenoiser(eps_fn, schedule), x, run_sigmas, extra_args=extra_args, callback=on_step,
                      disable=True, **opts)
    finally:
        bar.close()
    x = x / math.sqrt(1 + float(sigmas[stop]) ** 2)
    if stop > start:
        check(x, None, stop - 1, float(sigmas[stop - 1]))
    raise_if_not_finite()
    return x


PREV_TIMESTEP_RULES = ("diffusers", "listed")


def diffusers_ddim_options(schedule: NoiseSchedule, steps: int, spacing: str, sampler: str,
                           options: Optional[dict]) -> Optional[dict]:
    """sampler_options that make run_sampler's DDIM step as diffusers' DDIMScheduler does (t -> t - T // N, see
    ddim_sample) for "trailing" and "linspace" spacing, where that differs from stepping to the next listed
    timestep; other samplers, spacings and an explicit landing_sigmas are left as they are. omg.sample and
    omg.generate use it, so their DDIM matches diffusers' for every spacing."""
    if sampler != "ddim" or spacing not in ("trailing", "linspace") or "landing_sigmas" in (options or {}):
        return options
    timesteps = schedule.timesteps(steps, spacing)
    landing = schedule.prev_sigmas(timesteps, to_zero=False)
    if torch.equal(landing, schedule.sigmas_at(timesteps, to_zero=False)[1:]):
        return options
    return {**(options or {}), "landing_sigmas": landing}


def ddim_sample(eps_fn: EpsFn, x: Tensor, timesteps: Tensor, schedule: Optional[NoiseSchedule] = None, *,
                eta: float = 0.0, set_alpha_to_one: bool = False, prev_timestep: str = "diffusers",
                **kwargs: Any) -> Tensor:
    """DDIM over integer timesteps (descending): x is the VP latent at timesteps[0]; the model sees
    timesteps[i] at step i. Where step i lands is the prev_timestep rule:

    - "diffusers" (default; diffusers' DDIMScheduler.step): on t - T // N (T = 1000 train timesteps,
      N = len(timesteps), the whole list: resume with start=, not with a shortened list); the latent it lands
      on enters step i + 1 as is, i.e. as if at timesteps[i + 1]. Reproduces DDIMScheduler step by step for
      every timestep_spacing.
    - "listed": on timesteps[i + 1], the noise level the next step then assumes. This is DDIM over
      schedule.sampling_sigmas(N, spacing, to_zero=False), i.e. what run_sampler(..., "ddim"), omg.txt2img and
      omg.generate do.

    The rules agree when the timesteps are spaced by T // N, as "leading" ones are (SDXL's default); with
    "trailing" or "linspace" at an N that does not divide T (e.g. 37) they differ. The final alpha (the
    "diffusers" rule's landing where t - T // N < 0, the "listed" rule's after the last timestep) is
    alphas_cumprod[0] (set_alpha_to_one=False, SDXL) or 1.
    kwargs go to run_sampler (start, stop, callback, disable, generator, noise_sampler, extra_args).
    """
    if prev_timestep not in PREV_TIMESTEP_RULES:
        raise SamplingError(f"prev_timestep must be one of {PREV_TIMESTEP_RULES}, not {prev_timestep!r}")
    schedule = schedule if schedule is not None else NoiseSchedule.sdxl()
    sigmas = schedule.sigmas_at(timesteps, to_zero=set_alpha_to_one)
    landing = None
    if prev_timestep == "diffusers":
        landing = schedule.prev_sigmas(timesteps, to_zero=set_alpha_to_one)
        if torch.equal(landing, sigmas[1:]):  # leading spacing: the listed rule, on its own code path
            landing = None
    return run_sampler(eps_fn, x, sigmas, "ddim", schedule=schedule, eta=eta, landing_sigmas=landing, **kwargs)
