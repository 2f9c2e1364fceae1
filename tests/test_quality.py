"""bench/identity.py and bench/quality.py on tiny shapes (CPU): ground-truth window labels, the classifier and its
cache, masks and layout metrics, bootstrap intervals, aggregation and the claim on hand-made records, and one
end-to-end run on the session's tiny demo world (tests/conftest.py)."""
import glob
import json
import os

import numpy as np
import pytest
import torch

from bench.identity import (BACKGROUND, COLOUR_NAMES, CROP, LABELS, NO_COLOUR, ClassifierConfig, IdentityNet,
                            candidate_windows, crop_window, grid_windows, labelled_windows, load_or_train, predict,
                            scene_labels, score_concepts, to_tensor, train_classifier, training_boxes, vae_digest,
                            window_label, window_object)
from bench.quality import (METHODS, REFERENCES, SPLITS, Renderer, _bootstrap, background_for, claim, markdown_table,
                           masks_touch, outside_psnr, parse_pair, prompts, split_records, summarize)
from demo.scenes import BACKGROUNDS, CONCEPTS, render_scene
from demo.world import concept_prompt

PAIR = ("sks_ball", "ohwx_ball")


@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    return train_classifier(ClassifierConfig.tiny(), vae=None, log=lambda *a: None)


# --------------------------------------------------------------------------------------------- windows

def _two_objects():
    masks = np.zeros((2, 64, 64), bool)
    masks[0, 10:20, 10:20] = True  # 100 px
    masks[1, 40:60, 40:60] = True  # 400 px
    return masks


def test_window_object_and_label_follow_the_visible_masks():
    masks = _two_objects()
    labels = [LABELS.index("sks_ball"), LABELS.index("box")]
    cases = [((8, 8, 24, 24), 0),  # all of object 0, 39 % of the window
             ((36, 36, 64, 64), 1),
             ((8, 8, 62, 62), 1),  # object 0 fills too little of it; object 1 (14 %) does
             ((24, 0, 40, 16), -1),  # touches nothing: background
             ((15, 0, 31, 16), None),  # 30 % of object 0: a cut object, ambiguous
             ((0, 0, 200, 200), None)]  # both objects too small a share of the window, yet inside
    for box, expected in cases:
        assert window_object(masks, box) == expected, box
        label = None if expected is None else BACKGROUND if expected < 0 else labels[expected]
        assert window_label(masks, labels, box) == label, box
    # an object hidden entirely (no visible pixel) is never what a window shows
    masks[0] = False
    assert window_object(masks, (8, 8, 24, 24)) == -1


def test_labelled_windows_label_every_training_box():
    scenes = [render_scene(s, 64, objects=[("ball", "sks_ball"), ("box", None)], occlusion=s % 2 == 0)
              for s in range(4)]
    images = torch.stack([to_tensor(s.image) for s in scenes])
    crops, labels, colours = labelled_windows(scenes, images, np.random.default_rng(3))
    rng = np.random.default_rng(3)  # the same boxes again
    i, ambiguous = 0, 0
    for scene, image in zip(scenes, images):
        for box in training_boxes(scene, rng):
            obj = window_object(scene.masks, box)
            ambiguous += obj is None
            if obj is None or obj < 0:  # a cut object counts as background, with no colour
                assert labels[i] == BACKGROUND and colours[i] == NO_COLOUR
            else:
                assert labels[i] == scene_labels(scene)[obj]
                assert COLOUR_NAMES[colours[i]] == scene.objects[obj].colour
            assert torch.equal(crops[i], crop_window(image, box))
            i += 1
    assert i == len(crops) == len(labels) == len(colours) and crops.shape[1:] == (3, CROP, CROP)
    assert ambiguous > 0  # windows cutting objects are sampled on purpose
    assert {int(x) for x in labels} >= {BACKGROUND, LABELS.index("sks_ball"), LABELS.index("box")}


