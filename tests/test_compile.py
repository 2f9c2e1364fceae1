"""omg's UNet under torch.compile, through the custom ops of kernels.ops (torch.ops.omg.*).

CPU: the ops' fake functions are checked with torch.library.opcheck (schema, fake tensors against real outputs,
AOT dispatch); a tiny UNet compiled with fullgraph=True matches eager. backend="aot_eager" traces with fake
tensors and functionalises exactly as inductor does before code generation (22 s here); inductor's CPU code
generation would add about 75 s on this machine's single thread for the same check of the graph.
`test_interp_*` run in test_kernels.py's TRITON_INTERPRET=1 child: the Triton kernels through the ops.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.library import opcheck

import kernels
from kernels import cross_attention as kca
from kernels import ffn as kffn
from kernels import norm as knorm
from kernels import ops as kops
from omg.unet import UNet, UNetConfig

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child of test_interpreted_kernels")
in_parent = pytest.mark.skipif(INTERPRETED, reason="the interpreter child runs only the test_interp_* tests")


def attention_inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, 8, 16, generator=gen).to(dtype)
    k, v = torch.randn(2, 2, 2, 7, 16, generator=gen).to(dtype)
    return q, k, v


def op_cases():
    gen = torch.Generator().manual_seed(1)
    x, w, b, shift = torch.randn(2, 8, 5, 6, generator=gen), torch.randn(8), torch.randn(8), torch.randn(2, 8)
    q, k, v = attention_inputs()
    tokens = torch.tensor([1, 3])
    maps = kernels.encode_maps(kca.scores_reference(q[1:], k[1:]), "log8")
    return {
        "group_norm": (torch.ops.omg.group_norm.default, (x, 4, w, b, 1e-5, shift, True)),
        "group_norm_plain": (torch.ops.omg.group_norm.default, (x, 2, None, None, 1e-6, None, False)),
        "geglu": (torch.ops.omg.geglu.default, (torch.randn(3, 4, 10, generator=gen),)),
        "attention": (torch.ops.omg.attention.default, (q, k, v)),
        "capture": (torch.ops.omg.capture.default, (q, k, v, 1, 2, "log8", tokens, torch.zeros(1, 8, 2))),
        "capture_no_maps": (torch.ops.omg.capture.default, (q, k, v, 0, 2, None, None, None)),
        "capture_maps": (torch.ops.omg.capture_maps.default, (q, k, 1, 2, "bf16", tokens, torch.zeros(1, 8, 2))),
        "replay": (torch.ops.omg.replay.default, (q, k, v, maps, 1, 2)),
        "replay_maps": (torch.ops.omg.replay_maps.default, (maps, v[1:])),
    }


@in_parent
@pytest.mark.parametrize("case", sorted(op_cases()))
def test_custom_op_passes_opcheck(case):
    """Schema, fake tensors (shape, dtype, strides of each output against the real op's), AOT dispatch."""
    op, args = op_cases()[case]
    result = opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


@in_parent
def test_attention_ops_keep_sdpa_layout_on_every_device():
    """The fake function promises SDPA's (B, N, h, d) layout, so the references' outputs are put in it too (a
    compiled graph that plans a view with the promised strides would otherwise read the wrong elements)."""
    q, k, v = attention_inputs(torch.float16)
    out = kernels.attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous() and not out.is_contiguous()
    assert torch.equal(out, kernels.cross_attention_reference(q, k, v))
    with torch._subclasses.FakeTensorMode() as mode:
        fake = torch.ops.omg.attention(*(mode.from_tensor(t) for t in (q, k, v)))
    assert fake.stride() == out.stride() and fake.dtype == out.dtype


@in_parent
def test_ops_step_aside_under_autograd():
    """A tensor that needs a gradient takes the references (the ops have no backward), so training works."""
    h = torch.randn(2, 3, 8, requires_grad=True)
    out = kernels.geglu(h)
    assert out.grad_fn is not None
    out.sum().backward()
    assert h.grad is not None


def tiny_unet_inputs(cfg: UNetConfig, batch: int = 2):
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(batch, cfg.in_channels, 16, 16, generator=gen), torch.tensor([500.0, 20.0][:batch]),
            torch.randn(batch, 7, cfg.context_dim, generator=gen),
            torch.randn(batch, cfg.adm_in_channels, generator=gen))


