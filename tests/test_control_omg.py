"""ControlNets and style LoRAs in OMG on a small random SDXL (CPU, fp32): the stage-1 loop against diffusers'
StableDiffusionXLControlNetPipeline, the method's invariants with a ControlNet, and a style LoRA against merging it
into the base and every concept model. Exact checks say so; the others give their tolerance."""
import dataclasses
import warnings

import pytest
import torch

import omg
from omg.control import Control
from omg.controlnet import ControlNet, ControlNetConfig
from omg.lora import merged_lora, text_encoder_lora
from omg.sampling import NoiseSchedule, apply_guidance, run_sampler

from test_controlnet import diffusers_controlnet_config, to_diffusers
from test_pipeline import kohya_lora, tiny_model
from test_unet import diffusers_config

H, W = 64, 96  # latent 8 x 12
STEPS, BLEND = 5, 3
PROMPT = "a man and a woman in a park"
SIZE_EMBED = 4  # SDXL.random's size-embedding width


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def random_controlnet(model, seed):
    """A ControlNet for the model's UNet, every weight (zero convolutions included) random: residuals that matter."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cn = ControlNet(ControlNetConfig.tiny(model.unet.config)).eval()
        with torch.no_grad():
            for p in cn.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return cn


@pytest.fixture(scope="module")
def controlnets(model):
    return [random_controlnet(model, 11), random_controlnet(model, 12)]


def pose_image(seed=0):
    return torch.rand(3, H, W, generator=torch.Generator().manual_seed(seed))


def run(model, concepts=(), **kw):
    args = dict(steps=STEPS, blend_steps=BLEND, height=H, width=W, seed=3, progress=False)
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return omg.generate(model, PROMPT, list(concepts), **args)


def test_stage1_with_two_controlnets_matches_diffusers_sdxl_controlnet_pipeline(model, controlnets):
    """Stage 1 (blend_steps 0) with two ControlNets, each with its own image, scale and step window, against
    diffusers' StableDiffusionXLControlNetPipeline over the same UNet and ControlNets, DDIM scheduler and latents."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLControlNetPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    steps = 6
    images = [pose_image(1), pose_image(2)]
    controls = [Control(images[0], controlnets[0], scale=0.7), Control(images[1], controlnets[1], scale=0.4,
                                                                          start=0.2, end=0.7)]
    ours = run(model, control=controls, blend_steps=0, steps=steps, negative_prompt=None)

    unet_config = dict(diffusers_config(model.unet.config), addition_time_embed_dim=SIZE_EMBED)
    unet = UNet2DConditionModel(**unet_config).eval()
    unet.load_state_dict(convert_ldm_unet_checkpoint(
        {"model.diffusion_model." + k: v for k, v in model.unet.state_dict().items()}, unet.config), strict=True)
    cn_config = dict(diffusers_controlnet_config(controlnets[0].config), addition_time_embed_dim=SIZE_EMBED)
    theirs = [to_diffusers(cn, cn_config) for cn in controlnets]
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4)  # only its scale factor is read
    pipe = StableDiffusionXLControlNetPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=unet, controlnet=theirs, scheduler=scheduler,
                                               add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    context, pooled = model.text.encode([PROMPT])
    with torch.no_grad():
        latents = pipe(prompt_embeds=context, pooled_prompt_embeds=pooled,
                       negative_prompt_embeds=torch.zeros_like(context),
                       negative_pooled_prompt_embeds=torch.zeros_like(pooled), image=[im[None] for im in images],
                       controlnet_conditioning_scale=[0.7, 0.4], control_guidance_start=[0.0, 0.2],
                       control_guidance_end=[1.0, 0.7], height=H, width=W, num_inference_steps=steps,
                       guidance_scale=7.5, latents=model.noise([torch.Generator().manual_seed(3)], H, W),
                       output_type="latent").images
    error = (ours.stage1_latent - latents).abs().max().item()
    assert error <= 1e-4 and error / latents.abs().max().item() <= 1e-5, error
    plain = run(model, blend_steps=0, steps=steps, negative_prompt=None)
    assert (plain.stage1_latent - latents).abs().max() > 1e-2  # the ControlNets did change the image


