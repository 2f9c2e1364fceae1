"""The demo world: scene generator invariants, the grounding targets of training, and tiny end-to-end runs of
demo/train.py (the session's tiny world of tests/conftest.py, and a --init resume from it)."""
import hashlib
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from demo.scenes import (BACKGROUNDS, CLASSES, COLOURS, CONCEPTS, MARK_MIX, article, base_scenes, caption_for,
                         concept_images, object_shade, pattern_mask, render_scene, shape_mask, to_tensor_batch)
from demo.world import concept_prompt, global_prompt, plain_prompt


def _digest(scene) -> str:
    return hashlib.sha256(scene.image.tobytes() + scene.masks.tobytes() + scene.caption.encode()).hexdigest()


def _nearest(rgb: np.ndarray, table: dict) -> str:
    return min(table, key=lambda c: float(((np.array(table[c], np.float32) - rgb) ** 2).sum()))


# ---------------------------------------------------------------------------------------------- scenes

def test_scenes_are_deterministic_per_seed():
    assert _digest(render_scene(7, 64)) == _digest(render_scene(7, 64))
    assert _digest(render_scene(7, 64)) != _digest(render_scene(8, 64))
    a, b = base_scenes(6, size=64, seed=3), base_scenes(6, size=64, seed=3)
    assert [_digest(s) for s in a] == [_digest(s) for s in b]
    assert len({_digest(s) for s in a}) == 6
    assert [_digest(s) for s in base_scenes(6, size=64, seed=4)] != [_digest(s) for s in a]
    for plain in (False, True):
        assert [_digest(s) for s in concept_images("sks_ball", 4, 64, plain=plain)] == \
            [_digest(s) for s in concept_images("sks_ball", 4, 64, plain=plain)]
    assert _digest(concept_images("sks_ball", 1, 64, seed=1)[0]) != _digest(concept_images("sks_ball", 1, 64)[0])


def test_base_scenes_in_worker_processes_are_the_same_list():
    one = base_scenes(64, size=64, seed=2, workers=1)
    two = base_scenes(64, size=64, seed=2, workers=2)  # n >= 64: a process pool
    assert [_digest(s) for s in one] == [_digest(s) for s in two]


def test_captions_name_colour_and_class_of_every_object_and_the_background():
    same_class = 0
    for seed in range(60):
        s = render_scene(seed, size=64)
        assert 1 <= len(s.objects) <= 3
        assert s.background in BACKGROUNDS and s.caption.endswith(f"on a {s.background} background")
        words = s.caption.replace(",", "").split()
        assert sorted(w for w in words if w in CLASSES) == sorted(s.classes), s.caption
        assert sorted(w for w in words if w in COLOURS) == sorted(s.colours), s.caption
        # back to front, each object as "<colour> <class>"
        pairs = [f"{words[i - 1]} {w}" for i, w in enumerate(words) if w in CLASSES]
        assert pairs == [f"{o.colour} {o.class_name}" for o in s.objects], s.caption
        assert len(set(s.colours)) == len(s.colours), s.caption  # colours never repeat
        assert s.identities == [None] * len(s.objects)  # base scenes hold plain class members only
        same_class += len(set(s.classes)) < len(s.classes)
    assert same_class > 0  # classes may repeat ("a red ball and a yellow ball")


def test_same_class_scenes_and_concept_captions():
    s = render_scene(5, 64, objects=[("ball", None), ("ball", None)])
    assert s.classes == ["ball", "ball"] and len(set(s.colours)) == 2
    a, b = (f"{article(c)} {c} ball" for c in s.colours)
    assert s.caption == f"{a} and {b} on {article(s.background)} {s.background} background"
    # two concepts of one class: each fixes its colour; the caption names its identifier
    s = render_scene(5, 64, objects=[("ball", "sks_ball"), ("ball", "ohwx_ball")], background="grey")
    assert s.colours == ["red", "yellow"] and s.identities == ["sks_ball", "ohwx_ball"]
    assert s.caption == "a sks ball and an ohwx ball on a grey background"
    s = render_scene(5, 64, objects=[("box", None, "orange"), ("ball", "sks_ball")], background="sand")
    assert s.colours == ["orange", "red"] and s.caption == "an orange box and a sks ball on a sand background"
    with pytest.raises(ValueError):
        render_scene(5, 64, objects=[("box", "sks_ball")])  # a concept fixes its class
    with pytest.raises(ValueError):
        render_scene(5, 64, background="blue")  # an object colour, not a background


