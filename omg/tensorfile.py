"""Reading named tensors from files: a validating safetensors reader, weights-only pickles, sharded sets.

Nothing is allocated before the whole header has been checked (sizes, dtypes, offsets inside the file,
no overlaps). Tensors are then viewed through a private mmap and copied one at a time straight to the
target device and dtype; the pages of each source range are released right after (MADV_DONTNEED), so
host memory holds at most the loaded tensors plus one more.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor

from omg.errors import CheckpointError

PathLike = Union[str, "os.PathLike[str]"]
SHOW = 5  # offending keys named per kind of problem
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors package refuses larger headers too
MAX_DIMS = 64  # torch's limit: most ops (isfinite, reshape, ...) refuse tensors with more dimensions

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


class FiniteCheck:
    """Whether every loaded floating tensor is finite: one isfinite pass per tensor on its own device, the
    flags read back once in raise_if_any (one host-device sync for a whole part, not one per tensor)."""

    def __init__(self, path: str):
        self.path = path
        self._flags: list[Tensor] = []
        self._keys: list[str] = []

    def add(self, key: str, t: Tensor) -> None:
        if t.is_floating_point() and t.numel():
            self._flags.append(torch.isfinite(t).all())
            self._keys.append(key)

    def raise_if_any(self) -> None:
        """CheckpointError naming the tensors that hold NaN or inf (in the dtype they were loaded in)."""
        if not self._flags:
            return
        ok = torch.stack([f.to(self._flags[0].device) for f in self._flags]).cpu().tolist()
        bad = [k for k, good in zip(self._keys, ok) if not good]
        if bad:
            raise CheckpointError(f"{self.path}: {len(bad)} tensors hold NaN or inf values (a corrupt file, or "
                                  f"values too large for the load dtype): {_first(bad)}")


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
            if len(shape) > MAX_DIMS:
                problems.append(f"{key!r}: {len(shape)} dimensions; torch supports at most {MAX_DIMS}")
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
        too_many = [f"{k!r} ({v.dim()})" for k, v in self._tensors.items() if v.dim() > MAX_DIMS]
        if too_many:
            raise CheckpointError(f"{self.path}: tensors with more dimensions than torch supports "
                                  f"({MAX_DIMS}): {_first(too_many)}")

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