def test_zero_blend_steps_is_stage1_with_a_controlnet(model, controlnets):
    r = run(model, [omg.Concept("man", "a photo of sks man")], control=[Control(pose_image(), controlnets[0])],
            blend_steps=0)
    assert torch.equal(r.latent, r.stage1_latent)  # exact


@pytest.mark.parametrize("store,tol", [("recompute", 0.0), ("outputs", 0.0), ("maps", 1e-5)])
def test_replay_without_concepts_is_stage1_with_a_controlnet(model, controlnets, store, tol):
    """Stage 2's base pass gets the ControlNet residuals as stage 1 did (its source rows too): with no concept it
    reproduces stage 1."""
    r = run(model, control=[Control(pose_image(), controlnets[0], scale=0.9, end=0.8)], store=store,
            store_dtype=None)
    assert (r.latent - r.stage1_latent).abs().max().item() <= tol


def _concept_trajectory(model, r, lora, concept, control=None):
    """The concept model's own sampling from the blend start (optionally with the ControlNet residuals)."""
    schedule = NoiseSchedule.sdxl()
    with text_encoder_lora(model.text, (lora, 0.8)):
        ctx, y = model.conditioning([concept.prompt], [omg.pipeline.DEFAULT_NEGATIVE], H, W)
    features = None if control is None else control.encode_hint(pose_image()[None])
    with merged_lora(model.unet, (lora, 0.8)):
        def eps_fn(x, t):
            x2, t2 = torch.cat([x, x]), torch.cat([t, t])
            residuals = None if control is None else control(x2, t2, ctx, y, features, 1.0)
            u, c = model.unet(x2, t2, ctx, y, control=residuals).chunk(2)
            return apply_guidance(u, c, 7.5)
        return run_sampler(eps_fn, r.blend_start_latent, schedule.sampling_sigmas(STEPS, "leading", to_zero=False),
                           "ddim", start=STEPS - BLEND, disable=True)


@pytest.mark.parametrize("lora_mode", ["grouped", "merged"])
@pytest.mark.parametrize("control_concepts", [False, True])
def test_concept_passes_get_the_controlnet_only_when_asked(model, controlnets, tmp_path, lora_mode, control_concepts):
    """A concept whose mask covers the image follows its own model's trajectory from the blend start: without the
    ControlNet (the original's concept pipeline has none), or with it when control_concepts is set; in the grouped
    one-call stage 2 and with merged weights alike."""
    lora = kohya_lora(model, tmp_path / "a.safetensors", seed=1)
    concept = omg.Concept("man", "a photo of sks man", lora=lora, mask=(0, 0, W, H))
    r = run(model, [concept], control=[Control(pose_image(), controlnets[0])], lora_mode=lora_mode,
            control_concepts=control_concepts, keep_stage2=True)
    assert r.stage2.one_call == (lora_mode == "grouped")
    own = _concept_trajectory(model, r, lora, concept, controlnets[0] if control_concepts else None)
    assert (r.latent - own).abs().max().item() <= 1e-5
    other = _concept_trajectory(model, r, lora, concept, None if control_concepts else controlnets[0])
    assert (r.latent - other).abs().max().item() > 1e-3


def test_grouped_equals_merged_with_a_controlnet_and_two_concepts(model, controlnets, tmp_path):
    loras = [kohya_lora(model, tmp_path / f"{i}.safetensors", seed=i) for i in range(2)]
    concepts = [omg.Concept("man", "a photo of sks man", lora=loras[0], mask=(0, 0, 40, 64)),
                omg.Concept("woman", "a photo of xyz woman", lora=loras[1], mask=(48, 0, 96, 64))]
    control = [Control(pose_image(), controlnets[0], scale=0.8)]
    grouped = run(model, concepts, control=control)
    merged = run(model, concepts, control=control, lora_mode="merged")
    assert (grouped.latent - merged.latent).abs().max().item() <= 1e-4
    assert (grouped.latent - run(model, concepts).latent).abs().max() > 1e-2


def style_lora(model, path):
    return kohya_lora(model, path, seed=7)  # UNet attention and CLIP-L q/v: both halves of a style


