"""bench/world.py: the gates' semantics, its ground-truth readers (background, prompt following, latent masks), and
one end-to-end run on the session's tiny demo world (tests/conftest.py)."""
import glob
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from bench.identity import COLOUR_NAMES, LABELS, to_tensor
from bench.world import THRESHOLDS, background_of, follows, gate, iou, latent_masks
from demo.scenes import BACKGROUNDS, CONCEPTS, base_scenes, render_scene


def test_gate_semantics():
    assert gate("attention_iou", 0.5) == {"value": 0.5, "threshold": ">= 0.5", "pass": True}
    assert gate("attention_iou", 0.4999)["pass"] is False
    assert gate("class_map_correlation", 0.5)["pass"] is False  # strictly under
    assert gate("class_map_correlation", 0.4999)["pass"] is True
    assert gate("chance_identity", 0.1)["pass"] is True  # at most
    assert gate("chance_identity", 0.1001)["pass"] is False
    assert gate("lora_plain_prompt", 0.19)["threshold"] == "< 0.2"
    # a per-concept gate takes its family's threshold
    assert gate("lora_identity:sks_ball", 0.79) == {"value": 0.79, "threshold": ">= 0.8", "pass": False}
    assert gate("late_identity:bnha_box", 1.2)["pass"] is True
    assert gate("vae_psnr_plain", 31.234567)["value"] == 31.2346  # rounded to 4 places, a plain float
    assert isinstance(gate("vae_psnr_plain", np.float32(30.0))["value"], float)
    assert gate("prompt_following", float("nan"))["pass"] is False  # no figure is no pass
    with pytest.raises(KeyError):
        gate("no_such_gate", 1.0)
    for name, (op, threshold) in THRESHOLDS.items():
        assert op in (">=", "<", "<=") and gate(name, threshold)["pass"] == (op != "<")


def test_background_of_rendered_scenes_is_their_background():
    scenes = [render_scene(s, 64) for s in range(40)] + base_scenes(8, size=256, seed=9)
    scenes += [render_scene(s, 128, background=b) for s, b in enumerate(BACKGROUNDS)]
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    for s in scenes:
        assert background_of(to_tensor(s.image)) == s.background, s.seed


class _Says(nn.Module):
    """A stand-in classifier that labels every window with one label and one colour."""

    def __init__(self, label: str, colour: str):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))
        self.label, self.colour = LABELS.index(label), COLOUR_NAMES.index(colour)

    def both(self, x):
        labels = torch.zeros(len(x), len(LABELS))
        colours = torch.zeros(len(x), len(COLOUR_NAMES))
        labels[:, self.label], colours[:, self.colour] = 10.0, 10.0
        return labels, colours


def test_follows_needs_class_colour_and_background():
    scene = render_scene(3, 64, objects=[("ball", None, "red"), ("box", None, "blue")], background="pink")
    image = to_tensor(scene.image)
    assert follows(_Says("ball", "red"), image, scene) == {"objects": [True, False], "background": True, "all": False}
    # a concept of the class counts as the class
    assert follows(_Says("sks_ball", "red"), image, scene)["objects"] == [True, False]
    assert follows(_Says("box", "blue"), image, scene)["objects"] == [False, True]
    assert follows(_Says("ball", "yellow"), image, scene)["objects"] == [False, False]  # the wrong colour
    one = render_scene(3, 64, objects=[("box", None, "blue")], background="pink")
    assert follows(_Says("bnha_box", "blue"), to_tensor(one.image), one)["all"] is True
    wrong = render_scene(3, 64, objects=[("box", None, "blue")], background="green")
    assert follows(_Says("box", "blue"), to_tensor(wrong.image), one) == {"objects": [True], "background": False,
                                                                          "all": False}


def test_latent_masks_and_iou():
    scene = render_scene(4, 64, n_objects=2, occlusion=True)
    m = latent_masks(scene, 8)
    assert m.shape == (2, 8, 8) and m.dtype == torch.bool
    assert int(m.sum(0).max()) <= 1 and m[1].any()  # majority of a cell: at most one object per cell
    pooled = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(scene.masks).float()[:, None], 8)[:, 0]
    assert torch.equal(m, pooled > 0.5)
    a = torch.zeros(4, 4, dtype=torch.bool)
    b = a.clone()
    a[:2], b[1:3] = True, True
    assert iou(a, b) == pytest.approx(4 / 12) and iou(a, a) == 1.0 and iou(a & ~a, b & ~b) == 0.0


def test_world_main_end_to_end(tiny_world, classifier_cache, tmp_path):
    from bench import world

    weights, _ = tiny_world
    result = world.main(["--weights", str(weights), "--n", "2", "--steps", "2", "--device", "cpu",
                         "--out", str(tmp_path), "--cache", str(classifier_cache)])
    files = glob.glob(str(tmp_path / "world_*.json"))
    assert len(files) == 1
    with open(files[0]) as f:
        saved = json.load(f)
    gates = saved["gates"]
    per_concept = {f"{g}:{c}" for g in ("lora_identity", "lora_plain_prompt", "late_identity") for c in CONCEPTS}
    assert set(gates) == {"vae_psnr_plain", "vae_psnr_concepts", "text_loss_ratio", "prompt_following",
                          "attention_iou", "class_map_correlation", "same_class_split", "chance_identity",
                          *per_concept}
    figures = saved["figures"]
    for name, g in gates.items():
        assert set(g) == {"value", "threshold", "pass"}, name
        assert isinstance(g["value"], float) and math.isfinite(g["value"]), name
        assert isinstance(g["pass"], bool) and g == gate(name, g["value"]), name  # pass agrees with threshold
        if name in figures:
            assert g["value"] == pytest.approx(figures[name], abs=1e-4)
    assert saved["all_pass"] == all(g["pass"] for g in gates.values())
    assert gates["vae_psnr_plain"]["pass"] is False  # four tiny VAE steps are far from 28 dB: the gates can fail
    assert figures["size"] == 64 and figures["n"] == 2 and figures["steps"] == 2
    assert figures["text_loss_ratio"] == pytest.approx(figures["rotated_caption_loss"] / figures["caption_loss"] - 1)
    for name in ("prompt_following", "attention_iou", "same_class_split"):
        assert 0.0 <= figures[name] <= 1.0, name
    assert -1.0 <= figures["class_map_correlation"] <= 1.0
    assert set(figures["concepts"]) == set(CONCEPTS)
    for name, c in figures["concepts"].items():
        assert gates[f"lora_identity:{name}"]["value"] == pytest.approx(c["alone_hit"], abs=1e-4)
        assert c["late_ratio"] == pytest.approx(c["late_mean"] / c["late_own_mean"], rel=1e-6)
        assert 0.0 <= c["chance_mean"] <= 1.0
    chance = max(c["chance_mean"] for c in figures["concepts"].values())
    assert gates["chance_identity"]["value"] == pytest.approx(chance, abs=1e-4)
    assert saved["gates"] == json.loads(json.dumps(result["gates"]))
