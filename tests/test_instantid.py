"""InstantID concepts in OMG on a small random SDXL (CPU, fp32): IdentityNet against diffusers' ControlNetModel
attending to the face tokens, the keypoint drawing against InstantID's convention, the method's invariants with face
concepts, and bad inputs rejected before sampling."""
import sys
import warnings

import numpy as np
import pytest
import torch

import omg
from omg import faces as facelib
from omg import ip_adapter as ipa
from omg.controlnet import load_controlnet
from omg.errors import CheckpointError, OptionError
from omg.sampling import NoiseSchedule, apply_guidance, run_sampler

from test_control_omg import random_controlnet
from test_controlnet import diffusers_controlnet_config, to_diffusers
from test_ip_adapter import random_adapter
from test_pipeline import kohya_lora, tiny_model

H, W = 64, 96
STEPS, BLEND = 5, 3
PROMPT = "a man and a woman in a park"
SIZE_EMBED = 4


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def parts(model, tmp_path_factory):
    """(adapter file, IdentityNet diffusers folder, adapter, IdentityNet) on random weights."""
    folder = tmp_path_factory.mktemp("instantid")
    cfg = model.unet.config
    adapter = random_adapter(3, cfg, ipa.ResamplerConfig(dim=128, heads=2, output_dim=cfg.context_dim))
    torch.save(ipa.adapter_state_dicts(adapter), folder / "ip-adapter.bin")
    net = random_controlnet(model, 21)
    theirs = to_diffusers(net, dict(diffusers_controlnet_config(net.config), addition_time_embed_dim=SIZE_EMBED))
    theirs.save_pretrained(folder / "ControlNetModel")
    return folder / "ip-adapter.bin", folder / "ControlNetModel", adapter, net, theirs


def face_file(path, seed, keypoints=True):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    tensors = {"embedding": torch.randn(512, generator=g) * 4}
    if keypoints:
        tensors["keypoints"] = torch.tensor([[30., 40.], [60., 41.], [45., 58.], [33., 75.], [58., 74.]])
    save_file(tensors, str(path))
    return str(path)


def run(model, parts, concepts=(), **kw):
    args = dict(steps=STEPS, blend_steps=BLEND, height=H, width=W, seed=3, progress=False,
                face_adapter=str(parts[0]), identitynet=str(parts[1]))
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return omg.generate(model, PROMPT, list(concepts), **args)


def test_identitynet_residuals_match_diffusers_controlnet_on_face_tokens(model, parts):
    _, folder, adapter, _, theirs = parts
    ours = load_controlnet(folder, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, H // 8, W // 8, generator=g)
    t = torch.tensor([700.0, 700.0])
    tokens = adapter.cfg_tokens(torch.randn(512, generator=g) * 4)
    pooled = torch.randn(2, model.unet.config.adm_in_channels - 6 * SIZE_EMBED, generator=g)
    time_ids = torch.tensor([[H, W, 0, 0, H, W]] * 2, dtype=torch.float32)
    from omg.unet import timestep_embedding
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), SIZE_EMBED).reshape(2, -1)], dim=1)
    kps = facelib.keypoint_tensor(facelib.draw_keypoints(np.array([[30, 20], [60, 20], [45, 35], [33, 48], [58, 48]]),
                                                         (W, H)))
    with torch.no_grad():
        r = ours(x, t, tokens, y, ours.encode_hint(kps), 0.8)
        down, mid = theirs(x, t, encoder_hidden_states=tokens, controlnet_cond=kps.expand(2, -1, -1, -1),
                           conditioning_scale=0.8, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                           return_dict=False)
    errors = [(a - b).abs().max().item() for a, b in zip(r.skips + [r.middle], list(down) + [mid])]
    assert max(errors) <= 1e-4, errors
    assert r.middle.abs().max() > 1e-3


def test_keypoint_drawing_follows_instantids_convention():
    kps = np.array([[40, 50], [80, 50], [60, 70], [45, 90], [75, 90]], np.float32)
    im = np.asarray(facelib.draw_keypoints(kps, (128, 112)))
    assert im.shape == (112, 128, 3) and im.dtype == np.uint8
    for (x, y), color in zip(kps.astype(int), facelib.COLORS):  # discs of radius 10 in the keypoint's colour
        assert tuple(im[y, x]) == color and tuple(im[y, x + 10]) == color and tuple(im[y + 7, x + 7]) == color
        assert tuple(im[y, x + 12]) != color
    # limbs: eye/mouth corner -> nose, the first keypoint's colour at 60 % (int(255 * 0.6) = 153), 2 * 4 px thick
    assert tuple(im[60, 50]) == (153, 0, 0) and tuple(im[60, 70]) == (0, 153, 0)
    assert tuple(im[80, 52]) == (153, 153, 0) and tuple(im[80, 67]) == (153, 0, 153)
    column = (im[:, 50] == (153, 0, 0)).all(-1)
    assert 6 <= column.sum() <= 14  # the red limb crossed at 45 degrees: thickness 2 * 4 / cos(45) ~ 11 px
    assert im[0:30].sum() == 0 and im[:, :25].sum() == 0  # black elsewhere
    two = np.asarray(facelib.draw_keypoints(np.stack([kps, kps + [0, 0]]), (128, 112)))
    assert np.array_equal(two, im)  # a face drawn twice is not dimmed (the original's draw_kps_multi would)


