"""LoRA formats and per-concept weights (omg.lora) on the tiny UNet / text encoder.

Expected merged weights are computed here from each format's formula, written independently of
omg.lora (einsum spellings, explicit Kronecker blocks, explicit DoRA norms). The UNet with a kohya LoRA
is compared with diffusers' UNet2DConditionModel after diffusers' own LoRA loading of the same file.
"""
import copy
import warnings

import pytest
import torch
from safetensors.torch import save_file

from omg.errors import LoraError
from omg.lora import (ConceptWeights, UnmergedLora, bind, load_lora, merge_lora_, merged_lora, target_table,
                      text_encoder_lora)
from omg.unet import UNet, UNetConfig, timestep_embedding

# hand-derived SGM <-> diffusers pairs of the tiny config (2 ResBlocks per level, as SDXL)
Q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
Q_D = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
OUT = "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0"
OUT_D = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
K2 = "output_blocks.3.1.transformer_blocks.0.attn2.to_k"  # [64, 48]: not square
K2_D = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
FF = "middle_block.1.transformer_blocks.1.ff.net.0.proj"  # [512, 64] (GEGLU)
CONV = "input_blocks.4.0.in_layers.2"  # [64, 32, 3, 3]
CONV_D = "down_blocks.1.resnets.0.conv1"
CONV_SQUARE = "input_blocks.4.0.out_layers.3"  # [64, 64, 3, 3]
SKIP = "input_blocks.4.0.skip_connection"  # [64, 32, 1, 1]
OP = "input_blocks.3.0.op"  # stride-2 3x3
UPS = "output_blocks.2.2.conv"  # upsampler 3x3
EMB = "output_blocks.7.0.emb_layers.1"  # [32, 128]


def kohya(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    m = UNet(UNetConfig.tiny()).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


@pytest.fixture(scope="module")
def text():
    from omg.text import SDXLTextEncoder
    torch.manual_seed(1)
    t = SDXLTextEncoder.tiny()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return t


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(module, snap):
    now = module.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), f"{k} changed"


def W(unet, path):
    return unet.get_parameter(path + ".weight").detach()


def lr(out_shape, rank, in_shape, conv=False):
    """(down, up) of a kohya/PEFT LoRA; conv: down carries the kernel, up is 1x1."""
    if conv:
        return torch.randn(rank, *in_shape) * 0.3, torch.randn(out_shape, rank, 1, 1) * 0.3
    return torch.randn(rank, *in_shape) * 0.3, torch.randn(out_shape, rank) * 0.3


def unet_inputs(batch=2):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.tensor([10.0, 500.0][:batch] + [900.0] * max(0, batch - 2))
    ctx = torch.randn(batch, 7, 48, generator=g)
    y = torch.randn(batch, 64, generator=g)
    return x, t, ctx, y


# ------------------------------------------------------------------------------ formulas, every spelling

