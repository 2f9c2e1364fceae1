"""Image files and their records: real PNG/JPEG/WebP bytes, each format's metadata field, the run record, short
hashes as A1111 computes them, the all-or-nothing file set, and the spec checks the records go through."""
import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image
from PIL.ExifTags import IFD, Base
from safetensors.torch import save_file

import omg
from omg.atomic import AtomicFileSet
from omg.errors import OutputError, SpecError
from omg.hashes import lora_hash, model_hash
from omg.imagefile import check_output_path, image_format, read_metadata, save_image
from omg.infotext import LoraInfo, a1111_parameters
from omg.spec import CONCEPT_KEYS, DEMO_FOLDER, check_spec, option_checks, portable_path, run_record
from test_cli import parse_a1111

MAGIC = {"PNG": b"\x89PNG", "JPEG": b"\xff\xd8\xff", "WEBP": b"RIFF"}


@pytest.mark.parametrize("ext", [".png", ".jpg", ".jpeg", ".webp"])
def test_each_format_is_written_as_itself_with_both_records(tmp_path, ext):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    path = str(tmp_path / f"x{ext}")
    fmt = image_format(path)
    text = "a dög\nNegative prompt: blurry\nSteps: 3, Sampler: DDIM"
    run = {"prompt": "a dög", "steps": 3, "note": "<&\"'>"}
    save_image(image, path, fmt, text, run)
    with open(path, "rb") as f:
        assert f.read(4).startswith(MAGIC[fmt])
    assert read_metadata(path) == (text, run)
    back = Image.open(path)
    if fmt == "PNG":  # A1111's fields: a PNG text chunk "parameters"; EXIF UserComment, UTF-16 after "UNICODE\0"
        assert back.text["parameters"] == text
    else:
        assert back.getexif().get_ifd(IFD.Exif)[Base.UserComment] == b"UNICODE\0" + text.encode("utf-16-be")
    if fmt != "JPEG":  # PNG and (lossless) WebP keep the pixels
        assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(image))


def test_output_paths_are_checked_before_work(tmp_path):
    check_output_path(tmp_path / "new" / "deeper" / "x.webp")  # folders to be made are fine
    assert not (tmp_path / "new").exists()  # and not made by the check
    (tmp_path / "file").write_text("")
    for path, message in ((tmp_path / "x.bmp", "extension '.bmp'"), (tmp_path / "file" / "x.png", "is a file"),
                          (tmp_path, "extension"), (tmp_path / "x", "(none)")):
        with pytest.raises(OutputError, match=message):
            check_output_path(path)
    (tmp_path / "d.png").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_output_path(tmp_path / "d.png")


def test_a_file_set_appears_whole_or_not_at_all(tmp_path):
    (tmp_path / "a.png").write_text("old a")
    with pytest.raises(RuntimeError):
        with AtomicFileSet() as files:
            with open(files.path(tmp_path / "a.png"), "w") as f:
                f.write("new a")
            files.path(tmp_path / "b.png")
            raise RuntimeError("the second file failed")
    assert sorted(os.listdir(tmp_path)) == ["a.png"] and (tmp_path / "a.png").read_text() == "old a"
    with AtomicFileSet() as files:
        for name in ("a.png", "b.png"):
            with open(files.path(tmp_path / name), "w") as f:
                f.write("new " + name)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png"] and (tmp_path / "a.png").read_text() == "new a.png"


def test_short_hashes_are_a1111s(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "lora.safetensors"
    save_file({"w": omg.sampling.torch.arange(6.0)}, str(path))
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert model_hash(str(path)) == hashlib.sha256(raw).hexdigest()[:10]  # "Model hash", civitai AutoV2
    assert lora_hash(str(path)) == hashlib.sha256(raw[8 + header:]).hexdigest()[:12]  # kohya's addnet hash
    assert json.loads((tmp_path / "cache" / "omg" / "hashes.json").read_text())  # kept for the next run
    assert model_hash(str(path)) == hashlib.sha256(raw).hexdigest()[:10]  # from the cache


def test_infotext_parses_as_a1111s():
    options = omg.OMGOptions(steps=30, blend_steps=21, guidance=5.0, sampler="dpmpp_2m", spacing="karras", height=768,
                             width=1024, negative_prompt="blurry, ugly")
    concepts = [LoraInfo("man", "a photo of sks man", "sks", 0.8, "0123456789ab"),
                LoraInfo("woman", "a photo of xyz woman", "xyz", 0.6, "ba9876543210")]
    text = a1111_parameters("a man and a woman, in a park", options, 7, "sd_xl_base_1.0", "31e35c80fc", concepts,
                            "0.1.0")
    prompt, negative, fields = parse_a1111(text)
    assert (prompt, negative) == ("a man and a woman, in a park", "blurry, ugly")
    assert fields == {"Steps": "30", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "5.0",
                      "Seed": "7", "Size": "1024x768", "Model hash": "31e35c80fc", "Model": "sd_xl_base_1.0",
                      "Lora hashes": "sks: 0123456789ab, xyz: ba9876543210",
                      "OMG concepts": "man: a photo of sks man <lora:sks:0.8>; woman: a photo of xyz woman "
                                      "<lora:xyz:0.6>",
                      "OMG blend steps": "21", "Timestep spacing": "karras", "Version": "omg 0.1.0"}
    assert "Negative prompt" not in a1111_parameters("a dog", options.replace(negative_prompt=None), 0)


def test_spec_keys_follow_the_options_and_concept_fields():
    from omg.options import cli_options
    from omg.pipeline import Concept
    assert list(option_checks()) == [f.name for f in cli_options()]
    assert list(CONCEPT_KEYS) == [f.name for f in dataclasses.fields(Concept)]


def test_recorded_paths_are_relative_and_read_back(tmp_path):
    lora, sam = tmp_path / "loras" / "a.safetensors", tmp_path / "sam.pth"
    lora.parent.mkdir()
    lora.write_bytes(b"x")
    sam.write_bytes(b"x")
    demo_lora = os.path.join(DEMO_FOLDER, "sks_ball.safetensors")
    options = omg.OMGOptions(sam=str(sam), seeds=[4, 5])
    record = run_record("a dog and a ball", [{"class_name": "dog", "prompt": "x", "lora": str(lora)},
                                             {"class_name": "ball", "prompt": "y", "lora": demo_lora,
                                              "mask": (0, 0, 8, 8)}],
                        None, "cpu", "fp32", options, str(tmp_path / "out.png"), {"stage": 2})
    assert [c["lora"] for c in record["concepts"]] == ["loras/a.safetensors", "sks_ball.safetensors"]
    assert record["sam"] == "sam.pth" and record["seeds"] is None and record["num_images"] == 1
    assert str(tmp_path) not in json.dumps(record)
    back = check_spec(json.loads(json.dumps(record)), str(tmp_path / "out.png"))  # as --spec out.png reads it
    assert back["concepts"][0]["lora"] == str(lora) and back["concepts"][1]["lora"] == demo_lora
    assert back["sam"] == str(sam) and "info" not in back
    assert portable_path(str(tmp_path.parent / "elsewhere.pth"), str(tmp_path)) == "../elsewhere.pth"


def test_an_image_without_a_record_is_no_spec(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    from omg.spec import load_spec
    with pytest.raises(SpecError, match="no omg run record"):
        load_spec(str(tmp_path / "plain.png"))
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(str(tmp_path / "missing.yaml"))