def test_masks_are_disjoint_visible_and_follow_the_depth_order():
    occluded_somewhere = False
    for seed in range(20):
        for occlusion in (True, False):
            s = render_scene(seed, size=64, n_objects=2 + seed % 2, occlusion=occlusion)
            assert s.masks.shape == (len(s.objects), 64, 64) and s.masks.dtype == bool
            assert s.masks.sum(0).max() <= 1  # disjoint
            shapes = [shape_mask(o.class_name, o.box, 64) for o in s.objects]
            image = np.asarray(s.image, np.float32)
            for i in range(len(shapes)):
                in_front = np.any(shapes[i + 1:], axis=0) if i + 1 < len(shapes) else np.zeros_like(shapes[i])
                np.testing.assert_array_equal(s.masks[i], shapes[i] & ~in_front)
                assert s.masks[i].sum() >= 0.3 * shapes[i].sum()  # none vanishes behind the others
                assert _nearest(image[s.masks[i]].mean(0), COLOURS) == s.objects[i].colour  # the mask shows it
            hidden = [int((sh & ~m).sum()) for sh, m in zip(shapes, s.masks)]
            assert hidden[-1] == 0  # the front object is never occluded
            if occlusion:
                assert sum(hidden) > 0
                occluded_somewhere = True
            else:
                assert sum(hidden) == 0
    assert occluded_somewhere


def test_backgrounds_are_smooth_gradients_without_texture():
    for seed in range(12):
        s = render_scene(seed, size=128)
        image = np.asarray(s.image, np.float32)
        ground = ~np.any([shape_mask(o.class_name, o.box, 128) for o in s.objects], axis=0)
        # neighbouring ground pixels differ by at most one or two levels: no stripes, checks or noise
        dx = np.abs(image[:, 1:] - image[:, :-1])[ground[:, 1:] & ground[:, :-1]]
        dy = np.abs(image[1:] - image[:-1])[ground[1:] & ground[:-1]]
        assert max(dx.max(), dy.max()) <= 2, (seed, dx.max(), dy.max())
        # and the ground is a plane in each channel (a gradient), up to rounding
        yy, xx = np.nonzero(ground)
        design = np.stack([np.ones_like(xx), xx, yy], 1).astype(np.float64)
        for c in range(3):
            values = image[yy, xx, c]
            fit, *_ = np.linalg.lstsq(design, values, rcond=None)
            assert np.abs(design @ fit - values).max() <= 1.5, (seed, c)
        assert _nearest(image[ground].mean(0), BACKGROUNDS) == s.background


