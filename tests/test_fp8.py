"""The FP8 fast mode (option fp8, omg.fp8): e4m3 matmuls for the UNet's transformer Linear layers.

Oracles: the activation quantiser's torch reference (kernels.quantize_rows_reference), bit for bit; the dequantised
formulation (kernels.fp8_matmul_reference: (x_q scale_a)(w_q scale_b)ᵀ + bias in fp32) for the GEMM; the 16-bit
UNet for the mode as a whole (cosine > 0.99 on a tiny random UNet: e4m3 keeps 3 mantissa bits, so each Linear's
output is off by about 2-4 % relative, and that is what the mode trades); the exact model once the mode is left.
CPU: the kernel runs under TRITON_INTERPRET=1 in test_kernels.py's child process (`test_interp_*`).
GPU (-m gpu): torch._scaled_mm against the dequantised formulation, the kernel against its reference, and the
fp8 UNet replayed as a CUDA graph against its eager forward.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
import omg
from kernels import fp8 as kfp8
from kernels import ops as kops
from omg.fp8 import Linear, fp8_layers, fp8_linears
from omg.lora import ConceptWeights, GroupedLora, bind
from omg.unet import UNet, UNetConfig
from test_grouped_lora import kohya_lowrank
from test_kernels import interp
from test_lora import FF, K2, OUT, Q
from test_pipeline import kohya_lora, run, tiny_model


def cosine(a, b):
    return F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def e4m3_midpoints():
    """Every tie between two neighbouring positive e4m3 values, both signs (round to even decides them)."""
    values = torch.arange(0, 127, dtype=torch.uint8).view(kfp8.E4M3).float()  # 0 .. 448, all finite
    mids = (values[1:] + values[:-1]) / 2
    return torch.cat([mids, -mids, values, torch.tensor([448.0])])  # the 448 fixes the row's scale at 1


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny()).eval().requires_grad_(False)


def unet_inputs(rows=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, 16, 16, generator=g), torch.full((rows,), 500.0),
            torch.randn(rows, 10, 48, generator=g), torch.randn(rows, 64, generator=g))


# ------------------------------------------------------------------------------------- the quantiser

def test_reference_quantiser_scales_each_row_by_its_amax():
    x = torch.randn(6, 32) * torch.logspace(-3, 2, 6)[:, None]
    x[2] = 0
    q, scale = kernels.quantize_rows_reference(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 1) and scale.dtype == torch.float32
    assert torch.equal(scale[[0, 1, 3, 4, 5]], x[[0, 1, 3, 4, 5]].abs().amax(-1, keepdim=True) * (1 / 448))
    assert torch.equal(q.float().abs().amax(-1)[[0, 1, 3, 4, 5]], torch.full((5,), 448.0))  # the amax maps to 448
    assert torch.equal(q[2].float(), torch.zeros(32)) and scale[2].item() > 0  # a zero row stays finite
    rel = ((q.float() * scale - x).abs() / x.abs().clamp_min(1e-30))[x.abs() >= scale * 2 ** -6]
    assert rel.max() <= 2 ** -4  # e4m3: 3 mantissa bits, half a unit of rounding in the normal range
    assert torch.equal(kernels.quantize_rows(x)[0].float(), q.float())  # the op on CPU is the reference


def test_weight_is_quantised_per_output_channel():
    w = torch.randn(48, 32) * torch.linspace(0.1, 3, 48)[:, None]
    w_q, w_scale = kernels.quantize_weight(w)
    assert w_scale.shape == (1, 48) and w_q.shape == (48, 32) and w_q.is_contiguous()
    assert torch.equal(w_scale[0], w.abs().amax(1) * (1 / 448))


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16), (5, 48), (33, 320), (3, 100), (2, 5120)])
def test_interp_quantize_rows(dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * torch.logspace(-4, 1, shape[1])).to(dtype)  # subnormals of e4m3 too
    x[-1, :3] = torch.tensor([-0.0, 0.0, -1e-30])
    if shape[0] > 2:
        x[1] = 0
    q, scale = kfp8.quantize_rows_triton(x)
    q_ref, scale_ref = kernels.quantize_rows_reference(x)
    assert torch.equal(scale, scale_ref) and same_bits(q, q_ref)


@interp
def test_interp_quantize_rows_ties_and_strides(monkeypatch):
    x = e4m3_midpoints().repeat(3, 1)  # exact ties: the kernel rounds to even as torch's cast does
    q, scale = kfp8.quantize_rows_triton(x)
    q_ref, scale_ref = kernels.quantize_rows_reference(x)
    assert torch.equal(scale, torch.ones(3, 1)) and same_bits(q, q_ref)
    wide = torch.randn(7, 96)
    rows = wide[:, 16:80]  # rows 96 apart: read in place
    monkeypatch.setattr(kops, "TRITON_ON_CPU", True)  # through the custom op, as the UNet calls it
    q, scale = kernels.quantize_rows(rows)
    q_ref, scale_ref = kernels.quantize_rows_reference(rows)
    assert torch.equal(scale, scale_ref) and same_bits(q, q_ref)


# ------------------------------------------------------------------------------------------ the GEMM

@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_is_its_dequantised_formulation(bias):
    layer = Linear(48, 32, bias=bias).requires_grad_(False)
    x = torch.randn(2, 7, 48)
    with fp8_linears(layer):
        got = layer(x)
    x_q, scale_a = kernels.quantize_rows_reference(x.reshape(-1, 48))
    w_q, scale_b = kernels.quantize_weight(layer.weight)
    expected = kernels.fp8_matmul_reference(x_q, scale_a, w_q, scale_b, layer.bias, x.dtype).reshape(2, 7, 32)
    assert torch.equal(got, expected)
    exact = F.linear(x, layer.weight, layer.bias)
    assert cosine(got, exact) > 0.998 and not torch.equal(got, exact)
    assert torch.equal(layer(x), exact)  # the with-block's end restores nn.Linear bit for bit


def test_layers_not_multiples_of_16_and_other_linears_stay_16_bit(tiny_unet):
    odd = Linear(24, 32)
    assert not fp8_layers(odd)
    x = torch.randn(3, 24)
    with fp8_linears(odd):
        assert torch.equal(odd(x), F.linear(x, odd.weight, odd.bias))
    layers = fp8_layers(tiny_unet)
    linears = {n for n, m in tiny_unet.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(".transformer_blocks." in n or n.endswith(("proj_in", "proj_out")) for n in layers)
    assert {n for n in linears - set(layers)} == {n for n in linears if "emb" in n}  # embeddings only


# ------------------------------------------------------------------------------------------ the UNet

def test_tiny_unet_in_fp8_is_close_and_leaving_it_is_exact(tiny_unet, monkeypatch):
    weights = {n: p.clone() for n, p in tiny_unet.named_parameters()}
    args = unet_inputs()
    exact = tiny_unet(*args)
    calls = []
    quantize = kernels.quantize_weight
    monkeypatch.setattr(kernels, "quantize_weight", lambda w: calls.append(w.shape) or quantize(w))
    with fp8_linears(tiny_unet):
        fast = tiny_unet(*args)
        assert torch.equal(tiny_unet(*args), fast)
    assert len(calls) == len(fp8_layers(tiny_unet))  # every weight quantised once, on entry
    with fp8_linears(tiny_unet):
        assert torch.equal(tiny_unet(*args), fast)
    assert len(calls) == len(fp8_layers(tiny_unet))  # and cached on the module for later uses
    assert cosine(fast, exact) > 0.99 and (fast - exact).abs().max() > 0
    assert torch.equal(tiny_unet(*args), exact)  # fp8 off again: the exact model
    assert all(torch.equal(p, weights[n]) for n, p in tiny_unet.named_parameters())  # weights never modified


def test_changed_weights_are_quantised_anew(tiny_unet):
    """An in-place merge (style LoRAs) and a swapped-in tensor (merged concept weights) are new cache entries; on
    leaving, only the current weight's stays."""
    layer = tiny_unet.get_submodule(Q)
    args = unet_inputs()
    with fp8_linears(tiny_unet):
        before = tiny_unet(*args)
        with torch.no_grad():
            layer.weight.mul_(2)  # in place, as omg.style merges
        doubled = tiny_unet(*args)
        with torch.no_grad():
            layer.weight.div_(2)
        assert not torch.equal(doubled, before)
        spec = (kohya_lowrank(tiny_unet, [Q, OUT], rank=4, seed=2), 1.0)
        merged = ConceptWeights.merge(tiny_unet, spec)
        with merged.applied(tiny_unet):
            concept = tiny_unet(*args)
        assert len(layer._fp8_cache) == 3  # the base weight, the doubled one, the concept's
    with fp8_linears(tiny_unet):
        assert torch.equal(tiny_unet(*args), before)
    assert len(layer._fp8_cache) == 1
    with merged.applied(tiny_unet):
        exact_concept = tiny_unet(*args)
    assert cosine(concept, exact_concept) > 0.99


