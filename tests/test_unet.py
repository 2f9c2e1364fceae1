"""Our UNet against diffusers' UNet2DConditionModel holding the same weights, converted by diffusers'
own single-file key converter from our SGM-layout state dict."""
import json
import os

import pytest
import torch

from omg.unet import UNet, UNetConfig, timestep_embedding

from conftest import DATA

TIME_EMBED = 8  # size-embedding width of the tiny config: adm_in 64 = 16 pooled + 6 * 8


def diffusers_config(cfg: UNetConfig) -> dict:
    down = tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth)
    return dict(sample_size=32, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                down_block_types=down, up_block_types=tuple(
                    ("CrossAttnUpBlock2D" if d else "UpBlock2D") for d in reversed(cfg.transformer_depth)),
                block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
                layers_per_block=cfg.num_res_blocks,
                transformer_layers_per_block=tuple(max(d, 1) for d in cfg.transformer_depth),
                attention_head_dim=tuple(cfg.model_channels * m // cfg.head_dim for m in cfg.channel_mult),
                cross_attention_dim=cfg.context_dim, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
                projection_class_embeddings_input_dim=cfg.adm_in_channels,
                norm_num_groups=cfg.norm_groups)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.15)


@pytest.fixture(scope="module")
def pair():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    cfg = UNetConfig.tiny()
    ours = UNet(cfg).eval()
    randomize(ours)
    theirs = diffusers.UNet2DConditionModel(**diffusers_config(cfg)).eval()
    converted = convert_ldm_unet_checkpoint(
        {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}, theirs.config)
    theirs.load_state_dict(converted, strict=True)
    return cfg, ours, theirs


@pytest.mark.parametrize("batch,height,width,t",
                         [(1, 16, 16, 999.0), (2, 16, 24, 17.0), (3, 24, 8, 500.0), (2, 13, 7, 250.0)])
