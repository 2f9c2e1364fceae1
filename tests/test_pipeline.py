"""The OMG sampler's invariants on a small random SDXL (CPU, fp32).

Each exact check is stated as such (max abs error 0); the others give their float tolerance.
"""
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import omg
from omg.attention import outputs_store_bytes
from omg.errors import LoraError, SamplingError
from omg.lora import load_lora, merged_lora, text_encoder_lora
from omg.masks import SamRefiner
from omg.model import SDXL
from omg.pipeline import DEFAULT_NEGATIVE
from omg.reuse import Reuse
from omg.sampling import NoiseSchedule, apply_guidance, run_sampler
from omg.txt2img import sample_latents
from omg.vae import VAEConfig

H, W = 64, 96  # latent 8 x 12
STEPS, BLEND = 5, 3
PROMPT = "a man and a woman in a park"


def tiny_model(**kw) -> SDXL:
    """The tiny random SDXL of the pipeline tests (a 4-level f=8 VAE, so images are 8x the latent)."""
    return SDXL.random(vae_config=VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), norm_groups=8), seed=5, **kw)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def kohya_lora(model, path, seed, rank=4, te=True):
    """A kohya LoRA over every attention projection of the UNet (SGM names) and CLIP-L's q/v projections."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    modules = {n: m for n, m in model.unet.named_modules() if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")}
    if te:
        modules.update({"te1:" + n: m for n, m in model.text.clip_l.text_model.named_modules()
                        if n.endswith(("self_attn.q_proj", "self_attn.v_proj"))})
    for name, m in modules.items():
        key = ("lora_te1_text_model_" + name[4:] if name.startswith("te1:") else "lora_unet_" + name).replace(".", "_")
        sd[key + ".lora_down.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.3
        sd[key + ".lora_up.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.3
        sd[key + ".alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))
    return str(path)


KOHYA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                 "in_layers.2", "out_layers.3", "skip_connection", "emb_layers.1", "op", "conv")


def kohya_lora_all_targets(model, path, seed, rank=4, scale=0.1):
    """A kohya LoRA/LoCon on every UNet module kohya's SDXL networks train (attention incl. to_out.0, ff,
    proj_in/out, ResBlock convs and embeddings, down/upsamplers): sdxl kohya_sdxl_lora_modules.txt's kinds."""
    gen = torch.Generator().manual_seed(seed)
    sd, kinds = {}, set()
    for name, m in model.unet.named_modules():
        if not name.endswith(tuple("." + t for t in KOHYA_TARGETS)) or not isinstance(m, (torch.nn.Linear,
                                                                                          torch.nn.Conv2d)):
            continue
        kinds.add(next(t for t in KOHYA_TARGETS if name.endswith("." + t)))
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(m, torch.nn.Conv2d):
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=gen)
            up = torch.randn(m.out_channels, rank, 1, 1, generator=gen)
        else:
            down = torch.randn(rank, m.in_features, generator=gen)
            up = torch.randn(m.out_features, rank, generator=gen)
        sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down * scale, up * scale
        sd[key + ".alpha"] = torch.tensor(float(rank))
    assert kinds == set(KOHYA_TARGETS)  # every kind occurs in the small UNet
    save_file(sd, str(path))
    return str(path)


def run(model, concepts=(), **kw):
    prompt = kw.pop("prompt", PROMPT)
    args = dict(steps=STEPS, blend_steps=BLEND, height=H, width=W, seed=3, progress=False)
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return omg.generate(model, prompt, list(concepts), **args)


def test_zero_blend_steps_is_stage1_and_plain_sdxl(model):
    r = run(model, [omg.Concept("man", "a photo of sks man")], blend_steps=0)
    assert torch.equal(r.latent, r.stage1_latent)  # exact
    plain = sample_latents(model, PROMPT, DEFAULT_NEGATIVE, steps=STEPS, guidance=7.5, seed=3, height=H,
                           width=W, progress=False)
    assert torch.equal(r.stage1_latent, plain)  # capturing changes nothing: exact
    assert r.unet_evaluations == 2 * STEPS


