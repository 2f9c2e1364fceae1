"""The `omg` command, run as users run it: `python -m omg ...` in a subprocess (the console script calls the same
main), on the shipped demo weights (weights/demo/). Checks that must fail before any work run in-process too, with
the model loader replaced by one that fails the test if it is reached."""
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import omg
from omg import cli
from omg.imagefile import read_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--steps", "3", "--blend-steps", "2", "--no-progress"]
TWO_CONCEPTS = ["--prompt", "a man and a woman in a park", "--concept", "man: a photo of sks man",
                "--concept", "woman: a photo of xyz woman ! ugly"]


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path_factory, monkeypatch):
    """The short-hash cache of these runs (and their subprocesses) in a test folder, not the user's home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


def omg_command(*args, cwd=None, timeout=600):
    """The real command in a fresh process (the repository on PYTHONPATH, one CPU thread)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "omg", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def parse_a1111(text):
    """AUTOMATIC1111's parse_generation_parameters (modules/infotext_utils.py): prompt lines, then 'Negative
    prompt:', then the last line's 'Key: value' pairs (values JSON-quoted when they hold commas)."""
    *lines, last = text.strip().split("\n")
    fields = {k: json.loads(v) if v.startswith('"') else v
              for k, v in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last)}
    prompt = [line for line in lines if not line.startswith("Negative prompt:")]
    negative = [line[len("Negative prompt: "):] for line in lines if line.startswith("Negative prompt:")]
    return "\n".join(prompt), (negative[0] if negative else None), fields


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_flags_render_with_a_k_diffusion_sampler_and_the_image_renders_again_from_its_record(tmp_path):
    out = tmp_path / "o.png"
    done = omg_command("generate", *TWO_CONCEPTS, *FAST, "--sampler", "euler", "--height", "64", "--width", "96",
                       "--out", out, "--save-masks", "--save-attention", "--guidance", "6")
    assert done.returncode == 0, done.stderr
    for name in ("o.png", "o_stage1.png", "o_masks.png", "o_attention_0.png", "o_attention_1.png"):
        assert (tmp_path / name).exists(), name
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".omg-")]  # no temporary left
    assert "omg: wrote" in done.stderr  # logging, on stderr
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (96, 64)
    prompt, negative, fields = parse_a1111(image.text["parameters"])
    assert prompt == "a man and a woman in a park" and negative == omg.OMGOptions().negative_prompt
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"], fields["Seed"], fields["Size"]) == \
        ("3", "Euler", "6.0", "0", "96x64")
    assert fields["Model"] == "demo_sdxl" and re.fullmatch(r"[0-9a-f]{10}", fields["Model hash"])
    assert "man: a photo of sks man" in fields["OMG concepts"]
    run = json.loads(image.text["omg"])
    assert run["concepts"][1] == {"class_name": "woman", "prompt": "a photo of xyz woman", "lora": None,
                                  "negative_prompt": "ugly", "lora_scale": 0.8, "mask": None,
                                  "face": None}
    # defaults filled in (for store="auto": what it chose)
    assert run["steps"] == 3 and run["sampler"] == "euler" and run["store"] == "outputs"
    assert set(run) >= {f for f in omg.OMGOptions.__dataclass_fields__ if f not in ("store_dtype", "keep_stage2")}
    assert str(tmp_path) not in image.text["omg"] and ROOT not in image.text["omg"]  # no absolute path
    masks = Image.open(tmp_path / "o_masks.png")
    assert masks.height > 64  # the legend band below the image

    again = omg_command("generate", "--spec", out, "--out", tmp_path / "again.png", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(pixels(out), pixels(tmp_path / "again.png"))
    assert np.array_equal(pixels(tmp_path / "o_stage1.png"), pixels(tmp_path / "again_stage1.png"))
    # the stage-1 image records the run with no blending steps, which renders it (in-process: the same main)
    assert json.loads(Image.open(tmp_path / "o_stage1.png").text["omg"])["blend_steps"] == 0
    assert cli.main(["generate", "--spec", str(tmp_path / "o_stage1.png"), "--out", str(tmp_path / "s1.webp")]) == 0
    assert np.array_equal(pixels(tmp_path / "o_stage1.png"), pixels(tmp_path / "s1.webp"))  # lossless WebP


def test_a_batch_as_jpeg_with_a_lora_and_sam(tmp_path):
    """--num-images 2 in JPEG: real JPEG files with A1111's text in EXIF, the run as XMP; LoRA names and hashes;
    the SAM path on a tiny random SAM (its config read from the checkpoint's shapes)."""
    from test_masks import tiny_sam
    torch.save(tiny_sam(img_size=64).state_dict(), tmp_path / "sam.pth")
    out = tmp_path / "b.jpg"
    done = omg_command("generate", "--prompt", "a red ball and a blue box on a green background",
                       "--concept", "ball: a sks ball @ sks_ball.safetensors*0.7", *FAST, "--num-images", "2",
                       "--seed", "5", "--sam", tmp_path / "sam.pth", "--out", out, cwd=os.path.join(ROOT, "weights",
                                                                                                  "demo"))
    assert done.returncode == 0, done.stderr
    for stem, seed in (("b", 5), ("b_1", 6)):
        with open(tmp_path / f"{stem}.jpg", "rb") as f:
            assert f.read(3) == b"\xff\xd8\xff"  # JPEG bytes, not PNG
        parameters, run = read_metadata(tmp_path / f"{stem}.jpg")
        _, _, fields = parse_a1111(parameters)
        assert fields["Seed"] == str(seed) and run["seed"] == seed and run["num_images"] == 1
        assert re.fullmatch(r"sks_ball: [0-9a-f]{12}", fields["Lora hashes"])
        assert run["concepts"][0]["lora"] == "sks_ball.safetensors" and run["concepts"][0]["lora_scale"] == 0.7
        assert run["sam"] == "sam.pth" and run["info"]["mask_sources"] == ["sam"]
        assert (tmp_path / f"{stem}_stage1.jpg").exists()


def test_version_and_help():
    version = omg_command("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"omg {omg.__version__}"
    help_text = " ".join(omg_command("generate", "--help").stdout.split())
    assert "(default: 'ddim'; one of: ddim, euler" in help_text and "dpmpp_2m" in help_text
    assert "(default: 35)" in help_text  # blend steps
    for key in ("prompt:", "concepts:", "checkpoint:", "dtype:", "class_name", "lora_scale", "noise_device",
                "blend_steps"):
        assert key in help_text, key


def test_bare_command_renders_the_demo_scene_with_masks(tmp_path):
    """`omg generate` with no prompt and no checkpoint: the demo weights, weights/demo/demo.yaml, masks written."""
    done = omg_command("generate", *FAST, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in ("omg.png", "omg_stage1.png", "omg_masks.png"):
        assert (tmp_path / name).exists(), name
    image = Image.open(tmp_path / "omg.png")
    run = json.loads(image.text["omg"])
    assert image.size == (256, 256) and run["checkpoint"] is None  # None: the demo weights
    assert [c["class_name"] for c in run["concepts"]] == ["ball", "box"]
    assert [c["lora"] for c in run["concepts"]] == ["sks_ball.safetensors", "bnha_box.safetensors"]


def test_a_bad_spec_is_one_line_before_any_loading(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("prompt: a dog\nconcepts:\n  - {class: dog, prompt: a sks dog}\n")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    done = omg_command("generate", "--spec", spec, "--checkpoint", tmp_path / "junk.safetensors", "--out",
                       tmp_path / "x.png")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"omg: error: {spec}: concepts[0]: unknown key 'class'; did you mean 'class_name'? Known keys: class_name, "
        "prompt, lora, negative_prompt, lora_scale, mask, face")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------- in-process: errors before work

@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(cli, "_load_model", refuse)


@pytest.mark.parametrize("spec_text,message", [
    ("prompt: a dog\nconcepts:\n  - {class: dog, prompt: x}\n", "did you mean 'class_name'"),
    ("prompt: a dog\nsteps: four\n", "steps must be an integer, got 'four'"),
    ("prompt: a dog\nconcepts: {dog: a sks dog}\n", "concepts must be a list of concepts"),
    ("prompt: a dog\nsteps: [3\n", "line 3, column 1: not valid YAML"),
    ("prompt: a dog\ndtype: fp8\n", "dtype must be one of fp16, bf16, fp32 or null, got 'fp8'"),
    ("prompt: a dog\nstepz: 3\n", "unknown key 'stepz'; did you mean 'steps'?"),
    ("prompt: a dog\nsampler: eulr\n", "sampler must be one of ddim, euler"),
    ("prompt: a dog\nconcepts:\n  - {class_name: dog}\n", "concepts[0]: missing prompt"),
    ("prompt: a dog\nconcepts:\n  - {class_name: dog, prompt: x, lora_scale: high}\n", "lora_scale must be a number"),
    ("prompt: a dog\nconcepts:\n  - {class_name: dog, prompt: x, lora: missing.safetensors}\n", "no LoRA file"),
    ("prompt: a dog\nconcepts:\n  - {class_name: cat, prompt: x}\n", "class noun 'cat' occurs 0 time(s)"),
    ("prompt: a dog\nheight: 60\n", "multiples of 8"),
    ("prompt: a dog\nsam: missing_sam.pth\n", "no segment-anything checkpoint"),
    ("prompt: a dog\ncheckpoint: missing.safetensors\n", "no such checkpoint"),
    ("- a list\n", "expected a mapping of keys"),
])
def test_bad_spec_files_fail_before_loading_naming_the_key(tmp_path, capsys, no_loading, spec_text, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text)
    assert cli.main(["generate", "--spec", str(spec), "--out", str(tmp_path / "x.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("out,message", [
    ("x.gif", "cannot write images with extension '.gif'"),
    ("file.txt/x.png", "is a file"),
    ("folder", "is a folder"),
])
def test_bad_output_paths_fail_before_loading(tmp_path, capsys, no_loading, out, message):
    (tmp_path / "file.txt").write_text("")
    (tmp_path / "folder.png").mkdir()
    out = str(tmp_path / out) + (".png" if out == "folder" else "")
    assert cli.main(["generate", "--prompt", "a dog", "--out", out, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_a_json_spec_error_names_its_line(tmp_path, capsys, no_loading):
    spec = tmp_path / "spec.json"
    spec.write_text('{"prompt": "a dog",\n "steps": }\n')
    assert cli.main(["generate", "--spec", str(spec)]) == 2
    assert "line 2, column 11: not valid JSON" in capsys.readouterr().err


def test_a_failing_write_leaves_the_old_outputs(tmp_path, monkeypatch):
    """The stage-1 image fails to encode: out.png from an earlier run stays as it was, and no temporary is left."""
    import omg.imagefile as imagefile
    out = tmp_path / "o.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out)
    before = out.read_bytes()
    save = imagefile.save_image

    def failing(image, path, fmt, *args, **kwargs):
        if len(os.listdir(tmp_path)) > 2:  # o.png, o.png's temporary, and now the stage-1 temporary
            raise OSError("disk full")
        return save(image, path, fmt, *args, **kwargs)

    monkeypatch.setattr(imagefile, "save_image", failing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli.main(["generate", "--prompt", "a dog", *FAST, "--height", "64", "--width", "64", "--out", str(out)])
    assert rc == 2 and out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["o.png"]


@pytest.mark.parametrize("text,expected", [
    ("man: a photo of sks man", {"class_name": "man", "prompt": "a photo of sks man"}),
    ("man: sks man @ a.safetensors*0.6 ! blurry", {"class_name": "man", "prompt": "sks man", "lora": "a.safetensors",
                                                    "lora_scale": 0.6, "negative_prompt": "blurry"}),
])
def test_parse_concept(text, expected):
    assert cli.parse_concept(text) == expected


def test_without_demo_weights_falls_back_to_a_random_model(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "DEMO_CHECKPOINT", str(tmp_path / "missing.safetensors"))
    out = tmp_path / "r.png"
    with pytest.warns(UserWarning, match="RANDOM"):
        rc = cli.main(["generate", "--prompt", "a dog", "--steps", "2", "--blend-steps", "1", "--height", "64",
                       "--width", "64", "--out", str(out), "--no-progress"])
    assert rc == 0 and json.loads(Image.open(out).text["omg"])["checkpoint"] is None


def run_cli(argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli.main(argv)


def test_controlnet_and_style_lora_flags(tmp_path):
    """--control IMAGE@MODEL[:scale] (repeatable, canny=PHOTO computes edges) and --style-lora FILE[:scale] reach
    generate and the PNG's parameters; the same from a spec file, with paths relative to it."""
    import torch

    from omg.controlnet import ControlNet, ControlNetConfig, save_controlnet
    from omg.model import save_sgm
    from test_pipeline import kohya_lora, tiny_model

    model = tiny_model()
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
    params = json.loads(Image.open(out).text["omg"])  # the machine-readable record: paths relative to the image
    assert len(params["control"]) == 2 and params["control"][1]["canny"] and not params["control"][0]["canny"]
    assert params["control"][0]["image"] == "pose.png" and params["control"][0]["model"] == "pose_cn.safetensors"
    assert params["style_lora"] == [{"lora": "style.safetensors", "scale": 0.5}]
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
    params = json.loads(Image.open(out2).text["omg"])
    assert params["control"][0]["image"] == "pose.png" and params["control"][0]["scale"] == 0.8
    assert run_cli(["generate", "--prompt", "a man", *common, "--out", str(tmp_path / "bad.png"),
                    "--control", "pose.png"]) == 2
