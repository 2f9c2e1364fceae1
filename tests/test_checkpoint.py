"""Checkpoint loading: the full SDXL layout on meta, round trips through every layout, and bad input."""
import json
import math
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DATA
from omg import checkpoint as C
from omg import keymap
from omg.errors import CheckpointError
from omg.model import SDXL, load_sdxl, save_sgm
from omg.text import SDXLTextEncoder, TextEncoderConfig
from omg.unet import UNet, UNetConfig
from omg.vae import AutoencoderKL, VAEConfig

SDXL_UNET_PARAMS = 2_567_463_684


def manifest() -> dict[str, list[int]]:
    with open(os.path.join(DATA, "sdxl_keys.json")) as f:
        return json.load(f)


def meta_tensors(shapes, dtype=torch.float16):
    return {k: torch.empty(v, dtype=dtype, device="meta") for k, v in shapes.items()}


# ---------------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def tiny() -> SDXL:
    return SDXL.random(seed=3)


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
    save_sgm(tiny, path)
    return path


def hintless() -> SDXL:
    """Tiny, but with SDXL's values for everything shapes cannot tell (heads of 64, 32 groups): loads from any file."""
    l_cfg = TextEncoderConfig(width=64, layers=2, heads=1, mlp_width=128)
    g_cfg = TextEncoderConfig(width=64, layers=2, heads=1, mlp_width=128, act="gelu", projection_dim=48)
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 1), transformer_depth_middle=1,
                      head_dim=64, norm_groups=32)
    return SDXL.random(unet_config=unet, vae_config=VAEConfig(ch=32, ch_mult=(1, 2), norm_groups=32),
                       text_configs=(l_cfg, g_cfg), seed=5)


def assert_same_weights(a: SDXL, b: SDXL, dtype=None):
    sa, sb = a.sgm_state_dict(), b.sgm_state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        want = sa[k] if dtype is None else sa[k].to(dtype)
        assert sb[k].dtype == want.dtype and torch.equal(sb[k], want), k


