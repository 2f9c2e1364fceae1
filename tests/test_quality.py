"""bench/quality.py and bench/identity.py on tiny shapes (CPU): GT labels, the classifier, aggregation, the
replay=False ablation of omg.generate, and one end-to-end seed with a random tiny model."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import omg
from bench.common import gpu_slug
from bench.identity import (BACKGROUND, LABELS, ClassifierConfig, IdentityNet, candidate_windows, crop_window,
                            grid_windows, score_concepts, train_classifier, window_label)
from bench.quality import (METHODS, REFERENCES, QualityBench, aggregate, markdown_table, mask_contact, masks_touch,
                           pack_mask, prompts, run)
from demo.scenes import render_scene
from omg.model import SDXL
from omg.vae import VAEConfig


@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    return train_classifier(ClassifierConfig.tiny(), vae=None, log=lambda *a: None)


@pytest.fixture(scope="module")
def model():
    return SDXL.random(vae_config=VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), norm_groups=8), seed=5)


def test_window_label_follows_the_visible_masks():
    masks = np.zeros((2, 64, 64), bool)
    masks[0, 10:20, 10:20] = True  # 100 px
    masks[1, 40:60, 40:60] = True  # 400 px
    labels = [LABELS.index("sks_ball"), LABELS.index("box")]
    assert window_label(masks, labels, (8, 8, 24, 24)) == labels[0]  # all of object 0, 39 % of the window
    assert window_label(masks, labels, (36, 36, 64, 64)) == labels[1]
    assert window_label(masks, labels, (8, 8, 62, 62)) == labels[1]  # object 0 too small a share of it
    assert window_label(masks, labels, (24, 0, 40, 16)) == BACKGROUND  # touches nothing
    assert window_label(masks, labels, (15, 0, 31, 16)) is None  # half of object 0: ambiguous
    assert window_label(masks, labels, (0, 0, 200, 200)) is None  # objects too small a share of the window


def test_grid_windows_cover_the_image_and_match_crop_window():
    image = torch.rand(3, 64, 64) * 2 - 1
    crops, boxes = grid_windows(image)
    assert crops.shape == (len(boxes), 3, 32, 32)
    assert {(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes} == set(candidate_windows(64))
    assert max(b[2] for b in boxes) == 64 and max(b[3] for b in boxes) == 64  # windows flush with the far edges
    for i in (0, len(boxes) // 2, len(boxes) - 1):
        assert (crop_window(image, boxes[i]) - crops[i]).abs().max() <= 1e-6


def test_classifier_learns_the_ground_truth(tiny_classifier):
    net, report = tiny_classifier
    test = report["test"]
    chance = 1 / (len(LABELS) - 1)
    assert test["objects_raw"]["accuracy"] > 3 * chance, test["objects_raw"]
    assert test["windows_raw"]["accuracy"] > 0.5, test["windows_raw"]
    # a rendered concept scores high for its identity, a plain member of its class low
    concept = render_scene(12345, 64, objects=[("ball", "sks_ball")])
    plain = render_scene(12345, 64, objects=[("ball", None)])
    hit = score_concepts(net, concept.image, ["sks_ball"])["sks_ball"]
    miss = score_concepts(net, plain.image, ["sks_ball"])["sks_ball"]
    assert hit["identity"] > 0.5 > miss["identity"], (hit, miss)
    assert hit["presence"] and miss["presence"]  # a ball either way


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
    m[1] = 0
    assert not masks_touch(m)  # one concept not found


def test_mask_contact_and_packing():
    m = torch.zeros(2, 8, 8)
    m[0, :, :2] = 1  # 16 px
    m[1, :4, 2:] = 1  # 24 px, beside the upper half of the first
    # grown by one: columns 1-2 of rows 0-4 of each meet -> 10 px, over the smaller mask's 16
    assert mask_contact(m) == pytest.approx(10 / 16)
    assert mask_contact(torch.stack([m[0], torch.zeros(8, 8)])) == 0.0
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(pack_mask(m[1])), np.uint8))[:64].reshape(8, 8)
    assert np.array_equal(bits.astype(bool), m[1].numpy() > 0.5)


def _record(seed, occluded, gt_occluded, omg_ids, alone_id, contact=0.3):
    def s(identity, presence=True):
        return {"identity": identity, "presence": presence}
    return {"pair": "sks_ball+zwx_box", "seed": seed, "occluded": occluded, "gt_occluded": gt_occluded,
            "contact": contact if occluded else 0.0,
            "methods": {"omg": {"scores": {"sks_ball": s(omg_ids[0]), "zwx_box": s(omg_ids[1], omg_ids[1] > 0.1)}},
                        "alone": {"scores": {"sks_ball": s(alone_id), "zwx_box": s(0.1)}},
                        "gt": {"scores": {"sks_ball": s(0.9), "zwx_box": s(0.8)}}}}


def test_aggregate_means_rates_and_splits():
    records = [_record(0, True, False, (0.8, 0.6), 0.4), _record(1, False, True, (0.2, 0.05), 0.7),
               _record(2, True, True, (0.6, 0.3), 0.9, contact=0.05)]
    s = aggregate(records)["sks_ball+zwx_box"]
    assert s["omg"]["all"]["n"] == 3
    assert s["omg"]["all"]["sks_ball"]["identity"] == pytest.approx((0.8 + 0.2 + 0.6) / 3, abs=1e-4)
    assert s["omg"]["occluded"]["n"] == 2 and s["omg"]["separate"]["n"] == 1
    assert s["omg"]["occluded"]["zwx_box"]["identity"] == pytest.approx(0.45)
    assert s["omg"]["occluded"]["sks_ball"]["identity_hit"] == 1.0
    assert s["omg"]["all"]["both_identity"] == pytest.approx(1 / 3, abs=1e-4)  # seed 0 only
    assert s["omg"]["all"]["both_present"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["alone"]["separate"]["sks_ball"]["identity"] == pytest.approx(0.7)
    assert s["alone"]["all"]["zwx_box"]["n"] == 3 and s["alone"]["all"]["zwx_box"]["identity_hit"] == 0.0
    assert "both_identity" not in s["alone"]["all"]  # its two concepts come from two images
    assert s["gt"]["occluded"]["n"] == 2  # the ground truth's own occlusion (seeds 1, 2)
    assert "| omg | occluded | 2 |" in markdown_table(aggregate(records))
    strict = aggregate(records, contact=0.1)["sks_ball+zwx_box"]  # seed 2 touches too little
    assert strict["omg"]["occluded"]["n"] == 1 and strict["omg"]["separate"]["n"] == 2
    assert strict["gt"]["occluded"]["n"] == 2  # the ground truth's split does not move


def test_prompts():
    p = prompts(("sks_ball", "zwx_box"), "grey")
    assert p["global"] == "a ball and a box on a grey background"
    assert p["concepts"] == ["a sks ball", "a zwx box"]
    assert p["joint"] == "a sks ball and a zwx box on a grey background"
    assert p["alone"] == ["a sks ball on a grey background", "a zwx box on a grey background"]


def _run(model, concepts=(), **kw):
    args = dict(steps=4, blend_steps=2, height=64, width=64, seed=3, progress=False)
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return omg.generate(model, "a ball and a box on a green background", list(concepts), **args)


def test_generate_replay_off(model):
    plain = _run(model, replay=False)
    assert torch.equal(plain.latent, plain.stage1_latent)  # no concept, plain base pass: stage 1 exactly
    left = [omg.Concept("ball", "a sks ball", mask=(0, 0, 32, 64))]  # the left half (latent columns 0-3)
    on, off = _run(model, left, blend_steps=3), _run(model, left, blend_steps=3, replay=False)
    assert torch.equal(on.masks, off.masks) and torch.equal(on.stage1_latent, off.stage1_latent)
    assert on.unet_evaluations - off.unet_evaluations == 3  # recompute's base pass runs at batch 3, plain at 2
    diff = (on.latent - off.latent).abs()
    # the base pass (used outside the mask) changes; inside, the concept's pass decides either way
    assert diff[..., 4:].max() > 10 * diff[..., :4].max() and diff.max() > 1e-5
    full = [omg.Concept("ball", "a sks ball", mask=(0, 0, 64, 64))]
    assert (_run(model, full).latent - _run(model, full, replay=False).latent).abs().max() <= 1e-5


def _kohya_lora(model, path, seed, rank=2):
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.unet.named_modules():
        if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
            key = ("lora_unet_" + name).replace(".", "_")
            sd[key + ".lora_down.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.3
            sd[key + ".lora_up.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.3
            sd[key + ".alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))
    return str(path)


def test_one_seed_end_to_end(model, tmp_path):
    loras = {c: omg.lora.load_lora(_kohya_lora(model, tmp_path / f"{c}.safetensors", i))
             for i, c in enumerate(("sks_ball", "zwx_box"))}
    torch.manual_seed(0)
    net = IdentityNet(4).eval()  # untrained: the machinery, not the numbers
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    bench = QualityBench(model, loras, net, steps=2, blend_steps=1, size=64)
    payload = run(bench, [("sks_ball", "zwx_box")], [0], str(tmp_path), {"cache_key": "t"},
                  image_dir=str(tmp_path / "img"), n_images=1, log=lambda *a: None)
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in before.items())  # LoRAs restored exactly
    record = payload["records"][0]
    assert set(record["methods"]) == set(METHODS + REFERENCES)
    assert record["masks"]["shape"] == [8, 8] and len(record["masks"]["bits"]) == 2
    assert set(record["methods"]["alone"]["scores"]) == {"sks_ball", "zwx_box"}
    for m in record["methods"].values():
        for s in m["scores"].values():
            assert 0.0 <= s["identity"] <= s["presence_score"] <= 1.0 + 1e-6
    summary = payload["summary"]["sks_ball+zwx_box"]
    split = "occluded" if record["occluded"] else "separate"
    assert summary["omg"][split]["n"] == 1 and summary["omg"]["all"]["n"] == 1
    with open(tmp_path / f"quality_{gpu_slug()}.json") as f:
        assert json.load(f)["summary"] == payload["summary"]
    assert os.path.exists(tmp_path / "img" / "sks_ball+zwx_box_0000.png")
    # a rerun resumes: the seed is in the jsonl, nothing is generated again
    bench.run_seed = None
    again = run(bench, [("sks_ball", "zwx_box")], [0], str(tmp_path), {"cache_key": "t"}, log=lambda *a: None)
    assert len(again["records"]) == 1
    with open(tmp_path / f"quality_{gpu_slug()}.jsonl") as f:
        assert len(f.readlines()) == 1