@pytest.mark.parametrize("lora_mode", ["grouped", "merged"])
def test_style_lora_equals_merging_it_into_the_base_and_every_concept_model(model, tmp_path, lora_mode):
    style = style_lora(model, tmp_path / "style.safetensors")
    loras = [kohya_lora(model, tmp_path / f"{i}.safetensors", seed=i) for i in range(2)]
    concepts = [omg.Concept("man", "a photo of sks man", lora=loras[0], lora_scale=0.7, mask=(0, 0, 40, 64)),
                omg.Concept("woman", "a photo of xyz woman", lora=loras[1], lora_scale=0.7, mask=(48, 0, 96, 64))]
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    styled = run(model, concepts, style_lora=[f"{style}:0.5"], lora_mode=lora_mode, keep_stage2=True)
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())  # restored exactly
    with merged_lora(model.unet, (style, 0.5)), text_encoder_lora(model.text, (style, 0.5)):
        reference = run(model, concepts, lora_mode=lora_mode, keep_stage2=True)
    assert (styled.latent - reference.latent).abs().max().item() <= 1e-5
    assert (styled.stage1_latent - reference.stage1_latent).abs().max().item() <= 1e-5
    plain = run(model, concepts, lora_mode=lora_mode, keep_stage2=True)
    assert (styled.stage1_latent - plain.stage1_latent).abs().max() > 1e-2  # the style changed the base model too
    if lora_mode == "grouped":  # the style is in the shared base weights: no per-concept copy of its deltas
        assert styled.stage2.weights.lora.extra_bytes == plain.stage2.weights.lora.extra_bytes


def test_bad_controls_and_styles_are_rejected_before_sampling(model, controlnets, tmp_path):
    other = ControlNet(ControlNetConfig.tiny(dataclasses.replace(model.unet.config, context_dim=16)))
    with pytest.raises(omg.errors.ModelError, match="does not fit the base UNet"):
        run(model, control=[Control(pose_image(), other)])
    with pytest.raises(omg.errors.OptionError, match="torch.float64 on cpu, the UNet torch.float32"):
        run(model, control=[Control(pose_image(), random_controlnet(model, 1).double())])
    with pytest.raises(omg.errors.OptionError, match="no condition image"):
        run(model, control=[Control(str(tmp_path / "absent.png"), controlnets[0])])
    with pytest.raises(omg.errors.CheckpointError, match="no such file"):
        run(model, control=[Control(pose_image(), str(tmp_path / "absent.safetensors"))])
    with pytest.raises(omg.errors.OptionError, match="expected 'FILE"):
        omg.OMGOptions(style_lora=[""])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lora_mode", ["grouped", "merged"])
def test_graphed_generation_with_controlnets_equals_eager(tmp_path, lora_mode):
    """Two ControlNets with different step windows (so stage 1 and stage 2 switch between graphs of different acting
    sets), the grouped one-call stage 2 or merged concepts: graphs vs eager, same bits."""
    model = tiny_model(device="cuda")
    cns = [random_controlnet(model, 11).cuda(), random_controlnet(model, 12).cuda()]
    loras = [kohya_lora(model, tmp_path / f"{i}.safetensors", seed=i) for i in range(2)]
    concepts = [omg.Concept("man", "a photo of sks man", lora=loras[0], mask=(0, 0, 40, 64)),
                omg.Concept("woman", "a photo of xyz woman", lora=loras[1], mask=(48, 0, 96, 64))]
    control = [Control(pose_image(1), cns[0], scale=0.8), Control(pose_image(2), cns[1], 0.5, start=0.3, end=0.8)]
    eager, graphed = (run(model, concepts, control=control, steps=6, blend_steps=4, cuda_graphs=g,
                          lora_mode=lora_mode) for g in (False, True))
    assert torch.equal(eager.stage1_latent, graphed.stage1_latent)
    assert torch.equal(eager.latent, graphed.latent)


def test_the_controlnet_bench_runs_at_a_tiny_size(tmp_path):
    from bench import controlnet as bench_controlnet
    out = bench_controlnet.main(["--tiny", "--out", str(tmp_path)])
    assert [r["controlnets"] for r in out["rows"]] == [0, 1, 1] and out["rows"][2]["control_concepts"]
    assert (tmp_path / "controlnet_tiny_cpu.json").exists() and "stage1_added_s" in out["summary"]