LOWRANK_SPELLINGS = {
    "kohya_sgm": lambda p, d: (kohya(p), ".lora_down.weight", ".lora_up.weight"),
    "kohya_diffusers": lambda p, d: (kohya(d), ".lora_down.weight", ".lora_up.weight"),
    "lycoris_diffusers": lambda p, d: ("lycoris_" + d.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"),
    "peft": lambda p, d: ("unet." + d, ".lora_A.weight", ".lora_B.weight"),
    "peft_no_prefix": lambda p, d: (d, ".lora_A.weight", ".lora_B.weight"),
    "peft_processor": lambda p, d: ("unet." + d.replace(".attn1.to_", ".attn1.processor.to_"),
                                    ".lora_A.weight", ".lora_B.weight"),
    "old_processor": lambda p, d: ("unet." + d.replace(".attn1.to_", ".attn1.processor.to_").removesuffix(".0"),
                                   "_lora.down.weight", "_lora.up.weight"),
    "lora_dot": lambda p, d: ("unet." + d, ".lora.down.weight", ".lora.up.weight"),
    "lora_linear_layer": lambda p, d: ("unet." + d, ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
}


@pytest.mark.parametrize("spelling", sorted(LOWRANK_SPELLINGS))
def test_lowrank_spellings(unet, spelling):
    sd, expected, s = {}, {}, 0.7
    for path, dpath, alpha in ((Q, Q_D, 2.0), (OUT, OUT_D, None)):
        name, down_suffix, up_suffix = LOWRANK_SPELLINGS[spelling](path, dpath)
        down, up = lr(64, 4, (64,))
        sd[name + down_suffix], sd[name + up_suffix] = down, up
        if alpha is not None and spelling.startswith(("kohya", "lycoris")):
            sd[name + ".alpha"] = torch.tensor(alpha)
        scale = alpha / 4 if alpha is not None and spelling.startswith(("kohya", "lycoris")) else 1.0
        expected[path + ".weight"] = W(unet, path) + s * scale * (up @ down)
    cw = ConceptWeights.merge(unet, (load_lora(sd), s))
    assert cw.tensors.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(cw.tensors[k], v, rtol=1e-5, atol=1e-5)


def test_kohya_alpha_zero_missing_and_conv_locon(unet):
    """alpha 0 or missing = rank; conv LoRA: 3x3 down with the layer's kernel, 1x1 up, every conv kind."""
    sd, expected = {}, {}
    cases = [(Q, 0.0, None), (K2, None, None), (CONV, 8.0, (32, 3, 3)), (SKIP, 2.0, (32, 1, 1)),
             (OP, 1.0, (32, 3, 3)), (UPS, 3.0, (64, 3, 3)), (EMB, 5.0, None)]
    for path, alpha, conv_in in cases:
        w = W(unet, path)
        down, up = lr(w.shape[0], 4, conv_in or (w.shape[1],), conv=conv_in is not None)
        sd[kohya(path) + ".lora_down.weight"], sd[kohya(path) + ".lora_up.weight"] = down, up
        if alpha is not None:
            sd[kohya(path) + ".alpha"] = torch.tensor(alpha)
        scale = alpha / 4 if alpha else 1.0
        delta = torch.einsum("or,rikl->oikl", up[..., 0, 0], down) if conv_in else up @ down
        expected[path + ".weight"] = w + scale * delta
    cw = ConceptWeights.merge(unet, load_lora(sd))
    assert cw.tensors.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(cw.tensors[k], v, rtol=1e-5, atol=1e-5)


def test_locon_tucker(unet):
    r, w = 3, W(unet, CONV)
    down, up, mid = torch.randn(r, 32, 1, 1), torch.randn(64, r, 1, 1), torch.randn(r, r, 3, 3)
    sd = {kohya(CONV) + ".lora_down.weight": down, kohya(CONV) + ".lora_up.weight": up,
          kohya(CONV) + ".lora_mid.weight": mid, kohya(CONV) + ".alpha": torch.tensor(1.5)}
    # forward of up(mid(down(x))) collapsed: W[p,q,k,l] = sum_ij up[p,i] mid[i,j,k,l] down[j,q]
    delta = torch.einsum("pi,ijkl,jq->pqkl", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    cw = ConceptWeights.merge(unet, (load_lora(sd), 0.5))
    torch.testing.assert_close(cw.tensors[CONV + ".weight"], w + 0.5 * 1.5 / r * delta, rtol=1e-5, atol=1e-5)


def test_loha_plain_and_tucker(unet):
    r = 4
    a1, b1, a2, b2 = torch.randn(64, r), torch.randn(r, 48), torch.randn(64, r), torch.randn(r, 48)
    ta, tb = [torch.randn(r, r, 3, 3) for _ in range(2)]
    c1a, c1b, c2a, c2b = torch.randn(r, 64), torch.randn(r, 32), torch.randn(r, 64), torch.randn(r, 32)
    sd = {kohya(K2) + ".hada_w1_a": a1, kohya(K2) + ".hada_w1_b": b1, kohya(K2) + ".hada_w2_a": a2,
          kohya(K2) + ".hada_w2_b": b2, kohya(K2) + ".alpha": torch.tensor(2.0),
          kohya(CONV) + ".hada_w1_a": c1a, kohya(CONV) + ".hada_w1_b": c1b, kohya(CONV) + ".hada_t1": ta,
          kohya(CONV) + ".hada_w2_a": c2a, kohya(CONV) + ".hada_w2_b": c2b, kohya(CONV) + ".hada_t2": tb}
    cw = ConceptWeights.merge(unet, load_lora(sd))
    torch.testing.assert_close(cw.tensors[K2 + ".weight"], W(unet, K2) + 2.0 / r * (a1 @ b1) * (a2 @ b2),
                               rtol=1e-5, atol=1e-4)
    f1 = torch.einsum("ijkl,io,jn->onkl", ta, c1a, c1b)  # Tucker: core x_0 w_a x_1 w_b
    f2 = torch.einsum("ijkl,io,jn->onkl", tb, c2a, c2b)
    torch.testing.assert_close(cw.tensors[CONV + ".weight"], W(unet, CONV) + f1 * f2, rtol=1e-5, atol=1e-3)


def kron(a, b):
    """Kronecker product by explicit blocks: out[i*B0 + j, k*B1 + l, ...] = a[i, k] * b[j, l, ...]."""
    out = torch.einsum("ik,jl...->ijkl...", a, b)
    return out.reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], *b.shape[2:])


def test_lokr_full_decomposed_and_tucker(unet):
    sd = {}
    # full factors: scale 1 whatever alpha says (LyCORIS forces alpha = rank)
    w1, w2 = torch.randn(8, 4), torch.randn(64, 16)  # FF: [512, 64] = [8*64, 4*16]
    sd.update({kohya(FF) + ".lokr_w1": w1, kohya(FF) + ".lokr_w2": w2, kohya(FF) + ".alpha": torch.tensor(3.0)})
    # decomposed both (linear [64, 48] = [4*16, 4*12])
    d1a, d1b, d2a, d2b = torch.randn(4, 2), torch.randn(2, 4), torch.randn(16, 3), torch.randn(3, 12)
    sd.update({kohya(K2) + ".lokr_w1_a": d1a, kohya(K2) + ".lokr_w1_b": d1b, kohya(K2) + ".lokr_w2_a": d2a,
               kohya(K2) + ".lokr_w2_b": d2b, kohya(K2) + ".alpha": torch.tensor(6.0)})
    # conv, w2 Tucker (lokr_t2): [64, 32, 3, 3] = [4*16, 2*16, 3, 3]
    cw1, t2, c2a, c2b = torch.randn(4, 2), torch.randn(5, 5, 3, 3), torch.randn(5, 16), torch.randn(5, 16)
    sd.update({kohya(CONV) + ".lokr_w1": cw1, kohya(CONV) + ".lokr_t2": t2, kohya(CONV) + ".lokr_w2_a": c2a,
               kohya(CONV) + ".lokr_w2_b": c2b, kohya(CONV) + ".alpha": torch.tensor(2.5)})
    # conv, w2 decomposed without Tucker: w2_b [r, in_n*k*k]
    o2a, o2b, ow1 = torch.randn(16, 2), torch.randn(2, 16 * 9), torch.randn(2, 2)  # [32, 32, 3, 3]
    sd.update({kohya(OP) + ".lokr_w1": ow1, kohya(OP) + ".lokr_w2_a": o2a, kohya(OP) + ".lokr_w2_b": o2b})
    cw = ConceptWeights.merge(unet, load_lora(sd))
    torch.testing.assert_close(cw.tensors[FF + ".weight"], W(unet, FF) + kron(w1, w2), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cw.tensors[K2 + ".weight"], W(unet, K2) + 6.0 / 3 * kron(d1a @ d1b, d2a @ d2b),
                               rtol=1e-5, atol=1e-4)
    tucker = torch.einsum("ijkl,io,jn->onkl", t2, c2a, c2b)
    torch.testing.assert_close(cw.tensors[CONV + ".weight"], W(unet, CONV) + 2.5 / 5 * kron(cw1, tucker),
                               rtol=1e-5, atol=1e-3)
    flat = kron(ow1, o2a @ o2b).reshape(32, 32, 3, 3)  # alpha missing: scale 1
    torch.testing.assert_close(cw.tensors[OP + ".weight"], W(unet, OP) + flat, rtol=1e-5, atol=1e-3)


def dora_expected(w, delta, magnitude, s):
    """W + s(W' - W), W' = m (W + ΔW) / ||W + ΔW||: norm per output row if m spans outputs, else per input column."""
    v = w + delta
    if magnitude.shape[0] == w.shape[0]:
        norm = v.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
        m = magnitude.reshape(norm.shape)
    else:
        norm = v.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
        m = magnitude.reshape(norm.shape)
    return w + s * (m * v / norm - w)


def test_dora_output_and_input_axis(unet):
    sd, s = {}, 0.6
    d1, u1 = lr(64, 4, (48,))
    m_out = torch.rand(64, 1) + 0.5
    sd.update({kohya(K2) + ".lora_down.weight": d1, kohya(K2) + ".lora_up.weight": u1,
               kohya(K2) + ".alpha": torch.tensor(4.0), kohya(K2) + ".dora_scale": m_out})
    d2, u2 = lr(64, 4, (32, 3, 3), conv=True)
    m_in = torch.rand(1, 32, 1, 1) + 0.5  # older LyCORIS: decomposed on the input axis
    sd.update({kohya(CONV) + ".lora_down.weight": d2, kohya(CONV) + ".lora_up.weight": u2,
               kohya(CONV) + ".dora_scale": m_in})
    a1, b1, a2, b2 = torch.randn(512, 2), torch.randn(2, 64), torch.randn(512, 2), torch.randn(2, 64)
    m_ff = torch.rand(512, 1) + 0.5
    sd.update({kohya(FF) + ".hada_w1_a": a1, kohya(FF) + ".hada_w1_b": b1, kohya(FF) + ".hada_w2_a": a2,
               kohya(FF) + ".hada_w2_b": b2, kohya(FF) + ".dora_scale": m_ff})
    cw = ConceptWeights.merge(unet, (load_lora(sd), s))
    torch.testing.assert_close(cw.tensors[K2 + ".weight"], dora_expected(W(unet, K2), u1 @ d1, m_out, s),
                               rtol=1e-5, atol=1e-5)
    conv_delta = torch.einsum("or,rikl->oikl", u2[..., 0, 0], d2)
    torch.testing.assert_close(cw.tensors[CONV + ".weight"], dora_expected(W(unet, CONV), conv_delta, m_in, s),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cw.tensors[FF + ".weight"],
                               dora_expected(W(unet, FF), (a1 @ b1) * (a2 @ b2), m_ff, s), rtol=1e-5, atol=1e-4)


def test_full_diff_and_bias(unet):
    diff, diff_b = torch.randn(64, 64) * 0.1, torch.randn(64) * 0.1
    sd = {kohya(OUT) + ".diff": diff, kohya(OUT) + ".diff_b": diff_b}
    cw = ConceptWeights.merge(unet, (load_lora(sd), 0.5))
    assert cw.tensors.keys() == {OUT + ".weight", OUT + ".bias"}
    torch.testing.assert_close(cw.tensors[OUT + ".weight"], W(unet, OUT) + 0.5 * diff)
    torch.testing.assert_close(cw.tensors[OUT + ".bias"], unet.get_parameter(OUT + ".bias").detach() + 0.5 * diff_b)


def test_peft_alpha_from_metadata_file(unet, tmp_path):
    """diffusers-saved PEFT file: alpha from lora_adapter_metadata (lora_alpha + alpha_pattern), else rank."""
    import json
    d1, u1 = lr(64, 4, (64,))
    d2, u2 = lr(64, 8, (48,))
    sd = {f"unet.{Q_D}.lora_A.weight": d1, f"unet.{Q_D}.lora_B.weight": u1,
          f"unet.{K2_D}.lora_A.weight": d2, f"unet.{K2_D}.lora_B.weight": u2}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(
        {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {K2_D: 2}, "unet.rank_pattern": {K2_D: 8}})}
    path = str(tmp_path / "peft.safetensors")
    save_file(sd, path, metadata=meta)
    cw = ConceptWeights.merge(unet, load_lora(path))
    torch.testing.assert_close(cw.tensors[Q + ".weight"], W(unet, Q) + 8 / 4 * u1 @ d1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cw.tensors[K2 + ".weight"], W(unet, K2) + 2 / 8 * u2 @ d2, rtol=1e-5, atol=1e-5)
    save_file(sd, path)  # no metadata: scale 1
    cw = ConceptWeights.merge(unet, load_lora(path))
    torch.testing.assert_close(cw.tensors[Q + ".weight"], W(unet, Q) + u1 @ d1, rtol=1e-5, atol=1e-5)