def write_diffusers(model: SDXL, folder: str, shard_unet: bool = False, bare_clip_l: bool = False) -> None:
    """A diffusers folder made with the keymap in reverse, config.json files carrying what shapes cannot tell."""
    cfg = model.unet.config
    unet = keymap.unet_to_diffusers(model.unet.state_dict())
    os.makedirs(f"{folder}/unet")
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    with open(f"{folder}/unet/config.json", "w") as f:
        json.dump({"block_out_channels": channels, "attention_head_dim": [c // cfg.head_dim for c in channels],
                   "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth],
                   "norm_num_groups": cfg.norm_groups}, f)
    if shard_unet:
        keys = sorted(unet)
        halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for name, part in halves.items():
            save_file({k: unet[k].contiguous() for k in part}, f"{folder}/unet/{name}")
        with open(f"{folder}/unet/diffusion_pytorch_model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {}, "weight_map": {k: n for n, part in halves.items() for k in part}}, f)
    else:
        save_file({k: t.contiguous() for k, t in unet.items()}, f"{folder}/unet/diffusion_pytorch_model.safetensors")
    if model.vae is not None:
        os.makedirs(f"{folder}/vae")
        save_file({k: t.contiguous() for k, t in keymap.vae_to_diffusers(model.vae.state_dict()).items()},
                  f"{folder}/vae/diffusion_pytorch_model.safetensors")
        with open(f"{folder}/vae/config.json", "w") as f:
            json.dump({"norm_num_groups": model.vae.config.norm_groups,
                       "scaling_factor": model.vae.config.scaling_factor}, f)
    if model.text is not None:
        clip_l = {k: t for k, t in model.text.clip_l.state_dict().items()}
        if bare_clip_l:  # transformers 5 saves CLIPTextModel without the text_model. head
            clip_l = {k[len("text_model."):]: t for k, t in clip_l.items()}
        clip_g = keymap.clip_g_to_hf(model.text.clip_g.state_dict())
        encoders = (("text_encoder", clip_l, model.text.clip_l), ("text_encoder_2", clip_g, model.text.clip_g))
        for sub, sd, enc in encoders:
            os.makedirs(f"{folder}/{sub}")
            save_file({k: t.contiguous() for k, t in sd.items()}, f"{folder}/{sub}/model.safetensors")
            with open(f"{folder}/{sub}/config.json", "w") as f:
                json.dump({"num_attention_heads": enc.config.heads, "hidden_act": enc.config.act}, f)


def rewrite_header(src: str, dst: str, edit) -> None:
    """Copy a safetensors file with its JSON header edited by edit(header_dict) (data region unchanged)."""
    with open(src, "rb") as f:
        blob = f.read()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dst, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + blob[8 + n:])


def expect_error(path, *names):
    """load_sdxl raises one CheckpointError naming the file and each of names; nothing is returned."""
    result = None
    with pytest.raises(CheckpointError) as info:
        result = load_sdxl(path, dtype=torch.float32)
    assert result is None
    message = str(info.value)
    assert os.fspath(path) in message, message
    for name in names:
        assert name in message, (name, message)
    return message


# ------------------------------------------------------------------------------------- full SDXL layout on meta

def test_sdxl_modules_on_meta_have_exactly_the_manifest_keys_and_shapes():
    with torch.device("meta"):
        model = SDXL(UNet(UNetConfig.sdxl()), AutoencoderKL(VAEConfig.sdxl()), SDXLTextEncoder.sdxl())
    ours = {k: list(t.shape) for k, t in model.sgm_state_dict().items()}
    assert ours == manifest()
    assert sum(p.numel() for p in model.unet.parameters()) == SDXL_UNET_PARAMS


def test_loader_maps_every_key_of_the_sgm_layout():
    shapes = manifest()
    with C.checkpoint_from_source(C.MetaSource(meta_tensors(shapes), "sd_xl_base.safetensors")) as ckpt:
        plans = C.plan_checkpoint(ckpt)  # raises on any missing / unexpected / wrong-shape key
        used = {s for plan in plans.values() for r in plan.part.recipes.values() for s in r.sources}
    assert used == set(shapes)
    assert plans["unet"].config == UNetConfig.sdxl()
    assert plans["vae"].config == VAEConfig.sdxl()
    assert plans["text"].config == (TextEncoderConfig.clip_l(), TextEncoderConfig.bigg())
    # the known harmless extras are accepted, anything else is not
    extras = {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": [1, 77],
              "conditioner.embedders.1.model.logit_scale": [], "denoiser.sigmas": [1000]}
    with C.checkpoint_from_source(C.MetaSource(meta_tensors({**shapes, **extras}), "x.safetensors")) as ckpt:
        C.plan_checkpoint(ckpt)
    source = C.MetaSource(meta_tensors({**shapes, "model_ema.decay": []}), "x.safetensors")
    with C.checkpoint_from_source(source) as ckpt:
        with pytest.raises(CheckpointError, match="model_ema.decay"):
            C.plan_checkpoint(ckpt)


def test_unet_keymap_equals_the_tsv_and_diffusers_own_key_set():
    from diffusers import UNet2DConditionModel

    with open(os.path.join(DATA, "unet_sgm_to_diffusers.tsv")) as f:
        tsv = {diffusers: sgm for sgm, diffusers, _ in (line.rstrip("\n").split("\t") for line in f)}
    mapping = keymap.unet_diffusers_to_sgm(UNetConfig.sdxl())
    assert len(mapping) == 1680 and mapping == tsv
    with torch.device("meta"):
        reference = UNet2DConditionModel(**sdxl_diffusers_unet_config())
    assert set(reference.state_dict()) == set(mapping)
    modules = keymap.unet_module_map(UNetConfig.sdxl())
    assert modules["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert modules["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert len(set(modules.values())) == len(modules)


def sdxl_diffusers_unet_config() -> dict:
    return dict(sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)


def test_loader_maps_every_key_of_the_diffusers_layout():
    """diffusers' and transformers' own SDXL modules on meta give the folder's key set and configs."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_diffusers_unet_config())
        vae = DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                           block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024,
                           scaling_factor=0.13025)
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, hidden_act="quick_gelu"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32, num_attention_heads=20,
                                                         hidden_act="gelu", projection_dim=1280))
    # the HF SDXL repo stores CLIP-L with the text_model. head (transformers 4 layout)
    te1_sd = {("" if k.startswith("text_model.") else "text_model.") + k: t for k, t in te1.state_dict().items()}
    sources = {"unet": C.MetaSource(unet.state_dict(), "unet.safetensors"),
               "vae": C.MetaSource(vae.state_dict(), "vae.safetensors"),
               "text_encoder": C.MetaSource(te1_sd, "te1.safetensors"),
               "text_encoder_2": C.MetaSource(te2.state_dict(), "te2.safetensors")}
    configs = {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": te1.config.to_dict(),
               "text_encoder_2": te2.config.to_dict()}
    ckpt = C.checkpoint_from_diffusers("sdxl-base", sources, configs)
    plans = C.plan_checkpoint(ckpt)
    assert plans["unet"].config == UNetConfig.sdxl()
    assert plans["vae"].config == VAEConfig.sdxl()
    assert plans["text"].config == (TextEncoderConfig.clip_l(), TextEncoderConfig.bigg())
    sgm_vae = [k[len("first_stage_model."):] for k in manifest() if k.startswith("first_stage_model.")]
    assert set(keymap.vae_sgm_to_diffusers_keys(sgm_vae).values()) == set(vae.state_dict())  # keymap = diffusers

    def used(name):
        return {s for r in plans[name].part.recipes.values() for s in r.sources}
    assert used("unet") == set(sources["unet"].keys()) and used("vae") == set(sources["vae"].keys())
    text_keys = {f"{sub}/{k}" for sub in ("text_encoder", "text_encoder_2") for k in sources[sub].keys()}
    assert used("text") == {k for k in text_keys if not k.endswith("position_ids")}


# ---------------------------------------------------------------------------------------------- tensor conversions

def test_bigg_in_transformers_layout_gives_the_same_pooled_output(tiny):
    """Fused q/k/v and the transposed projection, checked against transformers' own CLIPTextModelWithProjection."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    g = tiny.text.clip_g
    cfg = g.config
    hf = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_positions, hidden_act="gelu",
        projection_dim=cfg.projection_dim, layer_norm_eps=1e-5, eos_token_id=49407, bos_token_id=49406, pad_token_id=0))
    converted = keymap.clip_g_to_hf(g.state_dict())
    missing, unexpected = hf.load_state_dict(converted, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    ids = torch.zeros(2, cfg.max_positions, dtype=torch.long)
    ids[:, 0], ids[0, 1:4], ids[0, 4], ids[1, 1:8], ids[1, 8] = 49406, 5, 49407, 7, 49407
    with torch.no_grad():
        ours = g(ids)[1]
        theirs = hf(input_ids=ids).text_embeds
    assert (ours - theirs).abs().max() <= 1e-4
    # and back: the recipes undo clip_g_to_hf exactly
    recipes, unmapped = keymap.clip_g_recipes_from_hf(converted)
    assert not unmapped
    back = {k: r.apply(converted[s] for s in r.sources) for k, r in recipes.items()}
    assert back.keys() == g.state_dict().keys()
    assert all(torch.equal(back[k], t) for k, t in g.state_dict().items())


def test_vae_in_diffusers_layout_loads_into_diffusers_autoencoder(tiny):
    from diffusers import AutoencoderKL as DiffusersVAE

    cfg = tiny.vae.config
    ref = DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * len(cfg.ch_mult),
                       up_block_types=("UpDecoderBlock2D",) * len(cfg.ch_mult),
                       block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
                       norm_num_groups=cfg.norm_groups, latent_channels=cfg.z_channels)
    ref.load_state_dict(keymap.vae_to_diffusers(tiny.vae.state_dict()), strict=True)
    z = torch.randn(1, 4, 4, 6)
    with torch.no_grad():
        ours = tiny.vae.decode(z * cfg.scaling_factor, dtype=torch.float32)
        theirs = ref.decode(z).sample
    assert (ours - theirs).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------- round trips

