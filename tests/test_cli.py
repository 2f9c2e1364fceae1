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
