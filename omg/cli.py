"""The `omg` command.

    omg generate --checkpoint sd_xl_base_1.0.safetensors --prompt "a man and a woman in a park" \\
        --concept "man: a photo of sks man @ sks.safetensors" \\
        --concept "woman: a photo of xyz woman @ xyz.safetensors" --out out.png --save-masks
    omg generate --spec concepts.yaml         # the same as a YAML/JSON file (keys as the flags, concepts as a list)
    omg generate --spec concepts.yaml --seeds 3 8 21      # three images in one batch: out.png, out_1.png, out_2.png
    omg generate --spec out.png               # the run recorded in an image omg wrote: the same image again

The options are omg.OMGOptions' fields (flag --blend-steps = spec key blend_steps). Everything is checked before
any weights are loaded (spec keys and types, options, prompt and concepts, files, the output path). Each image is
written (.png, .jpg or .webp) with A1111's "parameters" text and the whole run as JSON (omg.imagefile), beside its
stage-1 image (<stem>_stage1<ext>) and, on request, mask and attention overlays; all of a run's files appear
together or not at all.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Any, Optional

from omg.spec import DEMO_FOLDER, DTYPES

DEMO_CHECKPOINT = os.path.join(DEMO_FOLDER, "demo_sdxl.safetensors")  # written by demo/train.py
DEMO_SPEC = os.path.join(DEMO_FOLDER, "demo.yaml")  # the demo's prompt and concepts
log = logging.getLogger("omg")


def parse_concept(text: str) -> dict:
    """'CLASS: PROMPT [@ LORA[*SCALE] | @ face=FACE] [! NEGATIVE]' -> concept dict (FACE: an InstantID face photo or
    precomputed .safetensors/.npy face)."""
    from omg.errors import OptionError

    if ":" not in text:
        raise OptionError(f"--concept {text!r}: expected 'class: prompt [@ lora.safetensors[*scale]] [! negative]'")
    class_name, rest = (s.strip() for s in text.split(":", 1))
    concept: dict[str, Any] = {"class_name": class_name}
    if "!" in rest:
        rest, negative = (s.strip() for s in rest.split("!", 1))
        concept["negative_prompt"] = negative
    if "@" in rest:
        rest, lora = (s.strip() for s in rest.split("@", 1))
        if lora.startswith("face="):
            concept["face"], concept["prompt"] = lora[len("face="):].strip(), rest
            return concept
        if "*" in lora:
            lora, scale = lora.rsplit("*", 1)
            try:
                concept["lora_scale"] = float(scale)
            except ValueError:
                raise OptionError(f"--concept {text!r}: the LoRA scale after '*' must be a number, got {scale!r}")
        concept["lora"] = lora.strip()
    concept["prompt"] = rest
    return concept


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _spec_keys_help() -> str:
    from omg.spec import CONCEPT_KEYS, INFO_KEY, RUN_KEYS, option_checks
    lines = ["A spec file (YAML or JSON, or an image omg wrote) takes these keys; paths are relative to it:"]
    lines += [f"  {key}: {what}" for key, (_, what, _) in RUN_KEYS.items() if key != INFO_KEY]
    lines.append("  each concept: " + ", ".join(CONCEPT_KEYS) + " (class_name and prompt required)")
    lines.append("  and every option above by its field name: " + ", ".join(option_checks()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    import omg
    from omg.options import OMGOptions, cli_options

    parser = argparse.ArgumentParser(prog="omg", description="Occlusion-friendly multi-concept SDXL generation.")
    parser.add_argument("--version", action="version", version=f"omg {omg.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="render multi-concept images", epilog=_spec_keys_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Render images in which every concept keeps its identity. The options after "
                                   "--save-attention are omg.OMGOptions' fields; a spec file takes the same "
                                   "names (with underscores).")
    g.add_argument("--spec", help="YAML/JSON file with any of the options below and a 'concepts' list, or an image "
                                  "omg wrote (renders its recorded run again)")
    g.add_argument("--checkpoint", help="SDXL single-file .safetensors or diffusers folder (default: demo weights)")
    g.add_argument("--prompt", help="global prompt naming each concept's class noun")
    g.add_argument("--concept", action="append", default=[],
                   help="'class: prompt [@ lora.safetensors[*scale]] [! negative prompt]' (repeatable)")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    g.add_argument("--out", default="omg.png", help="image path, .png, .jpg or .webp; a batch writes <out>, "
                                                    "<stem>_1<ext>, <stem>_2<ext>, ... (default: omg.png)")
    g.add_argument("--save-masks", action="store_true", help="also write <stem>_masks<ext>, with a legend")
    g.add_argument("--save-attention", action="store_true", help="also write <stem>_attention_<i><ext>")
    defaults = OMGOptions()
    for f in cli_options():  # one flag per option, named, typed and explained by its field
        meta = f.metadata
        choices = f"; one of: {', '.join(meta['choices'])}" if meta["choices"] else ""
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS,
                                  "help": f"{meta['help']} (default: {getattr(defaults, f.name)!r}{choices})"}
        if meta["parse"] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            # a list option takes several values and may be repeated (--control a@x --control b@y)
            kwargs.update(type=meta["parse"], choices=meta["choices"], nargs="+" if meta["many"] else None,
                          action="extend" if meta["many"] else None,
                          metavar=f.name.upper() if meta["choices"] else None)  # the help lists the choices
        g.add_argument(_flag(f.name), **kwargs)
    return parser


def _load_model(checkpoint: Optional[str], device: str, dtype: Any) -> tuple[Any, str]:
    import omg
    if checkpoint:
        return omg.load_sdxl(checkpoint, device=device, dtype=dtype), checkpoint
    if os.path.exists(DEMO_CHECKPOINT):
        return omg.load_sdxl(DEMO_CHECKPOINT, device=device, dtype=dtype), DEMO_CHECKPOINT
    from omg.model import SDXL
    from omg.vae import VAEConfig
    warnings.warn("no --checkpoint and no demo weights in weights/demo/: running a small RANDOM model, so the "
                  "images are noise; pass --checkpoint with real SDXL weights")
    model = SDXL.random(vae_config=VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), norm_groups=8), device=device,
                        dtype=dtype)
    return model, "random-tiny"


def output_paths(out: str, index: int) -> tuple[str, str, str]:
    """(image path, stem, extension) of image `index` of a batch: out.png, out_1.png, out_2.png, ..."""
    stem, ext = os.path.splitext(out)
    ext = ext or ".png"
    stem = stem if index == 0 else f"{stem}_{index}"
    return stem + ext, stem, ext


def planned_outputs(args: argparse.Namespace, images: int, concepts: int) -> list[str]:
    """Every file a run of `images` images with `concepts` concepts writes (see _write_outputs)."""
    paths = []
    for i in range(images):
        out, stem, ext = output_paths(args.out, i)
        paths += [out, f"{stem}_stage1{ext}"]
        paths += [f"{stem}_masks{ext}"] if args.save_masks and concepts else []
        paths += [f"{stem}_attention_{j}{ext}" for j in range(concepts)] if args.save_attention else []
    return paths


def _gather(args: argparse.Namespace) -> dict:
    """The run's keys from the spec file (or the demo scene) and the flags, flags over the spec."""
    from omg.options import cli_options
    from omg.spec import load_spec

    spec = load_spec(args.spec) if args.spec else {}
    if not (args.spec or args.prompt or args.checkpoint or args.concept) and os.path.exists(DEMO_SPEC):
        spec = load_spec(DEMO_SPEC)  # bare `omg generate`: the demo world's scene, with its masks
        args.save_masks = True
    spec.update({k: getattr(args, k) for k in ("prompt", "checkpoint", "device", "dtype")
                 if getattr(args, k) is not None})
    spec.update({f.name: getattr(args, f.name) for f in cli_options() if hasattr(args, f.name)})
    spec["concepts"] = spec.get("concepts", []) + [parse_concept(c) for c in args.concept]
    return spec


