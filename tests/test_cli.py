"""The `omg generate` command, on the shipped demo weights (weights/demo/) and on the random fallback model."""
import json
import warnings

import pytest
from PIL import Image

from omg import cli


def run_cli(argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli.main(argv)


def test_generate_from_flags_writes_images_and_parameters(tmp_path):
    out = tmp_path / "o.png"
    rc = run_cli(["generate", "--prompt", "a man and a woman in a park", "--concept", "man: a photo of sks man",
                  "--concept", "woman: a photo of xyz woman ! ugly", "--steps", "4", "--blend-steps", "2",
                  "--height", "64", "--width", "96", "--out", str(out), "--save-masks", "--save-attention",
                  "--no-progress"])
    assert rc == 0
    for name in ("o.png", "o_stage1.png", "o_masks.png", "o_attention_0.png", "o_attention_1.png"):
        assert (tmp_path / name).exists(), name
    image = Image.open(out)
    assert image.size == (96, 64)
    params = json.loads(image.text["parameters"])
    assert params["prompt"] == "a man and a woman in a park" and params["steps"] == 4
    assert params["concepts"][1] == {"class_name": "woman", "prompt": "a photo of xyz woman",
                                     "negative_prompt": "ugly"}


def test_generate_from_a_yaml_spec(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("prompt: a man and a dog\nsteps: 3\nblend_steps: 2\nheight: 64\nwidth: 64\n"
                    "lora_mode: merged\nconcepts:\n  - {class_name: dog, prompt: a photo of sks dog}\n")
    out = tmp_path / "spec.png"
    assert run_cli(["generate", "--spec", str(spec), "--out", str(out), "--no-progress"]) == 0
    params = json.loads(Image.open(out).text["parameters"])
    assert params["concepts"][0]["class_name"] == "dog" and params["lora_mode"] == "merged"


def test_bad_input_is_one_line_error_and_no_file(tmp_path, capsys):
    out = tmp_path / "bad.png"
    rc = run_cli(["generate", "--prompt", "a dog", "--concept", "man: x", "--steps", "3", "--blend-steps", "2",
                  "--height", "64", "--width", "64", "--out", str(out), "--no-progress"])
    assert rc == 2 and not out.exists()
    assert "man" in capsys.readouterr().err


@pytest.mark.parametrize("text,expected", [
    ("man: a photo of sks man", {"class_name": "man", "prompt": "a photo of sks man"}),
    ("man: sks man @ a.safetensors*0.6 ! blurry", {"class_name": "man", "prompt": "sks man", "lora": "a.safetensors",
                                                    "lora_scale": 0.6, "negative_prompt": "blurry"}),
])
def test_parse_concept(text, expected):
    assert cli.parse_concept(text) == expected


def test_bare_command_renders_the_demo_scene_with_masks(tmp_path):
    """`omg generate` with no prompt and no checkpoint: the demo weights, weights/demo/demo.yaml, masks written."""
    out = tmp_path / "demo.png"
    assert run_cli(["generate", "--steps", "3", "--blend-steps", "2", "--out", str(out), "--no-progress"]) == 0
    for name in ("demo.png", "demo_stage1.png", "demo_masks.png"):
        assert (tmp_path / name).exists(), name
    image = Image.open(out)
    params = json.loads(image.text["parameters"])
    assert image.size == (256, 256) and params["checkpoint"] == cli.DEMO_CHECKPOINT
    assert [c["class_name"] for c in params["concepts"]] == ["ball", "box"]
    assert all(c["lora"].endswith(".safetensors") for c in params["concepts"])


def test_without_demo_weights_falls_back_to_a_random_model(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "DEMO_CHECKPOINT", str(tmp_path / "missing.safetensors"))
    out = tmp_path / "r.png"
    with pytest.warns(UserWarning, match="RANDOM"):
        rc = cli.main(["generate", "--prompt", "a dog", "--steps", "2", "--blend-steps", "1", "--height", "64",
                       "--width", "64", "--out", str(out), "--no-progress"])
    assert rc == 0 and json.loads(Image.open(out).text["parameters"])["checkpoint"] == "random-tiny"


def test_controlnet_and_style_lora_flags(tmp_path):
    """--control IMAGE@MODEL[:scale] (repeatable, canny=PHOTO computes edges) and --style-lora FILE[:scale] reach
    generate and the PNG's parameters; the same from a spec file, with paths relative to it."""
    import torch

    from omg.controlnet import ControlNet, ControlNetConfig, save_controlnet
    from omg.model import SDXL, save_sgm
    from omg.vae import VAEConfig
    from test_pipeline import kohya_lora

    model = SDXL.random(vae_config=VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), norm_groups=8), seed=5)
    save_sgm(model, tmp_path / "base.safetensors")
    controlnet = ControlNet(ControlNetConfig.tiny(model.unet.config))
    save_controlnet(controlnet, tmp_path / "pose_cn.safetensors")
    Image.fromarray((torch.rand(64, 96, 3) * 255).byte().numpy()).save(tmp_path / "pose.png")
    kohya_lora(model, tmp_path / "style.safetensors", seed=7)
    common = ["--checkpoint", str(tmp_path / "base.safetensors"), "--steps", "3", "--blend-steps", "2", "--height",
              "64", "--width", "96", "--no-progress", "--concept", "man: a photo of sks man"]
    out = tmp_path / "c.png"
    assert run_cli(["generate", "--prompt", "a man in a park", *common, "--out", str(out),
                    "--control", f"{tmp_path / 'pose.png'}@{tmp_path / 'pose_cn.safetensors'}:0.8",
                    "--control", f"canny={tmp_path / 'pose.png'}@{tmp_path / 'pose_cn.safetensors'}:0.3",
                    "--style-lora", f"{tmp_path / 'style.safetensors'}:0.5"]) == 0
    params = json.loads(Image.open(out).text["parameters"])
    assert len(params["control"]) == 2 and params["control"][1].startswith("canny=")
    assert params["style_lora"] == [f"{tmp_path / 'style.safetensors'}:0.5"]
    spec = tmp_path / "spec.yaml"
    spec.write_text("prompt: a man in a park\ncontrol:\n  - pose.png@pose_cn.safetensors:0.8\n"
                    "style_lora: [style.safetensors:0.5]\n")
    out2 = tmp_path / "s.png"
    assert run_cli(["generate", "--spec", str(spec), *common, "--out", str(out2)]) == 0
    out3 = tmp_path / "f.png"  # the spec's settings as flags: the same image
    assert run_cli(["generate", "--prompt", "a man in a park", *common, "--out", str(out3),
                    "--control", f"{tmp_path / 'pose.png'}@{tmp_path / 'pose_cn.safetensors'}:0.8",
                    "--style-lora", f"{tmp_path / 'style.safetensors'}:0.5"]) == 0
    assert Image.open(out2).tobytes() == Image.open(out3).tobytes() != Image.open(out).tobytes()
    params = json.loads(Image.open(out2).text["parameters"])
    assert params["control"][0]["image"] == str(tmp_path / "pose.png") and params["control"][0]["scale"] == 0.8
    assert run_cli(["generate", "--prompt", "a man", *common, "--out", str(tmp_path / "bad.png"),
                    "--control", "pose.png"]) == 2
