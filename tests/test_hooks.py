"""Hooks for embedders and UIs: the per-step callback, the latent preview, caller-supplied noise and the noise
device, the labelled progress bars; and load_sdxl's dtype by device."""
import warnings

import pytest
import torch
from PIL import Image

import omg
from omg.errors import OptionError
from omg.model import save_sgm
from omg.preview import fit_latent_rgb, latent_preview
from test_pipeline import BLEND, H, PROMPT, STEPS, W, model  # noqa: F401 (fixture)

CONCEPTS = [omg.Concept("man", "a photo of sks man", mask=(0, 0, 40, 64))]


def run(model, **kw):
    args = dict(steps=STEPS, blend_steps=BLEND, height=H, width=W, seed=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return omg.generate(model, PROMPT, CONCEPTS, **{**args, **kw})


def test_the_callback_sees_every_stage1_step_and_the_blending_steps(model):
    events = []
    result = run(model, callback=events.append)
    assert [(e.stage, e.step) for e in events] == ([("stage1", i) for i in range(STEPS)] +
                                                   [("stage2", i) for i in range(STEPS - BLEND, STEPS)])
    assert all(e.steps == STEPS and e.latent.shape == (1, 4, H // 8, W // 8) for e in events)
    sigmas = [e.sigma for e in events if e.stage == "stage1"]
    assert sigmas == sorted(sigmas, reverse=True)
    stage2 = [e for e in events if e.stage == "stage2"]
    # the blend start's latent is stage 1's at that step (stage 2 resumes from it)
    torch.testing.assert_close(stage2[0].latent, result.blend_start_latent, rtol=0, atol=0)
    preview = events[-1].preview()
    assert isinstance(preview, Image.Image) and preview.size == (W // 8, H // 8)
    assert torch.equal(run(model).latent, result.latent)  # watching changes nothing


def test_latent_preview_is_the_linear_map():
    latent = torch.zeros(2, 4, 3, 5)
    latent[0, 0] = 1.0
    previews = latent_preview(latent)
    assert len(previews) == 2 and previews[0].size == (5, 3)
    # channel 0 = 1: rgb = factors[0] + bias = (0.4735, 0.4057, 0.4330) -> ((v + 1) * 127.5)
    assert previews[0].getpixel((0, 0)) == (188, 179, 183) and previews[1].getpixel((0, 0)) == (141, 125, 127)
    assert latent_preview(latent[0], scale=8).size == (40, 24)


def test_fitted_preview_factors_approximate_the_vae(model):
    factors, bias = fit_latent_rgb(model.vae, samples=2, size=8)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    decoded = model.vae.decode(latent).float()
    target = torch.nn.functional.avg_pool2d(decoded, decoded.shape[-1] // 8)[0].permute(1, 2, 0)
    approx = torch.einsum("chw,cr->hwr", latent[0], factors) + bias
    assert (approx - target).abs().mean() < (target - target.mean((0, 1))).abs().mean()  # beats a flat colour


def test_caller_noise_replaces_the_seeded_noise(model):
    seeded = run(model, seed=3)
    noise = model.noise([torch.Generator().manual_seed(3)], H, W)
    assert torch.equal(run(model, seed=99, noise=noise).latent, seeded.latent)  # DDIM: the noise is all
    assert torch.equal(run(model, seed=99, latents=noise).latent, seeded.latent)  # diffusers' name
    with pytest.raises(OptionError, match=r"noise must be a tensor of shape \(2, 4, 8, 12\)"):
        run(model, seeds=[1, 2], noise=noise)
    with pytest.raises(OptionError, match="not both"):
        run(model, noise=noise, latents=noise)


def test_sample_takes_caller_noise_too(model):
    from omg.txt2img import sample_latents
    kw = dict(steps=3, height=H, width=W, progress=False)
    noise = model.noise([torch.Generator().manual_seed(4)], H, W)
    assert torch.equal(sample_latents(model, "a cat", seed=0, noise=noise, **kw), sample_latents(model, "a cat", seed=4,
                                                                                                 **kw))
    with pytest.raises(OptionError, match="noise must have shape"):
        sample_latents(model, "a cat", num_images=2, noise=noise, **kw)


def test_the_noise_device_draws_the_noise(model):
    assert run(model, noise_device="cpu").latent.equal(run(model).latent)
    with pytest.raises(OptionError, match="noise_device"):
        omg.OMGOptions(noise_device="gpu0")


@pytest.mark.gpu
def test_cuda_noise_is_diffusers_cuda_generator_noise():
    cuda = omg.model.SDXL.random(device="cuda")
    f = cuda.vae.config.downscale  # the tiny random VAE's, not SDXL's 8
    generator = torch.Generator("cuda").manual_seed(7)
    expected = torch.randn((4, 64 // f, 64 // f), generator=generator, device="cuda")
    from omg.pipeline import _generators
    torch.testing.assert_close(cuda.noise(_generators([7], "cuda"), 64, 64)[0], expected, rtol=0, atol=0)


def test_one_labelled_bar_per_stage(model, capsys):
    run(model, progress=True)
    err = capsys.readouterr().err
    assert f"stage 1: 100%|██████████| {STEPS}/{STEPS}" in err
    assert "masks: 100%|██████████| 1/1" in err
    assert f"stage 2: 100%|██████████| {BLEND}/{BLEND}" in err  # only the blending steps


def test_load_sdxl_defaults_to_fp32_on_the_cpu(tmp_path):
    tiny = omg.model.SDXL.random(with_text=False, with_vae=False)
    save_sgm(tiny, tmp_path / "tiny.safetensors")
    back = omg.load_sdxl(tmp_path / "tiny.safetensors", device="cpu")
    assert back.dtype == torch.float32
    assert omg.model.default_dtype("cuda") == torch.float16