def test_sgm_file_round_trip(tiny, tiny_file):
    back = load_sdxl(tiny_file, dtype=torch.float32)
    assert_same_weights(tiny, back)
    assert back.unet.config == tiny.unet.config and back.vae.config == tiny.vae.config
    assert (back.text.clip_l.config, back.text.clip_g.config) == (tiny.text.clip_l.config, tiny.text.clip_g.config)
    assert not [n for n, t in back.text.named_buffers() if t.is_meta]
    with torch.no_grad():
        context, pooled = back.text.encode(["a photo of a cat"])
        want = tiny.text.encode(["a photo of a cat"])
    assert torch.equal(context, want[0]) and torch.equal(pooled, want[1])


def test_sgm_file_loads_in_half_precision_with_a_safe_vae(tiny, tiny_file):
    back = load_sdxl(tiny_file, dtype=torch.float16)
    assert back.dtype == torch.float16 and back.device == torch.device("cpu")
    assert next(back.vae.parameters()).dtype == torch.float32  # fp16 VAE overflows; fp32 on CPU
    sd, want = back.unet.state_dict(), tiny.unet.state_dict()
    assert all(torch.equal(sd[k], want[k].half()) for k in want)
    assert next(back.text.parameters()).dtype == torch.float16
    back = load_sdxl(tiny_file, dtype=torch.float16, vae_dtype=torch.bfloat16)
    assert next(back.vae.parameters()).dtype == torch.bfloat16


