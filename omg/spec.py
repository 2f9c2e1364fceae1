"""Spec files for `omg generate --spec`: YAML, JSON, or an image omg wrote (its recorded run), checked key by key.

A spec holds the run keys (prompt, concepts, checkpoint, device, dtype) and any option of omg.OMGOptions under its
field name (steps: 30, blend_steps: 21, ...). Every key and value is checked before any weights are loaded: an
unknown key names the closest known one, a value of the wrong type names its key and the type expected, a YAML
or JSON syntax error its line. Paths (checkpoint, sam, each concept's lora and mask image) are relative to the
spec's folder; one not found there is looked up in omg's demo weights folder (weights/demo).

`run_record` writes the inverse: the whole run, every default filled in, paths relative to the image's folder
(or to the demo weights folder), so that `omg generate --spec image.png` renders the same image again.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Any, Callable, Optional

from omg.errors import SpecError

DEMO_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "demo")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # spec / --dtype name -> torch dtype
IMAGE_SPECS = (".png", ".jpg", ".jpeg", ".webp")
INFO_KEY = "info"  # what a run record says about the run that is not an input (hashes, timings): never read

Check = Callable[[Any], bool]


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_box(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 4 and all(_is_number(x) for x in v)


# key: (check, what is expected, may be null)
RUN_KEYS: dict[str, tuple[Check, str, bool]] = {
    "prompt": (_is_str, "a string (the global prompt naming each concept's class noun)", False),
    "concepts": (lambda v: isinstance(v, list), "a list of concepts (mappings with class_name, prompt, ...)", False),
    "checkpoint": (_is_str, "a path to an SDXL .safetensors file or diffusers folder (null: the demo weights)", True),
    "device": (_is_str, "a device name such as cuda, cuda:1 or cpu", True),
    "dtype": (lambda v: v in DTYPES, "one of " + ", ".join(DTYPES), True),
    INFO_KEY: (lambda v: isinstance(v, dict), "a mapping (written by omg, ignored when read)", True),
}
CONCEPT_KEYS: dict[str, tuple[Check, str, bool]] = {
    "class_name": (_is_str, "a string (the class noun in the global prompt)", False),
    "prompt": (_is_str, "a string (the concept's own prompt, with its identifier)", False),
    "lora": (_is_str, "a path to a LoRA file", True),
    "negative_prompt": (_is_str, "a string (null: the global negative prompt)", True),
    "lora_scale": (_is_number, "a number", False),
    "mask": (lambda v: _is_box(v) or _is_str(v), "a box [x0, y0, x1, y1] in pixels or a mask image path", True),
    "face": (_is_str, "a path to a face photo or a precomputed face (.safetensors/.npy): an InstantID concept", True),
}
REQUIRED_CONCEPT_KEYS = ("class_name", "prompt")
PATH_KEYS = ("checkpoint", "sam", "face_adapter", "identitynet", "face_models")  # run keys and options with paths
CONCEPT_PATH_KEYS = ("lora", "mask", "face")


def option_checks() -> dict[str, tuple[Check, str, bool]]:
    """The check of each OMGOptions field a spec may set, derived from the field's parser and type."""
    from omg.options import cli_options

    checks = {}
    for f in cli_options():
        parse, choices, many = f.metadata["parse"], f.metadata["choices"], f.metadata["many"]
        nullable = "Optional" in str(f.type) or "None" in str(f.type)
        if many and parse is int:
            check, what = (lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in v)), "a list of integers"
        elif many:  # control, style_lora: one entry or a list, each a string or a mapping of its fields
            check, what = (lambda v: all(isinstance(x, (str, dict)) for x in (v if isinstance(v, list) else [v]))
                           ), "a string or mapping, or a list of them"
        elif choices is not None:
            check, what = (lambda v, c=tuple(choices): v in c), "one of " + ", ".join(choices)
        elif parse is bool:
            check, what = (lambda v: isinstance(v, bool)), "true or false"
        elif parse is int:
            check, what = (lambda v: isinstance(v, int) and not isinstance(v, bool)), "an integer"
        elif parse is float:
            check, what = _is_number, "a number"
        elif parse is json.loads:
            check, what = (lambda v: isinstance(v, dict)), "a mapping"
        else:
            check, what = _is_str, "a string"
        checks[f.name] = (check, what, nullable)
    return checks


def known_keys() -> list[str]:
    return list(RUN_KEYS) + list(option_checks())


# ---------------------------------------------------------------------------------------------- reading

def load_spec(path: str) -> dict:
    """A spec file (YAML, JSON, or an image's recorded run), checked, with its paths made absolute."""
    if not os.path.isfile(path):
        raise SpecError(f"{path}: no such spec file")
    ext = os.path.splitext(path)[1].lower()
    if ext in IMAGE_SPECS:
        from omg.imagefile import read_metadata
        _, spec = read_metadata(path)
        if spec is None:
            raise SpecError(f"{path}: the image holds no omg run record (only images written by omg generate do)")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        spec = _parse_json(path, text) if ext == ".json" else _parse_yaml(path, text)
    return check_spec(spec, path)


def _parse_yaml(path: str, text: str) -> Any:
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}:{where}: not valid YAML: {problem}") from e