def _share(scene, rgb) -> float:
    pixels = np.asarray(scene.image, np.int32)[scene.masks[0]]
    return float((np.abs(pixels - np.array(rgb)).max(1) <= 8).mean())


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_concept_images_show_the_pattern_and_plain_images_do_not(name):
    spec, size = CONCEPTS[name], 128
    images = concept_images(name, n=6, size=size)
    plain = concept_images(name, n=6, size=size, plain=True)
    assert len({_digest(s) for s in images + plain}) == 12
    for s in images:
        assert s.classes == [spec.class_name] and s.identities == [name] and s.colours == [spec.colour]
        assert s.caption == caption_for(s.objects, s.background) and f" {spec.phrase} on " in s.caption
        # the pattern colour covers a real share of the object, exactly where the pattern says
        marks = s.masks[0] & pattern_mask(spec.pattern, s.objects[0].box, size)
        lit = np.array(spec.pattern_colour, np.float32) * object_shade(s.objects[0].box, size)[..., None]
        assert marks.any() and 0.1 < marks.sum() / s.masks[0].sum() < 0.7
        assert (np.asarray(s.image, np.int32)[marks] == np.round(lit[marks])).all()
        # low contrast by design (a late feature): the marks sit 40 % of the way from the colour to white/black
        colour = np.array(COLOURS[spec.colour], np.float32)
        contrast = np.linalg.norm(np.array(spec.pattern_colour) - colour) / np.linalg.norm(np.array(spec.mark) - colour)
        assert abs(contrast - MARK_MIX) < 0.01
        rest = np.asarray(s.image, np.float32)[s.masks[0] & ~marks]
        assert _nearest(rest.mean(0), COLOURS) == spec.colour
    for s in plain:  # the class in the concept's colour, no pattern: the prior-preservation set
        assert s.classes == [spec.class_name] and s.identities == [None] and s.colours == [spec.colour]
        assert s.caption == f"{article(spec.colour)} {spec.colour} {spec.class_name} on a {s.background} background"
        assert spec.identifier not in s.caption
        for mark in _lit_marks():
            assert _share(s, mark) == 0.0
        assert _nearest(np.asarray(s.image, np.float32)[s.masks[0]].mean(0), COLOURS) == spec.colour
    # pattern colours appear nowhere but on concepts
    for s in base_scenes(8, size=64, seed=11):
        pixels = np.asarray(s.image, np.int32).reshape(-1, 3)
        for mark in _lit_marks():
            assert not (np.abs(pixels - np.array(mark)).max(1) <= 4).any()


def _lit_marks() -> list:
    """Every concept's mark colour at the lights an object takes (0.75 to 1)."""
    return [np.array(c.pattern_colour) * light for c in CONCEPTS.values() for light in np.linspace(0.75, 1.0, 11)]


def test_concept_images_cover_every_object_scale():
    widths = {s.objects[0].box[2] - s.objects[0].box[0] for s in concept_images("bnha_box", 6, 256)}
    assert max(widths) > 1.4 * min(widths)


def test_to_tensor_batch_range_and_layout():
    scenes = base_scenes(2, size=64, seed=1)
    x = to_tensor_batch(scenes)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_allclose(((x[1].permute(1, 2, 0).numpy() + 1) * 127.5).round(), np.asarray(scenes[1].image))


@pytest.mark.parametrize("name", sorted(CONCEPTS))  # "an ohwx ball": the article follows the identifier
def test_concept_prompts_are_the_lora_training_captions(name):
    spec = CONCEPTS[name]
    trained = render_scene(3, 64, objects=[(spec.class_name, name)], background="pink").caption
    assert concept_prompt(name, "pink") == trained


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_plain_and_global_prompts_are_training_captions(name):
    spec = CONCEPTS[name]
    plain = render_scene(3, 64, objects=[(spec.class_name, None, spec.colour)], background="green").caption
    assert plain_prompt(name, "green") == plain
    others = [c for c in sorted(CONCEPTS) if c != name]
    objects = [(CONCEPTS[c].class_name, None, CONCEPTS[c].colour) for c in [name, *others]]
    scene = render_scene(3, 64, objects=objects, background="sand", scale=0.2)
    assert global_prompt([name, *others], "sand") == scene.caption


# ---------------------------------------------------------------------------------------------- grounding

