"""omg.text vs independent references: open_clip's tokenizer and TextTransformer, transformers' CLIPTextModel(s),
diffusers' Timesteps; and the SDXL text-encoder layout on the meta device."""
import copy
import json
import os
import socket

import open_clip
import pytest
import torch
from diffusers.models.embeddings import Timesteps
from open_clip.transformer import TextTransformer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from omg.text import (BOS, EOS, SGM_PREFIXES, SDXLTextEncoder, TextEncoderConfig, chunk_tokens, sdxl_vector,
                      tokenize)

DATA = os.path.join(os.path.dirname(__file__), "data")
TOL = 1e-4
SHORT = ["a photo of an astronaut riding a horse", "A man,  and\ta Woman! (photo:1.2) 42", ""]
LONG = ", ".join(f"a photo of a cat number {i}" for i in range(12))  # > 75 tokens: two chunks


def _randomize(module: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.add_(1.0)


@pytest.fixture(scope="module")
def enc() -> SDXLTextEncoder:
    model = SDXLTextEncoder.tiny()
    _randomize(model)
    return model


def _hf_clip_l(enc: SDXLTextEncoder) -> CLIPTextModel:
    """transformers' CLIPTextModel with literal tiny CLIP-L settings, holding our weights."""
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu")
    ref = CLIPTextModel(cfg).eval()
    sd = {k.removeprefix("text_model."): v for k, v in enc.clip_l.state_dict().items()}
    ref.load_state_dict(sd, strict=True)
    return ref


def _open_clip_g(enc: SDXLTextEncoder) -> TextTransformer:
    """open_clip's own text tower with literal tiny bigG settings, holding our weights."""
    ref = TextTransformer(context_length=77, vocab_size=49408, width=48, heads=3, layers=3, output_dim=40).eval()
    ref.load_state_dict(enc.clip_g.state_dict(), strict=True)
    return ref


def _open_clip_penultimate(ref: TextTransformer, ids: torch.Tensor) -> torch.Tensor:
    """Output of resblock L-2 (= input of the last one), through open_clip's own intermediates API."""
    out = ref.forward_intermediates(ids, indices=[len(ref.transformer.resblocks) - 2], intermediates_only=True,
                                    output_fmt="NLC")
    return out["text_intermediates"][0]


def _maxerr(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------- tokenizer

def test_tokenize_matches_open_clip_and_pads():
    ids_g, ids_l = tokenize(SHORT, pad_id=0)[:, 0], tokenize(SHORT, pad_id=EOS)[:, 0]
    assert torch.equal(ids_g, open_clip.tokenize(SHORT))  # bigG: zero padding, as open_clip
    for b in range(len(SHORT)):
        end = (ids_g[b] == EOS).nonzero()[0].item()
        assert ids_g[b, 0] == BOS and ids_l[b, 0] == BOS
        assert torch.equal(ids_l[b, :end + 1], ids_g[b, :end + 1])
        assert (ids_g[b, end + 1:] == 0).all() and (ids_l[b, end + 1:] == EOS).all()  # CLIP-L pads with EOS
    assert (ids_g[2, :2] == torch.tensor([BOS, EOS])).all()  # "" is BOS EOS pad...


def test_long_prompt_chunks():
    ids = tokenize([LONG], pad_id=0)[0]
    expected = open_clip.tokenizer.SimpleTokenizer().encode(LONG)
    assert 75 < len(expected) <= 150 and ids.shape == (2, 77)
    body = []
    for chunk in ids:
        end = (chunk == EOS).nonzero()[0].item()
        assert chunk[0] == BOS and (chunk[end + 1:] == 0).all()
        body += chunk[1:end].tolist()
    assert body == expected  # nothing lost, nothing reordered
    # a short word (3 tokens) that would straddle the boundary moves whole; a long one (>= 8) is split
    assert [len(c) for c in chunk_tokens(" ".join(["cat"] * 74 + ["hippopotamus"]))] == [74, 3]
    assert [len(c) for c in chunk_tokens(" ".join(["cat"] * 74 + ["xqzvkjwpqlrmzxvbnq"]))] == [75, 13]
    assert [len(c) for c in chunk_tokens(" ".join(["cat"] * 75))] == [75]


def test_batch_gets_empty_chunks():
    ids = tokenize([LONG, "a cat"], pad_id=EOS)
    assert ids.shape == (2, 2, 77)
    assert ids[1, 1, :2].tolist() == [BOS, EOS] and (ids[1, 1, 2:] == EOS).all()
    assert tokenize(["a cat"], pad_id=0, min_chunks=3).shape == (1, 3, 77)


# ---------------------------------------------------------------------------------------------- encoders

def test_clip_l_matches_transformers(enc):
    ids = tokenize(SHORT + [LONG], pad_id=EOS).flatten(0, 1)
    ref = _hf_clip_l(enc)(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    with torch.no_grad():
        assert _maxerr(enc.clip_l(ids), ref) <= TOL


def test_bigg_matches_open_clip(enc):
    ids = tokenize(SHORT + [LONG], pad_id=0).flatten(0, 1)
    ref = _open_clip_g(enc)
    with torch.no_grad():
        ref_pooled = ref(ids)
        ref_penult = _open_clip_penultimate(ref, ids)
        penult, pooled = enc.clip_g(ids)
    assert _maxerr(penult, ref_penult) <= TOL and _maxerr(pooled, ref_pooled) <= TOL


def test_bigg_matches_transformers_with_projection(enc):
    """The diffusers route for TE2: split in_proj into q/k/v, rename, Linear weight = text_projection.T."""
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=48, intermediate_size=192, num_hidden_layers=3,
                         num_attention_heads=3, max_position_embeddings=77, hidden_act="gelu", projection_dim=40)
    hf = CLIPTextModelWithProjection(cfg).eval()
    sd = enc.clip_g.state_dict()
    out = {"text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
           "text_model.final_layer_norm.weight": sd["ln_final.weight"],
           "text_model.final_layer_norm.bias": sd["ln_final.bias"],
           "text_projection.weight": sd["text_projection"].T}
    for i in range(3):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for name, t in zip("qkv", sd[src + f"attn.in_proj_{kind}"].chunk(3)):
                out[dst + f"self_attn.{name}_proj.{kind}"] = t
            for a, b in [("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
                out[dst + f"{b}.{kind}"] = sd[src + f"{a}.{kind}"]
    hf.load_state_dict(out, strict=True)
    ids = tokenize(SHORT, pad_id=0)[:, 0]
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        penult, pooled = enc.clip_g(ids)
    assert _maxerr(penult, ref.hidden_states[-2]) <= TOL and _maxerr(pooled, ref.text_embeds) <= TOL


# ---------------------------------------------------------------------------------------------- SDXL

def test_sdxl_conditioning_matches_independent_computation(enc):
    prompts = [LONG, "a cat", ""]
    context, pooled = enc.encode(prompts)
    ids_l, ids_g = tokenize(prompts, pad_id=EOS), tokenize(prompts, pad_id=0)
    hf, oc = _hf_clip_l(enc), _open_clip_g(enc)
    with torch.no_grad():
        for b in range(len(prompts)):
            ref_l = hf(input_ids=ids_l[b], output_hidden_states=True).hidden_states[-2]  # [chunks, 77, 32]
            ref_g = _open_clip_penultimate(oc, ids_g[b])
            ref_ctx = torch.cat([ref_l, ref_g], -1).flatten(0, 1)  # chunks concatenated along the sequence
            assert _maxerr(context[b], ref_ctx) <= TOL
            assert _maxerr(pooled[b], oc(ids_g[b, :1])[0]) <= TOL  # pooled from the first chunk
    assert context.shape == (3, 154, 32 + 48) and pooled.shape == (3, 40)
    # the short prompts' second chunk is the encoding of an empty chunk
    empty_ctx, _ = enc.encode([""])
    assert _maxerr(context[1, 77:], empty_ctx[0]) <= TOL

    original, crop, target = (1024, 768), (16, 32), (896, 1152)
    y = sdxl_vector(pooled, original, crop, target)
    time_ids = torch.tensor([[*original, *crop, *target]] * 3, dtype=torch.float32)
    ref_y = torch.cat([pooled, Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(time_ids.flatten())
                       .reshape(3, -1)], -1)
    assert y.shape == (3, 40 + 6 * 256) and _maxerr(y, ref_y) <= TOL
    assert sdxl_vector(torch.zeros(2, 1280), (1024, 1024)).shape == (2, 2816)
    assert torch.equal(sdxl_vector(pooled, original), sdxl_vector(pooled, original, (0, 0), original))


def test_zero_if_empty(enc):
    context, pooled = enc.encode(["a cat", " "], zero_if_empty=True)
    assert (context[1] == 0).all() and (pooled[1] == 0).all()
    assert context[0].abs().sum() > 0 and pooled[0].abs().sum() > 0
    plain, _ = enc.encode(["a cat", " "])
    assert torch.equal(context[0], plain[0]) and plain[1].abs().sum() > 0


@pytest.mark.parametrize("min_chunks", [1, 2])
def test_an_all_blank_zero_batch_runs_no_encoder(enc, monkeypatch, min_chunks):
    """The uncond half without a negative prompt: the zeros the encoders' path gives (shape, dtype, device),
    without running them. Before, both encoders ran on "" and their output was multiplied by zero."""
    expected = [t * 0 for t in enc.encode(["", " "], min_chunks=min_chunks)]
    calls = []
    for tower in (enc.clip_l, enc.clip_g):
        monkeypatch.setattr(tower, "forward", lambda *a, **k: calls.append(a) or pytest.fail("an encoder ran"))
    context, pooled = enc.encode(["", " "], zero_if_empty=True, min_chunks=min_chunks)
    assert not calls
    for got, want in zip((context, pooled), expected):
        assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
        assert torch.equal(got, want)


def test_encode_runs_in_encoder_dtype(enc):
    double = copy.deepcopy(enc).double()
    context, pooled = double.encode(SHORT)
    ref_context, ref_pooled = enc.encode(SHORT)
    assert context.dtype == pooled.dtype == torch.float64 and not context.requires_grad
    assert _maxerr(context.float(), ref_context) <= TOL and _maxerr(pooled.float(), ref_pooled) <= TOL


def test_meta_build_then_assign_load(enc):
    """The loader's path: build on meta, load with assign=True, rebuild the non-persistent buffers."""
    with torch.device("meta"):
        model = SDXLTextEncoder.tiny()
    model.load_state_dict(enc.state_dict(), strict=True, assign=True)
    model.rebuild_buffers()
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    for a, b in zip(model.encode(SHORT), enc.encode(SHORT)):
        assert torch.equal(a, b)


def test_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("omg.text tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    context, _ = SDXLTextEncoder.tiny().encode(["a cat"])
    assert context.shape == (1, 77, 80)


def test_sdxl_layout_on_meta():
    with open(os.path.join(DATA, "sdxl_keys.json")) as f:
        manifest = json.load(f)
    with torch.device("meta"):
        model = SDXLTextEncoder.sdxl()
    totals = {"clip_l": (196, 123_060_480), "clip_g": (389, 694_659_840)}
    configs = {"clip_l": TextEncoderConfig.clip_l(), "clip_g": TextEncoderConfig.bigg()}
    for name, prefix in SGM_PREFIXES.items():
        sd = getattr(model, name).state_dict()
        expected = {k[len(prefix):]: v for k, v in manifest.items() if k.startswith(prefix)}
        assert set(sd) == set(expected), (name, sorted(set(sd) ^ set(expected))[:5])
        assert {k: list(v.shape) for k, v in sd.items()} == expected
        assert (len(sd), sum(v.numel() for v in sd.values())) == totals[name]
        assert TextEncoderConfig.from_state_dict(sd) == configs[name]
    assert set(model.state_dict()) == {f"{n}.{k}" for n in SGM_PREFIXES for k in getattr(model, n).state_dict()}


def test_tiny_configs_round_trip(enc):
    assert TextEncoderConfig.from_state_dict(enc.clip_l.state_dict(), heads=2) == TextEncoderConfig.tiny_l()
    assert TextEncoderConfig.from_state_dict(enc.clip_g.state_dict(), heads=3) == TextEncoderConfig.tiny_g()
