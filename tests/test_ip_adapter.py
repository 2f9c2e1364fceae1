"""IP-Adapter Plus (InstantID's face adapter) on random weights in the published layout, against diffusers'
IPAdapterPlusImageProjection and IPAdapterAttnProcessor2_0 holding the same tensors (loaded by diffusers' own
converter), on CPU in fp32."""
import warnings

import pytest
import torch

from omg import ip_adapter as ipa
from omg.errors import CheckpointError, ModelError
from omg.unet import UNet, UNetConfig, timestep_embedding

from test_unet import TIME_EMBED, diffusers_config, randomize

CFG = UNetConfig.tiny()
RCFG = ipa.ResamplerConfig(dim=128, depth=4, dim_head=64, heads=2, num_queries=16, embedding_dim=512,
                           output_dim=CFG.context_dim)


def random_adapter(seed: int = 0, unet_config: UNetConfig = CFG, rcfg: ipa.ResamplerConfig = RCFG) -> ipa.IPAdapter:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = ipa.IPAdapter(unet_config, rcfg).eval()
        with torch.no_grad():
            for p in adapter.parameters():
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))  # LayerNorm gains near 1
    return adapter


def diffusers_unet(unet: UNet):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    theirs = UNet2DConditionModel(**diffusers_config(unet.config)).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(
        {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}, theirs.config), strict=True)
    return theirs


def test_resampler_matches_diffusers_ip_adapter_plus_projection():
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel  # noqa: F401
    adapter = random_adapter(1)
    sd = ipa.adapter_state_dicts(adapter)
    theirs_unet = diffusers_unet(UNet(CFG))
    proj = theirs_unet._convert_ip_adapter_image_proj_to_diffusers(sd["image_proj"], low_cpu_mem_usage=False)
    x = torch.randn(3, 1, 512) * 5  # antelopev2 embeddings are unnormalised (norm about 20)
    ours, ref = adapter.image_tokens(x), proj(x)
    assert ours.shape == (3, 16, CFG.context_dim)
    error = (ours - ref).abs().max().item()
    assert error <= 1e-4, error
    assert (ours[0] - ours[1]).abs().max() > 1e-2  # the embedding matters


def test_decoupled_cross_attention_matches_diffusers_ip_adapter_unet():
    """The whole UNet with the adapter (image projection + every attn2's decoupled branch) against diffusers'
    UNet2DConditionModel after its _load_ip_adapter_weights on the published layout, same face embedding."""
    unet = UNet(CFG).eval()
    randomize(unet, 3)
    adapter = random_adapter(2)
    theirs = diffusers_unet(unet)
    theirs._load_ip_adapter_weights([ipa.adapter_state_dicts(adapter)], low_cpu_mem_usage=False)
    for p in theirs.attn_processors.values():
        if hasattr(p, "scale"):
            p.scale = [0.7]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 7, CFG.context_dim, generator=g)
    pooled = torch.randn(2, CFG.adm_in_channels - 6 * TIME_EMBED, generator=g)
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), TIME_EMBED).reshape(2, -1)], dim=1)
    emb = torch.randn(2, 512, generator=g) * 5
    with torch.no_grad():
        tokens = adapter.image_tokens(emb)
        with adapter.installed(unet), adapter.tokens(tokens, 0.7):
            ours = unet(x, t, ctx, y)
        plain = unet(x, t, ctx, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = theirs(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids,
                                                       "image_embeds": [emb[:, None, None]]}).sample
    error = (ours - ref).abs().max().item()
    assert error <= 1e-4, error
    assert (ours - plain).abs().max() > 1e-2  # the branch changed the prediction


def _save_bin(adapter, path):
    torch.save(ipa.adapter_state_dicts(adapter), path)
    return path


def test_published_bin_and_safetensors_layouts_load_the_same_tensors(tmp_path):
    from safetensors.torch import save_file
    adapter = random_adapter(4)
    bin_path = _save_bin(adapter, tmp_path / "ip-adapter.bin")
    sd = ipa.adapter_state_dicts(adapter)
    st_path = tmp_path / "ip-adapter.safetensors"
    save_file({f"{part}.{k}": v for part, d in sd.items() for k, v in d.items()}, str(st_path))
    emb = torch.randn(1, 512)
    for path in (bin_path, st_path):
        loaded = ipa.load_ip_adapter(path, CFG, dtype=torch.float32)
        assert loaded.image_proj.config == RCFG
        assert torch.equal(loaded.image_tokens(emb), adapter.image_tokens(emb))
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), adapter.state_dict().values()))


def test_bad_adapter_files_are_rejected_with_what_they_are(tmp_path):
    sd15 = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0),
                      transformer_depth_middle=1,
                      head_dim=16, context_dim=24, adm_in_channels=64, norm_groups=8)
    other = random_adapter(0, sd15, ipa.ResamplerConfig(dim=128, heads=2, output_dim=24))
    with pytest.raises(CheckpointError, match=r"another base .*reads 24; the UNet's context is 48"):
        ipa.load_ip_adapter(_save_bin(other, tmp_path / "sd15.bin"), CFG)
    torch.save({"image_proj": {"proj.weight": torch.zeros(4, 4)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(1)}},
               tmp_path / "plain.bin")
    with pytest.raises(CheckpointError, match="plain IP-Adapter"):
        ipa.load_ip_adapter(tmp_path / "plain.bin", CFG)
    torch.save({"unet": {}}, tmp_path / "none.bin")
    with pytest.raises(CheckpointError, match="expected 'image_proj' and 'ip_adapter'"):
        ipa.load_ip_adapter(tmp_path / "none.bin", CFG)
    sd = ipa.adapter_state_dicts(random_adapter(0))
    del sd["ip_adapter"]["3.to_v_ip.weight"]
    torch.save(sd, tmp_path / "short.bin")
    with pytest.raises(CheckpointError, match=r"missing .*ip_adapter\.3\.to_v_ip\.weight"):
        ipa.load_ip_adapter(tmp_path / "short.bin", CFG)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"image_proj": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        ipa.load_ip_adapter(tmp_path / "evil.bin", CFG)
    with pytest.raises(ModelError, match="512 values"):
        random_adapter(0).image_tokens(torch.zeros(1, 511))