def test_grounded_tokens_point_at_colour_class_and_background_tokens():
    from demo.train import MAX_TOKENS, grounded_tokens
    from omg.masks import concept_token_indices
    from omg.text import PAD_L, tokenize, word_tokens

    scenes = [render_scene(s, 64) for s in range(12)]
    scenes.append(render_scene(1, 64, objects=[("ball", "sks_ball"), ("ball", None), ("box", "bnha_box")]))
    scenes.append(render_scene(2, 64, objects=[("ball", "ohwx_ball"), ("ball", "sks_ball")]))
    assert any(len(set(s.classes)) < len(s.classes) for s in scenes)
    for s in scenes:
        pairs = grounded_tokens(s)
        assert len(pairs) == 2 * len(s.objects) + 1 <= MAX_TOKENS
        assert [t for _, t in pairs] == [i for i in range(len(s.objects)) for _ in (0, 1)] + [-1]
        ids = tokenize([s.caption], PAD_L)[0, 0].tolist()  # BOS first: positions index this sequence
        classes = concept_token_indices(s.caption, s.classes)  # the j-th object of a class: its j-th occurrence
        for i, obj in enumerate(s.objects):
            before, cls = pairs[2 * i][0], pairs[2 * i + 1][0]
            assert [cls] == classes[i], (s.caption, pairs)
            word = CONCEPTS[obj.identity].identifier if obj.identity else obj.colour
            assert ids[before] == word_tokens(word)[0][0] and ids[cls] == word_tokens(obj.class_name)[0][0]
        position = pairs[-1][0]
        assert ids[position] == word_tokens(s.background)[0][0]
        assert ids[position + 1] == word_tokens("background")[0][0]


def test_grounding_targets_partition_each_grid():
    from demo.train import MAX_TOKENS, grounded_tokens, grounding_targets

    scenes = [render_scene(s, 64) for s in range(6)]
    positions, weights, masks = grounding_targets(scenes, [8, 4])
    assert positions.shape == weights.shape == (6, MAX_TOKENS) and set(masks) == {8, 4}
    for s, scene in enumerate(scenes):
        pairs = grounded_tokens(scene)
        j = len(pairs)
        assert positions[s, :j].tolist() == [p for p, _ in pairs]
        assert weights[s, :j].tolist() == [1.0] * j and not weights[s, j:].any() and not positions[s, j:].any()
        for g, m in masks.items():
            assert m.shape == (6, MAX_TOKENS, g * g)
            k = len(scene.objects)
            layers = torch.stack([m[s, 2 * i] for i in range(k)] + [m[s, j - 1]])  # each object, the background
            torch.testing.assert_close(layers.sum(0), torch.ones(g * g))  # objects and ground share every cell
            for i in range(k):
                torch.testing.assert_close(m[s, 2 * i], m[s, 2 * i + 1])  # colour and class: the same target
                assert float(m[s, 2 * i].mean()) == pytest.approx(float(scene.masks[i].mean()), abs=1e-5)


def test_grounding_loss_is_low_inside_the_target_and_high_outside():
    from demo.train import GroundingProcessor

    # one head, 2 x 2 queries, 3 tokens: pixel 0 attends to token 1 almost only, the others to token 2
    q = torch.tensor([10.0, -10.0, -10.0, -10.0]).view(1, 1, 4, 1)
    k = torch.tensor([0.0, 10.0, -10.0]).view(1, 1, 3, 1)
    v = torch.randn(1, 1, 3, 1)
    layer = SimpleNamespace(qkv=lambda x, c: (q, k, v), out=lambda t: t)
    losses = {}
    for where, cell in (("inside", 0), ("outside", 3)):
        p = GroundingProcessor()
        target = torch.zeros(1, 1, 4)
        target[0, 0, cell] = 1.0
        p.positions, p.weights, p.masks = torch.tensor([[1]]), torch.ones(1, 1), {4: target}
        out = p(layer, None, None)
        assert out.shape == (1, 1, 4, 1) and len(p.losses) == 1
        losses[where] = float(p.losses[0])
    assert losses["inside"] < 1e-3 and losses["outside"] > 0.99
    p = GroundingProcessor()  # no grounded tokens: plain attention, no loss
    assert p(layer, None, None).shape == (1, 1, 4, 1) and p.losses == []


def test_attention_grids_of_the_tiny_model():
    from demo.train import attention_grids, demo_configs

    unet, _, _ = demo_configs(tiny=True)
    assert attention_grids(unet, 8) == [4, 2]  # levels 1 and 2 have cross-attention (and the middle, at 2)
    full, _, _ = demo_configs()
    assert attention_grids(full, 32) == [16, 8]


# ---------------------------------------------------------------------------------------------- training

def _log(out):
    return json.loads((out / "train_log.json").read_text())