def test_grouped_lora_deltas_stay_16_bit_on_the_fp8_base(tiny_unet):
    """The concept rows of a grouped call get their LoRA delta on top of the fp8 base GEMM. One layer: with LoRA
    minus without is the 16-bit delta (float rounding). The UNet: so up to the fp8 error of the activations that feed
    the later layers (measured 0.13 and 0.22 of the delta's norm, about the fp8 error of the outputs themselves)."""
    specs = [(kohya_lowrank(tiny_unet, [Q, K2, FF], rank=4, seed=1), 0.5), (kohya_lowrank(tiny_unet, [OUT], 8, 3), 1.0)]
    grouped = GroupedLora(tiny_unet, [bind(tiny_unet, s) for s in specs])
    base_rows = 2
    x, t, ctx, y = unet_inputs(base_rows + 4)
    tokens = torch.randn(base_rows + 4, 20, 64)
    layer = tiny_unet.get_submodule(Q)

    def outputs(fn):
        plain = fn()
        with grouped.installed(base_rows):
            return plain, fn()

    layer16 = outputs(lambda: layer(tokens))
    unet16 = outputs(lambda: tiny_unet(x, t, ctx, y))
    with fp8_linears(tiny_unet):
        layer8 = outputs(lambda: layer(tokens))
        unet8 = outputs(lambda: tiny_unet(x, t, ctx, y))
    delta16, delta8 = layer16[1] - layer16[0], layer8[1] - layer8[0]
    assert delta16[base_rows:].abs().max() > 1e-2 and not delta8[:base_rows].any()
    assert (delta8 - delta16).abs().max() <= 1e-5 * layer16[1].abs().max()
    assert torch.equal(unet8[1][:base_rows], unet8[0][:base_rows])  # the base rows: the fp8 base model's
    for rows in (slice(2, 4), slice(4, 6)):
        delta16, delta8 = unet16[1][rows] - unet16[0][rows], unet8[1][rows] - unet8[0][rows]
        assert delta16.abs().max() > 1e-2
        assert (delta8 - delta16).norm() <= 0.3 * delta16.norm()
        assert cosine(unet8[1][rows], unet16[1][rows]) > 0.99


