"""Triton kernels (kernels/) against their PyTorch references.

CPU: the Triton kernels run under TRITON_INTERPRET=1 in a child pytest process (`test_interpreted_kernels`
runs the `test_interp_*` of this file, test_unet_kernels.py, test_compile.py and test_fp8.py there): triton picks
the interpreter when it decorates a kernel, which may already have happened in this process, and the setting must
not leak into GPU runs. Tiny shapes, ~10 s.
The references are checked against omg.attention / omg.pipeline semantics in-process.
GPU (-m gpu): SDXL shapes (64x64 layer N=4096 h=10, 32x32 layer N=1024 h=20), batch 2 and 12, fp16 and bf16.

Tolerances (max abs error against the fp32 reference; attention inputs N(0, 1), so |out| ≲ 3):
    attention output   fp16 2e-3, bf16 1.6e-2 (the output rounding plus P rounded to the input dtype,
                       as flash attention does); mean abs error ≤ 1.5x torch SDPA's + 1e-5 on GPU
    heat (fp32)        1e-5 (interpreter) / 2e-5 (GPU: fp32 atomics in any order)
    bf16 maps          2^-7 relative + 1e-6 (the kernel's and torch's fp32 softmax round to bf16 apart)
    log8 maps          ±1 code (a score on a rounding boundary)
    blend (fp32)       1e-6 (interpreter) / 1e-5 (GPU: fused multiply-adds)
    tiny-UNet capture  relative mean error of output, maps and heat vs AttentionControl: 1e-4 fp32 (reference),
                       1e-2 fp16, 3e-2 bf16 (rounding grows through the layers; a layout mix-up would be O(1))
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import blend as kblend
from kernels import cross_attention as kca

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_in_child = pytest.mark.skipif(not INTERPRETED,
                               reason="runs in the TRITON_INTERPRET=1 child of test_interpreted_kernels")
# log8 codes are -log2(w), and w = 0 for padded keys: numpy warns where the GPU quietly gives +inf (-> code 255)
_log2_of_zero = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")


def interp(fn):
    return _in_child(_log2_of_zero(fn))


TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qkv(batch, heads, n, t, d=64, dtype=torch.float16, device="cpu", seed=0):
    """q, k, v laid out as omg.unet.Attention.qkv gives them: (B, h, N, d) views of (B, N, h*d) projections."""
    gen = torch.Generator().manual_seed(seed)
    split = lambda x: x.view(x.shape[0], x.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    q = torch.randn(batch, n, heads * d, generator=gen)
    k, v = torch.randn(2, batch, t, heads * d, generator=gen)
    return tuple(split(x.to(device, dtype)) for x in (q, k, v))


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def rel_mean_err(a, b):
    return ((a.float() - b.float()).abs().mean() / b.float().abs().mean()).item()


def assert_same_up_to_rounding(a, b):
    """Two compilations of one computation: the compiler may order a reduction differently (an ulp or two)."""
    rel = 2 ** -9 if a.dtype == torch.float16 else 2 ** -6
    assert ((a.float() - b.float()).abs() <= rel * b.float().abs() + 1e-6).all()


def assert_maps_close(maps, ref):
    assert maps.dtype == ref.dtype and maps.shape == ref.shape
    if maps.dtype == torch.uint8:
        assert (maps.int() - ref.int()).abs().max().item() <= 1
        assert (maps == 0).any(dim=-1).all()  # every row's maximum has code 0
    else:
        assert ((maps.float() - ref.float()).abs() <= 2 ** -7 * ref.float().abs() + 1e-6).all()


# --------------------------------------------------------------------------------- the interpreter child

@pytest.mark.skipif(INTERPRETED, reason="this is the child")
@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
def test_interpreted_kernels():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("OMG_DISABLE_TRITON", None)
    here = os.path.dirname(os.path.abspath(__file__))
    files = [os.path.abspath(__file__)] + [os.path.join(here, f) for f in ("test_unet_kernels.py", "test_compile.py",
                                                                          "test_fp8.py")]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files,
                             "-k", "interp_", "-m", "not gpu"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


# ------------------------------------------------------------------------ references (in-process, CPU)

def test_reference_attention_matches_sdpa():
    q, k, v = qkv(2, 3, 50, 77, dtype=torch.float32)
    assert max_err(kernels.cross_attention_reference(q, k, v), F.scaled_dot_product_attention(q, k, v)) <= 1e-5


def test_capture_and_replay_references_match_omg_attention():
    from omg.attention import attention_probs
    q, k, v = qkv(3, 2, 24, 77, dtype=torch.float32, seed=1)
    rows, tokens = slice(1, 3), torch.tensor([4, 0, 76])
    heat = torch.full((2, 24, 3), 0.5)
    res = kernels.capture_reference(q, k, v, rows, "bf16", tokens, heat)
    probs = attention_probs(q[rows], k[rows])  # what AttentionControl._capture computes
    assert res.heat is heat
    assert max_err(heat, 0.5 + probs[..., tokens].mean(dim=1)) <= 1e-6
    assert torch.equal(res.maps, probs.to(torch.bfloat16))
    assert max_err(res.out, F.scaled_dot_product_attention(q, k, v)) <= 1e-5
    # replay: AttentionControl._replay's A_stage1 · V for the rows, plain attention elsewhere
    q2, k2, v2 = qkv(3, 2, 24, 77, dtype=torch.float32, seed=2)
    out = kernels.replay_reference(q2, k2, v2, res.maps, rows)
    assert max_err(out[rows], torch.einsum("bhnt,bhtd->bhnd", res.maps.float(), v2[rows])) <= 1e-5
    assert max_err(out[:1], F.scaled_dot_product_attention(q2, k2, v2)[:1]) <= 1e-5
    assert max_err(kernels.replay_maps_reference(res.maps, v2[rows]), out[rows]) <= 1e-6
    # maps only: omg.attention's probabilities bit for bit
    only = kernels.capture_maps_reference(q, k, rows, "bf16", tokens, torch.full((2, 24, 3), 0.5))
    assert only.out is None and torch.equal(only.maps, res.maps) and torch.equal(only.heat, heat)


def test_log8_codec_error_bound():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(4000, 77, generator=gen) * 3
    scores[:, 0] += 5  # an SD-like row: most mass on the first (BOS) token
    codes = kernels.encode_maps(scores, "log8")
    assert codes.dtype == torch.uint8 and (codes.amin(-1) == 0).all()
    p, p_hat = scores.softmax(-1), kernels.decode_maps(codes)
    assert torch.allclose(p_hat.sum(-1), torch.ones(4000))
    kept = codes < 255
    # half a step on the entry, half a step on the row sum, e^-12 * 77 of mass dropped
    log_err = (p_hat[kept].log() - p[kept].log()).abs().max().item()
    assert log_err <= kernels.LOG8_STEP + 5e-4
    assert log_err > kernels.LOG8_STEP / 4  # the quantisation is really there
    assert (p[~kept] <= math.exp(-kernels.cross_attention.LOG8_RANGE + kernels.LOG8_STEP / 2)).all()


@pytest.mark.parametrize("bos,sigma", [(0, 1), (4, 1), (6, 2), (8, 1), (0, 3)])
def test_log8_beats_fp8(bos, sigma):
    """The module docstring's claim: replayed A·v error of log8 ≤ 3e-3 rms, under 0.7x that of fp8 e4m3 with a
    per-row scale (max -> 448, renormalised); bf16 ≤ 1.5e-3 for scale."""
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(20000, 77, generator=gen) * sigma
    scores[:, 0] += bos
    v = torch.randn(77, 64, generator=gen)
    p = scores.softmax(-1)

    def rms(p_hat):
        return (p_hat @ v - p @ v).pow(2).mean().sqrt().item()

    fp8 = (p / p.amax(-1, keepdim=True) * 448).to(torch.float8_e4m3fn).float()
    err_log8 = rms(kernels.decode_maps(kernels.encode_maps(scores, "log8")))
    err_fp8 = rms(fp8 / fp8.sum(-1, keepdim=True))
    err_bf16 = rms(kernels.decode_maps(kernels.encode_maps(scores, "bf16")))
    assert err_log8 <= 3e-3 and err_bf16 <= 1.5e-3  # bf16 is not renormalised: its error on the BOS entry stays
    assert err_log8 < 0.7 * err_fp8


def test_validation():
    q, k, v = qkv(2, 2, 8, 77, dtype=torch.float32)
    with pytest.raises(ValueError, match="rows"):
        kernels.capture(q, k, v, slice(2, 2))
    with pytest.raises(ValueError, match="rows"):
        kernels.capture(q, k, v, slice(0, 2, 2))
    with pytest.raises(ValueError, match="map_format"):
        kernels.capture(q, k, v, slice(1, 2), "fp8")
    with pytest.raises(ValueError, match="tokens"):
        kernels.capture(q, k, v, slice(1, 2), None, torch.tensor([77]))
    with pytest.raises(ValueError, match="heat"):
        kernels.capture(q, k, v, slice(1, 2), None, torch.tensor([3]), torch.zeros(2, 8, 1))
    with pytest.raises(ValueError, match="maps"):
        kernels.replay(q, k, v, torch.zeros(1, 2, 8, 76, dtype=torch.uint8), slice(1, 2))
    with pytest.raises(ValueError, match="q"):
        kernels.attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="masks"):
        kernels.blend_guided(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), torch.zeros(2, 2, 4, 8, 8),
                             torch.zeros(1, 8, 8), 5.0)


def test_dispatch_on_cpu_uses_the_reference(monkeypatch):
    q, k, v = qkv(2, 2, 8, 77)
    assert not kernels.use_triton(q, k, v)
    assert torch.equal(kernels.attention(q, k, v), kernels.cross_attention_reference(q, k, v))
    if kernels.HAS_TRITON:
        monkeypatch.setenv("OMG_DISABLE_TRITON", "1")
        assert not kernels.use_triton()


def blend_inputs(k, h=8, w=12, device="cpu", seed=5):
    gen = torch.Generator().manual_seed(seed)
    base_u, base_c = torch.randn(2, 1, 4, h, w, generator=gen)
    concepts = torch.randn(k, 2, 4, h, w, generator=gen)
    owner = torch.randint(0, k + 1, (h, w), generator=gen)  # non-overlapping masks, soft edges
    masks = torch.stack([(owner == i + 1).float() * torch.rand(h, w, generator=gen) for i in range(k)]) \
        if k else torch.zeros(0, h, w)
    return [t.to(device) for t in (base_u, base_c, concepts, masks)]


def test_blend_reference_matches_blended_eps():
    from omg.sampling import apply_guidance
    base_u, base_c, concepts, masks = blend_inputs(3)
    # omg.pipeline.BlendedEps.__call__'s blend, written out
    union = masks.sum(0)[None, None]
    eps_u, eps_c = (1 - union) * base_u, (1 - union) * base_c
    for i in range(3):
        m = masks[i][None, None]
        eps_u, eps_c = eps_u + m * concepts[i, 0:1], eps_c + m * concepts[i, 1:2]
    expected = apply_guidance(eps_u, eps_c, 6.0)
    assert max_err(kernels.blend_guided(base_u, base_c, concepts, masks, 6.0), expected) <= 1e-6
    pairs = [(concepts[i, 0:1], concepts[i, 1:2]) for i in range(3)]
    assert max_err(kernels.blend_guided(base_u, base_c, pairs, masks, 6.0), expected) <= 1e-6
    u, c = kernels.blend_eps(base_u, base_c, list(concepts), masks)
    assert max_err(u, eps_u) <= 1e-6 and max_err(c, eps_c) <= 1e-6


class KernelCapture:
    """attn2 through kernels.capture, as AttentionControl._capture does after integration: the conditional
    rows' maps per layer and the heat sums per resolution."""

    def __init__(self, rows, tokens, map_format):
        self.rows, self.tokens, self.map_format = rows, tokens, map_format
        self.maps, self.heat = {}, {}

    def __call__(self, layer, x, context):
        q, k, v = layer.qkv(x, context)
        n = q.shape[2]
        if n not in self.heat:
            self.heat[n] = torch.zeros(self.rows.stop - self.rows.start, n, len(self.tokens), device=q.device)
        res = kernels.capture(q, k, v, self.rows, self.map_format, self.tokens.to(q.device), self.heat[n])
        self.maps[layer.path] = res.maps
        return layer.out(res.out)