def test_peft_dora_against_peft_merge(unet):
    """A PEFT LoRA with use_dora (lora_magnitude_vector) on raw SGM module names; oracle: peft's own merge."""
    import json

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    model = copy.deepcopy(unet)
    targets = [Q, K2, FF]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    state = {k.removeprefix("base_model.model."): v.detach().clone()
             for k, v in get_peft_model_state_dict(peft_model).items()}
    assert any("lora_magnitude_vector" in k for k in state)
    merged = peft_model.merge_and_unload()
    lora = load_lora(state, metadata={"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})})
    cw = ConceptWeights.merge(unet, lora)
    assert cw.tensors.keys() == {t + ".weight" for t in targets}
    for t in targets:
        torch.testing.assert_close(cw.tensors[t + ".weight"], merged.get_parameter(t + ".weight"),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [[CONV_SQUARE], [CONV, SKIP]], ids=["square", "non-square"])
def test_peft_dora_on_convs_against_peft_merge(unet, targets):
    """PEFT stores a conv's magnitude as [1, out, 1, 1], one value per output channel: on a square conv its
    shape also fits the input axis (LyCORIS's [1, in, 1, 1]), and on a non-square one only the output axis."""
    import json

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(unet),
                                LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0, 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.rand_like(p) + 0.5)  # not the initial ||W||, so a wrong norm axis shows
    state = {k.removeprefix("base_model.model."): v.detach().clone()
             for k, v in get_peft_model_state_dict(peft_model).items()}
    assert [list(v.shape) for k, v in state.items() if "magnitude" in k] == [[1, 64, 1, 1]] * len(targets)
    merged = peft_model.merge_and_unload()
    lora = load_lora(state, metadata={"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})})
    cw = ConceptWeights.merge(unet, lora)
    for t in targets:
        torch.testing.assert_close(cw.tensors[t + ".weight"], merged.get_parameter(t + ".weight"),
                                   rtol=1e-5, atol=1e-5)
    # a PEFT magnitude sized like the input axis is refused, not taken as LyCORIS's input-axis form
    key = next(k for k in state if "magnitude" in k and CONV in k) if CONV in targets else None
    if key is not None:
        state[key] = torch.rand(1, 32, 1, 1) + 0.5
        with pytest.raises(LoraError, match=r"lora_magnitude_vector \(one per output\) \[1, 32, 1, 1\]"):
            ConceptWeights.merge(unet, load_lora(state))


def test_old_text_encoder_spellings(text):
    """Older diffusers text-encoder keys: self_attn.to_q_lora.down/up, mlp.fc1.lora_linear_layer.down/up."""
    sd, expected = {}, {}
    d, u = lr(32, 2, (32,))
    sd["text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight"] = d
    sd["text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight"] = u
    w = text.clip_l.text_model.encoder.layers[0].self_attn.q_proj.weight.detach()
    expected["clip_l.text_model.encoder.layers.0.self_attn.q_proj.weight"] = w + u @ d
    d, u = lr(128, 2, (32,))
    sd["text_encoder.text_model.encoder.layers.2.mlp.fc1.lora_linear_layer.down.weight"] = d
    sd["text_encoder.text_model.encoder.layers.2.mlp.fc1.lora_linear_layer.up.weight"] = u
    w = text.clip_l.text_model.encoder.layers[2].mlp.fc1.weight.detach()
    expected["clip_l.text_model.encoder.layers.2.mlp.fc1.weight"] = w + u @ d
    d, u = lr(48, 2, (48,))
    sd["text_encoder_2.text_model.encoder.layers.1.self_attn.to_v_lora.down.weight"] = d
    sd["text_encoder_2.text_model.encoder.layers.1.self_attn.to_v_lora.up.weight"] = u
    w = text.clip_g.transformer.resblocks[1].attn.in_proj_weight.detach().clone()
    w[96:144] += u @ d  # v rows of the fused [q; k; v]
    expected["clip_g.transformer.resblocks.1.attn.in_proj_weight"] = w
    cw = ConceptWeights.merge(text, load_lora(sd))
    assert cw.tensors.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(cw.tensors[k], v, rtol=1e-5, atol=1e-5)


def test_full_sdxl_layout_every_kohya_module_matches():
    """Every kohya module name of SDXL base (722 + 66 LoCon UNet, 264 TE) resolves to a weight of its shape."""
    import json
    import os

    from omg.text import SDXLTextEncoder
    with torch.device("meta"):
        big, te = UNet(UNetConfig.sdxl()), SDXLTextEncoder.sdxl()
    rows = [line.split("\t") for line in open(os.path.join(os.path.dirname(__file__), "data",
                                                          "kohya_sdxl_lora_modules.txt")) if line.strip()]
    unet_table, te_table = target_table(big).names, target_table(te).names
    params = dict(big.named_parameters())
    n_unet = 0
    for row in rows:
        name = row[0].strip()
        if name.startswith("lora_unet_"):
            n_unet += 1
            assert list(params[unet_table[name].weight].shape) == json.loads(row[1].split("#")[0])
        else:
            assert name in te_table, name
    assert n_unet == 788 and len(rows) - n_unet == 264


# ------------------------------------------------------------------------------ text encoders

def test_text_encoder_lora_clip_l_and_bigg_fused_rows(text):
    """te1 on CLIP-L by HF names; te2 q/k/v on the rows of bigG's fused in_proj, out_proj, fc1/fc2,
    text_projection. Oracle: the same deltas added in the transformers layout, converted back by keymap."""
    from omg import keymap
    torch.manual_seed(3)
    sd, s = {}, 0.8
    te1_deltas = {}
    for mod, (o, i) in {"self_attn_q_proj": (32, 32), "mlp_fc1": (128, 32)}.items():
        down, up = lr(o, 2, (i,))
        sd[f"lora_te1_text_model_encoder_layers_1_{mod}.lora_down.weight"] = down
        sd[f"lora_te1_text_model_encoder_layers_1_{mod}.lora_up.weight"] = up
        te1_deltas[mod] = up @ down
    hf_deltas = {}
    for mod, (o, i) in {"self_attn.q_proj": (48, 48), "self_attn.k_proj": (48, 48), "self_attn.v_proj": (48, 48),
                        "self_attn.out_proj": (48, 48), "mlp.fc1": (192, 48), "mlp.fc2": (48, 192)}.items():
        down, up = lr(o, 3, (i,))
        name = f"text_encoder_2.text_model.encoder.layers.2.{mod}"  # PEFT spelling for te2
        sd[name + ".lora_A.weight"], sd[name + ".lora_B.weight"] = down, up
        hf_deltas[f"text_model.encoder.layers.2.{mod}.weight"] = up @ down
    down, up = lr(40, 2, (48,))
    sd["lora_te2_text_projection.lora_down.weight"], sd["lora_te2_text_projection.lora_up.weight"] = down, up
    hf_deltas["text_projection.weight"] = up @ down
    lora = load_lora(sd)

    # oracle, layout by layout
    expected = copy.deepcopy(text)
    with torch.no_grad():
        layer = expected.clip_l.text_model.encoder.layers[1]
        layer.self_attn.q_proj.weight += s * te1_deltas["self_attn_q_proj"]
        layer.mlp.fc1.weight += s * te1_deltas["mlp_fc1"]
        hf = keymap.clip_g_to_hf(expected.clip_g.state_dict())
        for k, d in hf_deltas.items():
            hf[k] = hf[k] + s * d
        recipes, unmapped = keymap.clip_g_recipes_from_hf(hf)
        assert not unmapped
        expected.clip_g.load_state_dict({k: r.apply(hf[x] for x in r.sources) for k, r in recipes.items()})

    before = snapshot(text)
    prompts = ["a photo of a sks dog", "a cat"]
    base_ctx, base_pooled = text.encode(prompts)
    with text_encoder_lora(text, (lora, s)) as te:
        ctx, pooled = te.encode(prompts)
        merged = te.state_dict()
        for k, v in expected.state_dict().items():
            torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert_same(text, before)  # restored bit for bit
    exp_ctx, exp_pooled = expected.encode(prompts)
    torch.testing.assert_close(ctx, exp_ctx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled, exp_pooled, rtol=1e-4, atol=1e-4)
    assert (ctx - base_ctx).abs().max() > 1e-3 and (pooled - base_pooled).abs().max() > 1e-3
    after_ctx, _ = text.encode(prompts)
    assert torch.equal(after_ctx, base_ctx)


def test_text_lora_ignores_unet_keys_and_unet_ignores_text_keys(unet, text):
    sd = {}
    down, up = lr(64, 2, (64,))
    sd[kohya(Q) + ".lora_down.weight"], sd[kohya(Q) + ".lora_up.weight"] = down, up
    down, up = lr(32, 2, (32,))
    sd["lora_te1_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight"] = down
    sd["lora_te1_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight"] = up
    lora = load_lora(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither side may call the other's modules "unmatched"
        assert ConceptWeights.merge(unet, lora).tensors.keys() == {Q + ".weight"}
        assert ConceptWeights.merge(text, lora).tensors.keys() == {
            "clip_l.text_model.encoder.layers.0.self_attn.k_proj.weight"}


# ------------------------------------------------------------------------------ against diffusers

def diffusers_twin(unet):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    config = dict(sample_size=32, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  block_out_channels=(32, 64, 64), layers_per_block=2, transformer_layers_per_block=(1, 1, 2),
                  attention_head_dim=(2, 4, 4), cross_attention_dim=48, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=64, norm_num_groups=8)
    d = UNet2DConditionModel(**config).eval()
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    d.load_state_dict(convert_ldm_unet_checkpoint(sd, d.config), strict=True)
    return d


def kohya_file_every_target(unet, names: str):
    """A kohya LoRA on every transformer Linear and every LoCon conv / emb target, rank 4, varied alphas."""
    from omg.keymap import unet_module_map
    to_diffusers = {s: d for d, s in unet_module_map(unet.config).items()}
    sd, g = {}, torch.Generator().manual_seed(11)
    for name, m in unet.named_modules():
        adaptable = ".1." in name and isinstance(m, torch.nn.Linear) or any(
            s in name for s in ("in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection", ".op", ".2.conv"))
        if not adaptable or not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w = m.weight
        key = kohya(name) if names == "sgm" else kohya(to_diffusers[name])
        if w.dim() == 4:
            down, up = torch.randn(4, *w.shape[1:], generator=g), torch.randn(w.shape[0], 4, 1, 1, generator=g)
        else:
            down, up = torch.randn(4, w.shape[1], generator=g), torch.randn(w.shape[0], 4, generator=g)
        sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down * 0.1, up * 0.1
        # kohya's network_alpha / conv_alpha. (diffusers 0.42.1 drops per-module alphas of attention layers
        # in this path — its alpha_pattern keys keep "processor.to_q_lora" — so only the most common
        # alpha reaches them; real kohya files share one alpha per kind, as here.)
        sd[key + ".alpha"] = torch.tensor(1.0 if w.dim() == 4 else 2.0)
    return sd


@pytest.mark.parametrize("names", ["sgm", "diffusers"])
def test_kohya_lora_matches_diffusers_loader(unet, names, tmp_path):
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    sd = kohya_file_every_target(unet, names)
    path = str(tmp_path / "kohya.safetensors")
    save_file(sd, path)
    strength = 0.7

    d = diffusers_twin(unet)
    state, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(dict(sd), unet_config=d.config)
    d.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name="concept")
    d.set_adapters(["concept"], weights=[strength])

    x, t, ctx, y = unet_inputs()
    pooled, time_ids = y[:, :16], torch.randn(2, 6, generator=torch.Generator().manual_seed(2)) * 100
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 8).reshape(2, -1)], 1)
    lora = load_lora(path)
    cw = ConceptWeights.merge(unet, (lora, strength))
    assert len(cw.tensors) == len(lora.adapters) == len(sd) // 3
    with torch.no_grad():
        base = unet(x, t, ctx, y)
        ref = d(x, t, ctx, added_cond_kwargs=dict(text_embeds=pooled, time_ids=time_ids)).sample
        with cw.applied(unet):
            ours = unet(x, t, ctx, y)
    assert (ref - base).abs().max() > 1e-2  # the LoRA does something
    assert (ours - ref).abs().max() <= 1e-4, (ours - ref).abs().max()


