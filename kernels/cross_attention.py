"""Fused cross-attention over short key sets (SDXL's 77 text tokens per prompt chunk): plain, capture, replay.

softmax(q kᵀ/√d) v with every key in one tile: T ≤ 256 keys are padded to a power of two (77 -> 128) and
masked, so the softmax is single-pass (no online rescaling) and the K, V of a head are read once per program.
One kernel, four modes:

- plain:   out = softmax(q kᵀ/√d) v (torch SDPA's job).
- capture: as plain; in the same pass, for the batch rows [start, stop) (the conditional rows) write the
           probabilities to a map store (R, heads, N, T), and add the head-averaged probabilities of chosen
           token columns into a float32 accumulator heat (R, N, n_tok) (atomic adds across the heads).
- capture_maps: capture's maps and heat alone, programs for the rows [start, stop) only, no V, no output;
           for callers that keep torch SDPA's output bit for bit (omg's "capturing changes nothing").
- replay:  for the rows [start, stop) the probabilities come from a map store instead of q kᵀ
           (prompt-to-prompt "replace": out = A_stored · v); the other rows attend as in plain mode.

Map formats:
- "bf16": the probabilities, relative error ≤ 2^-9 per entry (240.6 MiB per SDXL step at 1024², cond row).
- "log8": one byte per entry (half of bf16, no scale stored): the code c = min(255, round((s_max - s) / LOG8_STEP))
          of the scores s = q·k/√d, i.e. the log-probability below the row maximum in steps of 12/255 nat.
          Decoding gives p ∝ exp(-c · LOG8_STEP), renormalised over the row (which cancels any scale); c = 255
          (below e^-12 of the row maximum) decodes to 0. Entry-wise relative error ≤ ±2.4 % (half a step).
          Replayed A·v on synthetic SD-like rows (v ~ N(0, 1)): ≤ 3e-3 rms (bf16: ≤ 1.2e-3, as it is not
          renormalised), about half the error of fp8 e4m3 with a per-row scale (tests/test_kernels.py).

The references below compute the same outputs with an explicit fp32 softmax; they are the CPU fallback and the
test oracle. Inference only (no autograd).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from kernels._triton import tl, triton

MAP_FORMATS = ("bf16", "log8")
LOG8_RANGE = 12.0  # nats below the row maximum that log8 keeps (e^-12 = 6e-6)
LOG8_STEP = LOG8_RANGE / 255  # nats per code
MAX_KEYS = 256  # one tile holds every key: 3 prompt chunks (231) fit
_LN2 = math.log(2.0)


class Captured(NamedTuple):
    """What a capture call returns."""
    out: Optional[Tensor]  # (B, heads, N, D) attention output, like torch SDPA's (None from capture_maps)
    maps: Optional[Tensor]  # (R, heads, N, T) probabilities of rows [start, stop): bf16, or uint8 for log8
    heat: Optional[Tensor]  # (R, N, n_tok) float32 accumulator, head-averaged token maps added


# ------------------------------------------------------------------------------------------------ kernel

@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    if DOT_F32:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _softmax_numerators(q_ptrs, k_ptrs, m_ok, t_ok, qk_scale, DOT_F32: tl.constexpr):
    """w = 2^(s - max s) of the base-2 scores s (masked keys: 0) and the row sums l."""
    q = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0)  # (BLOCK_M, D)
    k = tl.load(k_ptrs, mask=t_ok[:, None], other=0.0)  # (BLOCK_T, D)
    s = _dot(q, tl.trans(k), DOT_F32) * qk_scale  # (BLOCK_M, BLOCK_T)
    s = tl.where(t_ok[None, :], s, float("-inf"))
    w = tl.exp2(s - tl.max(s, axis=1)[:, None])
    return w, tl.sum(w, axis=1)


@triton.jit
def _cross_attention_kernel(
    Q,  # (B, H, N, D) queries, any strides with unit stride on D
    K,  # (B, H, T, D) keys, idem
    V,  # (B, H, T, D) values, idem
    O,  # (B, H, N, D) output, idem
    MAPS,  # (R, H, N, T) contiguous map store of the rows [row_start, row_stop): written (capture), read (replay)
    HEAT,  # (R, N, n_tok) contiguous float32 accumulator of head-averaged token maps (capture)
    TOKENS,  # (n_tok,) int32 token columns accumulated into HEAT
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_on,
    H, N, T, n_tok, row_start, row_stop,
    first_row,  # batch row of program (·, 0): 0, or row_start in MODE 3 (whose grid covers only the rows)
    qk_scale,  # log2(e)/sqrt(D): scores in base-2 units
    inv_heads,  # 1/H: the head average of HEAT
    log8_codes_per_bit,  # ln(2)/LOG8_STEP: log8 codes per base-2 unit of score
    log8_bits_per_code,  # LOG8_STEP/ln(2)
    MODE: tl.constexpr,  # 0 plain, 1 capture, 2 replay, 3 capture without output (maps and heat only)
    MAP_FORMAT: tl.constexpr,  # 0 none, 1 bf16, 2 log8
    HEAT_ON: tl.constexpr,  # capture: accumulate HEAT
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_T: tl.constexpr,  # keys, padded to a power of two
    HEAD_DIM: tl.constexpr,
    DOT_F32: tl.constexpr,  # True only in the CPU interpreter, which multiplies bf16 as integers
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)  # the query tile varies fastest, so programs in flight share K, V in L2
    b = first_row + pid_bh // H
    h = pid_bh % H
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < N
    t_ok = offs_t < T
    q_ptrs = Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    k_ptrs = K + b64 * stride_kb + h * stride_kh + offs_t[:, None] * stride_kt + offs_d[None, :]
    if MODE != 3:
        v = tl.load(V + b64 * stride_vb + h * stride_vh + offs_t[:, None] * stride_vt + offs_d[None, :],
                    mask=t_ok[:, None], other=0.0)  # (BLOCK_T, D)
    in_rows = (b >= row_start) & (b < row_stop)
    map_base = MAPS + ((b - row_start).to(tl.int64) * H + h) * N * T  # map (b, h) starts here
    map_offs = offs_m[:, None] * T + offs_t[None, :]  # int32: one map is ≤ 2^31 entries

    if MODE == 2:
        if in_rows:  # weights decoded from the store
            map_ok = m_ok[:, None] & t_ok[None, :]
            if MAP_FORMAT == 2:
                code = tl.load(map_base + map_offs, mask=map_ok, other=255).to(tl.float32)
                w = tl.where(code < 255.0, tl.exp2(-code * log8_bits_per_code), 0.0)
                l = tl.where(m_ok, tl.sum(w, axis=1), 1.0)  # a stored row has its maximum at code 0: l ≥ 1
            else:
                w = tl.load(map_base + map_offs, mask=map_ok, other=0.0).to(tl.float32)
                l = tl.full((BLOCK_M,), 1.0, tl.float32)
        else:
            w, l = _softmax_numerators(q_ptrs, k_ptrs, m_ok, t_ok, qk_scale, DOT_F32)
    else:
        w, l = _softmax_numerators(q_ptrs, k_ptrs, m_ok, t_ok, qk_scale, DOT_F32)

    if MODE != 3:
        acc = _dot(w.to(V.dtype.element_ty), v, DOT_F32)  # (BLOCK_M, D) fp32; weights ≤ 1: fp16 keeps them
        o_ptrs = O + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
        tl.store(o_ptrs, (acc / l[:, None]).to(O.dtype.element_ty), mask=m_ok[:, None])

    # capture after the output is written, so only the weights stay live (registers)
    if MODE == 1 or MODE == 3:
        if in_rows:
            map_ok = m_ok[:, None] & t_ok[None, :]
            if MAP_FORMAT == 1:
                tl.store(map_base + map_offs, (w * (1.0 / l)[:, None]).to(tl.bfloat16), mask=map_ok)
            if MAP_FORMAT == 2:  # w = 2^(s - max): codes = -log2(w) · codes/bit, half up; w = 0 (masked) -> 255
                code = tl.minimum(-tl.log2(w) * log8_codes_per_bit, 255.0) + 0.5
                tl.store(map_base + map_offs, code.to(tl.uint8), mask=map_ok)
            if HEAT_ON:
                heat_ptrs = HEAT + ((b - row_start).to(tl.int64) * N + offs_m) * n_tok
                scale = inv_heads / l
                for j in range(n_tok):
                    tok = tl.load(TOKENS + j)
                    col = tl.sum(tl.where(offs_t[None, :] == tok, w, 0.0), axis=1)
                    tl.atomic_add(heat_ptrs + j, col * scale, mask=m_ok, sem="relaxed")


# ---------------------------------------------------------------------------------------------- launcher

def _config(n: int, block_t: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps): few registers in every mode with triton 3.6 and 3.8 (sm_90 compiles: ≤ 143 a
    thread for ≤ 128 keys, no spills); `python bench/kernels.py --sections sweep` times the alternatives."""
    block_m, num_warps = (32, 4) if block_t <= 128 else (32, 8)
    return min(block_m, max(16, triton.next_power_of_2(n))), num_warps


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q: Tensor, k: Tensor, v: Tensor, mode: int, rows: slice, maps: Optional[Tensor], map_format: int,
            tokens: Optional[Tensor], heat: Optional[Tensor], block_m: Optional[int],
            num_warps: Optional[int]) -> Tensor:
    """Runs the kernel; returns the output (B, h, N, d), or None in mode 3."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, N, D = q.shape
    T = k.shape[2]
    block_t = max(16, triton.next_power_of_2(T))
    default_m, default_warps = _config(N, block_t)
    block_m, num_warps = block_m or default_m, num_warps or default_warps
    # output laid out (B, N, H, D) like SDPA's, so Attention.out's "b h n d -> b n (h d)" is a view
    out = None if mode == 3 else torch.empty(B, N, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    o = q if out is None else out
    n_tok = 0 if tokens is None else tokens.numel()
    first_row, n_rows = (rows.start, rows.stop - rows.start) if mode == 3 else (0, B)
    grid = (triton.cdiv(N, block_m), n_rows * H)
    _cross_attention_kernel[grid](
        q, k, v, o,
        maps if maps is not None else o, heat if heat is not None else o, tokens if tokens is not None else o,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, N, T, n_tok, rows.start, rows.stop, first_row,
        math.log2(math.e) / math.sqrt(D), 1.0 / H, _LN2 / LOG8_STEP, LOG8_STEP / _LN2,
        MODE=mode, MAP_FORMAT=map_format, HEAT_ON=heat is not None and n_tok > 0,
        BLOCK_M=block_m, BLOCK_T=block_t, HEAD_DIM=D,
        DOT_F32=q.device.type == "cpu" and q.dtype == torch.bfloat16,
        num_warps=num_warps,
    )
    return out


# ------------------------------------------------------------------------------------------- validation

def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B, heads, N, D) and k, v (B, heads, T, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head dim")


def _check_rows(rows: slice, batch: int) -> slice:
    start, stop, step = rows.indices(batch)
    if step != 1 or rows.step not in (None, 1) or stop <= start:
        raise ValueError(f"rows must be a non-empty contiguous slice of the batch ({batch}), got {rows}")
    return slice(start, stop)


def _check_capture(q: Tensor, k: Tensor, rows: slice, map_format: Optional[str], tokens: Optional[Tensor],
                   heat: Optional[Tensor]) -> Optional[Tensor]:
    """Validates, returns the heat accumulator (a new zero one when tokens come without it)."""
    if map_format is not None and map_format not in MAP_FORMATS:
        raise ValueError(f"map_format must be one of {MAP_FORMATS} or None, got {map_format!r}")
    if tokens is None:
        if heat is not None:
            raise ValueError("heat was given without tokens")
        return None
    T, R, N = k.shape[2], rows.stop - rows.start, q.shape[2]
    if tokens.ndim != 1 or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tokens must be a 1-D integer tensor, got {tokens.dtype} {tuple(tokens.shape)}")
    # checked where it costs no device sync; the kernel compares columns, so a bad CUDA index reads nothing
    if not tokens.is_cuda and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= T):
        raise ValueError(f"tokens must index the {T} keys, got {tokens.tolist()}")
    if heat is None:
        return torch.zeros(R, N, tokens.numel(), device=q.device, dtype=torch.float32)
    if heat.shape != (R, N, tokens.numel()) or heat.dtype != torch.float32 or heat.device != q.device:
        raise ValueError(f"heat must be float32 ({R}, {N}, {tokens.numel()}) on {q.device}, got {heat.dtype} "
                         f"{tuple(heat.shape)} on {heat.device}")
    return heat


def _check_maps(maps: Tensor, v: Tensor, n: int, rows: slice) -> None:
    expected = (rows.stop - rows.start, v.shape[1], n, v.shape[2])
    if maps.shape != expected or maps.dtype not in (torch.uint8, torch.bfloat16):
        raise ValueError(f"maps must be {expected} bfloat16 or uint8 (log8), got {maps.dtype} {tuple(maps.shape)}")


def _new_maps(q: Tensor, k: Tensor, rows: slice, map_format: Optional[str]) -> Optional[Tensor]:
    if map_format is None:
        return None
    return torch.empty(rows.stop - rows.start, q.shape[1], q.shape[2], k.shape[2], device=q.device,
                       dtype=torch.bfloat16 if map_format == "bf16" else torch.uint8)


def supports(q: Tensor, k: Tensor) -> bool:
    """Whether the kernel handles these shapes and dtypes (else use the reference)."""
    d = q.shape[-1]
    return (q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and k.shape[2] <= MAX_KEYS
            and 16 <= d <= 128 and d & (d - 1) == 0)


# ------------------------------------------------------------------------------------- public (Triton)

def cross_attention_triton(q: Tensor, k: Tensor, v: Tensor, *, block_m: Optional[int] = None,
                           num_warps: Optional[int] = None) -> Tensor:
    """softmax(q kᵀ/√d) v, every key in one tile: (B, h, N, d), (B, h, T, d) x2 -> (B, h, N, d)."""
    _check_qkv(q, k, v)
    return _launch(q, k, v, 0, slice(0, 0), None, 0, None, None, block_m, num_warps)


def capture_triton(q: Tensor, k: Tensor, v: Tensor, rows: slice, map_format: Optional[str] = None,
                   tokens: Optional[Tensor] = None, heat: Optional[Tensor] = None, *,
                   block_m: Optional[int] = None, num_warps: Optional[int] = None) -> Captured:
    """Attention of every row; for `rows`, also the map store and heat += head-mean probs[..., tokens]."""
    _check_qkv(q, k, v)
    rows = _check_rows(rows, q.shape[0])
    heat = _check_capture(q, k, rows, map_format, tokens, heat)
    maps = _new_maps(q, k, rows, map_format)
    tok = None if tokens is None else tokens.to(device=q.device, dtype=torch.int32)
    out = _launch(q, k, v, 1, rows, maps, MAP_FORMATS.index(map_format) + 1 if map_format else 0, tok, heat,
                  block_m, num_warps)
    return Captured(out, maps, heat)


def capture_maps_triton(q: Tensor, k: Tensor, rows: slice, map_format: Optional[str] = None,
                        tokens: Optional[Tensor] = None, heat: Optional[Tensor] = None, *,
                        block_m: Optional[int] = None, num_warps: Optional[int] = None) -> Captured:
    """capture_triton without the attention output: only the rows' maps and heat (no V read, no output written),
    for a caller that keeps torch SDPA's output (out is None)."""
    _check_qkv(q, k, k)
    rows = _check_rows(rows, q.shape[0])
    heat = _check_capture(q, k, rows, map_format, tokens, heat)
    maps = _new_maps(q, k, rows, map_format)
    tok = None if tokens is None else tokens.to(device=q.device, dtype=torch.int32)
    _launch(q, k, k, 3, rows, maps, MAP_FORMATS.index(map_format) + 1 if map_format else 0, tok, heat,
            block_m, num_warps)
    return Captured(None, maps, heat)


