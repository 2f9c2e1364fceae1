"""Checkpoint reading: a validating safetensors reader, weights-only pickles, layout detection, strict loading.

Nothing is allocated before the whole header has been checked (sizes, dtypes, offsets inside the file,
no overlaps). Tensors are then viewed through a private mmap and copied one at a time straight to the
target device and dtype; the pages of each source range are released right after (MADV_DONTNEED), so
host memory holds at most the loaded model plus one tensor. Modules are built on the meta device and
filled with ``load_state_dict(assign=True, strict=True)`` only after every key and shape has been
checked, so a bad file gives one CheckpointError and no partial model.
"""
from __future__ import annotations

import glob
import json
import math
import mmap
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from omg import keymap
from omg.errors import CheckpointError

PathLike = Union[str, "os.PathLike[str]"]
SHOW = 5  # offending keys named per kind of problem
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors package refuses larger headers too

_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in _DTYPES.items()}


def _first(items: Iterable[Any], n: int = SHOW) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _convert(t: Tensor, device: Union[str, torch.device], dtype: Optional[torch.dtype]) -> Tensor:
    """t on device, floating tensors in dtype (integer/bool tensors keep theirs); always a fresh copy."""
    target = dtype if dtype is not None and t.is_floating_point() else t.dtype
    out = t.to(device=device, dtype=target)
    if out.data_ptr() == t.data_ptr() and out.device == t.device:
        out = out.clone()  # never hand out memory that belongs to the file mapping
    return out


# ---------------------------------------------------------------------------------------------- sources