# ------------------------------------------------------------------------------ modes

def mixed_lora(unet):
    """kohya LoRA + LoCon + LoHa + full diff + DoRA in one concept (the unmerged mode's two paths)."""
    sd = {}
    for path in (Q, K2, FF, SKIP):
        w = W(unet, path)
        down, up = lr(w.shape[0], 4, tuple(w.shape[1:]), conv=w.dim() == 4)
        sd[kohya(path) + ".lora_down.weight"], sd[kohya(path) + ".lora_up.weight"] = down * 0.3, up * 0.3
    down, up = lr(64, 3, (1, 1))
    sd.update({kohya(CONV) + ".lora_down.weight": torch.randn(3, 32, 1, 1) * 0.3,
               kohya(CONV) + ".lora_mid.weight": torch.randn(3, 3, 3, 3) * 0.3,
               kohya(CONV) + ".lora_up.weight": torch.randn(64, 3, 1, 1) * 0.3})
    sd.update({kohya(OP) + ".lora_down.weight": torch.randn(2, 32, 3, 3) * 0.3,
               kohya(OP) + ".lora_up.weight": torch.randn(32, 2, 1, 1) * 0.3})
    sd.update({kohya(EMB) + ".hada_w1_a": torch.randn(32, 2), kohya(EMB) + ".hada_w1_b": torch.randn(2, 128) * 0.3,
               kohya(EMB) + ".hada_w2_a": torch.randn(32, 2), kohya(EMB) + ".hada_w2_b": torch.randn(2, 128) * 0.3})
    sd.update({kohya(OUT) + ".diff": torch.randn(64, 64) * 0.05, kohya(OUT) + ".diff_b": torch.randn(64) * 0.05})
    down, up = lr(64, 2, (64,))
    p = "middle_block.1.proj_in"
    sd.update({kohya(p) + ".lora_down.weight": down, kohya(p) + ".lora_up.weight": up,
               kohya(p) + ".dora_scale": W(unet, p).norm(dim=1, keepdim=True) * 1.1})
    return load_lora(sd)