def test_reader_matches_the_safetensors_package(tmp_path):
    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 3).bfloat16(),
               "f8": torch.randn(9).to(torch.float8_e4m3fn), "f8b": torch.randn(4).to(torch.float8_e5m2),
               "i64": torch.arange(5), "bool": torch.tensor([True, False, True]),
               "u8": torch.arange(3, dtype=torch.uint8),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "f64": torch.randn(2, dtype=torch.float64)}
    path = str(tmp_path / "mixed.safetensors")
    save_file(tensors, path)
    ours, theirs = C.load_state_dict(path), load_file(path)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert torch.equal(ours[k].reshape(-1).view(torch.uint8), theirs[k].reshape(-1).view(torch.uint8)), k
    half = C.load_state_dict(path, dtype=torch.float16)
    assert half["bf16"].dtype == torch.float16 and torch.equal(half["bf16"], theirs["bf16"].half())
    assert half["f8"].dtype == torch.float16 and torch.equal(half["f8"], theirs["f8"].half())
    assert half["i64"].dtype == torch.int64  # integers keep their dtype
    assert C.load_state_dict(path, keys=["f32"]).keys() == {"f32"}
    with pytest.raises(CheckpointError, match="nope"):
        C.load_state_dict(path, keys=["nope"])
    some = C.load_state_dict(path, prefix="f8")
    assert some.keys() == {"", "b"} and torch.equal(some["b"].float(), theirs["f8b"].float())


def test_loaded_tensors_own_their_memory(tiny_file):
    """Nothing handed out points into the file mapping (params stay writable, the file can change)."""
    sd = C.load_state_dict(tiny_file)
    with C.SafetensorsFile(tiny_file) as f:
        view = f._view(next(iter(f.keys())))
        lo, hi = view.data_ptr() - f.data_start, view.data_ptr() - f.data_start + f.file_size
        assert all(not lo <= t.data_ptr() < hi for t in sd.values())
        del view


def test_diffusers_folder_round_trip(tiny, tmp_path):
    write_diffusers(tiny, str(tmp_path / "sdxl"), shard_unet=True)
    assert_same_weights(tiny, load_sdxl(tmp_path / "sdxl", dtype=torch.float32))
    write_diffusers(tiny, str(tmp_path / "sdxl5"), bare_clip_l=True)
    back = load_sdxl(tmp_path / "sdxl5", dtype=torch.float32)
    assert_same_weights(tiny, back)
    assert back.unet.config == tiny.unet.config and back.vae.config == tiny.vae.config


def test_unet_only_files_in_both_layouts(tiny, tmp_path):
    sd = {k: t.contiguous() for k, t in tiny.unet.state_dict().items()}
    meta = {"omg.config": json.dumps({"unet": tiny.configs()["unet"]})}
    layouts = {"bare.safetensors": sd, "prefixed.safetensors": {"model.diffusion_model." + k: t for k, t in sd.items()},
               "diffusers.safetensors": keymap.unet_to_diffusers(sd)}
    for name, tensors in layouts.items():
        save_file(tensors, str(tmp_path / name), metadata=meta)
        back = load_sdxl(tmp_path / name, dtype=torch.float32)
        assert back.vae is None and back.text is None, name
        assert back.unet.config == tiny.unet.config, name
        assert_same_weights(SDXL(tiny.unet), back)
    write_diffusers(SDXL(tiny.unet), str(tmp_path / "folder"))
    back = load_sdxl(tmp_path / "folder" / "unet", dtype=torch.float32)  # a diffusers UNet folder on its own
    assert_same_weights(SDXL(tiny.unet), back)


