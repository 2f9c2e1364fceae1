"""Fuzz: a small valid checkpoint mutated 1000 ways loads into a valid model or fails with CheckpointError.

Never another exception type, never a hang (each case has a time bound), never a read larger than the file.
"""
import json
import os
import random
import signal
import time
from contextlib import contextmanager

import torch
from safetensors.torch import save_file

from omg import checkpoint as C
from omg import keymap
from omg.errors import CheckpointError
from omg.model import SDXL, load_sdxl, save_sgm
from omg.text import TextEncoderConfig
from omg.unet import UNetConfig
from omg.vae import VAEConfig

CASE_SECONDS = 10
DTYPES = list(C._DTYPES) + ["F4", "I128", "", 7, None]


def micro() -> SDXL:
    """The smallest model with every block type: a file of a few hundred kB, fast to fuzz."""
    unet = UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                      transformer_depth_middle=1, head_dim=8, norm_groups=4)
    l_cfg = TextEncoderConfig(vocab_size=64, max_positions=8, width=8, layers=1, heads=1, mlp_width=16)
    g_cfg = TextEncoderConfig(vocab_size=64, max_positions=8, width=8, layers=1, heads=1, mlp_width=16, act="gelu",
                              projection_dim=8)
    return SDXL.random(unet_config=unet, vae_config=VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4),
                       text_configs=(l_cfg, g_cfg), seed=11)


def split(blob: bytes) -> tuple[int, dict]:
    n = int.from_bytes(blob[:8], "little")
    return n, json.loads(blob[8:8 + n])


