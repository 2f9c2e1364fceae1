"""Several seeds in one call (num_images / seeds): one batch through stage 1 and stage 2, each image as its own
single call would render it."""
import json
import warnings

import numpy as np
import torch
from PIL import Image

import omg
from omg import cli
from omg.masks import ConceptMasks
from omg.txt2img import sample, sample_latents
from test_pipeline import BLEND, H, PROMPT, STEPS, W, kohya_lora, model  # noqa: F401 (fixture)

SEEDS = [3, 11, 4]


def run(model, concepts, **kw):
    args = dict(steps=STEPS, blend_steps=BLEND, height=H, width=W, seed=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return omg.generate(model, PROMPT, concepts, **{**args, **kw})


def assert_same_image(batched, single, atol=1e-4):
    """Within float rounding of a batched UNet call on the CPU (fp32: the GEMMs of another batch size round
    differently, about 3e-5 here, as in test_txt2img), the masks exactly."""
    assert batched.seed == single.seed
    for name in ("latent", "stage1_latent", "blend_start_latent"):
        torch.testing.assert_close(getattr(batched, name), getattr(single, name), rtol=0, atol=atol)
    assert torch.equal(batched.masks, single.masks) and batched.concept_masks.found == single.concept_masks.found
    torch.testing.assert_close(batched.heatmaps, single.heatmaps, rtol=0, atol=1e-5)
    pixels = [np.asarray(im, np.int16) for im in (batched.image, single.image)]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1


def test_a_batch_of_seeds_equals_one_call_per_seed(model, tmp_path):
    loras = [kohya_lora(model, tmp_path / f"{i}.safetensors", seed=i) for i in range(2)]
    concepts = [omg.Concept("man", "a photo of sks man", lora=loras[0]),  # attention masks: each image its own
                omg.Concept("woman", "a photo of xyz woman", lora=loras[1], mask=(48, 0, 96, 64))]
    for options in (dict(), dict(sampler="euler_ancestral", lora_mode="merged", store="outputs", store_dtype=None)):
        batch = run(model, concepts, seeds=SEEDS, **options)
        assert isinstance(batch, list) and [r.seed for r in batch] == SEEDS
        singles = [run(model, concepts, seed=s, **options) for s in SEEDS]
        for b, s in zip(batch, singles):
            assert_same_image(b, s)
        # each image's share of the batch's work: every concept found in some image runs over the whole batch
        found_anywhere = sum(any(r.concept_masks.found[i] for r in batch) for i in range(len(concepts)))
        assert all(r.store == "outputs" for r in batch)  # set, or what store="auto" chose here
        base_rows = 2  # with stage 1's outputs kept, no stage-1 row rides along
        assert all(r.unet_evaluations == 2 * STEPS + (base_rows + 2 * found_anywhere) * BLEND for r in batch)
        assert not torch.allclose(batch[0].latent, batch[1].latent)  # each image its own noise
    consecutive = run(model, concepts, seed=11, num_images=2)
    assert [r.seed for r in consecutive] == [11, 12]


def test_a_concept_missing_in_one_image_gets_a_zero_mask_there(model, monkeypatch):
    """The woman is not found in the second image: that image blends the man alone, as its single call does."""
    import omg.pipeline as pipeline
    make_masks = pipeline.make_masks
    state = {"image": 0, "lose_woman_in": set()}

    def dropping(names, *args, **kwargs):  # make_masks runs once per image, in batch order
        masks = make_masks(names, *args, **kwargs)
        if state["image"] in state["lose_woman_in"]:
            found = [n != "woman" and f for n, f in zip(masks.names, masks.found)]
            masks = ConceptMasks(masks.masks * torch.tensor(found)[:, None, None], masks.scores, masks.heatmaps,
                                 masks.names, found, masks.sources)
        state["image"] += 1
        return masks

    def render(lose_woman_in, **kw):
        state.update(image=0, lose_woman_in=lose_woman_in)
        return run(model, concepts, **kw)

    monkeypatch.setattr(pipeline, "make_masks", dropping)
    concepts = [omg.Concept("man", "a photo of sks man", mask=(0, 0, 40, 64)),
                omg.Concept("woman", "a photo of xyz woman", mask=(48, 0, 96, 64))]
    batch = render({1}, seeds=[3, 11])
    assert batch[0].concept_masks.found == [True, True] and batch[1].concept_masks.found == [True, False]
    assert not batch[1].masks[1].any()
    alone = render({0}, seed=11)
    assert alone.concept_masks.found == [True, False]
    assert_same_image(batch[1], alone)
    assert_same_image(batch[0], render(set(), seed=3))


def test_sample_renders_num_images_or_seeds_as_one_batch(model):
    kw = dict(steps=3, height=H, width=W, progress=False)
    batch = sample_latents(model, "a cat", seeds=[5, 9], **kw)
    for i, seed in enumerate((5, 9)):
        torch.testing.assert_close(batch[i:i + 1], sample_latents(model, "a cat", seed=seed, **kw), rtol=0, atol=1e-4)
    torch.testing.assert_close(sample_latents(model, "a cat", seed=5, num_images=2, **kw)[1:],
                               sample_latents(model, "a cat", seed=6, **kw), rtol=0, atol=1e-4)
    assert len(sample(model, "a cat", num_images=3, **kw)) == 3


def test_cli_seeds_write_one_file_set_per_image(tmp_path):
    out = tmp_path / "o.png"
    args = ["generate", "--prompt", PROMPT, "--concept", "man: a photo of sks man", "--steps", "3",
            "--blend-steps", "2", "--height", "64", "--width", "96", "--out", str(out), "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(args + ["--seeds", "7", "8", "9"]) == 0
    for stem, seed in (("o", 7), ("o_1", 8), ("o_2", 9)):
        assert (tmp_path / f"{stem}.png").exists() and (tmp_path / f"{stem}_stage1.png").exists()
        assert json.loads(Image.open(tmp_path / f"{stem}.png").text["omg"])["seed"] == seed