def test_keypoints_follow_the_concepts_mask():
    mask = torch.zeros(64, 96)
    mask[10:60, 50:80] = 1
    kps = facelib.concept_keypoints(facelib.CANONICAL_KEYPOINTS * 100, mask, (192, 128))
    cx, cy = kps.mean(axis=0)
    assert 100 < cx < 160 and 20 < cy < 80  # inside the mask's top, in output pixels (scale 2)
    assert facelib.concept_keypoints(facelib.CANONICAL_KEYPOINTS, torch.zeros(8, 8), (64, 64)) is None


def test_zero_blend_steps_is_stage1_with_instantid_concepts(model, parts, tmp_path):
    concepts = [omg.Concept("man", "a photo of a man", face=face_file(tmp_path / "a.safetensors", 1))]
    r = run(model, parts, concepts, blend_steps=0)
    assert torch.equal(r.latent, r.stage1_latent)
    plain = run(model, parts, (), blend_steps=0)
    assert torch.equal(plain.stage1_latent, r.stage1_latent)  # the adapter adds nothing to the base model


def _instantid_trajectory(model, parts, r, face, prompt, kps_mask):
    """The concept's own InstantID sampling from the blend start: the base UNet with the face tokens in every attn2
    and IdentityNet on the keypoint image, built from the public pieces."""
    _, folder, adapter, _, _ = parts
    net = load_controlnet(folder, dtype=torch.float32)
    ctx, y = model.conditioning([prompt], [omg.pipeline.DEFAULT_NEGATIVE], H, W)
    tokens = adapter.cfg_tokens(face.embedding)
    kps = facelib.concept_keypoints(face.keypoints, kps_mask, (W, H))
    hint = net.encode_hint(facelib.keypoint_tensor(facelib.draw_keypoints(kps, (W, H))))
    schedule = NoiseSchedule.sdxl()
    with adapter.installed(model.unet):
        def eps_fn(x, t):
            x2, t2 = torch.cat([x, x]), torch.cat([t, t])
            residuals = net(x2, t2, tokens, y, hint, 0.8)
            with adapter.tokens(tokens, 0.8):
                u, c = model.unet(x2, t2, ctx, y, control=residuals).chunk(2)
            return apply_guidance(u, c, 7.5)
        return run_sampler(eps_fn, r.blend_start_latent, schedule.sampling_sigmas(STEPS, "leading", to_zero=False),
                           "ddim", start=STEPS - BLEND, disable=True)