def _parse_json(path: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: line {e.lineno}, column {e.colno}: not valid JSON: {e.msg}") from e


def _unknown(where: str, key: Any, known: list[str]) -> SpecError:
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return SpecError(f"{where}: unknown key {key!r}{hint} Known keys: {', '.join(known)}")


def _check_value(where: str, key: str, value: Any, rule: tuple[Check, str, bool]) -> None:
    check, what, nullable = rule
    if value is None and nullable:
        return
    if not check(value):
        raise SpecError(f"{where}: {key} must be {what}{' or null' if nullable else ''}, got {value!r}")


def check_spec(spec: Any, path: str) -> dict:
    """Check every key and value of a parsed spec; returns a copy with paths resolved against the spec's folder."""
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: expected a mapping of keys (prompt, concepts, steps, ...), got "
                        f"{type(spec).__name__}")
    rules = {**RUN_KEYS, **option_checks()}
    for key, value in spec.items():
        if key not in rules:
            raise _unknown(path, key, list(rules))
        _check_value(path, key, value, rules[key])
    spec = {k: v for k, v in spec.items() if k != INFO_KEY}
    base = os.path.dirname(os.path.abspath(path))
    for key in PATH_KEYS:
        if spec.get(key) is not None:
            spec[key] = resolve_path(spec[key], base)
    spec["concepts"] = [_check_concept(path, i, c, base) for i, c in enumerate(spec.get("concepts") or [])]
    _resolve_entry_paths(path, spec, base)
    return spec


def entry_path_keys() -> tuple:
    """The list options whose entries hold paths: (option, its entry type, the entry's path fields)."""
    from omg.control import Control
    from omg.style import StyleLora

    return (("control", Control, ("image", "model")), ("style_lora", StyleLora, ("lora",)))


def _resolve_entry_paths(path: str, spec: dict, base: str) -> None:
    """Control images, ControlNets and style LoRAs named in a spec are relative to it, as concept LoRAs are."""
    from omg.errors import OptionError

    for key, kind, fields in entry_path_keys():
        entries = spec.get(key)
        if entries is None:
            continue
        resolved = []
        for i, entry in enumerate(entries if isinstance(entries, list) else [entries]):
            try:
                described = kind.parse(entry).describe()
            except OptionError as e:
                raise SpecError(f"{path}: {key}[{i}]: {e}") from None
            resolved.append({**described, **{f: resolve_path(described[f], base) for f in fields}})
        spec[key] = resolved


def _check_concept(path: str, index: int, concept: Any, base: str) -> dict:
    where = f"{path}: concepts[{index}]"
    if not isinstance(concept, dict):
        raise SpecError(f"{where}: must be a mapping with class_name and prompt, got {concept!r}")
    for key, value in concept.items():
        if key not in CONCEPT_KEYS:
            raise _unknown(where, key, list(CONCEPT_KEYS))
        _check_value(where, key, value, CONCEPT_KEYS[key])
    missing = [k for k in REQUIRED_CONCEPT_KEYS if k not in concept]
    if missing:
        raise SpecError(f"{where}: missing {', '.join(missing)} (a concept needs class_name and prompt)")
    concept = dict(concept)
    for key in CONCEPT_PATH_KEYS:
        if isinstance(concept.get(key), str):
            concept[key] = resolve_path(concept[key], base)
    return concept


def resolve_path(path: str, base: str) -> str:
    """An absolute path: as given, or relative to `base` (the spec's folder), else to the demo weights folder."""
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return path
    beside = os.path.join(base, path)
    demo = os.path.join(DEMO_FOLDER, path)
    return demo if not os.path.exists(beside) and os.path.exists(demo) else beside


# ---------------------------------------------------------------------------------------------- writing

def portable_path(path: Optional[str], image_folder: str) -> Optional[str]:
    """A recorded path: relative to the image's folder, or to the demo weights folder for the demo's files."""
    if path is None:
        return None
    path = os.path.abspath(path)
    for root in (os.path.abspath(image_folder), DEMO_FOLDER):
        if os.path.commonpath([path, root]) == root:
            return os.path.relpath(path, root).replace(os.sep, "/")
    try:
        return os.path.relpath(path, image_folder).replace(os.sep, "/")
    except ValueError:  # another drive (Windows): nothing relative exists
        return os.path.basename(path)


def run_record(prompt: str, concepts: list[dict], checkpoint: Optional[str], device: str, dtype: str, options: Any,
               image_path: str, info: Optional[dict] = None) -> dict:
    """The whole run behind one image, every option filled in and no absolute path (see the module docstring)."""
    from omg.options import cli_options
    from omg.pipeline import Concept

    folder = os.path.dirname(os.path.abspath(image_path))
    defaults = {f.name: f.default for f in dataclasses.fields(Concept)}
    filled = [{**defaults, **c} for c in concepts]
    for c in filled:
        c["lora"] = portable_path(c["lora"], folder)
        if isinstance(c.get("face"), str):
            c["face"] = portable_path(c["face"], folder)
        if isinstance(c["mask"], str):
            c["mask"] = portable_path(c["mask"], folder)
        elif c["mask"] is not None:
            c["mask"] = list(c["mask"])
    record: dict[str, Any] = {"prompt": prompt, "concepts": filled, "checkpoint": portable_path(checkpoint, folder),
                              "device": device, "dtype": dtype}
    for f in cli_options():
        value = getattr(options, f.name)
        record[f.name] = list(value) if isinstance(value, tuple) else value
    record["sam"] = portable_path(record["sam"], folder) if isinstance(record["sam"], str) else None
    for key in ("face_adapter", "identitynet", "face_models"):
        if key in record:
            record[key] = portable_path(record[key], folder) if isinstance(record[key], str) else None
    for key, _, fields in entry_path_keys():  # Control / StyleLora objects as their fields, paths made portable
        record[key] = [{**d, **{f: portable_path(d[f], folder) for f in fields}}
                       for d in (entry.describe() for entry in getattr(options, key))]
    record.update(num_images=1, seeds=None)  # each image records its own seed
    if info:
        record[INFO_KEY] = info
    return record

