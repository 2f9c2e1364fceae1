"""The UNet's fused kernels (kernels.norm, kernels.residual_norm, kernels.ffn) against their PyTorch references.

CPU: the kernels run under TRITON_INTERPRET=1 in test_kernels.py's child process (its runner collects the
`test_interp_*` tests of this file too). GPU (-m gpu): SDXL's shapes, fp16 and bf16.
Tolerances: fp32 1e-5 relative, with a floor of a tenth of the output scale (the kernel's chunked statistics
sum in another order); fp16/bf16 two units in the last place of the output (the kernel rounds once, torch
after each op).
"""
import pytest
import torch

import kernels
from kernels import ffn as kffn
from kernels import residual_norm as kln
from kernels import norm as knorm
from test_kernels import interp

ULP = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


def assert_close_ulps(out, ref_fp32, dtype, ulps=2):
    """out (dtype) within `ulps` units of the dtype's last place of the fp32 reference (relative + a floor)."""
    assert out.dtype == dtype and out.shape == ref_fp32.shape
    err = (out.float() - ref_fp32).abs()
    # the floor: fp32 GroupNorm of inputs with mean 30 and std 2 loses ~|mean|/std units (torch's too)
    floor = (0.1 if dtype == torch.float32 else 1e-2) * ref_fp32.abs().max()
    bound = ulps * ULP[dtype] * (ref_fp32.abs() + floor)
    assert (err <= bound).all(), (err.max().item(), (err / bound).max().item())


def gn_inputs(shape, groups, dtype, device="cpu", offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    x = torch.randn(shape, generator=g) * 2 + offset
    w, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    shift = torch.randn(b, c, generator=g)
    return [t.to(device, dtype) for t in (x, w, bias, shift)]


def test_group_norm_reference_is_torchs_ops():
    x, w, b, shift = gn_inputs((2, 8, 5, 6), 4, torch.float32)
    expected = torch.nn.functional.silu(torch.nn.GroupNorm(4, 8, eps=1e-5).requires_grad_(False).eval()
                                        .to(x).__class__.forward(_gn(4, 8, w, b), x + shift[:, :, None, None]))
    assert torch.equal(kernels.group_norm_reference(x, 4, w, b, 1e-5, shift, silu=True), expected)


def _gn(groups, channels, w, b):
    m = torch.nn.GroupNorm(groups, channels)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    return m


def test_dispatch_on_cpu_is_the_reference():
    x, w, b, shift = gn_inputs((1, 4, 3, 3), 2, torch.float32)
    assert torch.equal(kernels.group_norm(x, 2, w, b, 1e-6, shift, True),
                       kernels.group_norm_reference(x, 2, w, b, 1e-6, shift, True))
    h = torch.randn(2, 3, 8)
    assert torch.equal(kernels.geglu(h), kernels.geglu_reference(h))


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,groups", [((2, 8, 10, 12), 4),   # one partial chunk per group
                                          ((1, 6, 80, 90), 2)])  # 3 x 7200 = 21600: 6 chunks, the last partial
@pytest.mark.parametrize("shift,silu", [(False, False), (True, True)])
def test_interp_group_norm(dtype, shape, groups, shift, silu):
    x, w, b, s = gn_inputs(shape, groups, dtype, offset=30.0)  # a large mean: the variance must stay accurate
    s = s if shift else None
    out = knorm.group_norm_triton(x, groups, w, b, 1e-5, s, silu)
    ref = kernels.group_norm_reference(x.float(), groups, w.float(), b.float(), 1e-5,
                                       None if s is None else s.float(), silu)
    assert_close_ulps(out, ref, dtype)
    plain = knorm.group_norm_triton(x, groups, None, None, 1e-5)  # no affine
    assert_close_ulps(plain, kernels.group_norm_reference(x.float(), groups, None, None, 1e-5), dtype)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,groups", [((2, 12, 5, 7), 4),       # 3 channels a group, one split, partial tiles
                                          ((1, 160, 40, 45), 8)])   # 20 a group, two channel blocks, many splits