class TensorSource:
    """A set of named tensors in one file (or a sharded set): shapes/dtypes first, data on request."""

    path: str
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def meta(self, key: str) -> Tensor:
        """A meta tensor of the stored shape and dtype (no data)."""
        raise NotImplementedError

    def tensor(self, key: str, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets inside the data region
    end: int


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


class SafetensorsFile(TensorSource):
    """A safetensors file whose header has been validated completely before anything is mapped or allocated."""

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        self._mm: Optional[mmap.mmap] = None
        self._file = None
        try:
            with open(self.path, "rb") as f:
                self.file_size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file: {self.file_size} bytes, "
                                          f"shorter than the 8-byte header length")
                n = int.from_bytes(head, "little")
                if n < 2 or n > min(MAX_HEADER_BYTES, self.file_size - 8):
                    raise CheckpointError(f"{self.path}: corrupt safetensors header: header length {n} bytes, "
                                          f"but the file has {self.file_size - 8} bytes after the length field "
                                          f"(limit {MAX_HEADER_BYTES})")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e}") from e
        if len(raw) != n:
            raise CheckpointError(f"{self.path}: truncated header: read {len(raw)} of {n} bytes")
        self.data_start = 8 + n
        self.data_size = self.file_size - self.data_start
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not valid UTF-8 JSON): {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header: expected a JSON object, "
                                  f"got {type(header).__name__}")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{self.path}: corrupt safetensors header: __metadata__ must map strings "
                                  f"to strings")
        self.metadata = metadata
        self.entries = self._validate(header)

    def _validate(self, header: dict[str, Any]) -> dict[str, _Entry]:
        """Every entry checked; one error naming the first offending keys."""
        problems: list[str] = []
        entries: dict[str, _Entry] = {}
        for key, info in header.items():
            if len(problems) >= SHOW:
                break
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
                problems.append(f"{key!r}: entry must have dtype, shape and data_offsets")
                continue
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(dtype, str) or dtype not in _DTYPES:
                problems.append(f"{key!r}: unknown dtype {dtype!r} (known: {', '.join(_DTYPES)})")
                continue
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                problems.append(f"{key!r}: shape {shape!r} is not a list of non-negative integers")
                continue
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
                problems.append(f"{key!r}: data_offsets {offsets!r} must be two integers [begin, end]")
                continue
            if not 0 <= offsets[0] <= offsets[1] <= self.data_size:
                problems.append(f"{key!r}: data_offsets {offsets!r} outside the data region "
                                f"[0, {self.data_size}] of the file")
                continue
            expected = math.prod(shape) * _ITEMSIZE[dtype]
            if offsets[1] - offsets[0] != expected:
                problems.append(f"{key!r}: {dtype}{shape} needs {expected} bytes, data_offsets span "
                                f"{offsets[1] - offsets[0]}")
                continue
            entries[key] = _Entry(dtype, tuple(shape), offsets[0], offsets[1])
        if not problems:
            spans = sorted((e.begin, e.end, k) for k, e in entries.items() if e.end > e.begin)
            for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
                if b1 < e0:
                    problems.append(f"{k0!r} [{b0}, {e0}) overlaps {k1!r} [{b1}, {e1})")
                    if len(problems) >= SHOW:
                        break
        if problems:
            raise CheckpointError(f"{self.path}: invalid safetensors header: " + "; ".join(problems))
        return entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def meta(self, key: str) -> Tensor:
        e = self.entries[key]
        return torch.empty(e.shape, dtype=_DTYPES[e.dtype], device="meta")

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            if sys.byteorder != "little":
                raise CheckpointError(f"{self.path}: safetensors data is little-endian; this machine is not")
            self._file = open(self.path, "rb")
            size = os.fstat(self._file.fileno()).st_size
            if size != self.file_size:
                raise CheckpointError(f"{self.path}: the file changed size while loading "
                                      f"({self.file_size} -> {size} bytes)")
            # private (copy-on-write) mapping: writable for torch.frombuffer, never writes to the file
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mm

    def _view(self, key: str) -> Tensor:
        """The stored bytes of key as a tensor over the mapping (no copy); offsets were validated."""
        e = self.entries[key]
        dtype = _DTYPES[e.dtype]
        count = math.prod(e.shape)
        if count == 0:
            return torch.empty(e.shape, dtype=dtype)
        return torch.frombuffer(self._map(), dtype=dtype, count=count,
                                offset=self.data_start + e.begin).view(e.shape)

    def _release(self, key: str) -> None:
        """Drop the mapped pages of key from this process (a private, unmodified mapping re-reads on demand)."""
        e = self.entries[key]
        if self._mm is None or e.end == e.begin:
            return
        page = mmap.PAGESIZE
        start = (self.data_start + e.begin) // page * page
        stop = min(-(-(self.data_start + e.end) // page) * page, self.file_size)
        if stop > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def tensor(self, key: str, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> Tensor:
        view = self._view(key)
        out = _convert(view, device, dtype)
        del view
        self._release(key)
        return out

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with it
                pass
            self._mm = None
        if self._file is not None:
            self._file.close()
            self._file = None


class PickleFile(TensorSource):
    """A .ckpt/.pt/.bin state dict, read only through torch.load(weights_only=True) (memory-mapped when possible)."""

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        self.metadata = {}
        try:
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{self.path}: refused: not loadable with torch.load(weights_only=True) "
                                  f"(only tensors and plain containers are allowed): {e}") from e
        except Exception as e:  # a corrupt archive raises whatever its parser raises
            raise CheckpointError(f"{self.path}: cannot read as a PyTorch checkpoint: {type(e).__name__}: {e}") from e
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{self.path}: expected a state dict (a mapping of names to tensors), "
                                  f"got {type(obj).__name__}")
        self._tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def meta(self, key: str) -> Tensor:
        t = self._tensors[key]
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def tensor(self, key: str, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> Tensor:
        return _convert(self._tensors[key], device, dtype)

    def close(self) -> None:
        self._tensors = {}


class ShardedSource(TensorSource):
    """Several files behind one ``*.index.json`` (weight_map: key -> shard file name in the same folder)."""

    def __init__(self, index_path: PathLike):
        self.path = os.fspath(index_path)
        folder = os.path.dirname(self.path)
        try:
            with open(self.path, "rb") as f:
                index = json.loads(f.read(MAX_HEADER_BYTES + 1).decode("utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{self.path}: cannot read the shard index: {e}") from e
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{self.path}: shard index needs a weight_map of key -> file name")
        bad = [v for v in set(weight_map.values()) if os.path.basename(v) != v or v in ("", ".", "..")]
        if bad:
            raise CheckpointError(f"{self.path}: shard names must be plain file names in the same folder: "
                                  f"{_first(sorted(bad))}")
        self.metadata = {}
        self._shards: dict[str, TensorSource] = {}
        self._where: dict[str, TensorSource] = {}
        try:
            for name in sorted(set(weight_map.values())):
                self._shards[name] = shard = open_source(os.path.join(folder, name))
                for key in shard.keys():
                    if key in self._where:
                        raise CheckpointError(f"{self.path}: key {key!r} is in two shards")
                    self._where[key] = shard
            absent = [k for k, v in weight_map.items() if self._where.get(k) is not self._shards[v]]
            if absent:
                raise CheckpointError(f"{self.path}: keys of the weight_map are not in their shard: {_first(absent)}")
        except CheckpointError:
            self.close()
            raise

    def keys(self) -> list[str]:
        return list(self._where)

    def meta(self, key: str) -> Tensor:
        return self._where[key].meta(key)

    def tensor(self, key: str, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> Tensor:
        return self._where[key].tensor(key, device, dtype)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


class MetaSource(TensorSource):
    """Named meta tensors standing in for a file: layout and shape checks with no data (tests, dry runs)."""

    def __init__(self, tensors: Mapping[str, Tensor], path: str = "<meta>", metadata: Optional[dict] = None):
        self.path = path
        self.metadata = dict(metadata or {})
        self._tensors = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def meta(self, key: str) -> Tensor:
        return self._tensors[key]

    def tensor(self, key: str, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> Tensor:
        raise CheckpointError(f"{self.path}: a MetaSource has no data (key {key!r})")


def open_source(path: PathLike) -> TensorSource:
    """A safetensors file, a shard index (*.index.json) or a weights-only pickle, by its name and magic."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".index.json"):
        return ShardedSource(path)
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    if path.endswith((".ckpt", ".pt", ".pth", ".bin")) or zipfile.is_zipfile(path):
        return PickleFile(path)
    return SafetensorsFile(path)


def load_state_dict(path: PathLike, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
                    keys: Optional[Iterable[str]] = None, prefix: Optional[str] = None) -> dict[str, Tensor]:
    """Tensors of a .safetensors file (or shard index, or weights-only pickle) on device, floats in dtype.

    keys: only these (each must exist). prefix: only keys starting with it, returned with it stripped.
    """
    with open_source(path) as source:
        names = source.keys()
        if keys is not None:
            wanted, present = list(keys), set(names)
            absent = [k for k in wanted if k not in present]
            if absent:
                raise CheckpointError(f"{source.path}: requested keys not in the file: {_first(absent)}")
            names = wanted
        if prefix is not None:
            names = [k for k in names if k.startswith(prefix)]
        strip = len(prefix) if prefix else 0
        return {k[strip:]: source.tensor(k, device, dtype) for k in names}


# ---------------------------------------------------------------------------------------------- layouts

@dataclass
class Part:
    """One model component of a checkpoint: where its tensors are and how module keys are made from them."""

    name: str  # "unet" | "vae" | "text"
    source: TensorSource
    recipes: dict[str, keymap.Recipe]  # module key -> recipe over source keys
    unexpected: list[str]  # source keys that belong to this part but map to no module key
    file_name: Callable[[str], str]  # module key -> how the file would name it (for messages)
    hints: dict[str, Any] = field(default_factory=dict)  # config fields the shapes cannot tell


@dataclass
class Checkpoint:
    path: str
    layout: str  # "sgm", "sgm-unet", "diffusers-unet", "diffusers"
    parts: dict[str, Part]
    sources: list[TensorSource]
    unexpected: list[str] = field(default_factory=list)  # keys of no component at all

    def close(self) -> None:
        for s in self.sources:
            s.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_HINT_FIELDS = {  # per config: the fields shapes leave no trace of, and their checks
    "unet": {"head_dim": int, "norm_groups": int},
    "vae": {"norm_groups": int, "scaling_factor": float},
    "clip_l": {"heads": int, "act": str},
    "clip_g": {"heads": int, "act": str},
}


def _hints_from_metadata(path: str, metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """save_sgm stores each config as JSON under "omg.config"; keep only the fields shapes cannot give."""
    raw = metadata.get("omg.config")
    if raw is None:
        return {}
    try:
        configs = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: metadata omg.config is not valid JSON: {e}") from e
    if not isinstance(configs, dict):
        raise CheckpointError(f"{path}: metadata omg.config must be a JSON object")
    return {part: {k: configs[part][k] for k in fields if k in configs[part]}
            for part, fields in _HINT_FIELDS.items() if isinstance(configs.get(part), dict)}


def _check_hints(path: str, part: str, hints: Mapping[str, Any]) -> None:
    """Config hints come from file metadata or config.json: validate before they shape a module."""
    groups = {"clip_l": hints.get("clip_l", {}), "clip_g": hints.get("clip_g", {})} if part == "text" else {part: hints}
    for group, values in groups.items():
        for k, v in values.items():
            kind = _HINT_FIELDS[group].get(k)
            ok = kind is not None and ((isinstance(v, str) and v in ("gelu", "quick_gelu")) if kind is str else (
                type(v) is int and 0 < v <= 1 << 16 if kind is int else
                type(v) in (int, float) and math.isfinite(v) and v > 0))
            if not ok:
                raise CheckpointError(f"{path}: config value {group}.{k} = {v!r} is not supported")


def _sgm_parts(source: TensorSource, layout: str) -> tuple[dict[str, Part], list[str]]:
    keys = source.keys()
    hints = _hints_from_metadata(source.path, source.metadata)
    parts: dict[str, Part] = {}
    if layout == "sgm-unet":  # UNet keys without the model.diffusion_model. prefix
        recipes = {k: keymap.Recipe((k,)) for k in keys}
        parts["unet"] = Part("unet", source, recipes, [], lambda k: k, hints.get("unet", {}))
        return parts, []

    def with_prefix(component: str) -> Callable[[str], str]:
        return lambda k: keymap.SGM_PREFIXES[component] + k

    parts["unet"] = Part("unet", source, keymap.sgm_recipes(keys, "unet"), [], with_prefix("unet"), hints.get("unet", {}))
    if any(k.startswith(keymap.SGM_PREFIXES["vae"]) for k in keys):
        parts["vae"] = Part("vae", source, keymap.sgm_recipes(keys, "vae"), [], with_prefix("vae"), hints.get("vae", {}))
    if any(k.startswith("conditioner.") for k in keys):
        recipes = {f"{enc}.{k}": r for enc in ("clip_l", "clip_g") for k, r in keymap.sgm_recipes(keys, enc).items()}

        def text_name(k: str) -> str:
            enc, _, rest = k.partition(".")
            return keymap.SGM_PREFIXES[enc] + rest if enc in keymap.SGM_PREFIXES else k
        parts["text"] = Part("text", source, recipes, [], text_name,
                             {"clip_l": hints.get("clip_l", {}), "clip_g": hints.get("clip_g", {})})
    known = tuple(keymap.SGM_PREFIXES.values())
    stray = [k for k in keys if not k.startswith(known) and k not in keymap.HARMLESS_SGM_KEYS]
    return parts, stray


def _unet_diffusers_part(source: TensorSource, hints: dict[str, Any], folder: str = "") -> Part:
    recipes, unmapped = keymap.unet_recipes_from_diffusers(source.keys())
    naming = keymap.UNetNaming.from_diffusers_keys(source.keys())

    def file_name(k: str) -> str:
        return folder + (keymap.unet_sgm_name_to_diffusers(k, naming) or k)
    return Part("unet", source, recipes, unmapped, file_name, hints)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read(1 << 20).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot read the config: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: a config must be a JSON object")
    return value


def _diffusers_unet_hints(path: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """head_dim and norm_groups from a diffusers UNet config.json (attention_head_dim is heads per level)."""
    hints: dict[str, Any] = {}
    if isinstance(cfg.get("norm_num_groups"), int):
        hints["norm_groups"] = cfg["norm_num_groups"]
    channels = cfg.get("block_out_channels")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim")
    kinds = cfg.get("down_block_types")
    if isinstance(channels, list) and heads is not None and isinstance(kinds, list):
        heads = [heads] * len(channels) if isinstance(heads, int) else heads
        try:
            dims = {c // h for c, h, kind in zip(channels, heads, kinds) if "CrossAttn" in str(kind)}
        except (TypeError, ZeroDivisionError) as e:
            raise CheckpointError(f"{path}: bad attention_head_dim / block_out_channels: {e}") from e
        if len(dims) > 1:
            raise CheckpointError(f"{path}: per-level head widths {sorted(dims)} differ; this UNet uses one "
                                  f"head width (SGM num_head_channels)")
        if dims:
            hints["head_dim"] = dims.pop()
    return hints


_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


def _component_source(folder: str) -> TensorSource:
    """The weights of one diffusers component folder: shard index > .safetensors > fp16 variant > .bin."""
    candidates = []
    for base in _WEIGHT_NAMES:
        candidates += [f"{base}.safetensors.index.json", f"{base}.safetensors", f"{base}.fp16.safetensors.index.json",
                       f"{base}.fp16.safetensors", f"{base}.bin.index.json", f"{base}.bin", f"{base}.fp16.bin"]
    for name in candidates:
        if os.path.isfile(os.path.join(folder, name)):
            return open_source(os.path.join(folder, name))
    others = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if len(others) == 1:
        return open_source(others[0])
    raise CheckpointError(f"{folder}: no weights found (expected e.g. diffusion_pytorch_model.safetensors or "
                          f"model.safetensors; found {_first(sorted(os.listdir(folder)))})")


DIFFUSERS_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")


def checkpoint_from_diffusers(path: str, sources: Mapping[str, TensorSource],
                              configs: Optional[Mapping[str, dict]] = None) -> Checkpoint:
    """A diffusers model from its component sources ({"unet": ..., "vae": ..., "text_encoder": ..., ...})
    and their config.json contents (used only for what shapes cannot tell: heads, groups, activation)."""
    configs = configs or {}
    if "unet" not in sources:
        raise CheckpointError(f"{path}: a diffusers model needs unet/")
    _other_architecture(f"{path}/unet", sources["unet"].keys(), sources["unet"], "diffusers-unet")
    unet_hints = _diffusers_unet_hints(f"{path}/unet", configs.get("unet", {}))
    parts = {"unet": _unet_diffusers_part(sources["unet"], unet_hints, "unet/")}
    if "vae" in sources:
        src, cfg = sources["vae"], configs.get("vae", {})
        recipes, unmapped = keymap.vae_recipes_from_diffusers(src.keys())
        hints = {k: cfg[h] for k, h in (("norm_groups", "norm_num_groups"), ("scaling_factor", "scaling_factor"))
                 if h in cfg}
        levels = keymap.vae_num_levels(src.keys(), diffusers=True)
        parts["vae"] = Part("vae", src, recipes, ["vae/" + k for k in unmapped],
                            lambda k: "vae/" + (keymap.vae_sgm_name_to_diffusers(k, levels) or k), hints)
    has_l, has_g = "text_encoder" in sources, "text_encoder_2" in sources
    if has_l != has_g:
        raise CheckpointError(f"{path}: has {'text_encoder' if has_l else 'text_encoder_2'} but not the other; "
                              f"SDXL needs both text encoders")
    if has_l:
        parts["text"] = _diffusers_text_part(path, sources["text_encoder"], sources["text_encoder_2"], configs)
    return Checkpoint(path, "diffusers", parts, list(sources.values()))


def _open_diffusers_folder(folder: str) -> Checkpoint:
    sources: dict[str, TensorSource] = {}
    try:
        configs = {}
        for sub in DIFFUSERS_FOLDERS:
            if os.path.isdir(os.path.join(folder, sub)):
                sources[sub] = _component_source(os.path.join(folder, sub))
                cfg = os.path.join(folder, sub, "config.json")
                configs[sub] = _read_json(cfg) if os.path.isfile(cfg) else {}
        return checkpoint_from_diffusers(folder, sources, configs)
    except CheckpointError:
        for s in sources.values():
            s.close()
        raise


def _diffusers_text_part(path: str, src_l: TensorSource, src_g: TensorSource, configs: Mapping[str, dict]) -> Part:
    rec_l, un_l = keymap.clip_l_recipes_from_hf(src_l.keys())
    rec_g, un_g = keymap.clip_g_recipes_from_hf(src_g.keys())
    source = _JoinedSource({"text_encoder/": src_l, "text_encoder_2/": src_g}, path)
    recipes = {f"clip_l.{k}": keymap.Recipe(tuple("text_encoder/" + s for s in r.sources), r.convert)
               for k, r in rec_l.items()}
    recipes.update({f"clip_g.{k}": keymap.Recipe(tuple("text_encoder_2/" + s for s in r.sources), r.convert)
                    for k, r in rec_g.items()})
    hints = {}
    for enc, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        cfg = configs.get(sub, {})
        hints[enc] = {k: cfg[h] for k, h in (("heads", "num_attention_heads"), ("act", "hidden_act")) if h in cfg}

    def file_name(k: str) -> str:
        enc, _, rest = k.partition(".")
        if enc == "clip_l":
            return "text_encoder/" + rest
        try:
            names = list(keymap.clip_g_to_hf({rest: torch.empty(3, 3, device="meta")}))
        except KeyError:
            return "text_encoder_2/" + k
        return "text_encoder_2/" + " / ".join(names)
    unexpected = ["text_encoder/" + k for k in un_l] + ["text_encoder_2/" + k for k in un_g]
    return Part("text", source, recipes, unexpected, file_name, hints)


class _JoinedSource(TensorSource):
    """Sources under name prefixes ("text_encoder/" + key), read as one."""

    def __init__(self, sources: Mapping[str, TensorSource], path: str):
        self._sources = dict(sources)
        self.path = path
        self.metadata = {}

    def _split(self, key: str) -> tuple[TensorSource, str]:
        head, rest = key.split("/", 1)
        return self._sources[head + "/"], rest

    def keys(self) -> list[str]:
        return [p + k for p, s in self._sources.items() for k in s.keys()]

    def meta(self, key: str) -> Tensor:
        src, k = self._split(key)
        return src.meta(k)

    def tensor(self, key: str, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> Tensor:
        src, k = self._split(key)
        return src.tensor(k, device, dtype)


def detect_layout(keys: Iterable[str]) -> Optional[str]:
    """"sgm" (single file, prefixed), "sgm-unet" (bare SGM UNet keys), "diffusers-unet", or None."""
    keys = list(keys)
    if any(k.startswith(keymap.SGM_PREFIXES["unet"]) for k in keys):
        return "sgm"
    if any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in keys):
        return "sgm-unet"
    if any(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in keys):
        return "diffusers-unet"
    return None


def _other_architecture(path: str, keys: list[str], source: TensorSource, layout: str) -> None:
    """Reject SD 1.x/2.x and other non-SDXL files with what was found against what SDXL has."""
    found = []
    if any(k.startswith("cond_stage_model.") for k in keys):
        found.append("a cond_stage_model.* text encoder (SD 1.x/2.x)")
    prefix = keymap.SGM_PREFIXES["unet"] if layout == "sgm" else ""
    label = {"sgm": prefix + "label_emb.0.0.weight", "sgm-unet": "label_emb.0.0.weight"}.get(
        layout, "add_embedding.linear_1.weight")
    unet_keys = [k for k in keys if k.startswith(prefix)]
    conv_proj = [k for k in unet_keys if k.endswith("proj_in.weight") and source.meta(k).ndim == 4]
    if conv_proj:
        found.append(f"{conv_proj[0]} is a 1x1 conv {list(source.meta(conv_proj[0]).shape)} (SD 1.x); "
                     f"SDXL's proj_in is Linear")
    if label not in keys:
        found.append(f"no {label} (SDXL's 2816-d vector embedding)")
        to_k = [k for k in unet_keys if k.endswith("attn2.to_k.weight")]
        if to_k:
            width = source.meta(to_k[0]).shape[-1]
            era = {768: "SD 1.x", 1024: "SD 2.x"}.get(width, "not SDXL")
            found.append(f"text context width {width} ({era}; SDXL has 2048)")
    if layout == "sgm" and any(k.startswith("conditioner.") for k in keys):
        odd = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith("conditioner.")}
                     - {"conditioner.embedders.0.transformer", "conditioner.embedders.1.model"})
        if odd:
            found.append(f"text encoders {_first(odd)} (SDXL base has conditioner.embedders.0.transformer "
                         f"CLIP-L and conditioner.embedders.1.model bigG)")
    if found:
        raise CheckpointError(f"{path}: not an SDXL checkpoint: found " + "; ".join(found) + ". Expected the SDXL "
                              f"base layout (model.diffusion_model.label_emb.0.0.weight [1280, 2816], Linear "
                              f"proj_in, context 2048, conditioner.embedders.{{0,1}}).")


def checkpoint_from_source(source: TensorSource) -> Checkpoint:
    """A single file's layout (SGM, or a UNet alone in SGM or diffusers layout); rejects other architectures."""
    path, keys = source.path, source.keys()
    layout = detect_layout(keys)
    if layout is None:
        raise CheckpointError(f"{path}: unrecognized layout: found {len(keys)} keys like {_first(keys[:5])}; "
                              f"expected an SDXL single file (model.diffusion_model.*, first_stage_model.*, "
                              f"conditioner.embedders.*) or a UNet (input_blocks.* / down_blocks.*)")
    _other_architecture(path, keys, source, layout)
    if layout == "diffusers-unet":
        hints = _hints_from_metadata(path, source.metadata).get("unet", {})
        return Checkpoint(path, layout, {"unet": _unet_diffusers_part(source, hints)}, [source])
    parts, stray = _sgm_parts(source, layout)
    return Checkpoint(path, layout, parts, [source], stray)


def open_checkpoint(path: PathLike) -> Checkpoint:
    """Open a single file (SGM, or a UNet alone in SGM or diffusers layout) or a diffusers folder; detect its layout."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        source = open_source(path)
        try:
            return checkpoint_from_source(source)
        except CheckpointError:
            source.close()
            raise
    if any(os.path.isdir(os.path.join(path, sub)) for sub in DIFFUSERS_FOLDERS):
        return _open_diffusers_folder(path)
    source = _component_source(path)  # a diffusers UNet folder on its own (config.json + weights)
    try:
        if detect_layout(source.keys()) != "diffusers-unet":
            raise CheckpointError(f"{path}: a folder without unet/ must hold a diffusers UNet; found keys like "
                                  f"{_first(source.keys()[:3])}")
        _other_architecture(path, source.keys(), source, "diffusers-unet")
        cfg_path = os.path.join(path, "config.json")
        hints = _diffusers_unet_hints(path, _read_json(cfg_path)) if os.path.isfile(cfg_path) else {}
        return Checkpoint(path, "diffusers-unet", {"unet": _unet_diffusers_part(source, hints)}, [source])
    except CheckpointError:
        source.close()
        raise


# ---------------------------------------------------------------------------------------------- strict loading

@dataclass
class Plan:
    """A part checked against the module its config builds: ready to load with no surprises."""

    part: Part
    config: Any
    module: Optional[nn.Module] = None  # built on meta during the check, or at load time


def _infer_config(part: Part, shapes: dict[str, Tensor]) -> Any:
    """The component's config from tensor shapes, plus the hints for what shapes cannot tell."""
    h = part.hints
    if part.name == "unet":
        from omg.unet import UNetConfig
        config = UNetConfig.from_state_dict(shapes, **h)
        widths = [config.model_channels * m for m, d in zip(config.channel_mult, config.transformer_depth) if d]
        widths += [config.model_channels * config.channel_mult[-1]] if config.transformer_depth_middle else []
        if any(w % config.head_dim for w in widths):
            raise ValueError(f"head width {config.head_dim} does not divide the attention widths {widths}")
        return config
    if part.name == "vae":
        from omg.vae import VAEConfig
        return VAEConfig.from_state_dict(shapes, **h)
    from omg.text import TextEncoderConfig
    configs = []
    for enc in ("clip_l", "clip_g"):
        per = {k[len(enc) + 1:]: v for k, v in shapes.items() if k.startswith(enc + ".")}
        try:
            configs.append(TextEncoderConfig.from_state_dict(per, **h.get(enc, {})))
        except KeyError as e:  # name the key as the model names it
            raise KeyError(f"{enc}.{e.args[0]}" if e.args and isinstance(e.args[0], str) else e) from e
    return tuple(configs)


def build_on_meta(name: str, config: Any) -> nn.Module:
    """The module of a component ("unet", "vae", "text") on the meta device: no memory."""
    with torch.device("meta"):
        if name == "unet":
            from omg.unet import UNet
            return UNet(config)
        if name == "vae":
            from omg.vae import AutoencoderKL
            return AutoencoderKL(config)
        from omg.text import SDXLTextEncoder
        return SDXLTextEncoder(*config)


_EXPECTED: dict[tuple[str, Any], dict[str, tuple[tuple[int, ...], bool]]] = {}  # (name, config) -> key shapes


def _expected(name: str, config: Any) -> tuple[dict[str, tuple[tuple[int, ...], bool]], Optional[nn.Module]]:
    """{key: (shape, is floating)} of the module config builds; the module too when it had to be built."""
    known = _EXPECTED.get((name, config))
    if known is not None:
        return known, None
    module = build_on_meta(name, config)
    shapes = {k: (tuple(t.shape), t.dtype.is_floating_point) for k, t in module.state_dict().items()}
    if len(_EXPECTED) > 32:
        _EXPECTED.clear()
    _EXPECTED[(name, config)] = shapes
    return shapes, module


def plan_part(path: str, part: Part) -> tuple[Optional[Plan], list[str]]:
    """Check one part: recipes applied to meta tensors, config inferred, module built on meta, keys compared.

    Returns the plan, or None and the problems (each naming keys as the file names them).
    """
    shapes: dict[str, Tensor] = {}
    broken = []
    for target, recipe in part.recipes.items():
        try:
            shapes[target] = recipe.apply(part.source.meta(s) for s in recipe.sources)
        except Exception as e:  # a recipe over mis-shaped tensors (fuse, transpose) fails in torch
            broken.append(f"{' + '.join(recipe.sources)} {[list(part.source.meta(s).shape) for s in recipe.sources]}: {e}")
    problems = [f"{part.name}: {len(broken)} tensors cannot be converted: {_first(broken)}"] if broken else []
    try:
        config = _infer_config(part, shapes)
    except (KeyError, StopIteration, IndexError) as e:
        missing = e.args[0] if isinstance(e, KeyError) and e.args else None
        what = f"key {part.file_name(missing)!r} is missing" if isinstance(missing, str) else f"{type(e).__name__}: {e}"
        return None, problems + [f"{part.name}: cannot infer the config from the tensor shapes: {what}"]
    except Exception as e:  # e.g. a zero-width tensor dividing, a head width not dividing
        return None, problems + [f"{part.name}: cannot infer the config from the tensor shapes: {type(e).__name__}: {e}"]
    try:
        expected, module = _expected(part.name, config)
    except Exception as e:  # shapes that make no buildable model (zero channels, groups not dividing, ...)
        return None, problems + [f"{part.name}: the tensor shapes give no buildable model ({config}): "
                                 f"{type(e).__name__}: {e}"]
    missing = [part.file_name(k) for k in expected if k not in shapes]
    unexpected = list(part.unexpected) + [" + ".join(r.sources) for k, r in part.recipes.items() if k not in expected]
    wrong = []
    for k, (shape, floating) in expected.items():
        got = shapes.get(k)
        if got is None:
            continue
        if tuple(got.shape) != shape:
            wrong.append(f"{' + '.join(part.recipes[k].sources)} {list(got.shape)} (expected {list(shape)})")
        elif got.dtype.is_floating_point != floating:
            wrong.append(f"{' + '.join(part.recipes[k].sources)} dtype {got.dtype} "
                         f"(expected {'floating point' if floating else 'integer'})")
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes/dtypes", wrong)):
        if items:
            problems.append(f"{part.name}: {len(items)} {label}: {_first(items)}")
    return (None if problems else Plan(part, config, module)), problems


def plan_checkpoint(ckpt: Checkpoint) -> dict[str, Plan]:
    """Check every part; one CheckpointError listing all problems, or the plans."""
    plans, problems = {}, []
    if ckpt.unexpected:
        problems.append(f"{len(ckpt.unexpected)} keys of no SDXL component: {_first(ckpt.unexpected)}")
    for name, part in ckpt.parts.items():
        _check_hints(part.source.path, name, part.hints)
        plan, found = plan_part(ckpt.path, part)
        problems += found
        if plan is not None:
            plans[name] = plan
    if problems:
        raise CheckpointError(f"{ckpt.path} ({ckpt.layout} layout): cannot load:\n  " + "\n  ".join(problems))
    return plans


def materialize(plan: Plan, device: Union[str, torch.device], dtype: Optional[torch.dtype]) -> nn.Module:
    """Load the tensors (one at a time, straight to device/dtype) into the meta module; strict and complete."""
    part = plan.part
    module = plan.module if plan.module is not None else build_on_meta(part.name, plan.config)
    plan.module = None  # the module is handed out; a plan loads once
    state = {}
    for target, recipe in part.recipes.items():
        t = recipe.apply(part.source.tensor(s, device, dtype) for s in recipe.sources)
        state[target] = t if t.is_contiguous() else t.contiguous()
    module.load_state_dict(state, strict=True, assign=True)
    if hasattr(module, "rebuild_buffers"):
        module.rebuild_buffers()
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    assert not left, f"{part.name}: still on meta after loading: {left[:SHOW]}"
    module.requires_grad_(False)
    return module.eval()