def _check_device(device: str) -> None:
    import torch

    from omg.errors import OptionError
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError(f"--device {device!r}: not a device name (cuda, cuda:1, cpu)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {device}: CUDA is not available on this machine; use --device cpu")


def _concept(c: dict) -> Any:
    """An omg.Concept from a spec's concept (a mask path becomes the image it names)."""
    import omg
    from omg.errors import SpecError
    c = dict(c)
    if isinstance(c.get("mask"), str):
        from PIL import Image
        try:
            with Image.open(c["mask"]) as im:
                c["mask"] = im.convert("L")
        except OSError as e:
            raise SpecError(f"concept {c['class_name']!r}: cannot read the mask image {c['mask']} ({e})") from e
    return omg.Concept(**c)


def generate_command(args: argparse.Namespace) -> int:
    import torch

    import omg
    from omg.errors import CheckpointError, OptionError
    from omg.imagefile import check_output_path
    from omg.options import option_names

    # ---- everything that can fail, checked before any weights are loaded ------------------------------------
    spec = _gather(args)
    prompt, concept_specs = spec.get("prompt"), spec["concepts"]
    if not prompt:
        raise OptionError("a --prompt (or 'prompt' in the spec) is required")
    device = spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    dtype_name = spec.get("dtype") or ("fp16" if device.startswith("cuda") else "fp32")
    chosen = {k: v for k, v in spec.items() if k in option_names()}
    if not spec.get("checkpoint"):  # the demo weights or the random fallback: both are 256-pixel models
        chosen.setdefault("height", 256)
        chosen.setdefault("width", 256)
    elif not os.path.exists(spec["checkpoint"]):
        raise CheckpointError(f"{spec['checkpoint']}: no such checkpoint file or folder")
    options = omg.OMGOptions(**chosen)
    concepts = [_concept(c) for c in concept_specs]
    omg.check_request(prompt, concepts, options)
    for path in planned_outputs(args, len(options.image_seeds), len(concepts)):
        check_output_path(path)

    # ---- the work -------------------------------------------------------------------------------------------
    model, source = _load_model(spec.get("checkpoint"), device, getattr(torch, DTYPES[dtype_name]))
    results = omg.generate(model, prompt, concepts, options)
    results = results if isinstance(results, list) else [results]
    written = _write_outputs(args, results, spec, options, device, dtype_name, source)
    log.info("wrote %s", ", ".join(written))
    log.info("timings (s): %s", ", ".join(f"{k} {v:.2f}" for k, v in results[0].timings.items()))
    return 0