def test_generate_with_fp8(tmp_path):
    """omg.generate(fp8=True) on the tiny random SDXL: close to the exact image; the concept's grouped LoRA changes
    the fp8 image as it changes the exact one (the two trajectories part by the fp8 error over 5 steps); merged
    concept weights run too; fp8=False afterwards is the exact path bit for bit."""
    model = tiny_model()
    exact = run(model)
    fast = run(model, fp8=True)
    assert cosine(fast.latent, exact.latent) > 0.99 and not torch.equal(fast.latent, exact.latent)
    lora = kohya_lora(model, tmp_path / "c.safetensors", seed=0)
    concepts = [omg.Concept("man", "a photo of sks man", lora=lora, mask=(0, 0, 40, 64))]
    with_lora = {mode: run(model, concepts, lora_mode=mode, fp8=True) for mode in ("grouped", "merged")}
    exact_lora = run(model, concepts)
    d16 = exact_lora.latent - exact.latent
    for mode, r in with_lora.items():
        d8 = r.latent - fast.latent
        assert (d8 - d16).norm() <= 0.35 * d16.norm(), mode
        assert cosine(r.latent, exact_lora.latent) > 0.99, mode
    assert all(len(m._fp8_cache) == 1 for m in fp8_layers(model.unet).values())  # merged sets dropped
    assert torch.equal(run(model).latent, exact.latent)