@pytest.mark.parametrize("lora_mode", ["grouped", "merged"])
def test_a_face_concept_over_the_whole_image_is_its_own_instantid_sample(model, parts, tmp_path, lora_mode):
    path = face_file(tmp_path / "a.safetensors", 1)
    concept = omg.Concept("man", "a photo of a man", face=path, mask=(0, 0, W, H))
    r = run(model, parts, [concept], lora_mode=lora_mode, keep_stage2=True)
    whole = torch.ones(H // 8, W // 8)
    own = _instantid_trajectory(model, parts, r, facelib.load_face(path), concept.prompt, whole)
    error = (r.latent - own).abs().max().item()
    assert error <= 1e-5, error
    other = _instantid_trajectory(model, parts, r, facelib.load_face(face_file(tmp_path / "b.safetensors", 2)),
                                  concept.prompt, whole)
    assert (r.latent - other).abs().max().item() > 1e-3  # the face matters


def test_lora_and_instantid_concepts_mix_with_one_keypoint_image_each(model, parts, tmp_path):
    lora = kohya_lora(model, tmp_path / "l.safetensors", seed=1)
    concepts = [omg.Concept("man", "a photo of sks man", lora=lora, mask=(0, 0, 40, 64)),
                omg.Concept("woman", "a photo of a woman", face=face_file(tmp_path / "w.safetensors", 3),
                            mask=(48, 0, 96, 64))]
    r = run(model, parts, concepts, keep_stage2=True)
    faces = r.stage2.faces
    assert faces.concepts == [1]
    drawn = np.asarray(faces.keypoint_images[1][0])
    assert drawn[:, :48].sum() == 0 and drawn[:, 48:].sum() > 0  # the woman's keypoints in her region only
    assert r.stage2.passes[0].concepts == (0,) and r.stage2.passes[-1].concepts == (1,)
    plain_woman = concepts[:1] + [omg.Concept("woman", "a photo of a woman", mask=(48, 0, 96, 64))]
    # one blending step: the man's region is his LoRA's prediction on the same latent either way, the woman's not
    one, without = (run(model, parts, c, blend_steps=1) for c in (concepts, plain_woman))
    delta = (one.latent - without.latent).abs()
    assert delta[..., :5].max() <= 1e-5 and delta[..., 6:].max() > 1e-3, (delta[..., :5].max(), delta[..., 6:].max())


def test_bad_face_inputs_are_rejected_before_sampling(model, parts, tmp_path, monkeypatch):
    np.save(tmp_path / "short.npy", np.zeros(256, np.float32) + 1)
    with pytest.raises(facelib.FaceError, match="512 values"):
        run(model, parts, [omg.Concept("man", "a man", face=str(tmp_path / "short.npy"))])
    from PIL import Image
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    with pytest.raises(facelib.FaceError, match="needs face_models"):
        run(model, parts, [omg.Concept("man", "a man", face=str(tmp_path / "photo.png"))])
    (tmp_path / "models" / "antelopev2").mkdir(parents=True)
    (tmp_path / "models" / "antelopev2" / "scrfd_10g_bnkps.onnx").write_bytes(b"")
    # as without insightface, which the test extra installs (tests/test_faces_insightface.py runs it)
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(facelib.FaceError, match="needs insightface and onnxruntime"):
        run(model, parts, [omg.Concept("man", "a man", face=str(tmp_path / "photo.png"))],
            face_models=str(tmp_path / "models" / "antelopev2"))
    for found, message in (([], "no face found"), ([{"bbox": np.zeros(4), "kps": np.zeros((5, 2)),
                                                     "embedding": np.ones(512)}] * 2, "2 faces found")):
        monkeypatch.setattr(facelib, "detect_faces", lambda image, models, found=found: found)
        with pytest.raises(facelib.FaceError, match=message):
            facelib.load_face(str(tmp_path / "photo.png"), "models")
    face = face_file(tmp_path / "a.safetensors", 1)
    with pytest.raises(OptionError, match="need face_adapter"):
        run(model, parts, [omg.Concept("man", "a man", face=face)], face_adapter=None)
    with pytest.raises(OptionError, match="a LoRA or an InstantID face"):
        run(model, parts, [omg.Concept("man", "a man", face=face, lora=face)])
    from dataclasses import replace
    sd15 = replace(model.unet.config, context_dim=24)
    other = random_adapter(0, sd15, ipa.ResamplerConfig(dim=128, heads=2, output_dim=24))
    torch.save(ipa.adapter_state_dicts(other), tmp_path / "sd15.bin")
    with pytest.raises(CheckpointError, match="another base"):
        run(model, parts, [omg.Concept("man", "a man", face=face)], face_adapter=str(tmp_path / "sd15.bin"))


def test_a_detected_face_gives_its_embedding_and_keypoints(tmp_path, monkeypatch):
    from PIL import Image
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.jpg")
    kps = np.arange(10, dtype=np.float32).reshape(5, 2)
    monkeypatch.setattr(facelib, "detect_faces", lambda image, models: [
        {"bbox": np.zeros(4), "kps": kps, "embedding": np.full(512, 2.0, np.float32)}])
    face = facelib.load_face(str(tmp_path / "photo.jpg"), "models")
    assert torch.equal(face.embedding, torch.full((512,), 2.0)) and np.array_equal(face.keypoints, kps)


def test_instantid_preset_has_the_originals_defaults():
    o = omg.OMGOptions.instantid()
    assert (o.guidance, o.identitynet_scale, o.ip_adapter_scale, o.sampler, o.blend_steps) == (3.0, 0.8, 0.8,
                                                                                               "euler", 34)


def test_the_instantid_bench_runs_at_a_tiny_size(tmp_path):
    from bench import instantid as bench_instantid
    out = bench_instantid.main(["--tiny", "--out", str(tmp_path)])
    assert [r["kinds"] for r in out["rows"]] == [["lora", "lora"], ["face", "face"], ["lora", "face"]]
    assert (tmp_path / "instantid_tiny_cpu.json").exists() and "stage2_added_s" in out["summary"]


def test_concept_flag_and_spec_take_a_face(tmp_path):
    from omg.cli import parse_concept
    assert parse_concept("woman: a photo of a woman @ face=w.safetensors") == {
        "class_name": "woman", "face": "w.safetensors", "prompt": "a photo of a woman"}
    from omg.spec import CONCEPT_KEYS, PATH_KEYS
    assert "face" in CONCEPT_KEYS and {"face_adapter", "identitynet", "face_models"} <= set(PATH_KEYS)