def test_grid_windows_cover_the_image_and_match_crop_window():
    image = torch.rand(3, 64, 64) * 2 - 1
    crops, boxes = grid_windows(image)
    assert crops.shape == (len(boxes), 3, CROP, CROP)
    assert {(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes} == set(candidate_windows(64))
    assert all(0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 for x0, y0, x1, y1 in boxes)
    assert min(b[0] for b in boxes) == 0 and max(b[2] for b in boxes) == 64  # flush with both edges
    assert min(b[1] for b in boxes) == 0 and max(b[3] for b in boxes) == 64
    for i in (0, len(boxes) // 3, len(boxes) // 2, len(boxes) - 1):
        assert (crop_window(image, boxes[i]) - crops[i]).abs().max() <= 1e-6
    covered = np.zeros((64, 64), bool)  # the smallest windows alone tile the image
    w = min(candidate_windows(64))[0]
    for x0, y0, x1, y1 in boxes:
        if x1 - x0 == w:
            covered[y0:y1, x0:x1] = True
    assert covered.all()


# --------------------------------------------------------------------------------------------- classifier

def test_classifier_learns_the_ground_truth(tiny_classifier):
    net, report = tiny_classifier
    test = report["test"]
    chance = 1 / (len(LABELS) - 1)  # an object window: one of the object labels
    assert test["objects_raw"]["accuracy"] > 3 * chance, test["objects_raw"]
    assert test["windows_raw"]["accuracy"] > 0.45, test["windows_raw"]
    assert "windows_vae" not in test  # no VAE given: raw images only
    assert report["train_windows"] == sum(report["train_windows_per_label"].values())


def test_classifier_colour_head_beats_chance(tiny_classifier):
    net, report = tiny_classifier
    assert report["test"]["windows_raw_colour_accuracy"] > 3 / len(COLOUR_NAMES), report["test"]
    # on one object window per colour, the colour head reads the object's colour more often than not
    scenes = [render_scene(100 + i, 64, objects=[("box", None, c)], background="grey") for i, c in
              enumerate(COLOUR_NAMES)]
    crops = torch.stack([crop_window(to_tensor(s.image), (0, 0, 64, 64)) for s in scenes])
    labels, colours = predict(net, crops, colours=True)
    assert labels.shape == (len(scenes), len(LABELS)) and colours.shape == (len(scenes), len(COLOUR_NAMES))
    torch.testing.assert_close(colours.sum(-1), torch.ones(len(scenes)))
    assert (colours.argmax(-1) == torch.arange(len(COLOUR_NAMES))).float().mean() > 0.5


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_scores_find_a_rendered_concept(tiny_classifier, name):
    net, _ = tiny_classifier
    spec = CONCEPTS[name]
    other = ("box", None, "purple") if spec.class_name == "ball" else ("cone", None, "orange")
    hits, misses = [], []
    for seed in range(6):
        concept = render_scene(20_000 + seed, 64, objects=[(spec.class_name, name)], scale=0.45)
        elsewhere = render_scene(20_000 + seed, 64, objects=[other], scale=0.45)
        hit = score_concepts(net, concept.image, [name])[name]
        miss = score_concepts(net, elsewhere.image, [name])[name]
        for s in (hit, miss):
            assert 0.0 <= s["identity"] <= s["presence_score"] <= 1.0 + 1e-4
            assert s["presence"] == (s["presence_score"] >= 0.5)
            assert len(s["identity_box"]) == len(s["presence_box"]) == 4
        hits.append(hit["identity"])
        misses.append(miss["identity"])
    assert np.mean(hits) > 0.5 > np.mean(misses) + 0.3, (hits, misses)


def test_scores_tell_a_concept_from_its_plain_class(tiny_classifier):
    """The identity is the pattern: a yellow ball with black dots against a plain yellow ball. (At 64 px the
    dots show at every object scale; sks_ball's 16 px stripes often miss a small ball entirely.)"""
    net, _ = tiny_classifier
    hits, misses = [], []
    for seed in range(6):
        concept = render_scene(20_000 + seed, 64, objects=[("ball", "ohwx_ball")], scale=0.45)
        plain = render_scene(20_000 + seed, 64, objects=[("ball", None, "yellow")], scale=0.45)
        hits.append(score_concepts(net, concept.image, ["ohwx_ball"])["ohwx_ball"]["identity"])
        misses.append(score_concepts(net, plain.image, ["ohwx_ball"])["ohwx_ball"]["identity"])
    # paired: every concept image above its plain twin, and clearly on average (the marks are low-contrast by
    # design, demo.scenes.MARK_MIX, which the tiny 64 px classifier sees less sharply than the real one)
    assert all(h > m for h, m in zip(hits, misses)) and np.mean(hits) > np.mean(misses) + 0.15, (hits, misses)


def test_load_or_train_caches_by_the_vae(tmp_path):
    import omg
    from demo.train import demo_configs

    model = omg.SDXL.random(*demo_configs(tiny=True), seed=0, size_embed_dim=16)
    cfg = ClassifierConfig(size=64, train_scenes=4, test_scenes=2, epochs=1, width=4, batch=32)
    said = []
    net, report = load_or_train(cfg, model.vae, str(tmp_path), said.append)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and report["cache_key"] in files[0] and "windows_vae" in report["test"]
    again, cached = load_or_train(cfg, model.vae, str(tmp_path), said.append)
    assert any("cached" in line for line in said) and cached == json.loads(json.dumps(report))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    digest = vae_digest(model.vae)
    weight = next(model.vae.parameters())
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)
        assert vae_digest(model.vae) != digest  # another VAE: another cache entry
        weight.copy_(kept)
        next(model.unet.parameters()).add_(1.0)
    assert vae_digest(model.vae) == digest  # the UNet beside it does not matter


# --------------------------------------------------------------------------------------------- masks and layout

def test_masks_touch():
    m = torch.zeros(2, 8, 8)
    m[0, :, :3] = 1
    m[1, :, 3:] = 1
    assert masks_touch(m)  # adjacent
    m[1] = 0
    m[1, :, 4:] = 1
    assert masks_touch(m)  # one empty latent column between them: each grown by one, they overlap
    m[1] = 0
    m[1, :, 5:] = 1
    assert not masks_touch(m)  # two empty columns
    assert masks_touch(m, grow=2)
    m[1] = 0
    assert not masks_touch(m)  # one concept not found
    m[1, 0, 0] = 0.4
    assert not masks_touch(m)  # soft values under one half are no mask


def test_outside_psnr():
    from PIL import Image

    base = np.full((64, 64, 3), 100, np.uint8)
    masks = torch.zeros(2, 8, 8)
    masks[0, 2:4, 2:4] = 1  # grown by one latent pixel: image pixels 8-40 are "inside"
    ref = Image.fromarray(base)
    assert outside_psnr(ref, ref, masks) == pytest.approx(100.0)  # identical (mse clamped at 1e-10)
    inside = base.copy()
    inside[8:40, 8:40] = 250
    assert outside_psnr(Image.fromarray(inside), ref, masks) == pytest.approx(100.0)  # changes inside only
    outside = base.copy()
    outside[48:, :] += 10  # 16 of 64 rows, all outside, by 10 levels
    keep = 64 * 64 - 32 * 32
    expected = 10 * np.log10(255 ** 2 / (10 ** 2 * 16 * 64 / keep))
    assert outside_psnr(Image.fromarray(outside), ref, masks) == pytest.approx(expected, abs=1e-3)
    everything = torch.ones(1, 8, 8)
    assert outside_psnr(Image.fromarray(outside), ref, everything) is None


# --------------------------------------------------------------------------------------------- aggregation

def test_bootstrap_intervals_contain_the_mean_and_narrow_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 80, 320):
        values = rng.random(n)
        lo, hi = _bootstrap(values, np.mean)
        assert lo <= values.mean() <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[0] > 2.5 * widths[2]  # about 1 / sqrt(n): four times as narrow for 16 times the seeds
    values = rng.random(50)
    assert _bootstrap(values, np.mean) == _bootstrap(values, np.mean)  # seeded
    assert _bootstrap(np.full(30, 0.25), np.mean) == [0.25, 0.25]
    assert all(np.isnan(_bootstrap(np.array([]), np.mean)))