@pytest.mark.parametrize("store,tol,sampler", [("outputs", 0.0, "ddim"), ("recompute", 0.0, "ddim"),
                                               ("maps", 1e-5, "ddim"), ("outputs", 0.0, "dpmpp_2m"),
                                               ("outputs", 0.0, "euler_ancestral")])
def test_replay_without_concepts_is_stage1(model, store, tol, sampler):
    r = run(model, store=store, store_dtype=None, sampler=sampler)
    assert (r.latent - r.stage1_latent).abs().max().item() <= tol
    assert r.unet_evaluations == 2 * STEPS + (3 if store == "recompute" else 2) * BLEND


def test_full_mask_concept_is_that_concept_models_own_trajectory(model, tmp_path):
    lora = kohya_lora(model, tmp_path / "a.safetensors", seed=1)
    concept = omg.Concept("man", "a photo of sks man", lora=lora, negative_prompt="bad", mask=(0, 0, W, H))
    r = run(model, [concept])
    assert r.masks.shape == (1, H // 8, W // 8) and bool((r.masks == 1).all())
    schedule = NoiseSchedule.sdxl()
    with text_encoder_lora(model.text, (lora, 0.8)):
        ctx, y = model.conditioning([concept.prompt], ["bad"], H, W)
    with merged_lora(model.unet, (lora, 0.8)):
        def eps_fn(x, t):
            u, c = model.unet(torch.cat([x, x]), torch.cat([t, t]), ctx, y).chunk(2)
            return apply_guidance(u, c, 7.5)
        own = run_sampler(eps_fn, r.blend_start_latent, schedule.sampling_sigmas(STEPS, "leading", to_zero=False),
                          "ddim", start=STEPS - BLEND, disable=True)
    assert (r.latent - own).abs().max().item() <= 1e-5
    assert (r.latent - r.stage1_latent).abs().max().item() > 1e-2  # the concept did change the image


def test_store_modes_agree_and_concepts_change_only_their_regions(model, tmp_path):
    loras = [kohya_lora(model, tmp_path / f"{i}.safetensors", seed=i) for i in range(2)]
    concepts = [omg.Concept("man", "a photo of sks man", lora=loras[0], mask=(0, 0, 40, 64)),
                omg.Concept("woman", "a photo of xyz woman", lora=loras[1], mask=(48, 0, 96, 64))]
    results = {s: run(model, concepts, store=s, store_dtype=None) for s in ("outputs", "maps", "recompute")}
    ref = results["outputs"].latent
    assert (results["recompute"].latent - ref).abs().max().item() <= 1e-5
    assert (results["maps"].latent - ref).abs().max().item() <= 1e-4
    bf16 = run(model, concepts, store="outputs", store_dtype=torch.bfloat16)
    assert (bf16.latent - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()
    assert bf16.store_bytes < results["outputs"].store_bytes
    assert results["recompute"].store_bytes == 0
    # the estimate store="auto" decides on is the store's size
    assert results["outputs"].store_bytes == outputs_store_bytes(model.unet.config, (H // 8, W // 8), 1, BLEND,
                                                                 torch.float32)  # DDIM: a model call a step


def test_auto_store_keeps_outputs_when_they_fit(model, monkeypatch):
    default = run(model)  # store="auto": this machine has room for a few hundred kB
    assert default.store == "outputs" and default.store_bytes > 0
    assert torch.equal(default.latent, run(model, store="outputs").latent)
    monkeypatch.setattr(omg.attention, "free_memory", lambda device: 2 * default.store_bytes - 1)
    tight = run(model)
    assert tight.store == "recompute" and tight.store_bytes == 0
    assert (tight.latent - default.latent).abs().max().item() <= 1e-5


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_one_to_five_concepts(model, k):
    prompt = "a man, a woman, a dog, a cat and a robot in a park"
    classes = ["man", "woman", "dog", "cat", "robot"][:k]
    r = run(model, [omg.Concept(c, f"a photo of sks {c}") for c in classes], prompt=prompt)
    assert r.masks.shape == (k, H // 8, W // 8)
    assert ((r.masks > 0).sum(0) <= 1).all()  # no latent pixel belongs to two concepts
    assert (r.masks.sum(0) <= 1 + 1e-6).all()
    found = sum(r.concept_masks.found)
    # the default store keeps stage 1's outputs here: the base pass runs at batch 2 (no stage-1 row rides along)
    assert r.store == "outputs" and r.unet_evaluations == 2 * STEPS + (2 + 2 * found) * BLEND
    assert r.image.size == (W, H) and r.stage1_image.size == (W, H)
    assert set(r.timings) >= {"stage1", "masks", "stage2", "decode"}


def test_two_concepts_of_the_same_class_get_distinct_regions(model):
    r = run(model, [omg.Concept("man", "a photo of sks man"), omg.Concept("man", "a photo of xyz man")],
            prompt="a man and a man in a park")
    assert all(r.concept_masks.found)
    assert not (r.masks[0] > 0).logical_and(r.masks[1] > 0).any()


def test_sam_refinement_runs_end_to_end(model):
    from test_masks import tiny_sam
    refiner = SamRefiner(tiny_sam())
    r = run(model, [omg.Concept("man", "a photo of sks man"), omg.Concept("woman", "a photo of xyz woman")],
            sam=refiner)
    assert r.masks.shape == (2, H // 8, W // 8)
    assert ((r.masks > 0).sum(0) <= 1).all()


def test_bad_input_is_rejected_before_sampling(model, tmp_path, monkeypatch):
    def no_unet(*a, **k):
        raise AssertionError("sampling started")
    monkeypatch.setattr(model.unet, "forward", no_unet)
    man = omg.Concept("man", "a photo of sks man")
    with pytest.raises(ValueError, match="dog"):
        run(model, [omg.Concept("dog", "a photo of sks dog")])
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd15 = {key + ".lora_down.weight": torch.zeros(4, 768), key + ".lora_up.weight": torch.zeros(320, 4)}
    save_file(sd15, str(tmp_path / "sd15.safetensors"))
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with pytest.raises(LoraError):
        run(model, [omg.Concept("man", "x", lora=str(tmp_path / "sd15.safetensors"))])
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    with pytest.raises(ValueError, match="man"):
        run(model, [omg.Concept("man", "x", mask=torch.ones(7, 7))])
    with pytest.raises(SamplingError, match="multiples of 8"):
        run(model, [man], height=60)
    with pytest.raises(SamplingError, match="blend_steps"):
        run(model, [man], blend_steps=STEPS + 1)
    with pytest.raises(SamplingError, match="steps"):
        run(model, [man], steps=0, blend_steps=0)


def test_blended_denoiser_drives_a_k_diffusion_sampler(model):
    """result.stage2.denoiser() is a k-diffusion model(x, sigma); k-diffusion's own sample_euler driving it
    from the first step reproduces stage 2."""
    from k_diffusion.sampling import sample_euler
    from omg.sampling import randn_cpu
    r = run(model, [omg.Concept("man", "a photo of sks man", mask=(0, 0, 48, 64))], sampler="euler",
            keep_stage2=True)
    assert (r.latent - r.stage1_latent).abs().max() > 1e-3
    blended = r.stage2
    blended.reset()
    sigmas = NoiseSchedule.sdxl().sampling_sigmas(STEPS, "leading", to_zero=True).float()
    noise = randn_cpu((1, 4, H // 8, W // 8), torch.Generator().manual_seed(3))
    with torch.no_grad(), blended.record.control:
        x = sample_euler(blended.denoiser(), noise * (1 + sigmas[0] ** 2).sqrt(), sigmas, disable=True)
    assert (x - r.latent).abs().max().item() <= 1e-5


def test_grouped_and_merged_lora_modes_agree(model, tmp_path):
    """Stage 2 with the concepts' factors on shared base weights (one UNet call per step) gives the image of
    the merged concept weights (one call per concept), up to float rounding; so does a concept whose prompt
    needs a second token chunk, which cannot share the call."""
    loras = [kohya_lora(model, tmp_path / f"{i}.safetensors", seed=i) for i in range(2)]
    concepts = [omg.Concept("man", "a photo of sks man", lora=loras[0], mask=(0, 0, 40, 64)),
                omg.Concept("woman", "a photo of xyz woman", lora=loras[1], mask=(48, 0, 96, 64))]
    for prompt in ("a photo of sks man", "a photo of sks man, " * 20):
        concepts[0].prompt = prompt
        grouped = run(model, concepts, keep_stage2=True)
        merged = run(model, concepts, lora_mode="merged")
        assert grouped.stage2.one_call == (len(prompt) < 40)
        assert (merged.latent - merged.stage1_latent).abs().max().item() > 1e-2
        assert (grouped.latent - merged.latent).abs().max().item() <= 1e-4
        assert grouped.unet_evaluations == merged.unet_evaluations
    with pytest.raises(SamplingError, match="lora_mode"):
        run(model, concepts, lora_mode="fused")


@pytest.mark.parametrize("store,map_format", [("recompute", None), ("outputs", None), ("maps", None),
                                              ("maps", "bf16"), ("maps", "log8")])
def test_grouped_equals_merged_for_every_store_with_loras_on_all_kohya_targets(model, tmp_path, store, map_format):
    """A concept LoRA on attention output projections (to_out.0) crashed the maps replay in the grouped mode: it
    ran to_out on the conditional rows alone, and a grouped to_out needs every row of the call."""
    loras = [kohya_lora_all_targets(model, tmp_path / f"{i}.safetensors", seed=i) for i in range(2)]
    concepts = [omg.Concept("man", "a photo of sks man", lora=loras[0], mask=(0, 0, 40, 64)),
                omg.Concept("woman", "a photo of xyz woman", lora=loras[1], mask=(48, 0, 96, 64))]
    kw = dict(store=store, map_format=map_format, store_dtype=None, steps=2, blend_steps=1)
    grouped = run(model, concepts, keep_stage2=True, **kw)
    merged = run(model, concepts, lora_mode="merged", **kw)
    assert grouped.stage2.one_call
    assert (merged.latent - merged.stage1_latent).abs().max().item() > 1e-2
    assert (grouped.latent - merged.latent).abs().max().item() <= 1e-4


def self_attention_queries(model, latent_hw):
    """{attn1 path: its query count} at a latent size, read from a plain UNet call (independent of omg.attention)."""
    queries = {}

    def record(m, args, out):  # returns None: the layer's output stays its own
        queries.setdefault(m.path, args[0].shape[1])

    hooks = [m.register_forward_hook(record)
             for m in model.unet.modules() if isinstance(m, omg.unet.Attention) and not m.is_cross]
    cfg = model.unet.config
    with torch.no_grad():
        model.unet(torch.zeros(1, cfg.in_channels, *latent_hw), torch.zeros(1), torch.zeros(1, 77, cfg.context_dim),
                   torch.zeros(1, cfg.adm_in_channels))
    for h in hooks:
        h.remove()
    return queries


def replayed_self_layers(monkeypatch):
    """Spy on the self-attention replay: the (step, layer path) of every replaced self-attention."""
    from omg.attention import AttentionControl
    seen, original = set(), AttentionControl._reference_qk

    def spy(self, q, k, key):
        seen.add(key)
        return original(self, q, k, key)
    monkeypatch.setattr(AttentionControl, "_reference_qk", spy)
    return seen


def test_self_replay_follows_the_original_schedule_and_layers(model, monkeypatch):
    """The original replaces self-attention (p2p self_replace_steps=0.4 of 50) at steps < 20 in layers with at most
    (W // 32) * (H // 32) queries; its stage 2 blends from step 16 (i > 15), and before that stage 2 equals stage 1.
    So with blend_steps=34 and self_replay_steps=4 omg must replace exactly steps 16-19 in those layers."""
    queries = self_attention_queries(model, (H // 8, W // 8))
    assert sorted(set(queries.values())) == [6, 24]  # latent 8x12: levels of 4x6 and 2x3 (and the middle block)
    limit = (W // 32) * (H // 32)  # 6: the 2x3 level and the middle block, as the 32x32 level at 1024x1024
    steps, replace_until, blend_from = 50, int(50 * 0.4), 16  # the original's p2p schedule and `if i > 15`
    expected = {(i, path) for i in range(blend_from, replace_until) for path, n in queries.items() if n <= limit}
    seen = replayed_self_layers(monkeypatch)
    run(model, steps=steps, blend_steps=steps - blend_from, self_replay_steps=replace_until - blend_from)
    assert seen == expected
    assert {p for _, p in expected} < set(queries)  # the rule does leave layers out


@pytest.mark.parametrize("store", ["recompute", "outputs"])
def test_self_replay_layers_original_against_all(model, tmp_path, monkeypatch, store):
    lora = kohya_lora(model, tmp_path / "a.safetensors", seed=0)
    concepts = [omg.Concept("man", "a photo of sks man", lora=lora, mask=(0, 0, 40, 64))]
    queries = self_attention_queries(model, (H // 8, W // 8))
    seen = replayed_self_layers(monkeypatch)
    results = {}
    for rule in ("original", "all"):
        seen.clear()
        results[rule] = run(model, concepts, self_replay_steps=2, self_replay_layers=rule, store=store,
                            store_dtype=None, keep_stage2=True)
        first = STEPS - BLEND
        allowed = {p for p, n in queries.items() if rule == "all" or n <= (W // 32) * (H // 32)}
        assert seen == {(i, p) for i in (first, first + 1) for p in allowed}, rule
        if store == "outputs":  # only those layers' queries and keys are kept
            saved = {k for k in results[rule].stage2.record.control.saved if k[1] in queries}
            assert saved == seen
    assert (results["original"].latent - results["all"].latent).abs().max().item() > 1e-4
    with pytest.raises(SamplingError, match="self_replay_layers"):
        run(model, concepts, self_replay_steps=2, self_replay_layers="some")


def test_a_repeated_render_reads_its_lora_files_once(model, tmp_path, monkeypatch):
    """Concepts given as paths: the next call reuses the files the last one read (so its stacked factors and kept
    CUDA graphs too), unless a file changed on disk."""
    import omg.reuse

    path = kohya_lora(model, tmp_path / "a.safetensors", seed=1)
    reads = []
    monkeypatch.setattr(omg.reuse, "load_lora", lambda p: reads.append(p) or omg.lora.load_lora(p))
    concepts = [omg.Concept("man", "a photo of sks man", lora=path, mask=(0, 0, 40, 64))]
    first = run(model, concepts)
    again = run(model, concepts)
    assert len(reads) == 1 and torch.equal(first.latent, again.latent)
    kohya_lora(model, tmp_path / "a.safetensors", seed=2)  # rewritten: other factors
    changed = run(model, concepts)
    assert len(reads) == 2 and not torch.equal(changed.latent, first.latent)


def test_concepts_without_text_encoder_loras_reuse_the_bases_negative_encoding(model, tmp_path, monkeypatch):
    """The negative prompt is encoded once for the base and every concept whose LoRA has no text-encoder part
    (their encoder is the base's); a concept with one encodes its own. Same latents as encoding everything anew.
    Before, each conditioning encoded the negative prompt again (6 encodes here instead of 5)."""
    import omg.pipeline as pipeline
    plain = kohya_lora(model, tmp_path / "unet_only.safetensors", seed=0, te=False)
    with_te = kohya_lora(model, tmp_path / "with_te.safetensors", seed=1, te=True)
    concepts = [omg.Concept("man", "a photo of sks man", lora=plain, mask=(0, 0, 32, 64)),
                omg.Concept("woman", "a photo of ohwx woman", lora=with_te, mask=(32, 0, 64, 64))]
    assert load_lora(plain).families == {"unet"} and load_lora(with_te).families == {"unet", "te1"}
    encoded, encode = [], model.text.encode

    def spy(prompts, *args, **kwargs):
        encoded.append(tuple(prompts))
        return encode(prompts, *args, **kwargs)

    monkeypatch.setattr(model.text, "encode", spy)
    monkeypatch.setattr(Reuse, "_last", None)  # no encodings kept from the tests before
    shared = run(model, concepts)
    assert sorted(encoded) == sorted([(PROMPT,), (DEFAULT_NEGATIVE,), ("a photo of sks man",),
                                      ("a photo of ohwx woman",), (DEFAULT_NEGATIVE,)])
    unshared = pipeline._concept_conditioning
    monkeypatch.setattr(pipeline, "_concept_conditioning",
                        lambda *a, **k: unshared(*a[:5], **{**k, "encodings": None}))
    encoded.clear()
    again = run(model, concepts)  # the base's encodings are the last call's; each concept encodes both prompts
    assert len(encoded) == 4 and torch.equal(again.latent, shared.latent)


def test_a_repeated_render_encodes_no_prompt_and_binds_no_lora_again(model, tmp_path, monkeypatch):
    """The next call reuses the last call's prompt encodings while the text encoder's weights and the LoRAs merged
    on it for them are the same, and its LoRAs' patches bound to the UNet; the same latents bit for bit. Another
    text-encoder LoRA, or the encoder's weights changed in place, encode anew. Before, every call encoded every
    prompt and bound every LoRA."""
    import omg.reuse
    loras = [kohya_lora(model, tmp_path / f"{i}.safetensors", seed=i, te=True) for i in range(3)]
    concepts = [omg.Concept("man", "a photo of sks man", lora=loras[0], mask=(0, 0, 32, 64)),
                omg.Concept("woman", "a photo of ohwx woman", lora=loras[1], mask=(32, 0, 64, 64))]
    encoded, encode, binds, bind = [], model.text.encode, [], omg.reuse.bind
    monkeypatch.setattr(model.text, "encode", lambda prompts, *a, **k: encoded.append(tuple(prompts))
                        or encode(prompts, *a, **k))
    monkeypatch.setattr(omg.reuse, "bind", lambda *a, **k: binds.append(a) or bind(*a, **k))
    monkeypatch.setattr(Reuse, "_last", None)
    first = run(model, concepts)
    assert len(encoded) == 6 and len(binds) == 2  # prompt, negative; each concept's two with its own encoder
    encoded.clear(), binds.clear()
    again = run(model, concepts)
    assert encoded == [] and binds == [] and torch.equal(again.latent, first.latent)

    other = [concepts[0], dataclasses.replace(concepts[1], lora=loras[2])]  # another text-encoder LoRA, same prompt
    swapped = run(model, other)
    assert sorted(encoded) == sorted([("a photo of ohwx woman",), (DEFAULT_NEGATIVE,)]) and len(binds) == 1
    monkeypatch.setattr(Reuse, "_last", None)
    assert torch.equal(run(model, other).latent, swapped.latent)  # as encoded and bound in a fresh process

    weight = model.text.clip_l.text_model.encoder.layers[0].mlp.fc1.weight
    kept = weight.detach().clone()
    encoded.clear()
    with torch.no_grad():
        weight.mul_(1.5)  # in place: the same address, a new version
    try:
        changed = run(model, concepts)
    finally:
        with torch.no_grad():
            weight.copy_(kept)
    assert len(encoded) == 6 and not torch.equal(changed.latent, first.latent)


def test_cross_attention_keys_and_values_are_projected_once_a_stage(model, tmp_path, monkeypatch):
    """Each stage projects its contexts' cross-attention keys and values once (the context is the same at every
    step; stage 2 once for its grouped call, under the concepts' LoRAs), with the same latents as projecting them at
    every call. Before, every UNet call projected them again (one to_k call per model call)."""
    from contextlib import nullcontext
    from omg.unet import UNet
    loras = [kohya_lora(model, tmp_path / f"{i}.safetensors", seed=i) for i in range(2)]
    concepts = [omg.Concept("man", "a photo of sks man", lora=loras[0], mask=(0, 0, 32, 64)),
                omg.Concept("woman", "a photo of ohwx woman", lora=loras[1], mask=(32, 0, 64, 64))]
    layer = next(iter(model.unet.attention_layers("cross").values()))
    calls = []
    handle = layer.to_k.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        once = run(model, concepts)
        assert calls == [2, 6]  # stage 1's [uncond; cond], stage 2's base rows + 2 concepts x 2 rows
        monkeypatch.setattr(UNet, "using_cross_kv", lambda self, kv: nullcontext())
        calls.clear()
        every_call = run(model, concepts)
    finally:
        handle.remove()
    assert len(calls) > STEPS and torch.equal(once.latent, every_call.latent)


def test_the_stage1_image_is_decoded_only_when_read(model, monkeypatch):
    """Stage 2 needs no stage-1 image with attention masks: generate decodes the final latents only, and the stage-1
    image on its first read (the same pixels as decoding the stage-1 latent; one decode for the batch). Before,
    every call decoded both."""
    decodes, decode = [], model.vae.decode

    def spy(latents, *args, **kwargs):
        decodes.append(latents.shape[0])
        return decode(latents, *args, **kwargs)

    monkeypatch.setattr(model.vae, "decode", spy)
    results = run(model, [omg.Concept("man", "a photo of a man")], num_images=2)
    assert decodes == [2]
    first = results[0].stage1_image
    assert decodes == [2, 2] and results[1].stage1_image.size == (W, H) and decodes == [2, 2]
    stage1 = model.decode(torch.cat([r.stage1_latent for r in results]))
    assert np.array_equal(np.asarray(first), np.asarray(stage1[0]))


def test_merge_linears_copies_only_where_memory_allows(model, tmp_path, monkeypatch):
    """merge_linears (on by default): the patched Linear layers run merged copies on the concepts' rows when the
    copies take at most a quarter of the free memory, else the factors alone; the same image within float rounding
    either way (and as the factors-only option)."""
    import omg.pipeline as pipeline
    from omg.lora.grouped import _MergedRows
    loras = [kohya_lora_all_targets(model, tmp_path / f"{i}.safetensors", seed=i) for i in range(2)]
    concepts = [omg.Concept("man", "a photo of sks man", lora=loras[0], mask=(0, 0, 32, 64)),
                omg.Concept("woman", "a photo of ohwx woman", lora=loras[1], mask=(32, 0, 64, 64))]

    def merged_rows(result):
        return sum(isinstance(layer, _MergedRows) for layer in result.stage2.weights.lora.layers.values())

    merged = run(model, concepts, keep_stage2=True)
    monkeypatch.setattr(pipeline, "free_memory", lambda device: 1000)
    short = run(model, concepts, keep_stage2=True)
    monkeypatch.undo()
    off = run(model, concepts, keep_stage2=True, merge_linears=False)
    assert merged_rows(merged) > 0 and merged_rows(short) == 0 and merged_rows(off) == 0
    assert torch.equal(short.latent, off.latent)
    assert (merged.latent - off.latent).abs().max().item() <= 1e-4 * off.latent.abs().max().item()


def test_merged_copies_stay_only_for_calls_that_use_them_and_release_frees_all(model, tmp_path):
    """The merged copies of merge_linears are kept on the model for the next call (the same concepts reuse them),
    dropped by a call that runs without them (merged mode, or the factors only), and omg.release(model) frees all that
    generate keeps. Before, a merged-mode call ran with the last call's copies still allocated."""
    from omg.lora.grouped import _last_merged_rows, _last_stacking
    loras = [kohya_lora_all_targets(model, tmp_path / f"{i}.safetensors", seed=i) for i in range(2)]
    concepts = [omg.Concept("man", "a photo of sks man", lora=loras[0], mask=(0, 0, 32, 64)),
                omg.Concept("woman", "a photo of ohwx woman", lora=loras[1], mask=(32, 0, 64, 64))]
    run(model, concepts)
    assert model.unet in _last_merged_rows
    run(model, concepts, lora_mode="merged")
    assert model.unet not in _last_merged_rows
    run(model, concepts)
    run(model, concepts, merge_linears=False)
    assert model.unet not in _last_merged_rows and model.unet in _last_stacking
    run(model, concepts)
    assert Reuse._last is not None
    omg.release(model)
    assert model.unet not in _last_merged_rows and model.unet not in _last_stacking and Reuse._last is None