def _write_outputs(args: argparse.Namespace, results: list, spec: dict, options: Any, device: str, dtype_name: str,
                   source: str) -> list[str]:
    """Every file of the run, staged and renamed together (AtomicFileSet): all appear, or none does."""
    import omg
    from omg.atomic import AtomicFileSet
    from omg.hashes import lora_hash, model_hash
    from omg.imagefile import image_format, save_image
    from omg.infotext import LoraInfo, a1111_parameters, model_name
    from omg.masks import overlay_heatmap, overlay_masks
    from omg.spec import run_record

    prompt, concept_specs = spec["prompt"], spec["concepts"]
    checkpoint_file = source if os.path.exists(source) else None
    ckpt_hash = model_hash(checkpoint_file) if checkpoint_file else None
    loras = [LoraInfo(c["class_name"], c["prompt"], model_name(c.get("lora")), c.get("lora_scale", 0.8),
                      lora_hash(c["lora"]) if c.get("lora") else None) for c in concept_specs]
    hashes = {"model": ckpt_hash, "loras": [lora.hash for lora in loras]}
    names = [c["class_name"] for c in concept_specs]
    with AtomicFileSet() as files:
        for i, result in enumerate(results):
            out, stem, ext = output_paths(args.out, i)
            fmt = image_format(out)
            info = {"omg_version": omg.__version__, "hashes": hashes, "masks_found": result.concept_masks.found,
                    "mask_sources": result.mask_sources,
                    "timings_s": {k: round(v, 3) for k, v in result.timings.items()}}
            # the stage-1 image is the run with no blending steps (blending over zero steps gives stage 1)
            for path, image, run_options, stage in (
                    (out, result.image, options.replace(seed=result.seed, seeds=None, num_images=1,
                                                        store=result.store), 2),
                    (f"{stem}_stage1{ext}", result.stage1_image,
                     options.replace(seed=result.seed, seeds=None, num_images=1, blend_steps=0), 1)):
                record = run_record(prompt, concept_specs, spec.get("checkpoint"), device, dtype_name, run_options,
                                    path, {**info, "stage": stage})
                parameters = a1111_parameters(prompt, run_options, result.seed, model_name(checkpoint_file),
                                              ckpt_hash, loras, omg.__version__)
                save_image(image, files.path(path), fmt, parameters, record)
            if args.save_masks and concept_specs:
                save_image(overlay_masks(result.stage1_image, result.masks, names=names),
                           files.path(f"{stem}_masks{ext}"), fmt)
            if args.save_attention:
                for j in range(len(concept_specs)):
                    save_image(overlay_heatmap(result.stage1_image, result.heatmaps[j]),
                               files.path(f"{stem}_attention_{j}{ext}"), fmt)
            for name, found in zip(names, result.concept_masks.found):
                if not found:
                    log.warning("concept %r was not found in the stage-1 image of seed %d and was skipped", name,
                                result.seed)
        staged = [final for _, final in files.staged]
    return staged


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (a test's captured stream, too), not the one at set-up."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging() -> None:
    """omg's log lines on stderr as 'omg: message' (once per process)."""
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
        log.handlers[-1].setFormatter(logging.Formatter("omg: %(message)s"))
    log.setLevel(logging.INFO)


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate_command(args)
    except (ValueError, OSError, ImportError) as e:  # omg's input errors are ValueErrors: one line, no trace
        log.error("error: %s", e)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