def _scores(identity, presence=True):
    return {"identity": identity, "presence": presence, "presence_score": max(identity, 0.6 if presence else 0.1)}


def _record(seed, occluded, methods, pair=PAIR, psnr=30.0, shifts=(1.0, 2.0)):
    """methods: {method: (identity of concept 0, identity of concept 1[, presence of 0, presence of 1])}."""
    out = {}
    for m, v in methods.items():
        present = v[2:] if len(v) > 2 else (True, True)
        out[m] = {c: _scores(i, p) for c, i, p in zip(pair, v[:2], present)}
    return {"pair": "+".join(pair), "seed": seed, "occluded": occluded, "methods": out,
            "layout": {"outside_psnr": psnr, "position_shift_px": list(shifts)}}


def _records():
    return [
        _record(0, True, {"omg": (0.8, 0.6), "alone": (0.9, 0.8), "simultaneous": (0.3, 0.2), "base": (0.1, 0.1)}),
        _record(1, False, {"omg": (0.2, 0.4, True, False), "alone": (0.7, 0.9), "simultaneous": (0.1, 0.6),
                           "base": (0.0, 0.2)}, psnr=None, shifts=(5.0, 7.0)),
        _record(2, True, {"omg": (0.6, 0.3), "alone": (0.9, 0.45), "simultaneous": (0.5, 0.1), "base": (0.2, 0.0)},
                psnr=20.0, shifts=(0.0, 3.0)),
    ]