def replay_triton(q: Tensor, k: Tensor, v: Tensor, maps: Tensor, rows: slice, *, block_m: Optional[int] = None,
                  num_warps: Optional[int] = None) -> Tensor:
    """Rows in `rows` attend with the stored maps (decode(maps) · v), the others as in plain attention."""
    _check_qkv(q, k, v)
    rows = _check_rows(rows, q.shape[0])
    _check_maps(maps, v, q.shape[2], rows)
    fmt = 2 if maps.dtype == torch.uint8 else 1
    return _launch(q, k, v, 2, rows, maps.contiguous(), fmt, None, None, block_m, num_warps)


def replay_maps_triton(maps: Tensor, v: Tensor, *, block_m: Optional[int] = None,
                       num_warps: Optional[int] = None) -> Tensor:
    """decode(maps) · v: (R, h, N, T) maps, (R, h, T, d) values -> (R, h, N, d)."""
    R, H, N, _ = maps.shape
    _check_maps(maps, v, N, slice(0, R))
    q = v[:, :, :1].expand(R, H, N, v.shape[3])  # never read: every row replays
    return replay_triton(q, v, v, maps, slice(0, R), block_m=block_m, num_warps=num_warps)


# ---------------------------------------------------------------------------------- PyTorch references

def scores_reference(q: Tensor, k: Tensor) -> Tensor:
    """q kᵀ/√d in fp32: (B, h, N, T)."""
    return torch.einsum("bhnd,bhtd->bhnt", q.float(), k.float()) * (q.shape[-1] ** -0.5)


