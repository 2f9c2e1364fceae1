"""Cropped concept passes (concept_crop): boxes, and stage 2 against the exact path on a tiny random SDXL.

With one blending step (DDIM: the update is per pixel) the latent outside the masks is the base pass's, so it
must equal the exact path's; inside, the concept's eps comes from its crop and differs. Grouped and merged
concept weights are two implementations of the same cropped passes and must agree.
"""
import warnings

import pytest
import torch

import omg
from omg.crop import CropBox, concept_boxes
from test_pipeline import H, PROMPT, W, kohya_lora, model  # noqa: F401 (fixture)

LATENT = (H // 8, W // 8)  # 8 x 12
MAN_BOX, WOMAN_BOX = (0, 0, 32, 64), (64, 0, 96, 64)  # pixels (x0, y0, x1, y1): latent columns 0-3 and 8-11


def test_boxes_are_the_union_of_supports_widened_and_clamped():
    masks = torch.zeros(2, 2, 16, 20)
    masks[0, 0, 5:7, 9:10] = 0.3  # soft mask: any non-zero value is support
    masks[1, 0, 6:9, 2:4] = 1.0
    masks[1, 1, 1:2, 1:2] = 1.0  # concept 1 is not present in image 1: its mask there does not count
    boxes = concept_boxes(masks, [[0, 1], [0]], margin=1, multiple=4)
    assert boxes[0] == CropBox(4, 12, 0, 12)  # rows 5-8 -> 4..10 -> 4..12; cols 2-9 -> 1..11 -> 0..12
    assert boxes[1] is None  # no support where present
    assert concept_boxes(masks, [[0], [0]], margin=30, multiple=4)[0].covers((16, 20))


def test_crop_and_paste_put_the_crop_back_in_place():
    box = CropBox(2, 6, 4, 8)
    x = torch.randn(3, 4, 10, 12)
    pasted = box.paste(box.crop(x), (10, 12))
    assert torch.equal(box.crop(pasted), box.crop(x))
    outside = torch.ones(10, 12, dtype=torch.bool)
    outside[2:6, 4:8] = False
    assert (pasted[..., outside] == 0).all()


def run(model, concepts, **kw):
    args = dict(steps=4, blend_steps=1, height=H, width=W, seed=3, progress=False, store="outputs",
                store_dtype=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return omg.generate(model, PROMPT, concepts, **{**args, **kw})


@pytest.fixture(scope="module")
def concepts(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("crop_loras")
    loras = [kohya_lora(model, folder / f"{i}.safetensors", seed=i) for i in range(2)]
    return [omg.Concept("man", "a photo of sks man", lora=loras[0], mask=MAN_BOX),
            omg.Concept("woman", "a photo of xyz woman", lora=loras[1], mask=WOMAN_BOX)]


def latent_sizes(model):
    """The latent sizes the UNet is called with, recorded by a forward pre-hook."""
    sizes: list[tuple[int, int]] = []
    handle = model.unet.register_forward_pre_hook(lambda module, args: sizes.append(tuple(args[0].shape[-2:])))
    return sizes, handle


@pytest.mark.parametrize("lora_mode", ["grouped", "merged"])
def test_a_margin_over_the_whole_image_is_the_exact_path(model, concepts, lora_mode):
    exact = run(model, concepts, lora_mode=lora_mode, blend_steps=2)
    covered = run(model, concepts, lora_mode=lora_mode, blend_steps=2, concept_crop=True, crop_margin=12)
    assert torch.equal(covered.latent, exact.latent)


@pytest.mark.parametrize("lora_mode", ["grouped", "merged"])
def test_crops_change_only_the_inside_of_the_masks(model, concepts, lora_mode):
    exact = run(model, concepts, lora_mode=lora_mode)
    sizes, handle = latent_sizes(model)
    try:
        cropped = run(model, concepts, lora_mode=lora_mode, concept_crop=True, crop_margin=0)
    finally:
        handle.remove()
    assert (8, 4) in sizes and LATENT in sizes  # the concepts ran on their boxes, the base on the whole latent
    inside = cropped.masks.sum(0) > 0
    outside_err = (cropped.latent - exact.latent)[..., ~inside].abs().max().item()
    # merged: the same calls as the exact path outside; grouped: the exact path's one call rounds its GEMMs
    # differently from the crop mode's separate calls (float rounding only)
    assert outside_err <= (0.0 if lora_mode == "merged" else 1e-4), outside_err
    assert (cropped.latent - exact.latent)[..., inside].abs().max().item() > 1e-3  # the crop has less context
    assert torch.isfinite(cropped.latent).all()


def test_grouped_and_merged_crops_agree_and_a_batch_equals_its_singles(model, concepts):
    grouped = run(model, concepts, lora_mode="grouped", concept_crop=True, crop_margin=0, blend_steps=2)
    merged = run(model, concepts, lora_mode="merged", concept_crop=True, crop_margin=0, blend_steps=2)
    torch.testing.assert_close(grouped.latent, merged.latent, rtol=0, atol=1e-4)
    batch = run(model, concepts, concept_crop=True, crop_margin=4, seeds=[3, 11], blend_steps=2)
    singles = [run(model, concepts, concept_crop=True, crop_margin=4, seed=s, blend_steps=2) for s in (3, 11)]
    for b, s in zip(batch, singles):  # user boxes: every image has the same crops as its single call
        torch.testing.assert_close(b.latent, s.latent, rtol=0, atol=1e-4)


def test_crop_refuses_controlnets_on_the_concept_passes():
    from omg.errors import OptionError
    from omg.stage2 import BlendedEps
    with pytest.raises(OptionError, match="control_concepts"):
        BlendedEps._crop_boxes(torch.nn.Linear(1, 1), torch.ones(1, 1, 4, 4), 0, True, [[0]])