def test_summarize_means_rates_and_splits():
    records = _records()
    s = summarize(records, list(METHODS + REFERENCES))
    assert list(s) == ["sks_ball+ohwx_ball"]
    table = s["sks_ball+ohwx_ball"]
    assert set(table) == {"omg", "alone", "simultaneous", "base", "layout"}  # methods without records left out
    assert set(table["omg"]) == set(SPLITS)
    omg = table["omg"]
    assert omg["all"]["n"] == 3 and omg["occluded"]["n"] == 2 and omg["separate"]["n"] == 1
    mean, (lo, hi) = omg["all"]["identity:sks_ball"]
    assert mean == pytest.approx((0.8 + 0.2 + 0.6) / 3, abs=1e-4) and lo <= mean <= hi
    assert omg["occluded"]["identity:ohwx_ball"][0] == pytest.approx(0.45)
    assert omg["occluded"]["hit:sks_ball"][0] == 1.0 and omg["all"]["hit:ohwx_ball"][0] == pytest.approx(1 / 3,
                                                                                                         abs=1e-4)
    assert omg["all"]["both_hit"][0] == pytest.approx(1 / 3, abs=1e-4)  # seed 0 only
    assert omg["all"]["present:ohwx_ball"][0] == pytest.approx(2 / 3, abs=1e-4)
    assert omg["all"]["both_present"][0] == pytest.approx(2 / 3, abs=1e-4)
    assert omg["separate"]["both_present"] == [0.0, [0.0, 0.0]]
    alone = table["alone"]
    assert alone["separate"]["identity:sks_ball"][0] == pytest.approx(0.7)
    assert alone["all"]["hit:ohwx_ball"][0] == pytest.approx(2 / 3, abs=1e-4)
    assert "both_hit" not in alone["all"] and "both_present" not in alone["all"]  # two images, not one
    layout = table["layout"]
    assert layout["outside_psnr_db"] == pytest.approx(25.0)  # the seed without outside pixels is left out
    assert layout["position_shift_px_median"] == pytest.approx(2.5)  # median of 1, 2, 5, 7, 0, 3
    assert layout["occluded_share"] == pytest.approx(2 / 3, abs=1e-3)
    assert [r["seed"] for r in split_records(records, "occluded")] == [0, 2]
    assert [r["seed"] for r in split_records(records, "separate")] == [1]
    text = markdown_table(s)
    assert "| omg | occluded | 2 |" in text and "| alone | separate | 1 |" in text
    assert "**sks_ball+ohwx_ball**" in text