def test_modes_agree_and_restore_exactly(unet):
    lora, s = mixed_lora(unet), 0.8
    x, t, ctx, y = unet_inputs()
    before = snapshot(unet)
    with torch.no_grad():
        base = unet(x, t, ctx, y)
        cw = ConceptWeights.merge(unet, (lora, s))
        with cw.applied(unet):
            swapped = unet(x, t, ctx, y)
            assert all(unet.get_parameter(k).data_ptr() == v.data_ptr() for k, v in cw.tensors.items())
        assert_same(unet, before)
        called = cw.call(unet, x, t, ctx, y)
        assert_same(unet, before)
        with merged_lora(unet, (lora, s)):
            inplace = unet(x, t, ctx, y)
        assert_same(unet, before)
        with UnmergedLora(unet, (lora, s)):
            hooked = unet(x, t, ctx, y)
        assert_same(unet, before)
        again = unet(x, t, ctx, y)
    assert torch.equal(again, base)
    assert (swapped - base).abs().max() > 1e-2
    assert torch.equal(swapped, called) and torch.equal(swapped, inplace)
    assert (hooked - swapped).abs().max() <= 1e-4


def test_concept_memory_is_touched_tensors_only(unet):
    lora = mixed_lora(unet)
    cw = ConceptWeights.merge(unet, lora)
    touched = {k: unet.get_parameter(k) for k in cw.tensors}
    touched_bytes = sum(p.numel() * p.element_size() for p in touched.values())
    assert cw.nbytes <= 1.1 * touched_bytes and cw.nbytes == touched_bytes
    assert len(cw.tensors) < len(list(unet.parameters())) // 3
    # nothing in the concept aliases a base tensor, and the base is not copied either
    base_ptrs = {p.data_ptr() for p in unet.parameters()}
    assert not base_ptrs & {t.data_ptr() for t in cw.tensors.values()}