def check_unet_capture(device, dtype, tol):
    """kernels.capture inside the tiny UNet gives AttentionControl(store="maps")'s maps and heat maps."""
    from omg.attention import AttentionControl, RowLayout
    from omg.unet import UNet, UNetConfig
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    unet = unet.to(device, dtype)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 16, 24, generator=gen).expand(2, -1, -1, -1).to(device, dtype)
    ctx = torch.randn(2, 9, unet.config.context_dim, generator=gen).to(device, dtype)
    y = torch.randn(2, unet.config.adm_in_channels, generator=gen).to(device, dtype)
    tokens = [1, 4]
    control = AttentionControl(unet, "maps", replay_calls=[0], store_dtype=torch.bfloat16, heatmap_tokens=tokens,
                               latent_hw=(16, 24))
    with control, torch.no_grad():
        control.set_call("capture", 0, RowLayout(images=1))
        ref = unet(x, 10.0, ctx, y)
    proc = KernelCapture(slice(1, 2), torch.tensor(tokens, dtype=torch.int32), "bf16")
    unet.set_attention_processor(proc, kind="cross")
    with torch.no_grad():
        out = unet(x, 10.0, ctx, y)
    unet.set_attention_processor(None)
    # relative mean errors: rounding differences grow through the layers; a layout mix-up would be O(1)
    assert rel_mean_err(out, ref) <= tol
    assert sorted(proc.maps) == sorted(path for (_, path) in control.saved)
    for (_, path), maps in control.saved.items():
        assert rel_mean_err(proc.maps[path], maps) <= tol
    for n, sums in control.heatmaps.sums.items():  # (rows, N, n_tok) summed over layers
        assert rel_mean_err(proc.heat[n].reshape(sums.shape), sums) <= tol


