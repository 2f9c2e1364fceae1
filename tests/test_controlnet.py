"""Our ControlNet against diffusers' ControlNetModel holding the same weights (converted by diffusers' own
single-file converter from our SGM-layout state dict), the loader on every published layout, and bad files."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from omg import keymap
from omg.checkpoint import plan_checkpoint
from omg.control import Control, ControlStack, check_fits, condition_image
from omg.controlnet import ControlNet, ControlNetConfig, check_controlnet, controlnet_checkpoint, load_controlnet
from omg.errors import CheckpointError, ModelError, OptionError
from omg.tensorfile import MetaSource
from omg.unet import UNet, UNetConfig, timestep_embedding

from test_unet import TIME_EMBED, diffusers_config, randomize

diffusers = pytest.importorskip("diffusers")


def diffusers_controlnet_config(cfg: ControlNetConfig) -> dict:
    out = diffusers_config(cfg.unet)
    for k in ("out_channels", "up_block_types", "sample_size"):
        out.pop(k)
    return dict(out, conditioning_channels=cfg.hint_channels,
                conditioning_embedding_out_channels=cfg.hint_block_channels)


def to_diffusers(ours: ControlNet, config: dict) -> "diffusers.ControlNetModel":
    """diffusers' ControlNetModel with our weights, converted by diffusers' LDM ControlNet converter (which leaves out
    the SDXL vector embedding: label_emb -> add_embedding is copied by hand, as its own key table names it)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    theirs = diffusers.ControlNetModel(**config).eval()
    sd = ours.state_dict()
    converted = convert_controlnet_checkpoint(dict(sd), theirs.config)
    for d, s in (("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")):
        for p in ("weight", "bias"):
            converted[f"{d}.{p}"] = sd[f"{s}.{p}"]
    theirs.load_state_dict(converted, strict=True)
    return theirs


@pytest.fixture(scope="module")
def pair():
    cfg = ControlNetConfig.tiny()
    ours = ControlNet(cfg).eval()
    randomize(ours, seed=3)
    return cfg, ours, to_diffusers(ours, diffusers_controlnet_config(cfg))


def conditioning(cfg: UNetConfig, batch: int, gen: torch.Generator):
    context = torch.randn(batch, 7, cfg.context_dim, generator=gen)
    pooled = torch.randn(batch, cfg.adm_in_channels - 6 * TIME_EMBED, generator=gen)
    time_ids = torch.tensor([[1024, 768, 0, 32, 1024, 768]] * batch, dtype=torch.float32)
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), TIME_EMBED).reshape(batch, -1)], dim=1)
    return context, y, {"text_embeds": pooled, "time_ids": time_ids}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("batch,height,width,t,scale", [(2, 16, 24, 17.0, 1.0), (3, 8, 16, 999.0, 0.55),
                                                        (2, 24, 8, 500.0, 1.3)])
def test_residuals_match_diffusers_controlnet(pair, batch, height, width, t, scale):
    cfg, ours, theirs = pair
    gen = torch.Generator().manual_seed(batch * 10 + height)
    x = torch.randn(batch, 4, height, width, generator=gen)
    timesteps = torch.full((batch,), t) - torch.arange(batch)
    context, y, added = conditioning(cfg.unet, batch, gen)
    image = torch.rand(1, 3, 8 * height, 8 * width, generator=gen)
    with torch.no_grad():
        r = ours(x, timesteps, context, y, ours.encode_hint(image), scale)
        down, mid = theirs(x, timesteps, context, image.expand(batch, -1, -1, -1), conditioning_scale=scale,
                           added_cond_kwargs=added, return_dict=False)
    assert len(r.skips) == len(down) == 9 and r.rows == batch  # 1 + 3 levels x (2 + downsampler) - 1
    for a, b in zip([*r.skips, r.middle], [*down, mid]):
        assert a.shape == b.shape and b.abs().max() > 0.1  # non-trivial residuals
        assert (a - b).abs().max().item() <= 1e-4 and relative_error(a, b) <= 1e-5


