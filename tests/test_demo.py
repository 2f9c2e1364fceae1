"""The demo world: scene generator invariants and a tiny end-to-end run of demo/train.py."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from demo.scenes import (CLASSES, COLOURS, CONCEPTS, base_scenes, concept_images, pattern_mask, render_scene,
                         shape_mask)


def _digest(scene) -> str:
    return hashlib.sha256(scene.image.tobytes() + scene.masks.tobytes() + scene.caption.encode()).hexdigest()


def test_scenes_are_deterministic_per_seed():
    assert _digest(render_scene(7)) == _digest(render_scene(7))
    assert _digest(render_scene(7)) != _digest(render_scene(8))
    a, b = base_scenes(6, size=96, seed=3), base_scenes(6, size=96, seed=3)
    assert [_digest(s) for s in a] == [_digest(s) for s in b]
    assert len({_digest(s) for s in a}) == 6
    assert [_digest(s) for s in concept_images("sks_ball", 4, 96)] == \
        [_digest(s) for s in concept_images("sks_ball", 4, 96)]


def test_captions_name_exactly_the_drawn_classes_and_colours():
    for seed in range(40):
        s = render_scene(seed, size=96)
        words = s.caption.replace(",", "").split()
        assert sorted(w for w in words if w in CLASSES) == sorted(s.classes), s.caption
        for o in s.objects:
            assert f"{o.colour} {o.class_name}" in s.caption
        assert s.caption.endswith(f"{s.background} background")
        assert 1 <= len(s.objects) <= 3


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda c: float(((np.array(COLOURS[c]) - rgb) ** 2).sum()))


def test_masks_are_disjoint_and_follow_the_depth_order():
    occluded_somewhere = False
    for seed in range(30):
        for occlusion in (True, False):
            s = render_scene(seed, size=96, n_objects=2 + seed % 2, occlusion=occlusion)
            assert s.masks.sum(0).max() <= 1  # disjoint
            shapes = [shape_mask(o.class_name, o.box, 96) for o in s.objects]
            for i in range(len(shapes)):
                in_front = np.any(shapes[i + 1:], axis=0) if i + 1 < len(shapes) else np.zeros_like(shapes[i])
                np.testing.assert_array_equal(s.masks[i], shapes[i] & ~in_front)
                assert s.masks[i].any()
                pixels = np.asarray(s.image, np.float32)[s.masks[i]]
                assert _nearest_colour(pixels.mean(0)) == s.objects[i].colour  # the mask shows that object
            hidden = [int((sh & ~m).sum()) for sh, m in zip(shapes, s.masks)]
            assert hidden[-1] == 0  # the front object is never occluded
            if occlusion:
                assert sum(hidden) > 0
                occluded_somewhere = True
            else:
                assert sum(hidden) == 0
    assert occluded_somewhere


def _pattern_share(scene, i: int, rgb) -> float:
    pixels = np.asarray(scene.image, np.int32)[scene.masks[i]]
    return float((np.abs(pixels - np.array(rgb)).max(1) <= 8).mean())


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_concept_images_show_the_concept_identity(name):
    spec = CONCEPTS[name]
    images = concept_images(name, n=12, size=128)
    assert len({_digest(s) for s in images}) == 12
    for s in images:
        assert s.classes == [spec.class_name] and s.identities == [name]
        assert s.caption == f"a {spec.phrase} on a {s.background} background"
        # the pattern colour covers a real share of the object, exactly where the pattern says
        assert 0.1 < _pattern_share(s, 0, spec.pattern_colour) < 0.7
        marks = s.masks[0] & pattern_mask(spec.pattern, s.objects[0].box, 128)
        assert (np.asarray(s.image, np.int32)[marks] == spec.pattern_colour).all()
    plain = render_scene(1, size=128, objects=[(spec.class_name, None)])
    assert _pattern_share(plain, 0, spec.pattern_colour) < 0.02  # a plain class member has no markings


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from demo import train

    out = tmp_path_factory.mktemp("demo")
    summary = train.main(["--tiny", "--device", "cpu", "--out", str(out)])
    return out, summary


def test_tiny_training_lowers_the_diffusion_loss(tiny_run):
    out, summary = tiny_run
    before, after = summary["unet_eval_loss"]  # fixed samples, timesteps and noise: no sampling jitter
    assert after < 0.7 * before
    assert summary["steps"]["unet"] == 30 and summary["steps"]["vae"] == 10
    log = json.loads((out / "train_log.json").read_text())["log"]
    # the training losses too: mean of the first five steps against the last five (the VAE gets 10 steps only)
    for tag, factor in (("unet", 0.7), ("vae", 0.95)):
        losses = [loss for t, _, loss in log if t == tag]
        assert np.mean(losses[-5:]) < factor * np.mean(losses[:5]), (tag, losses)


def test_tiny_run_writes_files_omg_loads_and_generates_with(tiny_run):
    import omg
    from omg.lora import load_lora
    from safetensors.torch import load_file

    out, summary = tiny_run
    model = omg.load_sdxl(summary["checkpoint"], device="cpu", dtype=torch.float32)
    assert model.vae is not None and model.text is not None
    assert model.unet.config.head_dim == 16 and model.vae.config.scaling_factor == pytest.approx(
        summary["scaling_factor"])
    projections = 4 * len(model.unet.attention_layers())
    loras = {}
    for name, path in summary["loras"].items():
        lora = load_lora(path)
        assert len(lora.adapters) == projections and not lora.unknown_keys
        ups = [v for k, v in load_file(path).items()
               if k.endswith("lora_up.weight")]
        assert any(bool(u.abs().sum() > 0) for u in ups)  # trained away from the zero init
        loras[name] = lora
    concepts = [omg.Concept("ball", "a sks ball on a green background", lora=loras["sks_ball"]),
                omg.Concept("box", "a zwx box on a green background", lora=loras["zwx_box"])]
    result = omg.generate(model, "a red ball and a blue box on a green background", concepts, steps=2,
                          blend_steps=1, height=64, width=64, seed=0, progress=False)
    assert result.image.size == (64, 64) and result.stage1_image.size == (64, 64)
    assert result.masks.shape == (2, 8, 8)
    assert np.isfinite(np.asarray(result.image, np.float32)).all()


def test_tiny_training_is_reproducible(tmp_path):
    from demo import train

    files = []
    for run in ("a", "b"):
        out = tmp_path / run
        train.main(["--tiny", "--device", "cpu", "--steps", "3", "--scenes", "4", "--concept-images", "2",
                    "--out", str(out)])
        files.append({f: (out / f).read_bytes() for f in sorted(os.listdir(out)) if f.endswith(".safetensors")})
    assert files[0].keys() == {"demo_sdxl.safetensors", *(f"{n}.safetensors" for n in CONCEPTS)}
    assert files[0] == files[1]


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "demo")


def test_shipped_demo_weights_load_strictly_and_fit_the_budget():
    """weights/demo/: the SGM checkpoint has demo_configs()'s shapes, every LoRA key lands, <= 40 MB in all."""
    import omg
    from demo.train import demo_configs
    from omg.lora import load_lora

    sizes = {f: os.path.getsize(os.path.join(SHIPPED, f)) for f in os.listdir(SHIPPED)}
    assert {"demo_sdxl.safetensors", *(f"{n}.safetensors" for n in CONCEPTS)} <= sizes.keys()
    assert sum(sizes.values()) <= 40e6, sizes
    model = omg.load_sdxl(os.path.join(SHIPPED, "demo_sdxl.safetensors"), device="cpu", dtype=torch.float32)
    unet_cfg, vae_cfg, _ = demo_configs()
    for field in ("model_channels", "channel_mult", "transformer_depth", "transformer_depth_middle", "head_dim"):
        assert getattr(model.unet.config, field) == getattr(unet_cfg, field), field
    assert model.vae.config.ch == vae_cfg.ch and model.vae.config.ch_mult == vae_cfg.ch_mult
    log = json.loads(open(os.path.join(SHIPPED, "train_log.json")).read())
    assert model.vae.config.scaling_factor == pytest.approx(log["scaling_factor"])
    projections = 4 * len(model.unet.attention_layers())
    for name in CONCEPTS:
        lora = load_lora(os.path.join(SHIPPED, f"{name}.safetensors"))
        assert len(lora.adapters) == projections and not lora.unknown_keys
    # the shipped files came from fixed step counts (the budget did not cut a stage short)
    assert log["steps"] == {"vae": log["args"]["vae_steps"], "unet": log["args"]["steps"],
                            **{f"lora:{n}": log["args"]["lora_steps"] for n in CONCEPTS}}
    assert log["unet_eval_loss"][1] < 0.5 * log["unet_eval_loss"][0]