def test_unet_capture_reference():
    check_unet_capture("cpu", torch.float32, 1e-4)  # bf16 maps: a few entries round the other way


# ------------------------------------------------------------ Triton on CPU (TRITON_INTERPRET=1 child)

@interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [77, 154])
def test_interp_attention(dtype, t):
    q, k, v = qkv(2, 2, 37, t, dtype=dtype)  # 37 queries: 3 tiles of 16, the last one partial
    out = kca.cross_attention_triton(q, k, v, block_m=16)
    assert out.shape == q.shape and out.dtype == dtype
    assert max_err(out, kernels.cross_attention_reference(q, k, v)) <= TOL[dtype]
    # and a contiguous (B, h, N, d) layout gives the same numbers
    assert torch.equal(kca.cross_attention_triton(*(x.contiguous() for x in (q, k, v)), block_m=16), out)


@interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("map_format", [None, "bf16", "log8"])
def test_interp_capture(dtype, map_format):
    q, k, v = qkv(3, 2, 37, 77, dtype=dtype, seed=7)
    rows, tokens = slice(1, 3), torch.tensor([0, 9, 76], dtype=torch.int32)
    heat = torch.rand(2, 37, 3)
    ref = kernels.capture_reference(q, k, v, rows, map_format, tokens, heat.clone())
    res = kca.capture_triton(q, k, v, rows, map_format, tokens, heat, block_m=16)
    assert res.heat is heat and max_err(heat, ref.heat) <= 1e-5
    assert max_err(res.out, ref.out) <= TOL[dtype]
    # capturing leaves the attention output of every row as in plain mode
    assert torch.equal(res.out, kca.cross_attention_triton(q, k, v, block_m=16))
    if map_format is None:
        assert res.maps is None
    else:
        assert_maps_close(res.maps, ref.maps)