@pytest.mark.parametrize("shift,silu", [(False, False), (True, True)])
def test_interp_group_norm_channels_last(dtype, shape, groups, shift, silu, monkeypatch):
    """Channels-last input: the (pixels x channels) kernels, output channels-last with the contiguous kernels'
    values."""
    monkeypatch.setattr(knorm, "SPLIT_TARGET", 4)  # several splits of the pixels even for these small tensors
    x, w, b, s = gn_inputs(shape, groups, dtype, offset=30.0)
    x = x.contiguous(memory_format=torch.channels_last)
    s = s if shift else None
    out = knorm.group_norm_triton(x, groups, w, b, 1e-5, s, silu)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    x32 = x.float().contiguous()  # the reference from contiguous input (torch's CPU channels-last sums another way)
    ref = kernels.group_norm_reference(x32, groups, w.float(), b.float(), 1e-5, None if s is None else s.float(), silu)
    assert_close_ulps(out, ref, dtype)
    plain = knorm.group_norm_triton(x, groups, None, None, 1e-5)
    assert_close_ulps(plain, kernels.group_norm_reference(x32, groups, None, None, 1e-5), dtype)


def test_group_norm_op_keeps_the_layout():
    """The op's output layout (what its fake function promises torch.compile) is channels-last exactly for
    channels-last input, on every path (here the reference's)."""
    x, w, b, s = gn_inputs((2, 8, 5, 6), 4, torch.float32)
    last = x.contiguous(memory_format=torch.channels_last)
    out = kernels.group_norm(last, 4, w, b, 1e-5, s, True)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.equal(out, kernels.group_norm(x, 4, w, b, 1e-5, s, True))
    assert kernels.group_norm(x, 4, w, b, 1e-5, s, True).is_contiguous()
    single = x[:, :, :1, :1].contiguous(memory_format=torch.channels_last)  # both layouts at once: contiguous
    assert kernels.group_norm(single, 4, w, b, 1e-5, s).is_contiguous()


