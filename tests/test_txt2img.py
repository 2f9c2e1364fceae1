"""omg.txt2img (omg.sample) end to end on a tiny random SDXL: determinism, batches, against a diffusers DDIM loop."""
import dataclasses

import numpy as np
import pytest
import torch

from omg.errors import SamplingError
from omg.model import SDXL
from omg.sampling import randn_cpu
from omg.text import SDXLTextEncoder
from omg.txt2img import sample, sample_latents
from omg.unet import UNet, UNetConfig
from omg.vae import AutoencoderKL, VAEConfig

H = W = 32  # tiny VAE downscales by 4, tiny UNet by 4: latents 8x8


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    text = SDXLTextEncoder.tiny()
    width = text.clip_l.config.width + text.clip_g.config.width
    pooled = text.clip_g.config.projection_dim
    unet = UNet(dataclasses.replace(UNetConfig.tiny(), context_dim=width, adm_in_channels=pooled + 6 * 4))
    return SDXL(unet=unet.eval(), vae=AutoencoderKL(VAEConfig.tiny()).eval(), text=text)


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_a_seed_gives_the_same_image(tiny):
    kw = dict(steps=3, guidance=5.0, height=H, width=W, progress=False)
    a, b = sample(tiny, "a cat", seed=1, **kw), sample(tiny, "a cat", seed=1, **kw)
    c = sample(tiny, "a cat", seed=2, **kw)
    assert len(a) == 1 and a[0].size == (W, H) and a[0].mode == "RGB"
    assert np.array_equal(pixels(a), pixels(b))
    la = sample_latents(tiny, "a cat", seed=1, **kw)
    lc = sample_latents(tiny, "a cat", seed=2, **kw)
    assert not torch.allclose(la, lc) and not np.array_equal(pixels(a), pixels(c))


def test_batch_item_equals_its_single_run(tiny):
    kw = dict(steps=3, guidance=4.0, height=H, width=W, progress=False, negative_prompt="blurry")
    batch = sample_latents(tiny, ["a cat", "a dog on a very long road under the sky"], seed=3, **kw)
    single = sample_latents(tiny, "a dog on a very long road under the sky", seed=4, **kw)
    assert batch.shape == (2, 4, 8, 8)
    torch.testing.assert_close(batch[1:], single, rtol=0, atol=1e-4)
    assert len(sample(tiny, ["a", "b", "c"], steps=2, height=H, width=W, progress=False)) == 3


def test_ddim_matches_a_diffusers_scheduler_loop_over_the_same_unet(tiny):
    from diffusers import DDIMScheduler
    steps, guidance, rescale, seed = 5, 6.0, 0.5, 11
    ours = sample_latents(tiny, "a red house", "ugly", steps=steps, guidance=guidance, guidance_rescale=rescale,
                          seed=seed, height=H, width=W, progress=False)

    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                          timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(steps)
    context, y = tiny.conditioning(["a red house"], ["ugly"], H, W)
    x = randn_cpu((1, 4, 8, 8), [torch.Generator().manual_seed(seed)])
    with torch.no_grad():
        for t in sched.timesteps:
            eps_u, eps_c = tiny.unet(torch.cat([x, x]), t.expand(2).float(), context, y).chunk(2)
            eps = rescale_noise_cfg(eps_u + guidance * (eps_c - eps_u), eps_c, rescale)
            x = sched.step(eps, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-4)


def test_negative_prompt_and_samplers_change_the_result(tiny):
    kw = dict(steps=3, guidance=5.0, seed=0, height=H, width=W, progress=False)
    base = sample_latents(tiny, "a cat", **kw)
    assert not torch.allclose(base, sample_latents(tiny, "a cat", negative_prompt="dark", **kw))
    pytest.importorskip("k_diffusion")
    for sampler, spacing in (("euler", "leading"), ("dpmpp_2m", "karras"), ("euler_ancestral", "trailing")):
        out = sample_latents(tiny, "a cat", sampler=sampler, spacing=spacing, **kw)
        assert torch.isfinite(out).all() and not torch.allclose(out, base)


def test_prompts_over_75_tokens_on_either_side(tiny):
    long = "a photo of " + "very " * 90 + "red house"
    for prompt, negative in ((long, "blurry"), ("a cat", long), (long, None)):
        context, y = tiny.conditioning([prompt], None if negative is None else [negative], H, W)
        assert context.shape[:2] == (2, 2 * 77) and y.shape == (2, tiny.unet.config.adm_in_channels)
        assert (not context[0].any()) == (negative is None)  # no negative prompt: zero uncond context
    assert torch.isfinite(sample_latents(tiny, long, "ugly", steps=1, height=H, width=W, progress=False)).all()


def test_callback_sees_every_step(tiny):
    seen = []
    sample_latents(tiny, "a cat", steps=5, height=H, width=W, progress=False,
                   callback=lambda info: seen.append((info.i, info.t)))
    assert seen == [(i, t) for i, t in enumerate([801.0, 601.0, 401.0, 201.0, 1.0])]


def test_bad_arguments_are_rejected(tiny):
    # one size rule with omg.generate: multiples of the VAE's downscale (4 for this tiny VAE), whatever the UNet
    with pytest.raises(SamplingError, match="multiples of 4"):
        sample_latents(tiny, "a cat", steps=2, height=42, width=W, progress=False)
    with pytest.raises(SamplingError, match="negative prompts"):
        sample_latents(tiny, ["a", "b"], ["x", "y", "z"], steps=2, height=H, width=W, progress=False)
    with pytest.raises(SamplingError, match="no vae"):
        sample(dataclasses.replace(tiny, vae=None), "a cat", steps=2, height=H, width=W, progress=False)


@pytest.mark.gpu
def test_a_seed_gives_the_same_latents_on_cpu_and_gpu(tiny):
    kw = dict(steps=3, guidance=5.0, seed=0, height=H, width=W, progress=False, sampler="ddim",
              sampler_options={"eta": 1.0})
    first = {}
    cpu = sample_latents(tiny, "a cat", callback=lambda info: first.setdefault("cpu", info.x), **kw)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32
    try:
        gpu_model = SDXL(unet=tiny.unet.to("cuda"), vae=tiny.vae.to("cuda"), text=tiny.text.to("cuda"))
        gpu = sample_latents(gpu_model, "a cat", callback=lambda info: first.setdefault("gpu", info.x.cpu()),
                             **kw).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        tiny.unet.cpu(), tiny.vae.cpu(), tiny.text.cpu()
    torch.testing.assert_close(first["gpu"], first["cpu"], rtol=0, atol=1e-6)  # the same starting noise
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-4)