def test_unmerged_on_a_batch_slice(unet):
    """Base and concept rows in one call: the delta only touches its rows."""
    lora = mixed_lora(unet)
    x, t, ctx, y = unet_inputs()
    with torch.no_grad():
        base = unet(x, t, ctx, y)
        with ConceptWeights.merge(unet, lora).applied(unet):
            concept = unet(x, t, ctx, y)
        with UnmergedLora(unet, lora, batch=slice(1, 2)):
            mixed = unet(x, t, ctx, y)
    assert torch.equal(mixed[0], base[0])
    assert (mixed[1] - concept[1]).abs().max() <= 1e-4


def test_low_precision_merge_is_fp32_then_cast(unet):
    half = copy.deepcopy(unet).to(torch.bfloat16)
    down, up = lr(64, 4, (64,))
    lora = load_lora({kohya(Q) + ".lora_down.weight": down.half(), kohya(Q) + ".lora_up.weight": up.half(),
                      kohya(Q) + ".alpha": torch.tensor(2.0, dtype=torch.float16)})
    cw = ConceptWeights.merge(half, (lora, 0.9))
    got = cw.tensors[Q + ".weight"]
    expected = (W(half, Q).float() + 0.9 * 2 / 4 * (up.half().float() @ down.half().float())).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected.float()).abs().max() <= 2 ** -7 * expected.float().abs().max()