@interp
def test_interp_capture_long_prompt_and_heat_only():
    q, k, v = qkv(2, 2, 20, 154, dtype=torch.float16, seed=8)
    tokens = torch.tensor([100, 153], dtype=torch.int32)
    ref = kernels.capture_reference(q, k, v, slice(1, 2), "log8", tokens)
    res = kca.capture_triton(q, k, v, slice(1, 2), "log8", tokens)
    assert max_err(res.heat, ref.heat) <= 1e-5 and ref.heat.abs().max() > 0
    assert_maps_close(res.maps, ref.maps)
    res = kca.capture_triton(q, k, v, slice(0, 2), None, tokens)
    assert res.maps is None and res.heat.shape == (2, 20, 2)


@interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("map_format", [None, "bf16", "log8"])
def test_interp_capture_maps(dtype, map_format):
    q, k, v = qkv(3, 2, 37, 77, dtype=dtype, seed=12)
    rows, tokens = slice(1, 3), torch.tensor([1, 40], dtype=torch.int32)
    ref = kernels.capture_maps_reference(q, k, rows, map_format, tokens)
    res = kca.capture_maps_triton(q, k, rows, map_format, tokens, block_m=16)
    assert res.out is None and max_err(res.heat, ref.heat) <= 1e-5
    full = kca.capture_triton(q, k, v, rows, map_format, tokens, block_m=16)  # the same numbers as capture
    assert torch.equal(res.heat, full.heat)
    if map_format is None:
        assert res.maps is None
    else:
        assert_maps_close(res.maps, ref.maps)
        assert torch.equal(res.maps, full.maps)


@interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("map_format", ["bf16", "log8"])
def test_interp_replay(dtype, map_format):
    q, k, v = qkv(3, 2, 37, 77, dtype=dtype, seed=9)
    rows = slice(2, 3)
    maps = kernels.capture_reference(*qkv(1, 2, 37, 77, dtype=dtype, seed=10), slice(0, 1), map_format).maps
    out = kca.replay_triton(q, k, v, maps, rows, block_m=32)
    assert max_err(out, kernels.replay_reference(q, k, v, maps, rows)) <= TOL[dtype]
    assert torch.equal(out[:2], kca.cross_attention_triton(q, k, v, block_m=32)[:2])
    alone = kca.replay_maps_triton(maps, v[rows])
    assert max_err(alone, kernels.replay_maps_reference(maps, v[rows])) <= TOL[dtype]
    assert max_err(alone, out[rows]) <= TOL[dtype] / 4


@interp
def test_interp_replay_of_capture_reproduces_the_output():
    q, k, v = qkv(2, 2, 37, 77, dtype=torch.float16, seed=11)
    for map_format, tol in (("bf16", 1e-2), ("log8", 5e-2)):  # the map store's error, not the kernel's
        res = kca.capture_triton(q, k, v, slice(1, 2), map_format)
        q_other = torch.randn_like(q)  # the replayed row ignores its own queries
        out = kca.replay_triton(q_other, k, v, res.maps, slice(1, 2))
        assert max_err(out[1], res.out[1]) <= tol
        assert max_err(out[0], res.out[0]) > tol


@interp
@pytest.mark.parametrize("k", [0, 1, 3])
def test_interp_blend(k):
    base_u, base_c, concepts, masks = blend_inputs(k, h=20, w=36)  # 720 pixels: a partial block
    expected = kernels.blend_guided_reference(base_u, base_c, concepts, masks, 7.5)
    assert max_err(kblend.blend_guided_triton(base_u, base_c, concepts, masks, 7.5), expected) <= 1e-6
    u, c = kblend.blend_eps_triton(base_u, base_c, list(concepts), masks)
    u_ref, c_ref = kernels.blend_eps_reference(base_u, base_c, concepts, masks)
    assert max_err(u, u_ref) <= 1e-6 and max_err(c, c_ref) <= 1e-6


@interp
def test_interp_unet_capture(monkeypatch):
    monkeypatch.setattr(kernels, "use_triton", lambda *tensors: True)  # run the kernel on CPU tensors
    check_unet_capture("cpu", torch.float16, 1e-2)


# ------------------------------------------------------------------------------ GPU, SDXL shapes

LAYERS = {"64x64": (4096, 10), "32x32": (1024, 20)}
gpu_shapes = pytest.mark.parametrize("batch", [2, 12])
gpu_layers = pytest.mark.parametrize("layer", sorted(LAYERS))
gpu_dtypes = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])


def gpu_qkv(batch, layer, dtype, seed=0):
    n, heads = LAYERS[layer]
    return qkv(batch, heads, n, 77, dtype=dtype, device="cuda", seed=seed)


def assert_attention_close(out, q, k, v, ref=None):
    ref = kernels.cross_attention_reference(q, k, v) if ref is None else ref
    err = (out.float() - ref.float()).abs()
    sdpa_err = (F.scaled_dot_product_attention(q, k, v).float() - ref.float()).abs()
    assert err.max().item() <= TOL[q.dtype], (err.max().item(), sdpa_err.max().item())
    assert err.mean().item() <= 1.5 * sdpa_err.mean().item() + 1e-5, (err.mean().item(), sdpa_err.mean().item())