def ln_inputs(shape, dtype, device="cpu", offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + offset
    delta = torch.randn(shape, generator=g)
    w, b = torch.randn(shape[-1], generator=g), torch.randn(shape[-1], generator=g)
    return [t.to(device, dtype) for t in (x, delta, w, b)]


def test_layer_norm_dispatch_on_cpu_is_the_unfused_block():
    """On CPU the ops are torch's: the transformer block's values do not change where the kernels do not run."""
    x, delta, w, b = ln_inputs((2, 5, 12), torch.float32)
    norm = torch.nn.LayerNorm(12)
    with torch.no_grad():
        norm.weight.copy_(w)
        norm.bias.copy_(b)
    s, y = kernels.add_layer_norm(norm, x, delta)
    assert torch.equal(s, x + delta) and torch.equal(y, norm(x + delta))
    assert torch.equal(kernels.layer_norm(norm, x), norm(x))


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 40), (2, 5, 96), (1, 3, 300)])  # several rows a program, one
@pytest.mark.parametrize("affine", [True, False])
def test_interp_layer_norm(dtype, shape, affine):
    x, delta, w, b = ln_inputs(shape, dtype, offset=20.0)  # a large mean: the variance must stay accurate
    w, b = (w, b) if affine else (None, None)
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    assert_close_ulps(kln.layer_norm_triton(x, w, b, 1e-5), kln.layer_norm_reference(x.float(), f32(w), f32(b), 1e-5),
                      dtype)
    s, y = kln.add_layer_norm_triton(x, delta, w, b, 1e-5)
    assert torch.equal(s, x + delta)  # the residual stream as torch's add stores it
    assert_close_ulps(y, kln.layer_norm_reference(s.float(), f32(w), f32(b), 1e-5), dtype)
    with pytest.raises(ValueError, match="delta must match"):
        kln.add_layer_norm_triton(x, delta[..., :1], w, b, 1e-5)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_geglu(dtype):
    h = (torch.randn(3, 5, 2 * 37, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    assert_close_ulps(kffn.geglu_triton(h), kernels.geglu_reference(h.float()), dtype)
    with pytest.raises(ValueError, match="even"):
        kffn.geglu_triton(h[..., 1:])


# ------------------------------------------------------------------------------ GPU, SDXL shapes

gpu_dtypes = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@gpu_dtypes
@pytest.mark.parametrize("shape", [(2, 320, 128, 128), (7, 1280, 32, 32), (2, 960, 128, 128), (3, 640, 64, 64)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_group_norm(dtype, shape, layout):
    x, w, b, shift = gn_inputs(shape, 32, dtype, device="cuda", offset=1.0)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out = kernels.group_norm(x, 32, w, b, 1e-5, shift, silu=True)
    ref = kernels.group_norm_reference(x.float(), 32, w.float(), b.float(), 1e-5, shift.float(), silu=True)
    assert_close_ulps(out, ref, dtype)
    torch_ops = kernels.group_norm_reference(x, 32, w, b, 1e-5, shift, silu=True)  # what eager torch gives
    assert (out.float() - ref).abs().mean() <= (torch_ops.float() - ref).abs().mean() + 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@gpu_dtypes
@pytest.mark.parametrize("shape", [(2, 4096, 640), (7, 1024, 1280), (3, 77, 2048)])
def test_gpu_add_layer_norm(dtype, shape):
    x, delta, w, b = ln_inputs(shape, dtype, device="cuda", offset=1.0)
    s, y = kernels.add_layer_norm(_ln(w, b), x, delta)
    assert torch.equal(s, x + delta)
    ref = kln.layer_norm_reference(s.float(), w.float(), b.float(), 1e-5)
    assert_close_ulps(y, ref, dtype)
    torch_ops = kln.layer_norm_reference(s, w, b, 1e-5)
    assert (y.float() - ref).abs().mean() <= (torch_ops.float() - ref).abs().mean() + 1e-6
    assert_close_ulps(kernels.layer_norm(_ln(w, b), x), kln.layer_norm_reference(x.float(), w.float(), b.float(), 1e-5),
                      dtype)


def _ln(w, b):
    norm = torch.nn.LayerNorm(w.shape[0], device=w.device, dtype=w.dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        norm.bias.copy_(b)
    return norm


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@gpu_dtypes
@pytest.mark.parametrize("shape", [(2, 4096, 2 * 2560), (7, 1024, 2 * 5120)])
def test_gpu_geglu(dtype, shape):
    h = (torch.randn(shape, device="cuda") * 2).to(dtype)
    out = kernels.geglu(h)
    assert_close_ulps(out, kernels.geglu_reference(h.float()), dtype)
    assert (out.float() - kernels.geglu_reference(h.float())).abs().mean() <= \
        (kernels.geglu_reference(h).float() - kernels.geglu_reference(h.float())).abs().mean() + 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@gpu_dtypes
def test_gpu_unet_with_fused_kernels_matches_torch_ops(dtype, monkeypatch):
    """The whole (tiny) UNet: fused GroupNorm/SiLU/embedding-add and GEGLU against torch's ops, against fp32."""
    from omg.unet import UNet, UNetConfig
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).cuda().eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)  # 0.2 overflows fp16 in this random net
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 32, 32, generator=g)
    ctx, y = torch.randn(2, 7, 48, generator=g), torch.randn(2, 64, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        monkeypatch.setenv("OMG_DISABLE_TRITON", "1")
        ref = unet(*(a.cuda() for a in (x, t, ctx, y)))  # fp32, torch ops
        low = unet.to(dtype)
        args = (x.to("cuda", dtype), t.cuda(), ctx.to("cuda", dtype), y.to("cuda", dtype))
        torch_ops = low(*args)
        monkeypatch.delenv("OMG_DISABLE_TRITON")
        fused = low(*args)
    assert torch.isfinite(torch_ops).all() and torch.isfinite(fused).all()
    fused_err = (fused.float() - ref).abs().mean() / ref.abs().mean()
    torch_err = (torch_ops.float() - ref).abs().mean() / ref.abs().mean()
    assert fused_err <= 1.2 * torch_err + 1e-4, (fused_err.item(), torch_err.item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_kernels_step_aside_under_autograd():
    """The Triton kernels have no backward: with a tensor that needs a gradient the references run, so training
    through the UNet gets gradients (before, norm_act returned a tensor without grad_fn and the backward
    stopped there silently)."""
    norm = torch.nn.GroupNorm(4, 8).cuda()
    # drawn on the CPU: after tests/test_graphs.py's deliberately failed capture, torch leaves CUDA's default
    # generator in capture mode and device-side draws fail ("Offset increment outside graph capture"); omg
    # itself draws its noise on CPU generators (OMGOptions.noise_device)
    x = torch.randn(2, 8, 16, 16).cuda().requires_grad_(True)
    y = kernels.norm_act(norm, x)
    assert y.grad_fn is not None
    y.square().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    h = torch.randn(2, 16, 32).cuda().requires_grad_(True)
    assert kernels.geglu(h).grad_fn is not None
    with torch.no_grad():  # inference keeps the fused kernels
        assert kernels.use_triton(x) == kernels.HAS_TRITON