# ------------------------------------------------------------------------------ bad input

def test_sd15_lora_on_sdxl_is_refused_and_model_untouched(unet):
    sd = {}
    # SD 1.x: attention at the first level (none in SDXL) and a 768-wide context (48 here -> 30)
    first = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    down, up = lr(32, 4, (32,))
    sd[first + ".lora_down.weight"], sd[first + ".lora_up.weight"] = down, up
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    down, up = lr(64, 4, (30,))
    sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"] = down, up
    lora = load_lora(sd, name="sd15.safetensors")
    before = snapshot(unet)
    for apply in (lambda: ConceptWeights.merge(unet, lora), lambda: merge_lora_(unet, lora),
                  lambda: UnmergedLora(unet, lora)):
        with pytest.raises(LoraError, match=r"sd15\.safetensors.*attn2_to_k.*\[64, 30\].*SD 1"):
            apply()
        assert_same(unet, before)
        assert not any(m._forward_hooks for m in unet.modules())
    only_unmatched = load_lora({first + ".lora_down.weight": sd[first + ".lora_down.weight"],
                                first + ".lora_up.weight": sd[first + ".lora_up.weight"]}, name="sd15b")
    with pytest.raises(LoraError, match=r"sd15b: none of its 1 modules.*down_blocks_0_attentions"):
        ConceptWeights.merge(unet, only_unmatched)


def test_rank_and_shape_mismatch(unet):
    with pytest.raises(LoraError, match=r"bad-rank.*attn1_to_q.*rank"):
        load_lora({kohya(Q) + ".lora_down.weight": torch.randn(8, 64),
                   kohya(Q) + ".lora_up.weight": torch.randn(64, 4)}, name="bad-rank")
    lora = load_lora({kohya(Q) + ".lora_down.weight": torch.randn(4, 60),
                      kohya(Q) + ".lora_up.weight": torch.randn(64, 4)}, name="bad-shape")
    before = snapshot(unet)
    with pytest.raises(LoraError, match=r"bad-shape.*attn1_to_q.*\[64, 60\].*\[64, 64\]"):
        merge_lora_(unet, lora)
    assert_same(unet, before)
    with pytest.raises(LoraError, match=r"half.*only one of its up/down"):
        load_lora({kohya(Q) + ".lora_up.weight": torch.randn(64, 4)}, name="half")
    with pytest.raises(LoraError, match=r"dora_scale"):
        ConceptWeights.merge(unet, load_lora({kohya(K2) + ".lora_down.weight": torch.randn(4, 48),
                                              kohya(K2) + ".lora_up.weight": torch.randn(64, 4),
                                              kohya(K2) + ".dora_scale": torch.randn(1, 7)}))


def test_nan_inf_and_unreadable_files(unet, tmp_path):
    down = torch.randn(4, 64)
    down[0, 3] = float("nan")
    path = str(tmp_path / "nan.safetensors")
    save_file({kohya(Q) + ".lora_down.weight": down, kohya(Q) + ".lora_up.weight": torch.randn(64, 4)}, path)
    with pytest.raises(LoraError, match=r"nan\.safetensors.*NaN or inf.*attn1_to_q\.lora_down"):
        load_lora(path)
    with pytest.raises(LoraError, match="missing.safetensors: no such file"):
        load_lora(str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(LoraError, match="cannot read LoRA file: .*junk.safetensors"):
        load_lora(str(junk))


def write_safetensors_by_hand(path, tensors):
    """A safetensors file from {key: (shape, float32 values)}: any shape, even ones torch refuses in most ops."""
    import json
    import struct
    header, data = {}, b""
    for key, (shape, values) in tensors.items():
        raw = struct.pack(f"<{len(values)}f", *values)
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)
    return str(path)


MALFORMED = {  # case -> the LoraError expected
    "alpha": r"alpha\.safetensors: lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q\.alpha: "
             r"alpha must be one number, got a tensor of shape \[4\]",
    "rank0": r"rank0\.safetensors: module 'lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q' "
             r"has empty .*lora_down\.weight': \[0, 64\]",
    "dims": r"dims\.safetensors.*attn1_to_q\.lora_down\.weight.*65 dimensions; torch supports at most 64",
}