def test_claim_ratios_differences_and_holds():
    records = _records()
    c = claim(records)
    omg_ids = [0.8, 0.6, 0.2, 0.4, 0.6, 0.3]
    alone_ids = [0.9, 0.8, 0.7, 0.9, 0.9, 0.45]
    assert c["n_images"] == 3
    assert c["omg_identity"] == pytest.approx(np.mean(omg_ids), abs=1e-4)
    assert c["alone_identity"] == pytest.approx(np.mean(alone_ids), abs=1e-4)
    ratio, (lo, hi) = c["omg_over_alone"]
    assert ratio == pytest.approx(np.mean(omg_ids) / np.mean(alone_ids), abs=1e-4) and lo <= ratio <= hi
    sim = [0.3, 0.2, 0.1, 0.6, 0.5, 0.1]
    assert c["omg_minus_simultaneous"][0] == pytest.approx(np.mean(omg_ids) - np.mean(sim), abs=1e-4)
    assert c["omg_minus_base"][0] == pytest.approx(np.mean(omg_ids) - np.mean([0.1, 0.1, 0, 0.2, 0.2, 0]), abs=1e-4)
    assert "omg_minus_regional" not in c and "omg_minus_no_replay" not in c  # not measured
    assert c["omg_both_present"][0] == pytest.approx(2 / 3, abs=1e-4)
    occluded, separate = np.mean([0.8, 0.6, 0.6, 0.3]), np.mean([0.2, 0.4])
    assert c["omg_occluded_over_separate"][0] == pytest.approx(occluded / separate, abs=1e-4)
    assert c["holds"] is False
    assert claim([{k: v for k, v in r.items()} | {"methods": {"omg": r["methods"]["omg"]}} for r in records]) == {}


def _winning_records(n=12):
    out = []
    for seed in range(n):
        jitter = 0.01 * (seed % 3)
        out.append(_record(seed, seed % 2 == 0, {"omg": (0.85 + jitter, 0.8), "alone": (0.9, 0.85 + jitter),
                                                 "simultaneous": (0.3, 0.2 + jitter), "regional": (0.5, 0.4 + jitter),
                                                 "no_replay": (0.7, 0.7), "base": (0.05, 0.05)}))
    return out


def test_claim_holds_only_when_every_part_holds():
    records = _winning_records()
    c = claim(records)
    assert c["omg_over_alone"][0] >= 0.9 and c["omg_minus_simultaneous"][1][0] > 0
    assert c["omg_minus_regional"][1][0] > 0 and c["omg_both_present"][0] == 1.0
    assert c["holds"] is True
    # OMG no better than one baseline: the claim fails
    tied = [r | {"methods": r["methods"] | {"regional": r["methods"]["omg"]}} for r in records]
    assert claim(tied)["omg_minus_regional"][0] == 0.0 and claim(tied)["holds"] is False
    # one concept missing in one image of twelve: both_present 0.92 < 0.95
    lost = [r if r["seed"] else _record(0, True, {**{m: (v["sks_ball"]["identity"], v["ohwx_ball"]["identity"])
                                                     for m, v in r["methods"].items()},
                                                  "omg": (0.85, 0.8, True, False)}) for r in records]
    assert claim(lost)["omg_both_present"][0] == pytest.approx(11 / 12, abs=1e-4) and claim(lost)["holds"] is False
    # OMG's identity well under the concepts' own: the ratio fails
    weak = [r | {"methods": r["methods"] | {"omg": {c: _scores(0.6) for c in PAIR}}} for r in records]
    assert claim(weak)["omg_over_alone"][0] < 0.9 and claim(weak)["holds"] is False
    # without the baselines there is nothing to beat: no claim
    bare = [r | {"methods": {m: r["methods"][m] for m in ("omg", "alone")}} for r in records]
    assert claim(bare)["holds"] is False