class RecordingBackend:
    """aot_eager that remembers which torch.ops.omg ops dynamo put in the graph (fullgraph: one graph)."""

    def __init__(self):
        self.omg_ops: set[str] = set()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        for node in gm.graph.nodes:
            if isinstance(node.target, torch._ops.OpOverload):
                node_target = node.target.overloadpacket
            else:
                node_target = node.target
            if isinstance(node_target, torch._ops.OpOverloadPacket):
                namespace, name = node_target._qualified_op_name.split("::")
                if namespace == "omg":
                    self.omg_ops.add(name)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)


@in_parent
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compiled_unet_fullgraph_matches_eager(layout):
    """Channels-last too (the UNet's layout on CUDA): the ops' fake functions promise its strides."""
    torch._dynamo.reset()
    cfg = UNetConfig.tiny()
    unet = UNet(cfg).eval()
    if layout == "channels_last":
        unet.to(memory_format=torch.channels_last)
    inputs = tiny_unet_inputs(cfg)
    backend = RecordingBackend()
    compiled = torch.compile(unet, fullgraph=True, backend=backend)
    with torch.no_grad():
        eager = unet(*inputs)
        out = compiled(*inputs)
        again = compiled(*(t.clone() for t in inputs))  # the cached graph: no recompilation, same answer
    assert {"group_norm", "geglu", "layer_norm", "add_layer_norm"} <= backend.omg_ops, backend.omg_ops
    assert (out - eager).abs().max().item() <= 1e-4
    assert torch.equal(again, out)


# --------------------------------------------------------------------- Triton through the ops (interpreter)

@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """The ops run the Triton kernels on CPU tensors; the references raise, so nothing else can answer."""
    monkeypatch.setattr(kops, "TRITON_ON_CPU", True)
    references = {knorm: "group_norm_reference", kffn: "geglu_reference", kca: "cross_attention_reference"}
    originals = {name: getattr(module, name) for module, name in references.items()}

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernel")
    for module, name in references.items():
        monkeypatch.setattr(module, name, refuse)
    return originals


@interp
@pytest.mark.parametrize("shape,groups", [((2, 8, 10, 12), 4), ((2, 4, 1, 1), 4)])  # group size 1: specialised
def test_interp_group_norm_op_runs_the_kernel(kernels_on_cpu, shape, groups):
    gen = torch.Generator().manual_seed(4)
    x, shift = torch.randn(*shape, generator=gen) + 3.0, torch.randn(*shape[:2], generator=gen)
    w, b = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
    out = kernels.group_norm(x, groups, w, b, 1e-5, shift, True)
    ref = kernels_on_cpu["group_norm_reference"](x, groups, w, b, 1e-5, shift, True)
    if x[0, 0].numel() * shape[1] // groups == 1:
        # one element per group normalises to exactly 0, so y = silu(bias); torch's GroupNorm rounds x - mean
        # to about 1e-7 and multiplies it by 1/sqrt(eps) = 316: the kernel is the exact one here
        assert (out - torch.nn.functional.silu(b)[None, :, None, None]).abs().max().item() <= 1e-6
        assert (out - ref).abs().max().item() <= 1e-3
    else:
        assert (out - ref).abs().max().item() <= 1e-5


@interp
def test_interp_attention_op_runs_the_kernel(kernels_on_cpu):
    q, k, v = attention_inputs(torch.float16)
    out = kernels.attention(q, k, v)
    ref = kernels_on_cpu["cross_attention_reference"](q.float(), k.float(), v.float())
    assert (out.float() - ref).abs().max().item() <= 2e-3


@interp
def test_interp_compiled_kernels_match_the_references(kernels_on_cpu):
    """The Triton path inside a fullgraph-compiled function: GroupNorm + SiLU, then GEGLU."""
    torch._dynamo.reset()

    def block(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = kernels.group_norm(x, 2, w, b, 1e-5, None, True)
        return kernels.geglu(h.flatten(2).transpose(1, 2).contiguous())

    gen = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(1, 4, 3, 4, generator=gen), torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    with torch.no_grad():
        out = torch.compile(block, fullgraph=True, backend="aot_eager")(x, w, b)
    h = kernels_on_cpu["group_norm_reference"](x, 2, w, b, 1e-5, None, True)
    ref = kernels_on_cpu["geglu_reference"](h.flatten(2).transpose(1, 2).contiguous())
    assert out.shape == (1, 12, 2) and (out - ref).abs().max().item() <= 1e-5
