"""Capture/replay of cross-attention against the original's in-batch prompt-to-prompt copy."""
import pytest
import torch

from omg.attention import AttentionControl, RowLayout, attention_probs
from omg.unet import UNet, UNetConfig


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = UNet(UNetConfig.tiny()).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def inputs(cfg, seed):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 4, 16, 24, generator=gen)
    cond, uncond = torch.randn(2, 1, 9, cfg.context_dim, generator=gen)
    y = torch.randn(2, cfg.adm_in_channels, generator=gen)
    return z, cond, uncond, y


class InBatchCopy:
    """The original code's reference: batch [uncond_tgt, cond_src, cond_tgt]; every attn2 layer computes
    probabilities explicitly and the target's conditional map is overwritten by the source's."""

    def __call__(self, layer, x, context):
        q, k, v = layer.qkv(x, context)
        probs = attention_probs(q, k)
        if layer.is_cross:
            probs = probs.clone()
            probs[2] = probs[1]
        return layer.out(torch.einsum("bhnt,bhtd->bhnd", probs.to(v.dtype), v))


@pytest.mark.parametrize("store", ["outputs", "maps", "recompute"])
def test_replay_equals_in_batch_copy(store):
    unet = tiny_unet()
    cfg = unet.config
    z_src, cond, uncond, y = inputs(cfg, 1)
    z_tgt = z_src + 0.5 * torch.randn_like(z_src)
    t = torch.tensor(400.0)

    unet.set_attention_processor(InBatchCopy())
    with torch.no_grad():
        ref = unet(torch.cat([z_tgt, z_src, z_tgt]), t, torch.cat([uncond, cond, cond]), y[[0, 1, 1]])
    unet.set_attention_processor(None)

    control = AttentionControl(unet, store=store, replay_calls=[7], store_dtype=torch.float32)
    with control, torch.no_grad():
        if store == "recompute":
            control.set_call("replay", 7, RowLayout(images=1, with_source=True))
            out = unet(torch.cat([z_tgt, z_src, z_tgt]), t, torch.cat([uncond, cond, cond]), y[[0, 1, 1]])
            out = out[[0, 2]]
        else:
            control.set_call("capture", 7, RowLayout(images=1))
            unet(torch.cat([z_src, z_src]), t, torch.cat([uncond, cond]), y)
            assert control.stored_bytes() > 0
            control.set_call("replay", 7, RowLayout(images=1))
            out = unet(torch.cat([z_tgt, z_tgt]), t, torch.cat([uncond, cond]), y)
    assert (out - ref[[0, 2]]).abs().max().item() <= 1e-5
    # and the replay changed something: the target's own attention gives another result
    with torch.no_grad():
        plain = unet(torch.cat([z_tgt, z_tgt]), t, torch.cat([uncond, cond]), y)
    assert (plain - out).abs().max().item() > 1e-3


def test_replay_of_unchanged_latent_is_identity():
    unet = tiny_unet(2)
    z, cond, uncond, y = inputs(unet.config, 2)
    batch, ctx = torch.cat([z, z]), torch.cat([uncond, cond])
    with torch.no_grad():
        plain = unet(batch, 10.0, ctx, y)
        control = AttentionControl(unet, replay_calls=[0], self_replay_calls=[0])
        with control:
            control.set_call("capture", 0, RowLayout(images=1))
            captured = unet(batch, 10.0, ctx, y)
            control.set_call("replay", 0, RowLayout(images=1))
            replayed = unet(batch, 10.0, ctx, y)
    assert torch.equal(plain, captured)
    # bf16 store: the replayed rows carry bf16 rounding of the attention outputs
    assert (replayed - plain).abs().max().item() <= 2e-2 * plain.abs().max().item()


def test_heatmaps_follow_token_attention():
    unet = tiny_unet(3)
    z, cond, uncond, y = inputs(unet.config, 3)
    control = AttentionControl(unet, heatmap_tokens=[1, 4], latent_hw=(16, 24))
    with control, torch.no_grad():
        control.set_call("capture", 0, RowLayout(images=1))
        unet(torch.cat([z, z]), 10.0, torch.cat([uncond, cond]), y)
    maps = control.heatmaps.result()
    assert maps.shape == (2, 16, 24)
    assert torch.allclose(maps.sum(dim=(1, 2)), torch.ones(2), atol=1e-5)
    assert not torch.allclose(maps[0], maps[1])


def test_reset_empties_the_heat_maps_in_place():
    """A kept CUDA graph adds into the controller's heat sums and reads its token columns: reset zeroes and sets those
    very tensors (omg.graphs.KeptGraphs)."""
    unet = tiny_unet()
    z, cond, uncond, y = inputs(unet.config, 1)
    control = AttentionControl(unet, store="outputs", replay_calls=[0], heatmap_tokens=[1, 3],
                               latent_hw=tuple(z.shape[-2:]))
    with control, torch.no_grad():
        control.set_call("capture", 0, RowLayout(images=1))
        unet(torch.cat([z, z]), torch.tensor(400.0), torch.cat([uncond, cond]), y)
    sums = dict(control.heatmaps.sums)
    tokens = control.heatmaps.tokens(z.device)
    assert sums and all(s.abs().sum() > 0 for s in sums.values())
    outputs = dict(control.outputs)
    control.reset([2, 5])
    assert control.heatmaps.sums == sums and all(bool((s == 0).all()) for s in sums.values())
    assert control.heatmaps.counts == {} and control.heatmaps.token_indices == [2, 5]
    assert control.heatmaps.tokens(z.device) is tokens and tokens.tolist() == [2, 5]
    assert all(control.outputs[k] is v for k, v in outputs.items())  # the store's buffers are kept
    with pytest.raises(Exception, match="3"):
        control.reset([1, 2, 3])


def test_auto_store_counts_the_kept_store_as_free(monkeypatch):
    """store="auto" keeps the outputs when they take at most half the free memory; the store a kept graph set holds
    (freed or reused by the run) counts as free, so repeated renders do not flip between stores."""
    import omg.attention as attention

    monkeypatch.setattr(attention, "free_memory", lambda device: 100)
    assert attention.choose_store("auto", 50, torch.device("cpu")) == "outputs"
    assert attention.choose_store("auto", 51, torch.device("cpu")) == "recompute"
    assert attention.choose_store("auto", 80, torch.device("cpu"), reclaimable=60) == "outputs"
    assert attention.choose_store("maps", 10**12, torch.device("cpu")) == "maps"  # as asked
    monkeypatch.setattr(attention, "free_memory", lambda device: None)
    assert attention.choose_store("auto", 1, torch.device("cpu")) == "recompute"  # unknown: nothing kept
