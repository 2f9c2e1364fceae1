"""omg.regional (the Mix-of-Show-style regional baseline) on a small random SDXL (CPU, fp32).

Tolerances are float rounding of differently batched kernels; each test says what it compares against.
"""
import math
import warnings

import pytest
import torch
from safetensors.torch import save_file

import omg
from omg.errors import SamplingError
from omg.lora import merged_lora, text_encoder_lora
from omg.regional import RegionalCrossAttention, layer_grids, regional_sample, regional_sample_latents
from omg.txt2img import sample_latents
from omg.unet import Attention
from test_pipeline import tiny_model

H, W = 64, 96  # latent 8 x 12
STEPS = 3
PROMPT = "a man and a woman in a park"
NEG = "blurry"
TOL = 1e-5  # relative to the largest magnitude compared (latents reach ~10)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def loras(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return [kohya_lora(model, root / f"{i}.safetensors", seed=i) for i in range(2)]


def kohya_lora(model, path, seed, rank=4):
    """A kohya LoRA over every UNet attention projection and CLIP-L's q/v projections (as test_pipeline's)."""
    gen = torch.Generator().manual_seed(seed)
    modules = {"lora_unet_" + n: m for n, m in model.unet.named_modules() if n.endswith(("to_q", "to_k", "to_v"))}
    modules.update({"lora_te1_text_model_" + n: m for n, m in model.text.clip_l.text_model.named_modules()
                    if n.endswith(("self_attn.q_proj", "self_attn.v_proj"))})
    sd = {}
    for name, m in modules.items():
        key = name.replace(".", "_")
        sd[key + ".lora_down.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.3
        sd[key + ".lora_up.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.3
        sd[key + ".alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))
    return str(path)


def two_concepts(loras, scales=(0.8, 0.6)):
    return [omg.Concept("man", "a photo of sks man", lora=loras[0], lora_scale=scales[0]),
            omg.Concept("woman", "a photo of xyz woman", lora=loras[1], lora_scale=scales[1])]


def halves(n=1, h=H // 8, w=W // 8, split=None):
    """[n, 2, h, w] masks: concept 0 on the left columns, concept 1 on the right, a gap between."""
    m = torch.zeros(n, 2, h, w)
    for b in range(n):
        s = split[b] if split else w // 2
        m[b, 0, :, :s - 1] = 1
        m[b, 1, 1:, s + 1:] = 1
    return m


def regional(model, concepts, masks, **kw):
    args = dict(negative_prompt=NEG, steps=STEPS, progress=False)
    args.update(kw)
    if "seeds" not in args:
        args.setdefault("seed", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LoRAs hold keys for encoders the tiny model lacks
        return regional_sample_latents(model, PROMPT, concepts, masks, **args)


def plain(model, prompt=PROMPT, **kw):
    return sample_latents(model, prompt, NEG, steps=STEPS, seed=3, height=H, width=W, progress=False, **kw)


def close(a, b, tol=TOL):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def snapshot(model):
    return {f"{name}.{k}": v.clone() for name, m in (("unet", model.unet), ("text", model.text))
            for k, v in m.state_dict().items()}


def same_weights(model, before):
    return all(torch.equal(before[k], v) for k, v in snapshot(model).items()) and len(before) == len(snapshot(model))


# ------------------------------------------------------------------------------------ against plain sampling

def test_one_concept_over_the_whole_latent_with_the_global_prompt_is_plain_sampling(model):
    masks = torch.ones(1, H // 8, W // 8)
    latents = regional(model, [omg.Concept("man", PROMPT)], masks)
    assert latents.shape == (1, 4, H // 8, W // 8)
    assert close(latents, plain(model))
    # the regional context is used: another concept prompt over the same region changes the image
    other = regional(model, [omg.Concept("man", "a photo of sks man")], masks)
    assert (other - latents).abs().max().item() > 1e-3


def test_empty_masks_are_the_merged_model_on_the_global_prompt(model, loras):
    concepts = two_concepts(loras)
    latents = regional(model, concepts, torch.zeros(2, H // 8, W // 8))
    specs = [(c.lora, c.lora_scale) for c in concepts]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with merged_lora(model.unet, specs), text_encoder_lora(model.text, specs):
            simultaneous = plain(model)
    assert close(latents, simultaneous)
    assert (latents - plain(model)).abs().max().item() > 1e-3  # the LoRAs were merged
    assert (regional(model, concepts, halves()) - latents).abs().max().item() > 1e-3  # the regions act


def test_regional_sample_decodes_one_image_per_seed(model, loras):
    images = regional_sample(model, PROMPT, two_concepts(loras), halves()[0], negative_prompt=NEG, steps=1,
                             seeds=[3, 4], progress=False)
    assert len(images) == 2 and images[0].size == (W, H)


# ------------------------------------------------------------------------------------ the processor itself

def naive_attention(layer, x, context):
    """to_out(softmax(q kᵀ / √d) v) for one query row x (dim,) over one context (T, context_dim), by hand."""
    heads, dim = layer.heads, x.shape[-1]
    d = dim // heads
    q = (layer.to_q.weight @ x).view(heads, d)
    k = (context @ layer.to_k.weight.T).view(-1, heads, d)
    v = (context @ layer.to_v.weight.T).view(-1, heads, d)
    out = []
    for h in range(heads):
        scores = (k[:, h] @ q[h]) / math.sqrt(d)
        p = scores.exp() / scores.exp().sum()
        out.append(p @ v[:, h])
    return layer.to_out[0](torch.cat(out))


def area_weights(masks, hw):
    """Adaptive average pooling by its bin formula: rows [floor(i H / h), ceil((i + 1) H / h))."""
    n, k, H_, W_ = masks.shape
    out = torch.zeros(n, k, *hw)
    for i in range(hw[0]):
        r0, r1 = (i * H_) // hw[0], -(-((i + 1) * H_) // hw[0])
        for j in range(hw[1]):
            c0, c1 = (j * W_) // hw[1], -(-((j + 1) * W_) // hw[1])
            out[:, :, i, j] = masks[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out


def reference(layer, x, context, concept_contexts, weights):
    """Every query row on its own: uncond rows over their (global) context; cond rows mix the attention over
    the global context and each concept's context with the layer-grid weights (one of them 1 for hard masks)."""
    B, N, _ = x.shape
    n = B // 2
    w = weights.reshape(n, len(concept_contexts), N)
    out = torch.zeros_like(x)
    for b in range(B):
        for p in range(N):
            glob = naive_attention(layer, x[b, p], context[b])
            if b < n:
                out[b, p] = glob
                continue
            mix = (1 - w[b - n, :, p].sum()) * glob
            for i, c in enumerate(concept_contexts):
                if w[b - n, i, p] > 0:
                    mix = mix + w[b - n, i, p] * naive_attention(layer, x[b, p], c[0])
            out[b, p] = mix
    return out


def random_layer(dim=32, heads=2, context_dim=24):
    torch.manual_seed(1)
    layer = Attention(dim, heads, context_dim)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer.path = "test.attn2"
    return layer


@torch.no_grad()
def test_processor_equals_per_query_attention_over_the_chosen_context():
    """Hard masks on a non-square 6x10 latent, checked at level 0 (6x10) and level 1 (3x5); masks constant
    on 2x2 blocks stay binary at level 1. Concept prompts of different token counts."""
    layer, n = random_layer(), 2
    masks = torch.zeros(n, 2, 3, 5)
    masks[0, 0, :2, :2], masks[0, 1, 1:, 3:] = 1, 1
    masks[1, 0, 2:, :], masks[1, 1, :1, 1:4] = 1, 1
    masks = masks.repeat_interleave(2, 2).repeat_interleave(2, 3)  # (2, 2, 6, 10)
    contexts = [torch.randn(1, 5, 24), torch.randn(1, 7, 24)]
    processor = RegionalCrossAttention(contexts, masks, levels=2)
    context = torch.randn(2 * n, 4, 24)
    for hw in ((6, 10), (3, 5)):
        x = torch.randn(2 * n, hw[0] * hw[1], 32)
        chosen = area_weights(masks, hw)
        assert set(chosen.unique().tolist()) <= {0.0, 1.0}
        expected = reference(layer, x, context, contexts, chosen)
        assert close(processor(layer, x, context), expected)


@torch.no_grad()
def test_processor_mixes_soft_masks_by_area_on_ceil_grids():
    """Soft disjoint masks on an odd 5x7 latent: level 1 is 3x4, level 2 2x2 (ceil halving); the weights are
    the area averages and the background takes the rest."""
    layer, n = random_layer(), 1
    assert layer_grids((5, 7), 3) == {35: (5, 7), 12: (3, 4), 4: (2, 2)}
    torch.manual_seed(2)
    masks = torch.zeros(n, 2, 5, 7)
    masks[0, 0, :, :3] = torch.rand(5, 3)
    masks[0, 1, :, 4:] = torch.rand(5, 3)
    contexts = [torch.randn(1, 6, 24), torch.randn(1, 3, 24)]
    processor = RegionalCrossAttention(contexts, masks, levels=3)
    context = torch.randn(2 * n, 4, 24)
    for hw in ((3, 4), (2, 2)):
        x = torch.randn(2 * n, hw[0] * hw[1], 32)
        expected = reference(layer, x, context, contexts, area_weights(masks, hw))
        assert close(processor(layer, x, context), expected)
    with pytest.raises(SamplingError, match="grid"):
        processor(layer, torch.randn(2, 6, 32), context)


def test_odd_latent_sizes_run_through_the_unet(model):
    """A 5x7 latent: every attn2 layer finds its grid from its token count (the UNet rounds up)."""
    masks = torch.zeros(1, 5, 7)
    masks[0, :, :3] = 1
    latents = regional(model, [omg.Concept("man", "a photo of sks man")], masks, steps=1)
    assert latents.shape == (1, 4, 5, 7) and bool(torch.isfinite(latents).all())


# ------------------------------------------------------------------------------------ batches and the model

def test_a_batch_of_seeds_equals_single_calls(model, loras):
    concepts, masks = two_concepts(loras), halves(2, split=[5, 8])
    for sampler in ("ddim", "euler_ancestral"):  # the ancestral one draws noise per image as well
        batch = regional(model, concepts, masks, seeds=[3, 11], sampler=sampler)
        single = [regional(model, concepts, masks[b], seed=s, sampler=sampler) for b, s in enumerate((3, 11))]
        assert batch.shape == (2, 4, H // 8, W // 8)
        assert close(batch, torch.cat(single))
    # [k, h, w] masks apply to every image of the batch (single[0]: masks[0], seed 3, euler_ancestral)
    shared = regional(model, concepts, masks[0], seeds=[3, 11], sampler="euler_ancestral")
    assert close(shared[:1], single[0])


def test_the_model_is_restored_after_the_call_and_after_an_error(model, loras):
    before = snapshot(model)
    seen = {}

    def merged_and_installed(info):
        seen["merged"] = not same_weights(model, before)
        seen["installed"] = all(isinstance(a.processor, RegionalCrossAttention)
                                for a in model.unet.attention_layers("cross").values())

    regional(model, two_concepts(loras), halves(), callback=merged_and_installed)
    assert seen == {"merged": True, "installed": True}
    assert same_weights(model, before)  # bit for bit
    assert all(a.processor is None for a in model.unet.attention_layers().values())

    def fail(info):
        if info.i == 1:
            raise RuntimeError("stop in the middle")

    with pytest.raises(RuntimeError, match="middle"):
        regional(model, two_concepts(loras), halves(), callback=fail)
    assert same_weights(model, before)
    assert all(a.processor is None for a in model.unet.attention_layers().values())


def test_bad_input_is_rejected_before_the_model_is_touched(model, loras):
    before = snapshot(model)
    concepts = two_concepts(loras)
    overlap = halves()
    overlap[0, 1] = 1
    for masks, kw, match in [(overlap, {}, "overlap"), (halves()[:, :1], {}, "masks must be"),
                             (halves(3), {"seeds": [1, 2]}, "masks must be"), (halves() * 2 - 1, {}, r"\[0, 1\]"),
                             (halves(), {"height": 32}, "does not fit"),
                             (halves(), {"seed": 1, "seeds": [1]}, "not both"),
                             (halves(), {"sampler": "nope"}, "sampler"),
                             (halves(), {"negative_prompt": ["a", "b"]}, "negative_prompt")]:
        with pytest.raises(SamplingError, match=match):
            regional(model, concepts, masks, **kw)
    assert same_weights(model, before)