def assemble(header: dict, data: bytes, raw: str = None) -> bytes:
    text = (raw if raw is not None else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def mutate(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of a safetensors file: (description, new bytes)."""
    n, header = split(blob)
    data = blob[8 + n:]
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    entry = header[key]
    kind = rng.choice(["truncate", "flip_header", "flip_length", "length", "dtype", "offsets", "shape", "remove",
                       "duplicate", "rename", "metadata", "flip_data", "swap", "combo"])
    if kind == "truncate":
        cut = rng.choice([rng.randrange(len(blob)), rng.randrange(8 + n), len(blob) - rng.randrange(1, 64)])
        return f"truncate to {cut}", blob[:max(cut, 0)]
    if kind == "flip_header":
        out = bytearray(blob)
        spots = [rng.randrange(8, 8 + n) for _ in range(rng.randint(1, 4))]
        for i in spots:
            out[i] ^= rng.randrange(1, 256)
        return f"flip header bytes {spots}", bytes(out)
    if kind == "flip_length":
        out = bytearray(blob)
        i = rng.randrange(8)
        out[i] ^= rng.randrange(1, 256)
        return f"flip length byte {i}", bytes(out)
    if kind == "length":
        value = rng.choice([n + rng.randint(-40, 40), 0, 1, len(blob), len(blob) - 8, 2 ** 64 - 1,
                            rng.randrange(2 ** 64)])
        return f"header length {value}", (value % 2 ** 64).to_bytes(8, "little") + blob[8:]
    if kind == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
        return f"{key} dtype {entry['dtype']!r}", assemble(header, data)
    if kind == "offsets":
        b, e = entry["data_offsets"]
        other = header[rng.choice(keys)]["data_offsets"]
        d = rng.choice([1, -1, 2, -8, 4096, -(b + 1)])
        entry["data_offsets"] = rng.choice([[b + d, e + d], [b, e + d], [e, b], list(other), [b - 1, e], [b, 2 ** 63],
                                            [str(b), e], [b], [b, e, e], [float(b), e], None, [b + 0.5, e]])
        return f"{key} offsets {entry['data_offsets']!r}", assemble(header, data)
    if kind == "shape":
        shape = list(entry["shape"])
        i = rng.randrange(len(shape)) if shape else 0
        choice = rng.randrange(10)
        if shape and choice < 5:
            shape[i] = [shape[i] + 1, shape[i] - 1, shape[i] * 2, 0, -1][choice]
        elif choice == 5:
            shape = shape + [1]
        elif choice == 6 and shape:
            shape = shape[:-1] + [] if len(shape) == 1 else shape[:-2] + [shape[-2] * shape[-1]]  # same bytes
        elif choice == 7:
            shape = list(reversed(shape))  # same bytes, other shape
        elif choice == 8:
            shape = [2 ** 40] + shape
        else:
            shape = rng.choice([["3"], [1.5], None, "4", [True], [[2]]])
        entry["shape"] = shape
        return f"{key} shape {shape!r}", assemble(header, data)
    if kind == "remove":
        del header[key]
        return f"remove {key}", assemble(header, data)
    if kind == "duplicate":
        raw = json.dumps(header)
        item = json.dumps({key: entry})[1:-1]
        return f"duplicate {key}", assemble(header, data, raw[:-1] + ", " + item + "}")
    if kind == "rename":
        i = rng.randrange(len(key))
        new = key[:i] + rng.choice("abcxyz0123._") + key[i + 1:]
        header[new] = header.pop(key)
        return f"rename {key} -> {new}", assemble(header, data)
    if kind == "metadata":
        meta = header.setdefault("__metadata__", {})
        meta = meta if isinstance(meta, dict) else header.__setitem__("__metadata__", {}) or header["__metadata__"]
        try:
            config = json.loads(meta.get("omg.config", "{}"))
        except ValueError:
            config = {}
        config = config if isinstance(config, dict) else {}
        part = rng.choice(["unet", "vae", "clip_l", "clip_g"])
        field = rng.choice(["head_dim", "norm_groups", "heads", "act", "scaling_factor", "channel_mult"])
        value = rng.choice([0, 1, 2, 3, 5, 7, 16, -4, 1e9, 2 ** 70, 0.5, "gelu", "tanh", None, [1], {"a": 1}])
        config.setdefault(part, {})[field] = value
        meta["omg.config"] = rng.choice([json.dumps(config), json.dumps(config)[:-3], "[" * 5000, "7"])
        if rng.random() < 0.1:
            header["__metadata__"] = rng.choice([[1], "x", {"a": 1}])
        return f"metadata {part}.{field} = {value!r}", assemble(header, data)
    if kind == "flip_data":
        out = bytearray(blob)
        if len(blob) > 8 + n:
            out[rng.randrange(8 + n, len(blob))] ^= rng.randrange(1, 256)
        return "flip a data byte", bytes(out)
    if kind == "swap":
        other = rng.choice(keys)
        header[key], header[other] = header[other], header[key]
        return f"swap {key} <-> {other}", assemble(header, data)
    desc, out = mutate(blob, rng)
    desc2, out = mutate(out, rng) if len(out) > 16 and _parses(out) else (desc, out)
    return f"combo: {desc}; {desc2}", out


def _parses(blob: bytes) -> bool:
    try:
        n, header = split(blob)
        return isinstance(header, dict) and all(
            isinstance(v, dict) and "data_offsets" in v for k, v in header.items() if k != "__metadata__")
    except (ValueError, RecursionError):
        return False


@contextmanager
def time_bound(seconds: int, what: str):
    def fail(*_):
        raise TimeoutError(f"over {seconds} s: {what}")
    old = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextmanager
def read_tracker(reads: list):
    """Record the byte size of every tensor view the reader makes over a file mapping."""
    original = C.SafetensorsFile._view

    def tracked(self, key):
        view = original(self, key)
        reads.append((self.file_size, view.numel() * view.element_size()))
        return view
    C.SafetensorsFile._view = tracked
    try:
        yield
    finally:
        C.SafetensorsFile._view = original


def check_case(path: str, desc: str, failures: list, outcomes: dict) -> None:
    reads: list = []
    try:
        with read_tracker(reads), time_bound(CASE_SECONDS, desc):
            model = load_sdxl(path, dtype=torch.float32)
            assert not [n for n, p in model.unet.named_parameters() if p.is_meta]
            cfg = model.unet.config
            x = torch.randn(1, cfg.in_channels, 8, 8)
            ctx = torch.randn(1, 3, cfg.context_dim)
            with torch.no_grad():
                out = model.unet(x, torch.tensor([10.0]), ctx, torch.randn(1, cfg.adm_in_channels))
            assert out.shape == (1, cfg.out_channels, 8, 8)
            outcomes["model"] += 1
    except CheckpointError as e:
        assert path in str(e)
        outcomes["error"] += 1
    except BaseException as e:  # noqa: BLE001 - anything else is a finding
        failures.append(f"{desc}: {type(e).__name__}: {str(e)[:300]}")
    size = os.path.getsize(path)
    if sum(r for _, r in reads) > size or any(r > s for s, r in reads):
        failures.append(f"{desc}: read {sum(r for _, r in reads)} bytes from a {size}-byte file")


def test_fuzz_checkpoints(tmp_path):
    rng = random.Random(20260501)
    model = micro()
    sgm = str(tmp_path / "full.safetensors")
    save_sgm(model, sgm)
    unet_only = str(tmp_path / "unet.safetensors")
    meta = {"omg.config": json.dumps({"unet": model.configs()["unet"]})}
    save_file({k: t.contiguous() for k, t in model.unet.state_dict().items()}, unet_only, metadata=meta)
    diffusers = str(tmp_path / "unet_diffusers.safetensors")
    save_file({k: t.contiguous() for k, t in keymap.unet_to_diffusers(model.unet.state_dict()).items()}, diffusers,
              metadata=meta)
    ckpt = str(tmp_path / "unet.ckpt")  # pickles carry no config hints: SDXL's head width and group count
    plain = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                       transformer_depth_middle=1, context_dim=16, adm_in_channels=32)
    torch.save({"state_dict": SDXL.random(unet_config=plain, with_vae=False, with_text=False).sgm_state_dict()}, ckpt)
    bases = {p: open(p, "rb").read() for p in (sgm, unet_only, diffusers, ckpt)}
    weights = [(unet_only, 0.5), (sgm, 0.3), (diffusers, 0.12), (ckpt, 0.08)]
    failures: list = []
    outcomes = {"model": 0, "error": 0}
    for base in (sgm, unet_only, diffusers, ckpt):  # the unmutated files load
        check_case(base, f"unmutated {base}", failures, outcomes)
    assert outcomes == {"model": 4, "error": 0}, failures

    start, cases = time.monotonic(), 1000
    for i in range(cases):
        base = rng.choices([w[0] for w in weights], [w[1] for w in weights])[0]
        blob = bases[base]
        if base == ckpt:  # pickles: truncations and byte flips anywhere
            out = bytearray(blob)
            if rng.random() < 0.5:
                desc, out = "ckpt truncate", out[: rng.randrange(len(out))]
            else:
                spots = [rng.randrange(len(out)) for _ in range(rng.randint(1, 8))]
                for s in spots:
                    out[s] ^= rng.randrange(1, 256)
                desc = f"ckpt flips {spots}"
            path = str(tmp_path / "case.ckpt")
        else:
            desc, out = mutate(blob, rng)
            path = str(tmp_path / "case.safetensors")
        with open(path, "wb") as f:
            f.write(bytes(out))
        check_case(path, f"case {i} ({os.path.basename(base)}): {desc}", failures, outcomes)
    elapsed = time.monotonic() - start
    print(f"\n{cases} mutated checkpoints in {elapsed:.1f} s: {outcomes}")
    assert not failures, "\n".join(failures[:10])
    assert outcomes["error"] > cases // 2 and outcomes["model"] > 20  # both endings were exercised
