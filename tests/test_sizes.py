"""Image sizes: one rule for omg.sample and omg.generate (positive multiples of the VAE's 8), and every such size
works with concepts, non-square and odd latent sizes included (the attention grids follow the UNet's halving)."""
import warnings

import pytest
import torch

import omg
from omg.attention import level_grids
from omg.errors import OptionError
from omg.txt2img import sample
from test_pipeline import PROMPT, model  # noqa: F401 (fixture)

# latents 6x10, 5x5, 7x9 (odd), 9x4, 125x125; the tiny UNet halves twice: 3x5/2x3, 3x3/2x2, 4x5/2x3, 5x2/3x1, ...
SIZES = [(48, 80), (40, 40), (56, 72), (72, 32), (1000, 1000)]


def test_level_grids_are_the_unets_own():
    from omg.unet import UNet, UNetConfig
    unet = UNet(UNetConfig.tiny()).eval()
    for h, w in [(6, 10), (5, 5), (7, 9), (125, 125), (1, 3)]:
        seen = []
        hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
                 for m in unet.attention_layers().values()]
        with torch.no_grad():
            unet(torch.zeros(1, 4, h, w), torch.zeros(1), torch.zeros(1, 3, unet.config.context_dim),
                 torch.zeros(1, unet.config.adm_in_channels))
        for hook in hooks:
            hook.remove()
        grids = level_grids((h, w))
        assert set(seen) <= set(grids)
        for n in set(seen):
            assert grids[n][0] * grids[n][1] == n


@pytest.mark.parametrize("height,width", SIZES)
def test_sizes_off_multiples_of_32_work_with_concepts(model, height, width):
    concepts = [omg.Concept("man", "a photo of sks man"), omg.Concept("woman", "a photo of xyz woman")]
    steps = 1 if height * width > 10 ** 5 else 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = omg.generate(model, PROMPT, concepts, steps=steps, blend_steps=1, height=height, width=width, seed=1,
                         progress=False)
    latent = (height // 8, width // 8)
    assert r.image.size == (width, height) and r.latent.shape[-2:] == latent
    assert r.masks.shape == (2, *latent) and r.heatmaps.shape == (2, *latent)
    assert torch.isfinite(r.latent).all()
    if height * width <= 10 ** 5:
        images = sample(model, PROMPT, steps=2, height=height, width=width, progress=False)
        assert images[0].size == (width, height)


def test_sample_and_generate_share_one_size_rule(model):
    for height, width in [(60, 64), (64, 0), (-8, 64)]:
        with pytest.raises(OptionError, match="multiples of 8") as from_generate:
            omg.generate(model, PROMPT, steps=2, blend_steps=1, height=height, width=width, progress=False)
        with pytest.raises(OptionError, match="multiples of 8") as from_sample:
            sample(model, PROMPT, steps=2, height=height, width=width, progress=False)
        assert str(from_generate.value) == str(from_sample.value)