def test_ckpt_only_through_weights_only(tmp_path):
    model = hintless()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.sgm_state_dict(), "global_step": 7}, path)
    back = load_sdxl(path, dtype=torch.float32)
    assert_same_weights(model, back)
    assert back.unet.config == model.unet.config

    class Payload:  # anything but tensors and plain containers must be refused, not unpickled
        def __reduce__(self):
            return (os.getcwd, ())
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "p": Payload()}, evil)
    message = expect_error(evil)
    assert "weights_only" in message
    old = tmp_path / "legacy.ckpt"  # plain pickle, no zip: refused as well (not a weights-only archive)
    with open(old, "wb") as f:
        pickle.dump({"state_dict": {}}, f)
    expect_error(old)


# ---------------------------------------------------------------------------------------------- bad input

def test_truncated_file(tiny_file, tmp_path):
    bad = tmp_path / "truncated.safetensors"
    with open(tiny_file, "rb") as f:
        blob = f.read()
    bad.write_bytes(blob[: len(blob) - 1000])
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    expect_error(bad, last, "outside the data region")
    bad.write_bytes(blob[:5])
    expect_error(bad, "8-byte header length")


def test_corrupt_header(tiny_file, tmp_path):
    with open(tiny_file, "rb") as f:
        blob = bytearray(f.read())
    bad = tmp_path / "badjson.safetensors"
    broken = bytearray(blob)
    broken[8] = ord("[")  # the header no longer parses as the object it was
    bad.write_bytes(bytes(broken))
    expect_error(bad, "corrupt safetensors header")
    length = tmp_path / "badlength.safetensors"
    broken = bytearray(blob)
    broken[:8] = (int.from_bytes(blob[:8], "little") - 3).to_bytes(8, "little")  # cuts the JSON short
    length.write_bytes(bytes(broken))
    expect_error(length, "corrupt safetensors header")
    dup = tmp_path / "duplicate.safetensors"
    n = int.from_bytes(blob[:8], "little")
    text = blob[8:8 + n].decode()
    first = text.index('"model.diffusion_model.')
    entry_end = text.index("}", first) + 1
    raw = (text[:entry_end] + "," + text[first:entry_end] + text[entry_end:]).encode()
    dup.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(blob[8 + n:]))
    expect_error(dup, "duplicate key", text[first + 1:text.index('"', first + 1)])


def test_header_claiming_more_bytes_than_the_file_has(tiny_file, tmp_path):
    with open(tiny_file, "rb") as f:
        blob = f.read()
    huge = tmp_path / "length.safetensors"
    huge.write_bytes(struct.pack("<Q", len(blob) * 10) + blob[8:])
    expect_error(huge, "header length")
    key = "model.diffusion_model.out.2.weight"
    beyond = tmp_path / "offsets.safetensors"

    def grow(header):
        b, e = header[key]["data_offsets"]
        header[key]["data_offsets"] = [b, e + 10 ** 9]
        header[key]["shape"] = [header[key]["shape"][0] + 10 ** 9 // 4 // math.prod(header[key]["shape"][1:])] + \
            header[key]["shape"][1:]
    rewrite_header(tiny_file, beyond, grow)
    expect_error(beyond, key, "outside the data region")


def test_sd15_layout_is_rejected(tmp_path):
    sd15 = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(8, 8, 1, 1),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 768),
        "model.diffusion_model.time_embed.0.weight": torch.zeros(32, 8),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
        "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
    }
    path = tmp_path / "v1-5-pruned.safetensors"
    save_file(sd15, path)
    message = expect_error(path, "not an SDXL checkpoint", "cond_stage_model", "input_blocks.1.1.proj_in.weight",
                           "label_emb", "768")
    assert "SD 1.x" in message


