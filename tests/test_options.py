"""omg.OMGOptions: presets, checks, keyword overrides, and the command line and spec files derived from its fields."""
import dataclasses
import warnings

import pytest
import torch

import omg
from omg import cli
from omg.errors import OptionError
from omg.options import DEFAULT_NEGATIVE, OMGOptions, cli_options
from test_pipeline import BLEND, H, PROMPT, STEPS, W, model  # noqa: F401 (fixture)


def test_presets():
    assert OMGOptions.paper() == OMGOptions()
    paper = OMGOptions.paper()
    assert (paper.steps, paper.guidance, paper.blend_steps, paper.sampler, paper.height) == (50, 7.5, 35, "ddim", 1024)
    original = OMGOptions.original()  # kongzhecn/OMG: Euler, "leading" spacing, blending from step index 16
    assert (original.sampler, original.spacing, original.steps, original.guidance) == ("euler", "leading", 50, 7.5)
    assert original.blend_start == 16 and original.self_replay_steps == 4 and original.store == "recompute"
    assert original.negative_prompt == DEFAULT_NEGATIVE
    assert OMGOptions.original(seed=4).seed == 4


@pytest.mark.parametrize("changes,match", [
    (dict(steps=0), "steps"), (dict(blend_steps=51), "blend_steps"), (dict(sampler="plms"), "sampler"),
    (dict(store="disk"), "store"), (dict(lora_mode="fused"), "lora_mode"), (dict(height=60), "multiples of 8"),
    (dict(guidance_rescale=2.0), "guidance_rescale"), (dict(seeds=[]), "seeds"), (dict(num_images=0), "num_images"),
    (dict(seeds=[1, 2], num_images=3), "num_images"), (dict(map_format="fp8"), "map_format"),
    (dict(store_dtype=torch.int8), "store_dtype"), (dict(dilate=-1), "dilate"),
])
def test_bad_options_are_refused_when_made(changes, match):
    with pytest.raises(OptionError, match=match):
        OMGOptions(**changes)
    with pytest.raises(OptionError, match=match):
        OMGOptions().replace(**changes)


def test_unknown_option_names_what_is_known():
    with pytest.raises(OptionError, match="stepz.*known: steps"):
        OMGOptions().replace(stepz=3)


def test_seeds_of_the_batch():
    assert OMGOptions(seed=5, num_images=3).image_seeds == (5, 6, 7)
    assert OMGOptions(seeds=[9, 2]).image_seeds == (9, 2) and OMGOptions(seeds=[9, 2]).batched
    assert not OMGOptions(seed=9).batched


def test_options_object_and_keywords_are_the_same_call(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        concepts = [omg.Concept("man", "a photo of sks man", mask=(0, 0, 40, 64))]
        by_keywords = omg.generate(model, PROMPT, concepts, steps=STEPS, blend_steps=BLEND, height=H, width=W,
                                   seed=3, progress=False)
        options = OMGOptions.paper(steps=STEPS, blend_steps=BLEND, height=H, width=W, progress=False)
        by_options = omg.generate(model, PROMPT, concepts, options, seed=3)
    assert torch.equal(by_keywords.latent, by_options.latent)


def test_every_cli_option_is_a_flag_and_a_spec_key_with_its_help():
    parser = cli.build_parser()
    generate = next(a for a in parser._actions if a.dest == "command").choices["generate"]
    flags = {a.dest: a for a in generate._actions}
    for f in cli_options():
        assert f.name in flags, f.name
        assert f.metadata["help"] in flags[f.name].help
    not_on_the_cli = {f.name for f in dataclasses.fields(OMGOptions)} - {f.name for f in cli_options()}
    assert not_on_the_cli == {"store_dtype", "keep_stage2"}  # a dtype object; a Python object to drive
    args = parser.parse_args(["generate", "--no-replay", "--seeds", "1", "2", "--sampler-options", '{"eta": 0.5}'])
    assert args.replay is False and args.seeds == [1, 2] and args.sampler_options == {"eta": 0.5}
    assert not hasattr(args, "steps")  # a flag not given leaves the preset's value


def test_a_spec_with_an_unknown_key_is_refused(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("prompt: a dog\nstepz: 3\n")
    assert cli.main(["generate", "--spec", str(spec), "--out", str(tmp_path / "x.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and "blend_steps" in err
