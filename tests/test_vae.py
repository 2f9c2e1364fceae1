"""omg.vae: equivalence with diffusers' AutoencoderKL, the SDXL key layout, and never computing in fp16."""
import json
import math
import os

import pytest
import torch
from torch import nn

from omg.vae import AutoencoderKL, VAEConfig

DATA = os.path.join(os.path.dirname(__file__), "data")
PREFIX = "first_stage_model."


def randomize(model: nn.Module) -> nn.Module:
    """Random weights with O(1) activations: fan-in scaled weights, noisy norms, nonzero biases."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return model


def diffusers_twin(ours: AutoencoderKL):
    """diffusers' AutoencoderKL holding our weights, converted by diffusers' own single-file converter."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = ours.config
    n = len(cfg.ch_mult)
    config = dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                  block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
                  down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                  layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels,
                  norm_num_groups=cfg.norm_groups, scaling_factor=cfg.scaling_factor)
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    theirs = diffusers.AutoencoderKL(**config)
    theirs.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    return theirs.eval()


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(1)
    ours = randomize(AutoencoderKL(VAEConfig.tiny())).eval()
    return ours, diffusers_twin(ours)


@pytest.mark.parametrize("shape", [(2, 3, 16, 24), (1, 3, 32, 8)])
@torch.no_grad()
def test_encode_matches_diffusers(pair, shape):
    ours, theirs = pair
    images = torch.rand(shape) * 2 - 1
    expected = theirs.encode(images).latent_dist.mean * theirs.config.scaling_factor
    got = ours.encode(images)
    assert got.shape == (shape[0], 4, shape[2] // 4, shape[3] // 4)
    assert expected.abs().max() > 0.05  # the comparison is not between near-zero tensors
    assert (got - expected).abs().max() <= 1e-4


@torch.no_grad()
def test_encode_sample_matches_diffusers(pair):
    ours, theirs = pair
    images = torch.rand(2, 3, 16, 24) * 2 - 1
    posterior = theirs.encode(images).latent_dist
    expected = posterior.sample(generator=torch.Generator().manual_seed(7)) * theirs.config.scaling_factor
    got = ours.encode(images, sample=True, generator=torch.Generator().manual_seed(7))
    assert (got - expected).abs().max() <= 1e-4
    assert (got - ours.encode(images)).abs().max() > 1e-3  # it really sampled


@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (1, 4, 6, 4)])
@torch.no_grad()
def test_decode_matches_diffusers(pair, shape):
    ours, theirs = pair
    latents = torch.randn(shape)
    expected = theirs.decode(latents / theirs.config.scaling_factor).sample
    got = ours.decode(latents)
    assert got.shape == (shape[0], 3, shape[2] * 4, shape[3] * 4)
    assert expected.abs().max() > 0.05
    assert (got - expected).abs().max() <= 1e-4


def test_bad_shapes_raise():
    vae = AutoencoderKL(VAEConfig.tiny())
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(torch.zeros(1, 3, 16, 18))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        vae.decode(torch.zeros(1, 3, 4, 4))


# --- configs and the SDXL layout -------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    VAEConfig.tiny(), VAEConfig.sdxl(),
    VAEConfig(ch=16, ch_mult=(1, 3), num_res_blocks=1, z_channels=8, embed_dim=6, in_channels=4, out_channels=2,
              norm_groups=8),
])
def test_config_from_state_dict_round_trip(config):
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    inferred = VAEConfig.from_state_dict(vae.state_dict(), norm_groups=config.norm_groups)
    assert inferred == config


def test_sdxl_layout_matches_manifest():
    with open(os.path.join(DATA, "sdxl_keys.json")) as f:
        expected = {k[len(PREFIX):]: tuple(v) for k, v in json.load(f).items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.sdxl())
    got = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert sorted(set(expected) - set(got)) == [] and sorted(set(got) - set(expected)) == []
    assert got == expected
    assert len(got) == 248
    assert sum(math.prod(s) for s in got.values()) == 83_653_863


# --- never fp16 --------------------------------------------------------------------------------------

def test_safe_dtype():
    assert AutoencoderKL.safe_dtype(torch.float16, "cpu") == torch.float32
    assert AutoencoderKL.safe_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert AutoencoderKL.safe_dtype(torch.float32, "meta") == torch.float32
    with pytest.raises(ValueError, match="floating"):
        AutoencoderKL.safe_dtype(torch.int8, "cpu")


def test_half_keeps_parameters_out_of_fp16():
    vae = randomize(AutoencoderKL(VAEConfig.tiny()))
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    for cast in (lambda m: m.half(), lambda m: m.to(torch.float16), lambda m: nn.Sequential(m).half()):
        cast(vae)
        assert {p.dtype for p in vae.parameters()} == {torch.float32}
        # cast straight to the safe dtype: no detour through fp16 rounding
        assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    assert vae.compute_dtype == torch.float32
    vae.to(torch.bfloat16)  # other dtypes are honoured
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}


@torch.no_grad()
def test_fp16_weights_decode_without_overflow():
    torch.manual_seed(3)
    vae = randomize(AutoencoderKL(VAEConfig.tiny())).eval()
    fp16 = {k: v.half() for k, v in vae.state_dict().items()}
    vae.load_state_dict(fp16, assign=True)  # how a loader may end up with fp16 parameters
    assert {p.dtype for p in vae.parameters()} == {torch.float16}
    assert vae.compute_dtype == torch.float32  # CPU: fp16 -> fp32

    latents = torch.randn(1, 4, 4, 4) * 3000  # activations far beyond fp16's 65504
    naive = vae.decoder(vae.post_quant_conv(latents.half() / vae.config.scaling_factor))
    assert not torch.isfinite(naive).all()  # the precondition: a plain fp16 decode overflows

    images = vae.decode(latents.half())
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    reference = AutoencoderKL(VAEConfig.tiny()).eval()
    reference.load_state_dict({k: v.float() for k, v in fp16.items()})
    assert torch.allclose(images, reference.decode(latents.half().float()), atol=1e-4, rtol=0)
    # an explicit fp16 request is mapped to the safe dtype as well
    assert vae.decode(latents, dtype=torch.float16).dtype == torch.float32
    assert vae.encode(torch.zeros(1, 3, 8, 8), dtype=torch.float16).dtype == torch.float32


@torch.no_grad()
def test_bfloat16_request_close_to_fp32(pair):
    ours, _ = pair
    latents = torch.randn(1, 4, 4, 4)
    got = ours.decode(latents, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert {p.dtype for p in ours.parameters()} == {torch.float32}  # the module itself is untouched
    assert (got.float() - ours.decode(latents)).abs().max() < 0.1


@pytest.mark.gpu
@torch.no_grad()
def test_half_on_cuda_decodes_in_bf16():
    if not torch.cuda.is_bf16_supported():
        pytest.skip("needs a GPU with bf16")
    torch.manual_seed(3)
    vae = randomize(AutoencoderKL(VAEConfig.tiny())).eval().cuda().half()
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    images = vae.decode(torch.randn(1, 4, 4, 4, device="cuda", dtype=torch.float16) * 3000)
    assert images.dtype == torch.bfloat16 and torch.isfinite(images).all()