def test_matches_diffusers(pair, batch, height, width, t):
    cfg, ours, theirs = pair
    gen = torch.Generator().manual_seed(batch * 100 + height)
    x = torch.randn(batch, cfg.in_channels, height, width, generator=gen)
    timesteps = torch.full((batch,), t) + torch.arange(batch)
    context = torch.randn(batch, 7, cfg.context_dim, generator=gen)
    pooled = torch.randn(batch, cfg.adm_in_channels - 6 * TIME_EMBED, generator=gen)
    time_ids = torch.tensor([[1024, 768, 0, 32, 1024, 768]] * batch, dtype=torch.float32)
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), TIME_EMBED).reshape(batch, -1)], dim=1)
    with torch.no_grad():
        a = ours(x, timesteps, context, y)
        b = theirs(x, timesteps, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert a.shape == b.shape == x.shape
    assert b.abs().max() > 0.1  # a non-trivial output
    assert (a - b).abs().max().item() <= 1e-4


def test_sdxl_layout_on_meta():
    with torch.device("meta"):
        unet = UNet(UNetConfig.sdxl())
    with open(os.path.join(DATA, "sdxl_keys.json")) as f:
        reference = {k[len("model.diffusion_model."):]: v for k, v in json.load(f).items()
                     if k.startswith("model.diffusion_model.")}
    ours = {k: list(v.shape) for k, v in unet.state_dict().items()}
    assert ours == reference
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert UNetConfig.from_state_dict(unet.state_dict()) == UNetConfig.sdxl()
    assert len(unet.attention_layers("cross")) == 70 and len(unet.attention_layers("self")) == 70


def test_config_from_tiny_state_dict():
    cfg = UNetConfig.tiny()
    inferred = UNetConfig.from_state_dict(UNet(cfg).state_dict(), head_dim=cfg.head_dim, norm_groups=cfg.norm_groups)
    assert inferred == cfg


def test_attention_hook_addresses_every_layer_by_sgm_path():
    cfg = UNetConfig.tiny()
    unet = UNet(cfg).eval()
    randomize(unet, seed=3)
    x = torch.randn(2, 4, 16, 16)
    ctx, y = torch.randn(2, 5, cfg.context_dim), torch.randn(2, cfg.adm_in_channels)
    with torch.no_grad():
        base = unet(x, 10.0, ctx, y)
    seen = []

    def explicit_softmax(layer, x, context):  # a processor that computes attention by hand
        seen.append(layer.path)
        q, k, v = layer.qkv(x, context)
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return layer.out(probs @ v)

    unet.set_attention_processor(explicit_softmax, kind="cross")
    with torch.no_grad():
        hooked = unet(x, 10.0, ctx, y)
    assert sorted(seen) == sorted(unet.attention_layers("cross"))
    assert all(p.endswith("attn2") for p in seen) and "input_blocks.4.1.transformer_blocks.0.attn2" in seen
    assert (hooked - base).abs().max() <= 1e-5

    path = "middle_block.1.transformer_blocks.0.attn1"
    unet.set_attention_processor(None)
    unet.set_attention_processor(lambda layer, x, c: torch.zeros_like(x), paths=[path])
    with torch.no_grad():
        changed = unet(x, 10.0, ctx, y)
    assert (changed - base).abs().max() > 1e-3
    with pytest.raises(KeyError):
        unet.set_attention_processor(None, paths=["middle_block.1.nope"])


def test_channels_last_weights_run_every_activation_channels_last():
    """unet.to(memory_format=channels_last) (what SDXL does on CUDA): the same eps, every 4-d activation inside
    laid out channels-last (no NCHW transposes around its convolutions), the output contiguous for the samplers.
    Before the layout followed the weights, the activations stayed NCHW and cuDNN transposed around each conv."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    randomize(unet, seed=3)
    gen = torch.Generator().manual_seed(1)
    x, ctx, y = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 48, generator=gen), torch.randn(2, 64)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        plain = unet(x, t, ctx, y)
        unet.to(memory_format=torch.channels_last)
        layouts = []
        hooks = [m.register_forward_hook(lambda m, i, o: layouts.append(
            (type(m).__name__, o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous())))
                 for m in unet.modules() if m is not unet and isinstance(m, (torch.nn.Conv2d, torch.nn.ModuleList))]
        last = unet(x, t, ctx, y)
        for h in hooks:
            h.remove()
    assert last.is_contiguous() and (last - plain).abs().max().item() <= 1e-5 * plain.abs().max().item()
    assert len(layouts) > 20 and all(ok for _, ok in layouts), [n for n, ok in layouts if not ok]


def test_sdxl_puts_its_unet_in_the_devices_preferred_layout(monkeypatch):
    """channels-last on CUDA, contiguous elsewhere; SDXL applies it to the UNet it is given (here CPU made to
    prefer channels-last, as CUDA does)."""
    import omg.model
    from omg.unet import in_layout_of, preferred_memory_format
    assert preferred_memory_format("cuda") == torch.channels_last
    assert preferred_memory_format("cpu") == torch.contiguous_format
    plain = omg.model.SDXL.random(with_vae=False, with_text=False)
    conv = plain.unet.input_blocks[0][0]
    assert conv.weight.is_contiguous() and in_layout_of(conv, torch.zeros(1, 4, 3, 3)).is_contiguous()
    monkeypatch.setattr(omg.model, "preferred_memory_format", lambda device: torch.channels_last)
    last = omg.model.SDXL.random(with_vae=False, with_text=False)
    conv = last.unet.input_blocks[0][0]
    assert not conv.weight.is_contiguous() and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not in_layout_of(conv, torch.zeros(1, 4, 3, 3)).is_contiguous()


def test_cross_kv_computed_once_give_the_same_eps():
    """unet.cross_kv(context) and using_cross_kv: the same eps as projecting the context in every layer; a refresh
    into the same tensors (a kept CUDA graph reads them) gives the new context's values; a call with other rows
    fails."""
    from omg.errors import ModelError
    unet = UNet(UNetConfig.tiny()).eval()
    randomize(unet, seed=4)
    gen = torch.Generator().manual_seed(2)
    x, ctx, y = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 48, generator=gen), torch.randn(2, 64)
    other = torch.randn(2, 7, 48, generator=gen)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        kv = unet.cross_kv(ctx)
        assert sorted(kv) == sorted(unet.attention_layers("cross"))
        with unet.using_cross_kv(kv):
            cached = unet(x, t, torch.zeros_like(ctx), y)  # the context itself is not read again
        assert torch.equal(cached, unet(x, t, ctx, y))
        assert all(layer.kv is None for layer in unet.attention_layers("cross").values())
        tensors = [k for k, _ in kv.values()]
        refreshed = unet.cross_kv(other, into=kv)
        assert refreshed is kv and all(k is t_ for (k, _), t_ in zip(kv.values(), tensors))
        expected = unet(x, t, other, y)
        with unet.using_cross_kv(kv):
            assert torch.equal(unet(x, t, ctx, y), expected)
            with pytest.raises(ModelError, match="computed for 2 rows"):
                unet(x[:1], t[:1], other[:1], y[:1])