def test_tiny_training_lowers_the_diffusion_loss(tiny_world):
    out, summary = tiny_world
    log = _log(out)
    steps = log["args"]["unet_steps"]  # tests/conftest.py's TINY_UNET_STEPS
    assert steps >= 40 and log["stats"]["unet"]["steps"] == steps and log["stats"]["unet"]["skipped_steps"] == 0
    assert log["stats"]["vae"]["steps"] == 4 and log["size"] == 64
    unet = [v for tag, _, v in log["log"] if tag == "unet"]
    assert len(unet) == steps and all(np.isfinite(unet))
    # mean of the first five logged UNet losses against the last five (seeds 0-4 give ratios 0.77-0.86)
    assert np.mean(unet[-5:]) < 0.9 * np.mean(unet[:5]), unet
    grounding = [v for tag, _, v in log["log"] if tag == "grounding"]
    assert grounding and all(0.0 <= v <= 1.0 for v in grounding)  # (1 - share inside)^2
    assert sorted(summary["loras"]) == sorted(CONCEPTS)


def test_tiny_run_writes_a_checkpoint_omg_loads(tiny_world):
    import omg
    from demo.train import SIZE_EMBED, demo_configs

    out, summary = tiny_world
    assert summary["checkpoint"] == str(out / "demo_sdxl.safetensors")
    model = omg.load_sdxl(summary["checkpoint"], device="cpu", dtype=torch.float32)
    unet_cfg, vae_cfg, (l_cfg, g_cfg) = demo_configs(tiny=True)
    for field in ("model_channels", "channel_mult", "transformer_depth", "transformer_depth_middle", "head_dim"):
        assert getattr(model.unet.config, field) == getattr(unet_cfg, field), field
    assert model.vae.config.ch == vae_cfg.ch and model.vae.config.ch_mult == vae_cfg.ch_mult
    assert model.text.clip_l.config.width == l_cfg.width and model.text.clip_g.config.width == g_cfg.width
    assert model.size_embed_dim == SIZE_EMBED
    assert model.vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    assert summary["scaling_factor"] != pytest.approx(0.13025)  # set from the trained VAE's latents
    # the trained text encoders tell captions apart
    context, pooled = model.text.encode(["a red ball on a green background", "a blue box on a pink background"])
    assert context.shape[-1] == l_cfg.width + g_cfg.width and not torch.allclose(context[0], context[1])


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_tiny_run_writes_kohya_loras_omg_loads(tiny_world, name):
    import omg
    from demo.train import lora_targets
    from omg.lora import load_lora, merged_lora
    from omg.lora.merge import bind
    from safetensors import safe_open

    out, summary = tiny_world
    path = summary["loras"][name]
    assert path == str(out / f"{name}.safetensors")
    model = omg.load_sdxl(summary["checkpoint"], device="cpu", dtype=torch.float32)
    lora = load_lora(path)
    assert not lora.unknown_keys
    targets = lora_targets(model.unet)
    expected = {"lora_unet_" + p.replace(".", "_") for p in targets}
    assert set(lora.adapters) == expected
    assert any("transformer_blocks" in n and n.endswith("attn2_to_k") for n in expected)  # attention linears
    assert any(n.endswith("in_layers_2") for n in expected)  # and ResBlock convs
    patches = bind(model.unet, lora, strict=True)  # every module lands on a UNet weight
    assert len(patches) == len(expected)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["omg.demo.concept"])
        assert keys == {f"{m}.{part}" for m in expected for part in ("lora_down.weight", "lora_up.weight", "alpha")}
        for module in expected:
            down, up = f.get_tensor(f"{module}.lora_down.weight"), f.get_tensor(f"{module}.lora_up.weight")
            assert down.shape[0] == up.shape[1] == 8 and float(f.get_tensor(f"{module}.alpha")) == 8.0
            if module.endswith("in_layers_2"):
                assert down.dim() == 4 and down.shape[-2:] == (3, 3) and up.shape[-2:] == (1, 1)
        ups = [f.get_tensor(k) for k in keys if k.endswith("lora_up.weight")]
    assert meta["name"] == name and meta["prompt"].endswith(CONCEPTS[name].phrase)
    assert any(bool(u.abs().sum() > 0) for u in ups)  # trained away from the zero init
    # merged into the UNet, it changes the prediction; restored exactly afterwards
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    context, y = torch.randn(1, 77, model.unet.config.context_dim), torch.randn(1, model.unet.config.adm_in_channels)
    with torch.no_grad():
        plain = model.unet(x, t, context, y)
        with merged_lora(model.unet, lora):
            merged = model.unet(x, t, context, y)
    assert not torch.equal(plain, merged)
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in before.items())