def test_pairs_prompts_and_backgrounds():
    assert parse_pair("sks_ball+bnha_box") == ("sks_ball", "bnha_box")
    for bad in ("sks_ball", "sks_ball+sks_ball", "sks_ball+zwx_box", "sks_ball+ohwx_ball+bnha_box"):
        with pytest.raises(ValueError):
            parse_pair(bad)
    assert [background_for(s) for s in range(2 * len(BACKGROUNDS))] == list(BACKGROUNDS) * 2
    p = prompts(PAIR, "grey")
    assert p["global"] == "a red ball and a yellow ball on a grey background"
    assert p["concepts"] == [concept_prompt(c, "grey") for c in PAIR]
    assert p["joint"] == "a sks ball and an ohwx ball on a grey background"
    p = prompts(("bnha_box", "sks_ball"), "sand")
    assert p["global"] == "a blue box and a red ball on a sand background"
    assert p["concepts"][0].startswith(f"a {CONCEPTS['bnha_box'].phrase} ")


# --------------------------------------------------------------------------------------------- end to end

def test_renderer_restores_the_model_and_renders_ground_truth(tiny_world, classifier_cache):
    from bench.world import load_world
    from omg.lora import load_lora

    weights, summary = tiny_world
    model, net, report, size = load_world(str(weights), "cpu", str(classifier_cache), log=lambda *a: None)
    assert size == 64 and isinstance(net, IdentityNet)
    loras = {c: load_lora(summary["loras"][c]) for c in PAIR}
    renderer = Renderer(model, loras, steps=2, size=64)
    assert renderer.blend_steps == 1 and renderer.settings["steps"] == 2
    before = {k: v.clone() for k, v in {**model.unet.state_dict(), **model.text.state_dict()}.items()}
    images = renderer.merged("a sks ball and an ohwx ball on a green background", PAIR, [0, 1])
    assert len(images) == 2 and images[0].size == (64, 64)
    after = {**model.unet.state_dict(), **model.text.state_dict()}
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # LoRAs merged and restored exactly
    gt, plain = renderer.ground_truth(PAIR, [0, 1], plain=False), renderer.ground_truth(PAIR, [0, 1], plain=True)
    assert len(gt) == 2 and gt[0].shape == (3, 64, 64) and float(gt[0].abs().max()) <= 1.0
    assert not torch.equal(gt[0], plain[0])  # the same layout, with and without the patterns