def test_unet_with_residuals_matches_diffusers_additional_residuals(pair):
    """The UNet adds the residuals where diffusers' UNet2DConditionModel adds down_block_additional_residuals and
    mid_block_additional_residual; only the first control.rows rows get them."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    cfg, controlnet, _ = pair
    unet = UNet(cfg.unet).eval()
    randomize(unet, seed=4)
    theirs = diffusers.UNet2DConditionModel(**diffusers_config(cfg.unet)).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(
        {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}, theirs.config), strict=True)
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 16, 24, generator=gen), torch.tensor([400.0, 400.0, 399.0])
    context, y, added = conditioning(cfg.unet, 3, gen)
    with torch.no_grad():
        r = controlnet(x, t, context, y, controlnet.encode_hint(torch.rand(1, 3, 128, 192, generator=gen)), 0.8)
        a = unet(x, t, context, y, control=r)
        b = theirs(x, t, context, added_cond_kwargs=added, down_block_additional_residuals=r.skips,
                   mid_block_additional_residual=r.middle).sample
        plain = unet(x, t, context, y)
        first_two = type(r)([s[:2] for s in r.skips], r.middle[:2])
        partial = unet(x, t, context, y, control=first_two)
    assert (a - b).abs().max().item() <= 1e-4 and relative_error(a, b) <= 1e-5
    assert (a - plain).abs().max() > 0.1  # the residuals matter
    assert torch.allclose(partial[:2], a[:2], atol=1e-5) and torch.equal(partial[2:], plain[2:])


def test_several_controlnets_sum_their_residuals(pair):
    """diffusers' MultiControlNetModel: each ControlNet with its own image and scale, residuals summed."""
    cfg, a, theirs_a = pair
    b = ControlNet(cfg).eval()
    randomize(b, seed=9)
    theirs_b = to_diffusers(b, diffusers_controlnet_config(cfg))
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
    multi = MultiControlNetModel([theirs_a, theirs_b])
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 16, generator=gen), torch.tensor([300.0, 300.0])
    context, y, added = conditioning(cfg.unet, 2, gen)
    images = [torch.rand(1, 3, 64, 128, generator=gen) for _ in range(2)]
    with torch.no_grad():
        ours = a(x, t, context, y, a.encode_hint(images[0]), 0.7) + b(x, t, context, y, b.encode_hint(images[1]), 0.4)
        down, mid = multi(x, t, context, [im.expand(2, -1, -1, -1) for im in images], [0.7, 0.4],
                          added_cond_kwargs=added, return_dict=False)
    for p, q in zip([*ours.skips, ours.middle], [*down, mid]):
        assert (p - q).abs().max().item() <= 1e-4


def test_our_names_convert_as_diffusers_converter_does(pair):
    cfg, ours, theirs = pair
    assert set(keymap.controlnet_sgm_to_diffusers(ours.state_dict())) == set(theirs.state_dict())


def _write(layout: str, ours: ControlNet, theirs, folder) -> str:
    """Our weights as a published layout; single files carry the head width and groups as omg's metadata (they
    leave no trace in the shapes; a file without it gets SDXL's)."""
    sgm = {k: v.contiguous() for k, v in ours.state_dict().items()}
    cfg = ours.config.unet
    metadata = {"omg.config": json.dumps({"controlnet": {"head_dim": cfg.head_dim, "norm_groups": cfg.norm_groups}})}
    if layout == "diffusers-folder":
        theirs.save_pretrained(folder / "cn", safe_serialization=True)
        return str(folder / "cn")
    if layout == "diffusers-folder-fp16-variant":
        os.makedirs(folder / "cn16")
        weights = str(folder / "cn16" / "diffusion_pytorch_model.fp16.safetensors")
        save_file({k: v.half() for k, v in keymap.controlnet_sgm_to_diffusers(sgm).items()}, weights)
        (folder / "cn16" / "config.json").write_text(json.dumps(dict(theirs.config)))
        return str(folder / "cn16")
    if layout == "diffusers-file":  # e.g. OpenPoseXL2.safetensors, diffusers_xl_canny_full.safetensors
        save_file(keymap.controlnet_sgm_to_diffusers(sgm), str(folder / "cn.safetensors"), metadata)
        return str(folder / "cn.safetensors")
    prefix = keymap.CONTROLNET_SGM_PREFIX if layout == "sgm-file-prefixed" else ""
    save_file({prefix + k: v for k, v in sgm.items()}, str(folder / "cn_sgm.safetensors"), metadata)
    return str(folder / "cn_sgm.safetensors")


@pytest.mark.parametrize("layout", ["diffusers-folder", "diffusers-folder-fp16-variant", "diffusers-file", "sgm-file",
                                    "sgm-file-prefixed"])
def test_loads_every_published_layout_exactly(pair, tmp_path, layout):
    cfg, ours, theirs = pair
    path = _write(layout, ours, theirs, tmp_path)
    assert check_controlnet(path) == cfg
    loaded = load_controlnet(path, dtype=torch.float32)
    assert loaded.config == cfg
    mine = {k: v.half().float() if "fp16" in layout else v for k, v in ours.state_dict().items()}
    assert set(loaded.state_dict()) == set(mine)
    assert all(torch.equal(v, mine[k]) for k, v in loaded.state_dict().items())


def test_a_file_without_metadata_gets_sdxl_head_width(pair, tmp_path):
    cfg, ours, _ = pair
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    config = check_controlnet(tmp_path / "plain.safetensors")
    assert (config.unet.head_dim, config.unet.norm_groups) == (64, 32)