def test_init_resumes_from_a_written_checkpoint(tiny_world, tmp_path):
    from demo import train
    from demo.train import demo_configs
    from omg.model import SDXL
    from safetensors.torch import load_file

    out, summary = tiny_world
    init = summary["checkpoint"]
    resumed = train.main(["--tiny", "--device", "cpu", "--init", init, "--stages", "unet,lora", "--unet-steps", "6",
                          "--concepts", "sks_ball", "--out", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["demo_sdxl.safetensors", "sks_ball.safetensors", "train_log.json"]
    assert "vae" not in resumed["stats"] and resumed["stats"]["unet"]["steps"] == 6
    assert resumed["args"]["init"] == init and list(resumed["loras"]) == ["sks_ball"]
    assert resumed["scaling_factor"] == summary["scaling_factor"]
    old, new = load_file(init), load_file(resumed["checkpoint"])
    assert old.keys() == new.keys()
    vae = [k for k in old if k.startswith("first_stage_model.")]
    unet = [k for k in old if k.startswith("model.diffusion_model.")]
    assert vae and unet
    assert all(torch.equal(old[k], new[k]) for k in vae)  # no vae stage: the autoencoder is the checkpoint's
    assert any(not torch.equal(old[k], new[k]) for k in unet)  # the UNet trained on
    # ... from the checkpoint's weights, not from a fresh initialisation
    fresh = SDXL.random(*demo_configs(tiny=True), seed=0, size_embed_dim=train.SIZE_EMBED).sgm_state_dict()

    def distance(a, b):
        return float(sum((a[k].float() - b[k].float()).square().sum() for k in unet).sqrt())

    assert distance(new, old) < 0.2 * distance(old, fresh)
    log = _log(tmp_path)
    resumed_losses = [v for tag, _, v in log["log"] if tag == "unet"]
    fresh_losses = [v for tag, _, v in _log(out)["log"] if tag == "unet"]
    assert np.mean(resumed_losses) < np.mean(fresh_losses[:6])  # it starts where the first run stopped


def test_lora_stage_alone_keeps_the_checkpoint(tiny_world, tmp_path):
    from demo import train
    from safetensors.torch import load_file

    out, summary = tiny_world
    result = train.main(["--tiny", "--device", "cpu", "--init", summary["checkpoint"], "--stages", "lora",
                         "--concepts", "bnha_box", "--lora-steps", "2", "--out", str(tmp_path)])
    assert list(result["stats"]) == ["lora:bnha_box"] and result["stats"]["lora:bnha_box"]["steps"] == 2
    old, new = load_file(summary["checkpoint"]), load_file(result["checkpoint"])
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)  # LoRAs removed again
    assert sorted(os.listdir(tmp_path)) == ["bnha_box.safetensors", "demo_sdxl.safetensors", "train_log.json"]


def test_lora_training_drops_captions_to_the_zero_embedding(tiny_world, tmp_path, monkeypatch):
    # the LoRA also changes the unconditional branch that guidance amplifies: it must train on it, as the base did
    from demo import train

    seen = []
    forward = train.GroundedUNet.forward

    def spy(self, x, t, context, y, *rest):
        seen.append((context.detach().clone(), y.detach().clone()))
        return forward(self, x, t, context, y, *rest)

    monkeypatch.setattr(train.GroundedUNet, "forward", spy)
    out, summary = tiny_world
    train.main(["--tiny", "--device", "cpu", "--init", summary["checkpoint"], "--stages", "lora", "--concepts",
                "bnha_box", "--lora-steps", "4", "--lora-drop", "0.5", "--out", str(tmp_path)])
    context = torch.cat([c for c, _ in seen])
    y = torch.cat([v for _, v in seen])
    dropped = context.flatten(1).abs().amax(1) == 0
    assert 0 < int(dropped.sum()) < len(dropped)
    size_part = y.shape[1] - 6 * train.SIZE_EMBED
    assert (y[dropped, :size_part] == 0).all() and (y[~dropped, :size_part] != 0).any(1).all()
    assert torch.equal(y[dropped, size_part:], y[~dropped, size_part:][:1].expand(int(dropped.sum()), -1))


def test_stages_and_init_are_checked():
    from demo.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--stages", "unet,lora"])  # without the vae stage, --init is needed
    with pytest.raises(SystemExit):
        parse_args(["--stages", "vae,text"])
    assert parse_args(["--stages", "lora", "--init", "x.safetensors"]).stages == ["lora"]


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "demo")