def test_quality_main_end_to_end(tiny_world, classifier_cache, tmp_path):
    from bench import quality

    weights, _ = tiny_world
    result = quality.main(["--weights", str(weights), "--seeds", "2", "--steps", "2", "--pairs", "sks_ball+ohwx_ball",
                           "--device", "cpu", "--out", str(tmp_path), "--cache", str(classifier_cache),
                           "--strips", str(tmp_path / "strips")])
    # one strip, named in letters, digits and '_' (the device tool and some file systems refuse '+')
    assert os.listdir(tmp_path / "strips") == ["quality_sks_ball_ohwx_ball.png"]
    files = glob.glob(str(tmp_path / "quality_*.json"))
    assert len(files) == 1
    with open(files[0]) as f:
        saved = json.load(f)
    assert {"claim", "summary", "records", "settings", "classifier_test"} <= saved.keys()
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert saved["settings"]["steps"] == 2 and saved["pairs"] == ["sks_ball+ohwx_ball"]
    records = saved["records"]
    assert [r["seed"] for r in records] == [0, 1]
    for r in records:
        assert r["pair"] == "sks_ball+ohwx_ball" and r["background"] == background_for(r["seed"])
        assert r["prompts"] == prompts(PAIR, r["background"])
        assert set(r["methods"]) == set(METHODS + REFERENCES)  # every method and reference
        for method, scores in r["methods"].items():
            assert set(scores) == set(PAIR), method
            for s in scores.values():
                assert 0.0 <= s["identity"] <= s["presence_score"] <= 1.0 + 1e-3
        assert isinstance(r["occluded"], bool) and len(r["mask_area"]) == 2
        assert len(r["layout"]["position_shift_px"]) == 2
    table = saved["summary"]["sks_ball+ohwx_ball"]
    assert set(METHODS + REFERENCES) <= set(table)
    occluded = sum(r["occluded"] for r in records)
    assert table["omg"]["all"]["n"] == 2 and table["omg"]["occluded"]["n"] == occluded
    c = saved["claim"]
    assert c["n_images"] == 2 and isinstance(c["holds"], bool)
    omg_ids = [r["methods"]["omg"][k]["identity"] for r in records for k in PAIR]
    assert c["omg_identity"] == pytest.approx(np.mean(omg_ids), abs=1e-4)
    assert {"omg_minus_simultaneous", "omg_minus_regional", "omg_minus_no_replay", "omg_minus_base"} <= c.keys()


def test_fast_modes_compare_the_crop_mode_with_omg_on_the_same_seeds():
    from bench.quality import fast_modes

    def record(seed, omg_ids, crop_ids, psnr):
        pair = ("sks_ball", "bnha_box")
        methods = {m: {c: {"identity": v} for c, v in zip(pair, ids)} for m, ids in (("omg", omg_ids),
                                                                                   ("omg_crop", crop_ids))}
        return {"pair": "+".join(pair), "seed": seed, "methods": methods,
                "layout": {"crop_outside_psnr_vs_omg": psnr}}

    records = [record(0, (0.9, 0.8), (0.8, 0.8), 40.0), record(1, (1.0, 0.6), (1.0, 0.5), None),
               record(2, (0.7, 0.7), (0.7, 0.7), 50.0)]
    out = fast_modes(records)
    assert out["n_images"] == 3
    mean, (lo, hi) = out["omg_crop_minus_omg_identity"]
    assert mean == pytest.approx(-0.2 / 6, abs=1e-4) and lo <= mean <= hi <= 0
    assert out["omg_crop_outside_psnr_vs_omg_db"]["mean"] == 45.0  # records without outside pixels are left out
    assert out["omg_crop_outside_psnr_vs_omg_db"]["min"] == 40.0
    assert fast_modes([{k: v for k, v in r.items()} | {"methods": {"omg": r["methods"]["omg"]}} for r in records]) == {}


def test_fast_modes_compare_the_fp8_mode_with_omg_on_the_same_seeds():
    from bench.quality import FAST_MODE_OPTIONS, fast_modes

    assert FAST_MODE_OPTIONS["omg_fp8"] == {"fp8": True}
    pair = ("sks_ball", "bnha_box")
    records = [{"pair": "+".join(pair), "seed": s,
                "methods": {m: {c: {"identity": v} for c, v in zip(pair, ids)} for m, ids in (("omg", (0.9, 0.8)),
                                                                                            ("omg_fp8", fp8_ids))},
                "layout": {"fp8_psnr_vs_omg": psnr, "fp8_outside_psnr_vs_omg": psnr + 2}}
               for s, fp8_ids, psnr in ((0, (0.9, 0.7), 30.0), (1, (0.8, 0.8), 40.0))]
    out = fast_modes(records)
    assert "n_images" not in out and out["omg_fp8_n_images"] == 2  # no crop records: no crop keys
    assert out["omg_fp8_minus_omg_identity"][0] == pytest.approx(-0.05, abs=1e-4)
    assert out["omg_fp8_psnr_vs_omg_db"]["mean"] == 35.0 and out["omg_fp8_outside_psnr_vs_omg_db"]["min"] == 32.0