def malformed_state_dict(case):
    down, up = lr(64, 4, (64,))
    if case == "alpha":
        return {kohya(Q) + ".lora_down.weight": down, kohya(Q) + ".lora_up.weight": up,
                kohya(Q) + ".alpha": torch.tensor([4.0, 4.0, 4.0, 4.0])}
    if case == "rank0":
        return {kohya(Q) + ".lora_down.weight": torch.zeros(0, 64), kohya(Q) + ".lora_up.weight": torch.zeros(64, 0),
                kohya(Q) + ".alpha": torch.tensor(4.0)}
    return {kohya(Q) + ".lora_down.weight": torch.full([1] * 65, 0.5), kohya(Q) + ".lora_up.weight": up[:, :1]}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_are_lora_errors_naming_file_and_key_and_leave_the_model_untouched(unet, tmp_path, case):
    """A wrong-shaped alpha, rank-0 factors and a tensor of more than 64 dimensions raised RuntimeError or
    ZeroDivisionError from deep inside torch or the merge."""
    sd = malformed_state_dict(case)
    path = str(tmp_path / f"{case}.safetensors")
    if case == "dims":  # torch refuses most ops on it, so write the header by hand
        write_safetensors_by_hand(path, {k: (list(v.shape), v.flatten().tolist()) for k, v in sd.items()})
    else:
        save_file(sd, path)
    before = snapshot(unet)
    for apply in (lambda: load_lora(path), lambda: merge_lora_(unet, path), lambda: ConceptWeights.merge(unet, path),
                  lambda: UnmergedLora(unet, path), lambda: bind(unet, path)):
        with pytest.raises(LoraError, match=MALFORMED[case]):
            apply()
        assert_same(unet, before)
    with pytest.raises(LoraError, match="^in-memory: .*attn1_to_q"):  # the same tensors as a state dict
        load_lora(sd, name="in-memory")


def test_overflow_during_inplace_merge_restores_everything(unet):
    """The last module overflows fp16: what was already merged is restored bit for bit."""
    half = copy.deepcopy(unet).half()
    sd = {}
    for path, scale in ((Q, 0.1), (OUT, 0.1), (K2, 1e4)):
        w = W(half, path)
        sd[kohya(path) + ".lora_down.weight"] = torch.randn(4, w.shape[1]) * scale
        sd[kohya(path) + ".lora_up.weight"] = torch.randn(w.shape[0], 4) * scale
    before = snapshot(half)
    with pytest.raises(LoraError, match="NaN/inf in torch.float16"):
        merge_lora_(half, load_lora(sd))
    assert_same(half, before)


def test_unknown_keys_warn_with_count_or_raise_when_strict(unet):
    down, up = lr(64, 4, (64,))
    sd = {kohya(Q) + ".lora_down.weight": down, kohya(Q) + ".lora_up.weight": up,
          "lora_unet_no_such_block_to_q.lora_down.weight": down, "lora_unet_no_such_block_to_q.lora_up.weight": up,
          "something.else": torch.zeros(3)}
    lora = load_lora(sd, name="extra")
    with pytest.warns(UserWarning, match=r"extra: 2 LoRA keys/modules match nothing.*1 unmatched modules, "
                                         r"1 unknown keys.*no_such_block.*something\.else"):
        cw = ConceptWeights.merge(unet, lora)
    assert cw.tensors.keys() == {Q + ".weight"}
    before = snapshot(unet)
    with pytest.raises(LoraError, match="extra: 2 LoRA keys"):
        merge_lora_(unet, lora, strict=True)
    assert_same(unet, before)
    with pytest.raises(LoraError, match="cannot apply"):
        load_lora({"lora_unet_x.a1.weight": torch.zeros(2, 2), "lora_unet_x.a2.weight": torch.zeros(2, 2)})


def test_stacked_inplace_merges_restore_in_reverse_order(unet):
    lora_a = load_lora({kohya(Q) + ".lora_down.weight": torch.randn(2, 64),
                        kohya(Q) + ".lora_up.weight": torch.randn(64, 2)})
    lora_b = load_lora({kohya(Q) + ".diff": torch.randn(64, 64), kohya(OUT) + ".diff": torch.randn(64, 64)})
    before = snapshot(unet)
    first = merge_lora_(unet, lora_a)
    after_first = snapshot(unet)
    second = merge_lora_(unet, (lora_b, 0.5))
    with pytest.raises(RuntimeError, match="reverse order"):
        first.restore()
    second.restore()
    assert_same(unet, after_first)
    first.restore()
    assert_same(unet, before)


def test_sdxl_bundle_unet_and_text_from_one_file(tmp_path):
    """One kohya file with UNet, te1 and te2 modules applied to the SDXL bundle, without any warning."""
    from omg.model import SDXL
    model = SDXL.random(with_vae=False)
    sd = {}
    fc2 = model.text.clip_l.text_model.encoder.layers[0].mlp.fc2.weight
    targets = {kohya(Q): W(model.unet, Q).shape, "lora_te1_text_model_encoder_layers_0_mlp_fc2": fc2.shape,
               "lora_te2_text_model_encoder_layers_1_self_attn_k_proj": (48, 48)}
    for name, (o, i) in targets.items():
        sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = torch.randn(4, i), torch.randn(o, 4)
        sd[name + ".alpha"] = torch.tensor(2.0)
    path = str(tmp_path / "concept.safetensors")
    save_file(sd, path)
    lora = load_lora(path)
    before = snapshot(model.text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unet_weights = ConceptWeights.merge(model.unet, (lora, 0.8))
        base = model.text.encode(["a sks dog"])
        with text_encoder_lora(model.text, (lora, 0.8)) as te:
            ctx, pooled = te.encode(["a sks dog"])
    assert unet_weights.tensors.keys() == {Q + ".weight"}
    assert_same(model.text, before)
    assert (ctx - base[0]).abs().max() > 1e-4 and (pooled - base[1]).abs().max() > 1e-4
