"""Short file hashes as AUTOMATIC1111 writes them (and civitai looks them up), cached by path, size and mtime.

- model_hash: the first 10 hex digits of the file's SHA-256 (A1111 "Model hash"; civitai AutoV2);
- lora_hash: the first 12 of the SHA-256 of a .safetensors file's tensor data, its header skipped (kohya's
  "addnet" hash, A1111 "Lora hashes"; civitai AutoV3); of the whole file for other formats.

Hashing a 7 GB checkpoint takes seconds, so each hash is kept in $XDG_CACHE_HOME/omg/hashes.json (A1111 keeps a
cache.json for the same reason).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from omg.atomic import atomic_path

BLOCK = 1 << 20


def cache_file() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "omg", "hashes.json")


def model_hash(path: str) -> Optional[str]:
    """A1111's "Model hash" of a single-file checkpoint; None for a folder (diffusers layout)."""
    return None if os.path.isdir(path) else _cached(path, "sha256", 0)[:10]


def lora_hash(path: str) -> Optional[str]:
    """A1111's LoRA short hash; None for a folder."""
    if os.path.isdir(path):
        return None
    if path.endswith(".safetensors"):
        with open(path, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
        return _cached(path, "addnet", 8 + header)[:12]
    return _cached(path, "sha256", 0)[:12]


def _cached(path: str, kind: str, offset: int) -> str:
    stat = os.stat(path)
    key = f"{kind}:{os.path.abspath(path)}"
    stamp = [stat.st_size, stat.st_mtime_ns]
    cache = _read_cache()
    if key in cache and cache[key].get("stamp") == stamp:
        return cache[key]["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    value = digest.hexdigest()
    cache[key] = {"stamp": stamp, "sha256": value}
    try:
        with atomic_path(cache_file(), ".json") as tmp, open(tmp, "w") as f:
            json.dump(cache, f)
    except OSError:  # a read-only home: the hash is still right, only not kept
        pass
    return value


def _read_cache() -> dict:
    try:
        with open(cache_file()) as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}