def encode_maps(scores: Tensor, map_format: str) -> Tensor:
    """The map store of fp32 scores (..., T): bf16 probabilities, or log8 codes (module docstring)."""
    if map_format == "bf16":
        return scores.softmax(dim=-1).to(torch.bfloat16)
    if map_format == "log8":
        below_max = scores.amax(dim=-1, keepdim=True) - scores
        return ((below_max / LOG8_STEP).clamp(max=255.0) + 0.5).floor().to(torch.uint8)
    raise ValueError(f"map_format must be one of {MAP_FORMATS}, got {map_format!r}")


def decode_maps(maps: Tensor) -> Tensor:
    """fp32 probabilities of a map store: bf16 as stored; log8 (uint8) exp(-c·step), 255 -> 0, renormalised."""
    if maps.dtype == torch.uint8:
        code = maps.float()
        w = torch.where(code < 255, torch.exp(-code * LOG8_STEP), 0.0)
        return w / w.sum(dim=-1, keepdim=True)
    return maps.float()


def cross_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ/√d) v with an explicit fp32 softmax, cast to q's dtype."""
    _check_qkv(q, k, v)
    return (scores_reference(q, k).softmax(dim=-1) @ v.float()).to(q.dtype)


def capture_reference(q: Tensor, k: Tensor, v: Tensor, rows: slice, map_format: Optional[str] = None,
                      tokens: Optional[Tensor] = None, heat: Optional[Tensor] = None) -> Captured:
    """The capture kernel's outputs from an explicit fp32 softmax."""
    _check_qkv(q, k, v)
    rows = _check_rows(rows, q.shape[0])
    heat = _check_capture(q, k, rows, map_format, tokens, heat)
    scores = scores_reference(q, k)
    probs = scores.softmax(dim=-1)
    out = (probs @ v.float()).to(q.dtype)
    maps = None if map_format is None else encode_maps(scores[rows], map_format)
    if heat is not None:
        heat += probs[rows][..., tokens.to(q.device).long()].mean(dim=1)
    return Captured(out, maps, heat)