def test_missing_keys(tiny, tmp_path):
    sd = {k: t.contiguous() for k, t in tiny.sgm_state_dict().items()}
    gone = ["model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_v.weight",
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.bias"]
    for k in gone:
        del sd[k]
    path = tmp_path / "missing.safetensors"
    save_file(sd, path, metadata={"omg.config": json.dumps(tiny.configs())})
    expect_error(path, "missing keys", *gone)


def test_wrong_shapes(tiny, tmp_path):
    sd = {k: t.contiguous() for k, t in tiny.sgm_state_dict().items()}
    key = "model.diffusion_model.input_blocks.4.1.proj_out.weight"
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1)
    te = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    sd[te] = sd[te][:-3].contiguous()
    path = tmp_path / "shapes.safetensors"
    save_file(sd, path, metadata={"omg.config": json.dumps(tiny.configs())})
    calls = []
    original = C.SafetensorsFile.tensor
    try:
        C.SafetensorsFile.tensor = lambda self, *a, **k: calls.append(a) or original(self, *a, **k)
        expect_error(path, "wrong shapes", key, te, str(list(sd[key].shape)))
    finally:
        C.SafetensorsFile.tensor = original
    assert calls == []  # nothing was read, so no model was partially created


def test_diffusers_folder_with_a_bad_component_names_it(tiny, tmp_path):
    folder = tmp_path / "sdxl"
    write_diffusers(tiny, str(folder))
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(vae)
    del sd["decoder.mid_block.attentions.0.to_q.weight"]
    save_file(sd, vae)
    expect_error(folder, "vae/decoder.mid_block.attentions.0.to_q.weight")


@pytest.mark.gpu
def test_loads_straight_to_cuda(tiny, tiny_file):
    back = load_sdxl(tiny_file, device="cuda", dtype=torch.float16)
    assert back.device.type == "cuda" and back.dtype == torch.float16
    vae = next(back.vae.parameters())
    assert vae.device.type == "cuda" and vae.dtype == AutoencoderKL.safe_dtype(torch.float16, "cuda")
    assert all(t.device.type == "cuda" for m in back.components().values() for t in [*m.parameters(), *m.buffers()])
    sd, want = back.unet.state_dict(), tiny.unet.state_dict()
    assert all(torch.equal(sd[k].cpu(), want[k].half()) for k in want)


def test_non_finite_tensors_are_rejected_at_load_naming_them(tiny, tmp_path):
    """NaN/inf weights loaded silently and gave non-finite images; a value finite in the file but beyond the load
    dtype's range (fp16: 65504) is as bad."""
    nan_key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    for bad, value in ((nan_key, float("nan")), ("first_stage_model.decoder.conv_out.bias", float("-inf")),
                       ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", float("inf"))):
        sd = {k: t.contiguous().clone() for k, t in tiny.sgm_state_dict().items()}
        sd[bad].view(-1)[1] = value
        path = tmp_path / "nan.safetensors"
        save_file(sd, path, metadata={"omg.config": json.dumps(tiny.configs())})
        expect_error(path, "NaN or inf", bad)
    sd = {k: t.contiguous().clone() for k, t in tiny.sgm_state_dict().items()}
    sd[nan_key][0, 0] = 1e6
    big = tmp_path / "big.safetensors"
    save_file(sd, big, metadata={"omg.config": json.dumps(tiny.configs())})
    assert load_sdxl(big, dtype=torch.float32).unet.get_parameter(nan_key.split(".", 2)[2]).max() == 1e6
    with pytest.raises(CheckpointError, match=rf"big\.safetensors.*NaN or inf.*{nan_key}"):
        load_sdxl(big, dtype=torch.float16)


def test_tensors_of_more_than_64_dims_are_rejected(tmp_path):
    """torch refuses most ops on them (isfinite: 'only tensors with up to 64 dims are supported')."""
    header = {"ok": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "deep": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [8, 12]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "deep.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + struct.pack("<3f", 1, 2, 3))
    with pytest.raises(CheckpointError, match=r"deep\.safetensors.*'deep': 65 dimensions; torch supports at most 64"):
        C.load_state_dict(path)
    pt = tmp_path / "deep.pt"
    torch.save({"deep": torch.zeros([1] * 65)}, pt)
    with pytest.raises(CheckpointError, match=r"deep\.pt.*'deep' \(65\)"):
        C.load_state_dict(pt)