@pytest.mark.gpu
@gpu_shapes
@gpu_layers
@gpu_dtypes
def test_gpu_attention(batch, layer, dtype):
    q, k, v = gpu_qkv(batch, layer, dtype)
    out = kernels.attention(q, k, v)
    assert out.is_cuda and out.shape == q.shape
    assert_attention_close(out, q, k, v)
    assert torch.equal(out, kca.cross_attention_triton(q, k, v))  # the dispatcher took the kernel


@pytest.mark.gpu
@gpu_shapes
@gpu_layers
@gpu_dtypes
@pytest.mark.parametrize("map_format", [None, "bf16", "log8"], ids=["no-maps", "bf16-maps", "log8-maps"])
def test_gpu_capture(batch, layer, dtype, map_format):
    q, k, v = gpu_qkv(batch, layer, dtype, seed=1)
    rows = slice(batch // 2, batch)  # the conditional half of a CFG batch
    tokens = torch.tensor([0, 2, 5, 76], dtype=torch.int32, device="cuda")
    res = kernels.capture(q, k, v, rows, map_format, tokens)
    ref = kernels.capture_reference(q, k, v, rows, map_format, tokens)
    assert_attention_close(res.out, q, k, v, ref.out)
    assert_same_up_to_rounding(res.out, kernels.attention(q, k, v))
    assert max_err(res.heat, ref.heat) <= 2e-5
    if map_format:
        assert_maps_close(res.maps, ref.maps)


@pytest.mark.gpu
@gpu_shapes
@gpu_layers
@gpu_dtypes
@pytest.mark.parametrize("map_format", [None, "log8"], ids=["no-maps", "log8-maps"])
def test_gpu_capture_maps(batch, layer, dtype, map_format):
    q, k, _ = gpu_qkv(batch, layer, dtype, seed=4)
    rows = slice(batch // 2, batch)
    tokens = torch.tensor([0, 2, 5, 76], dtype=torch.int32, device="cuda")
    res = kernels.capture_maps(q, k, rows, map_format, tokens)
    ref = kernels.capture_maps_reference(q, k, rows, map_format, tokens)
    assert res.out is None and max_err(res.heat, ref.heat) <= 2e-5
    if map_format:
        assert_maps_close(res.maps, ref.maps)


@pytest.mark.gpu
@gpu_shapes
@gpu_layers
@gpu_dtypes
@pytest.mark.parametrize("map_format", ["bf16", "log8"], ids=["bf16-maps", "log8-maps"])
def test_gpu_replay(batch, layer, dtype, map_format):
    q, k, v = gpu_qkv(batch, layer, dtype, seed=2)
    rows = slice(batch // 2, batch)
    maps = kernels.capture_reference(*gpu_qkv(batch, layer, dtype, seed=3), rows, map_format).maps
    out = kernels.replay(q, k, v, maps, rows)
    ref = kernels.replay_reference(q, k, v, maps, rows)
    assert max_err(out, ref) <= TOL[dtype]
    assert_same_up_to_rounding(out[:rows.start], kernels.attention(q, k, v)[:rows.start])
    alone = kernels.replay_maps(maps, v[rows])
    assert max_err(alone, ref[rows]) <= TOL[dtype]


@pytest.mark.gpu
def test_gpu_disable_env_forces_the_reference(monkeypatch):
    q, k, v = gpu_qkv(2, "32x32", torch.float16)
    assert kernels.use_triton(q, k, v)
    monkeypatch.setenv("OMG_DISABLE_TRITON", "1")
    assert not kernels.use_triton(q, k, v)
    assert torch.equal(kernels.attention(q, k, v), kernels.cross_attention_reference(q, k, v))


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 2, 4])
def test_gpu_blend(k):
    base_u, base_c, concepts, masks = blend_inputs(k, h=128, w=128, device="cuda")
    expected = kernels.blend_guided_reference(base_u, base_c, concepts, masks, 7.5)
    assert max_err(kernels.blend_guided(base_u, base_c, concepts, masks, 7.5), expected) <= 1e-5
    u, c = kernels.blend_eps(base_u, base_c, concepts, masks)
    u_ref, c_ref = kernels.blend_eps_reference(base_u, base_c, concepts, masks)
    assert max_err(u, u_ref) <= 1e-5 and max_err(c, c_ref) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_unet_capture(dtype):
    check_unet_capture("cuda", dtype, 1e-2 if dtype == torch.float16 else 3e-2)