def capture_maps_reference(q: Tensor, k: Tensor, rows: slice, map_format: Optional[str] = None,
                           tokens: Optional[Tensor] = None, heat: Optional[Tensor] = None) -> Captured:
    """The maps and heat of capture_reference alone (out None); the probabilities are those of
    omg.attention.attention_probs(q[rows], k[rows])."""
    _check_qkv(q, k, k)
    rows = _check_rows(rows, q.shape[0])
    heat = _check_capture(q, k, rows, map_format, tokens, heat)
    scores = scores_reference(q[rows], k[rows])
    if heat is not None:
        heat += scores.softmax(dim=-1)[..., tokens.to(q.device).long()].mean(dim=1)
    return Captured(None, None if map_format is None else encode_maps(scores, map_format), heat)


def replay_reference(q: Tensor, k: Tensor, v: Tensor, maps: Tensor, rows: slice) -> Tensor:
    """Rows in `rows`: decode(maps) · v; the others: plain attention (explicit fp32 softmax)."""
    _check_qkv(q, k, v)
    rows = _check_rows(rows, q.shape[0])
    _check_maps(maps, v, q.shape[2], rows)
    probs = scores_reference(q, k).softmax(dim=-1)
    probs[rows] = decode_maps(maps)
    return (probs @ v.float()).to(q.dtype)


def replay_maps_reference(maps: Tensor, v: Tensor) -> Tensor:
    """decode(maps) · v in fp32, cast to v's dtype: (R, h, N, T), (R, h, T, d) -> (R, h, N, d)."""
    _check_maps(maps, v, maps.shape[2], slice(0, maps.shape[0]))
    return (decode_maps(maps) @ v.float()).to(v.dtype)