def test_sdxl_layout_on_meta_gives_the_sdxl_config():
    """diffusers/controlnet-canny-sdxl-1.0's config (as published), built on meta: every key maps and the config
    inferred from the shapes is SDXL's."""
    config = dict(block_out_channels=(320, 640, 1280), down_block_types=(
        "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        conditioning_embedding_out_channels=(16, 32, 96, 256), layers_per_block=2, in_channels=4)
    with torch.device("meta"):
        theirs = diffusers.ControlNetModel(**config)
    source = MetaSource(theirs.state_dict(), "controlnet-canny-sdxl-1.0")
    plan = plan_checkpoint(controlnet_checkpoint(source, source.path, dict(theirs.config)))["controlnet"]
    assert plan.config == ControlNetConfig.sdxl()
    check_fits(plan.config, UNetConfig.sdxl(), "canny")
    n = len(theirs.state_dict())
    with torch.device("meta"):
        assert len(ControlNet(ControlNetConfig.sdxl()).state_dict()) == n


def test_bad_files_get_clear_errors(pair, tmp_path):
    cfg, ours, theirs = pair
    sgm = {k: v.contiguous() for k, v in ours.state_dict().items()}

    def fails(tensors: dict, *expected: str, name: str = "bad.safetensors") -> None:
        path = str(tmp_path / name)
        save_file(tensors, path)
        with pytest.raises(CheckpointError) as e:
            load_controlnet(path)
        assert name in str(e.value) and all(s in str(e.value) for s in expected), str(e.value)

    unet = {"model.diffusion_model." + k: v.contiguous() for k, v in UNet(cfg.unet).state_dict().items()}
    fails(unet, "not a ControlNet", "SDXL/UNet checkpoint", name="sdxl.safetensors")
    fails({"lora_controlnet_input_blocks_1_0.lora_up.weight": torch.zeros(4, 2)}, "control-LoRA", name="cl.safetensors")
    sd15 = {k: v for k, v in sgm.items() if not k.startswith("label_emb.")}
    sd15 = {k: (torch.zeros(v.shape[0], 768) if k.endswith("attn2.to_k.weight") else v) for k, v in sd15.items()}
    fails(sd15, "not an SDXL ControlNet", "label_emb.0.0.weight", "SD 1.x", name="sd15.safetensors")
    fails({k: v for k, v in sgm.items() if k != "zero_convs.3.0.weight"}, "missing keys", "zero_convs.3.0.weight")
    wrong = dict(sgm, **{"middle_block_out.0.weight": torch.zeros(64, 64, 3, 3)})
    fails(wrong, "wrong shapes", "middle_block_out.0.weight", "[64, 64, 3, 3]", "expected [64, 64, 1, 1]")
    diff = keymap.controlnet_sgm_to_diffusers(sgm)
    fails(dict(diff, **{"controlnet_down_blocks.99.weight": torch.zeros(1)}), "unexpected keys",
          "controlnet_down_blocks.99.weight", name="extra.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_controlnet(tmp_path / "absent.safetensors")


def test_a_controlnet_for_another_unet_is_rejected(pair):
    cfg, ours, _ = pair
    other = UNetConfig.tiny()
    import dataclasses
    with pytest.raises(ModelError, match="context_dim 48 .the UNet's: 64."):
        check_fits(cfg, dataclasses.replace(other, context_dim=64), "control 0")


def test_control_specs_parse_and_check():
    c = Control.parse("pose.png@/models/openpose-sdxl:0.8")
    assert (c.image, c.model, c.scale, c.canny) == ("pose.png", "/models/openpose-sdxl", 0.8, False)
    c = Control.parse("canny=photo.jpg@C:/models/canny.safetensors")  # a colon in the path is no scale
    assert (c.image, c.model, c.scale, c.canny) == ("photo.jpg", "C:/models/canny.safetensors", 1.0, True)
    assert Control.parse({"image": "a.png", "model": "m", "scale": 0.5, "end": 0.5}).end == 0.5
    for bad in ("pose.png", "@model", {"image": "a.png"}, {"image": "a", "model": "m", "typo": 1}):
        with pytest.raises(OptionError):
            Control.parse(bad)
    with pytest.raises(OptionError, match="start and end"):
        Control("a.png", "m", start=0.5, end=0.5)


def test_steps_where_each_controlnet_acts_follow_diffusers():
    """diffusers' control_guidance_start/end: keep = not (i / n < start or (i + 1) / n > end)."""
    cn = ControlNet(ControlNetConfig.tiny()).eval()
    stack = ControlStack([type("P", (), dict(model=cn, features=None, scale=1.0, start=s, end=e))()
                          for s, e in ((0.0, 1.0), (0.2, 1.0), (0.0, 0.6))], steps=10)
    expected = [[1.0 - float(i / 10 < s or (i + 1) / 10 > e) for s, e in ((0.0, 1.0), (0.2, 1.0), (0.0, 0.6))]
                for i in range(10)]
    assert [[float(j in stack.active(i)) for j in range(3)] for i in range(10)] == expected


def test_condition_image_is_resized_and_scaled_like_diffusers(tmp_path):
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(40, 56, 3, generator=gen) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "pose.png")
    ours = condition_image(str(tmp_path / "pose.png"), 64, 96)
    theirs = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False).preprocess(
        Image.fromarray(pixels), height=64, width=96)
    assert ours.shape == theirs.shape == (1, 3, 64, 96)
    assert (ours - theirs).abs().max().item() <= 1e-6