# ------------------------------------------------------------------------------------------------ GPU

needs_scaled_mm = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                     reason="torch._scaled_mm's e4m3 GEMM needs an sm89+ GPU")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2 * 4096, 640), (154, 2048), (7 * 1024, 5120), (3, 16)])
def test_gpu_quantize_rows_kernel_is_its_reference(dtype, shape):
    x = (torch.randn(shape, device="cuda") * 3).to(dtype)
    q, scale = kernels.quantize_rows(x)
    q_ref, scale_ref = kernels.quantize_rows_reference(x)
    assert torch.equal(scale, scale_ref) and same_bits(q, q_ref)


@pytest.mark.gpu
@needs_scaled_mm
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("m,k,n,bias", [(2 * 4096, 640, 640, True), (154, 2048, 1280, False),
                                        (7 * 1024, 5120, 1280, True), (2 * 1024, 1280, 10240, True)])
def test_gpu_scaled_mm_is_the_dequantised_formulation(dtype, m, k, n, bias):
    x = torch.randn(m, k, device="cuda").to(dtype)
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(dtype)
    b = torch.randn(n, device="cuda").to(dtype) if bias else None
    w_q, w_scale = kernels.quantize_weight(w)
    got = kernels.fp8_linear(x, w_q, w_scale, b)
    x_q, x_scale = kernels.quantize_rows_reference(x)
    expected = kernels.fp8_matmul_reference(x_q, x_scale, w_q, w_scale, b, torch.float32)
    assert got.dtype == dtype
    # fp32 accumulation in another order, one rounding to the output dtype (fp32 models: _scaled_mm takes no bias
    # for fp32 outputs, it is added after: this failed the fp32 demo world's fp8 runs)
    ulp = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -20}[dtype]
    assert ((got.float() - expected).abs() <= ulp * expected.abs() + 1e-3 * expected.abs().max()).all()
    assert cosine(got, F.linear(x.float(), w.float(), None if b is None else b.float())) > 0.998


@pytest.mark.gpu
@needs_scaled_mm
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_fp8_unet_graphed_equals_eager(dtype):
    from omg.graphs import GraphedCall
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).to("cuda", dtype).eval().requires_grad_(False)
    x, t, ctx, y = (a.to("cuda") for a in unet_inputs(4))
    x, ctx, y = x.to(dtype), ctx.to(dtype), y.to(dtype)
    with torch.no_grad():
        exact = unet(x, t, ctx, y)
        with fp8_linears(unet):
            eager = unet(x, t, ctx, y)
            graphed = GraphedCall(lambda x_, t_: unet(x_, t_, ctx, y))
            first, replayed = graphed(x, t), graphed(x, t)
        assert graphed.graph is not None and not graphed.eager
        assert torch.equal(first, eager) and torch.equal(replayed, eager)
        assert cosine(eager, exact) > 0.99
        assert torch.equal(unet(x, t, ctx, y), exact)