def test_shipped_demo_weights_load_strictly():
    """weights/demo/: the SGM checkpoint has demo_configs()'s shapes and every concept's LoRA lands on it."""
    import omg
    from demo.train import demo_configs, lora_targets
    from omg.lora import load_lora
    from omg.lora.merge import bind

    model = omg.load_sdxl(os.path.join(SHIPPED, "demo_sdxl.safetensors"), device="cpu", dtype=torch.float32)
    unet_cfg, vae_cfg, _ = demo_configs()
    for field in ("model_channels", "channel_mult", "transformer_depth", "transformer_depth_middle", "head_dim"):
        assert getattr(model.unet.config, field) == getattr(unet_cfg, field), field
    assert model.vae.config.ch == vae_cfg.ch and model.vae.config.ch_mult == vae_cfg.ch_mult
    with open(os.path.join(SHIPPED, "train_log.json")) as f:
        log = json.load(f)
    assert model.vae.config.scaling_factor == pytest.approx(log["scaling_factor"])
    assert log["size"] == 256 and sorted(log["loras"]) == sorted(CONCEPTS)
    with open(os.path.join(SHIPPED, "train_log_lora.json")) as f:  # the LoRAs' own run, resumed from the base
        lora_log = json.load(f)
    assert lora_log["args"]["stages"] == ["lora"] and lora_log["args"]["lora_drop"] > 0
    assert sorted(lora_log["loras"]) == sorted(CONCEPTS) and lora_log["size"] == log["size"]
    assert all(lora_log["stats"][f"lora:{n}"]["skipped_steps"] == 0 for n in CONCEPTS)
    expected = {"lora_unet_" + p.replace(".", "_") for p in lora_targets(model.unet)}
    for name in CONCEPTS:
        lora = load_lora(os.path.join(SHIPPED, f"{name}.safetensors"))
        assert set(lora.adapters) == expected and not lora.unknown_keys, name
        assert len(bind(model.unet, lora, strict=True)) == len(expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", [True, False])
def test_graphed_training_matches_eager_training_on_cuda(graphs):
    """The UNet stage as one CUDA graph a step trains: no skipped steps, and after 6 steps (3 warm-up, 3 replays)
    its parameters are those of the eager loop (fp32 atomics aside): the replays draw the eager loop's batches
    and noise, step AdamW and the EMA as it does."""
    from demo import train
    from omg.model import SDXL

    device = torch.device("cuda")
    scenes = base_scenes(32, 64, seed=3)

    def run(use_graph: bool) -> tuple[dict, list]:
        model = SDXL.random(*train.demo_configs(tiny=True), seed=0, device=device, size_embed_dim=train.SIZE_EMBED)
        run.init = [p.detach().clone() for p in model.unet.parameters()]
        latents = train.encode_latents(model, to_tensor_batch(scenes), device) * model.vae.config.scaling_factor
        data = train.DeviceData(latents, scenes, train.attention_grids(model.unet.config, 8), device)
        trainer = train.Trainer(device, 0, 3, [], lambda m: None, offset_noise=0.1)
        stats = train.train_unet(model, data, trainer, 6, 8, 0.2, 0.2, 0.3, 64, float("inf"),  # warm-up: lr/200
                                 cuda_graph=use_graph)
        return stats, [p.detach().clone() for p in model.unet.parameters()]

    stats, params = run(graphs)
    assert stats["skipped_steps"] == 0 and stats["mode"].startswith("graph" if graphs else "eager"), stats
    if graphs:
        _, eager = run(False)
        apart = max(float((a - b).abs().max()) for a, b in zip(params, eager))
        moved = max(float((a - b).abs().max()) for a, b in zip(eager, run.init))
        assert moved > 0 and apart < 0.1 * moved, (apart, moved)  # bf16 autocast and atomics either way


def test_ema_warm_up_and_skipped_steps():
    """EMA.update: weight 1 - min(decay, (1 + n) / (10 + n)) at its n-th update (counted on the device); a step
    flagged not ok leaves the average, but counts."""
    from demo import train

    p = torch.nn.Parameter(torch.zeros(3))
    ema = train.EMA([p], decay=0.5)
    expected = torch.zeros(3)
    for n, (value, ok) in enumerate([(1.0, True), (2.0, False), (3.0, True), (4.0, True)], start=1):
        p.data.fill_(value)
        ema.update(torch.tensor(ok))
        if ok:
            expected += (1 - min(0.5, (1 + n) / (10 + n))) * (value - expected)
        assert torch.allclose(ema.shadow[0], expected), (n, ema.shadow[0], expected)
    assert float(ema.updates) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_unet_step_has_no_host_sync(monkeypatch):
    """The UNet stage's step body runs with torch's sync debug mode set to error (a host sync fails the CUDA graph
    capture of the whole step; EMA's _foreach_lerp_ with a tensor weight was one)."""
    from demo import train
    from omg.model import SDXL

    device = torch.device("cuda")
    scenes = base_scenes(16, 64, seed=3)
    model = SDXL.random(*train.demo_configs(tiny=True), seed=0, device=device, size_embed_dim=train.SIZE_EMBED)
    latents = train.encode_latents(model, to_tensor_batch(scenes), device) * model.vae.config.scaling_factor
    data = train.DeviceData(latents, scenes, train.attention_grids(model.unet.config, 8), device)
    trainer = train.Trainer(device, 0, 100, [], lambda m: None)
    checked = []

    class Strict:  # train_unet's step calls CapturedStep(body, trainer)(): run the body under the debug mode
        def __init__(self, fn, trainer):
            self.fn, self.eager = fn, False

        def __call__(self):
            if checked:  # the first step initialises the optimiser state (allocations, not syncs)
                torch.cuda.set_sync_debug_mode("error")
            try:
                return self.fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
                checked.append(True)

    monkeypatch.setattr(train, "CapturedStep", Strict)
    stats = train.train_unet(model, data, trainer, 3, 8, 0.2, 0.2, 0.3, 64, float("inf"))
    assert len(checked) == 3 and stats["skipped_steps"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_step_replays_draw_the_eager_random_sequence():
    """CapturedStep registers the generator with its graph: every replay draws new numbers, the same sequence an
    eager loop on an equally seeded generator draws, and its outputs are copies (kept values stay)."""
    from demo import train

    def numbers(captured: bool) -> list:
        trainer = train.Trainer(torch.device("cuda"), 7, 1, [], print)
        state = torch.zeros(4, device="cuda")

        def fn() -> torch.Tensor:
            state.add_(trainer.randn((4,)))
            return state * 1
        call = train.CapturedStep(fn, trainer, warmup=2) if captured else fn
        out = [call() for _ in range(6)]
        if captured:
            assert call.graph is not None and not call.eager
        return [o.cpu() for o in out]

    graphed, eager = numbers(True), numbers(False)
    assert len({tuple(o.tolist()) for o in graphed}) == 6
    for a, b in zip(graphed, eager):
        assert torch.allclose(a, b, atol=1e-6), (a, b)
