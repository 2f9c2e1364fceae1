"""CUDA graphs in the OMG sampler (omg.graphs): the same output as the eager path, exactly."""
import pytest
import torch

import omg
from omg.errors import SamplingError
from test_pipeline import H, PROMPT, W, kohya_lora, tiny_model


def test_cuda_graphs_are_refused_where_they_cannot_run():
    model = tiny_model()
    with pytest.raises(SamplingError, match="cuda_graphs"):
        omg.generate(model, PROMPT, steps=2, blend_steps=1, height=H, width=W, progress=False, cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,lora_mode,store", [(torch.float32, "grouped", "recompute"),
                                                   (torch.float16, "grouped", "recompute"),
                                                   (torch.float16, "grouped", "outputs"),
                                                   (torch.float16, "merged", "outputs")])
def test_graphed_generation_equals_eager(tmp_path, dtype, lora_mode, store):
    """Stage 1 (with heat-map capture), masks, stage 2 (base and concept passes in one call, or merged concepts in
    calls of their own), the stage-1 rows recomputed or stage 1's outputs read from their slots (one graph for every
    call, the slot index on the device): graphs vs eager, same bits."""
    model = tiny_model(device="cuda", dtype=dtype)
    loras = [kohya_lora(model, tmp_path / f"{i}.safetensors", seed=i) for i in range(2)]
    concepts = [omg.Concept("man", "a photo of sks man", lora=loras[0]),
                omg.Concept("woman", "a photo of xyz woman", lora=loras[1])]
    runs = [omg.generate(model, PROMPT, concepts, steps=6, blend_steps=4, height=H, width=W, seed=3,
                         progress=False, cuda_graphs=g, lora_mode=lora_mode, store=store) for g in (False, True)]
    eager, graphed = runs
    assert graphed.store == store
    # the heat kernel accumulates with float atomics (on CUDA for fp16/bf16): summation order varies run to run
    # (H100, fp16: two eager runs differ by up to 3.0e-6, eager and graphed by 2.6e-6; masks and latents: 0)
    torch.testing.assert_close(eager.heatmaps, graphed.heatmaps, rtol=1e-4, atol=1e-5)
    assert torch.equal(eager.masks, graphed.masks)
    assert torch.equal(eager.stage1_latent, graphed.stage1_latent)
    assert torch.equal(eager.latent, graphed.latent)
    assert eager.unet_evaluations == graphed.unet_evaluations


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_call_that_cannot_be_captured_runs_eagerly_with_a_warning():
    """A function with a host sync (here .item()) invalidates the capture: GraphedCall warns once and runs it
    eagerly from then on, with eager results, instead of failing the whole generate call. In a process of its
    own: after a failed capture torch can leave CUDA's default generator in capture mode, and every later
    device-side draw in the process fails (seen on the H200: it failed the GPU tests that ran after this one)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import warnings, torch
        from omg.graphs import GraphedCall

        def fn(x):
            return x * 2 + float(x.sum().item())  # the .item() is a host sync

        call = GraphedCall(fn)
        x = torch.arange(4.0, device="cuda")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = call(x)
        assert any("capture failed" in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert call.eager and torch.equal(first, fn(x))
        y = torch.ones(4, device="cuda")
        assert torch.equal(call(y), fn(y))
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_call_copies_its_output_unless_told_not_to():
    """By default a replay returns a copy the caller may keep; copy_output=False (omg's stages, which read it at
    once) returns the graph's output buffer itself, overwritten by the next replay."""
    from omg.graphs import GraphedCall

    x = torch.arange(4.0, device="cuda")
    kept, shared = GraphedCall(lambda a: a * 2), GraphedCall(lambda a: a * 2, copy_output=False)
    for call in (kept, shared):
        call(x)  # the eager first call and the recording
    a, b = kept(x), kept(x + 1)
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, x * 2) and torch.equal(b, (x + 1) * 2)
    a, b = shared(x), shared(x + 1)
    assert a.data_ptr() == b.data_ptr() == shared.static_out.data_ptr() and torch.equal(a, (x + 1) * 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_generation_leaves_no_reference_cycle(tmp_path):
    """Without keep_stage2, nothing of a run outlives generate by reference counting alone: stage 2's graphs keep
    their function, which once kept stage 2 (and through it stage 1's outputs store, 7 GiB at 1024x1024 and k = 2)
    alive in a cycle until Python's next full collection."""
    import gc

    from omg.attention import AttentionControl
    from omg.stage2 import BlendedEps

    model = tiny_model(device="cuda", dtype=torch.float16)
    lora = kohya_lora(model, tmp_path / "a.safetensors", seed=1)
    concepts = [omg.Concept("man", "a photo of sks man", lora=lora, mask=(0, 0, 40, 64))]
    gc.collect()
    gc.disable()
    try:
        for lora_mode, keep in (("grouped", False), ("merged", False), ("grouped", True)):
            r = omg.generate(model, PROMPT, concepts, steps=4, blend_steps=2, height=H, width=W, progress=False,
                             cuda_graphs=True, lora_mode=lora_mode, store="outputs", keep_graphs=keep)
            assert r.store_bytes > 0
            if keep:  # kept for the next call until released
                omg.release_graphs(model)
            # type(), not isinstance: a dead weak proxy among the objects raises on isinstance
            alive = [type(o).__name__ for o in gc.get_objects() if type(o) in (AttentionControl, BlendedEps)]
            assert alive == [], (lora_mode, keep, alive)
    finally:
        gc.enable()


def test_nothing_is_kept_without_graphs():
    from omg.graphs import kept_graphs

    model = tiny_model()
    omg.generate(model, PROMPT, steps=2, blend_steps=1, height=H, width=W, progress=False)
    assert kept_graphs(model.unet) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kept_graphs_replay_in_the_next_call_as_a_fresh_call_renders(tmp_path):
    """keep_graphs: a second call of the same configuration (another prompt of the same length, another seed, masks
    from its own attention) records no graph and gives the bits of a call that records its own; another LoRA strength
    records stage 2's graph anew and keeps stage 1's."""
    from omg.graphs import GraphedCall, kept_graphs, timed

    model = tiny_model(device="cuda", dtype=torch.float16)
    loras = [kohya_lora(model, tmp_path / f"{i}.safetensors", seed=i) for i in range(2)]

    def concepts(scale=0.8):
        return [omg.Concept("man", "a photo of sks man", lora=loras[0], lora_scale=scale),
                omg.Concept("woman", "a photo of xyz woman", lora=loras[1], lora_scale=scale)]

    options = dict(steps=6, blend_steps=4, height=H, width=W, progress=False, cuda_graphs=True, store="outputs")
    captures: list[GraphedCall] = []

    def hook(call, kind, run):
        if kind == "capture":
            captures.append(call)
        return run()

    def render(prompt, seed, scale=0.8, keep=True):
        captures.clear()
        with timed(hook):
            return omg.generate(model, prompt, concepts(scale), seed=seed, keep_graphs=keep, **options)

    other = "a man and a woman in a garden"
    render(PROMPT, 3)
    assert kept_graphs(model.unet) is not None
    second = render(other, 4)
    assert captures == []
    omg.release_graphs(model)
    assert kept_graphs(model.unet) is None
    fresh = render(other, 4, keep=False)
    assert len(captures) == 2 and kept_graphs(model.unet) is None  # stage 1's graph and stage 2's one call
    assert torch.equal(second.masks, fresh.masks) and torch.equal(second.latent, fresh.latent)
    torch.testing.assert_close(second.heatmaps, fresh.heatmaps, rtol=1e-4, atol=1e-5)  # float atomics
    render(other, 5)  # kept again
    weaker = render(other, 5, scale=0.5)
    assert len(captures) == 1  # stage 2 only: the concepts' factors changed
    omg.release_graphs(model)
    assert torch.equal(weaker.latent, render(other, 5, scale=0.5, keep=False).latent)


def test_kept_stage2_graphs_follow_the_concept_weights():
    """Stage 2's kept graphs are those of weights of the same identity; a new identity replaces them (its objects
    held by the key instead); None (merged weights, made anew by each call) is never kept, and lets go of what was."""
    from omg.graphs import KeptGraphs

    factors, others = object(), object()
    kept = KeptGraphs(key=(), control=None)
    grouped = kept.stage2_for(("grouped", factors))
    assert kept.stage2_for(("grouped", factors)) is grouped and kept.stage2_key[1] is factors
    other = kept.stage2_for(("grouped", others))
    assert other is not grouped and kept.stage2_key[1] is others
    merged = kept.stage2_for(None)
    assert merged is not kept.stage2 and kept.stage2_key is None
    assert kept.stage2_for(None) is not merged


def test_a_kept_controller_serves_only_its_configuration():
    """What decides whether a call reuses the kept graphs (checked on the CPU by forcing keepable): the same
    configuration gets the kept controller back, reset; another store, size, replay setting or changed weights get a
    new one, and what was kept is dropped."""
    from types import SimpleNamespace

    from omg.graphs import kept_graphs, release_graphs
    from omg.pipeline import _attention_control
    from omg.sampling import NoiseSchedule
    from omg.schedule import CallSchedule

    model = tiny_model()
    schedule = NoiseSchedule.sdxl()
    calls = CallSchedule.plan("ddim", schedule.sampling_sigmas(4, "leading", to_zero=False), 2, schedule)
    inputs = SimpleNamespace(heat_tokens=[2, 5])

    def control(**changes):
        o = omg.OMGOptions(steps=4, blend_steps=2, height=H, width=W, store="outputs").replace(**changes)
        return _attention_control(model, calls, (o.height // 8, o.width // 8), 1, o, inputs, keepable=True)

    first, kept = control()
    assert kept_graphs(model.unet) is kept and kept.control is first
    again, kept_again = control()
    assert again is first and kept_again is kept
    for changes in (dict(store="recompute"), dict(replay=False), dict(height=H + 8)):
        other, kept_other = control(**changes)
        assert other is not first and kept_other is not kept, changes
        first, kept = control()  # back to the first configuration: a new controller again
    name, param = next(iter(model.unet.named_parameters()))
    module, leaf = model.unet.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
    setattr(module, leaf, torch.nn.Parameter(param.detach().clone()))  # a weight replaced: other addresses
    assert control()[0] is not first
    release_graphs(model.unet)
    assert kept_graphs(model.unet) is None


def test_a_graph_sets_constants_are_made_once_a_run_into_the_kept_tensors():
    """GraphSet.constant: made at a run's first request, reused by the run; the next run remakes it into the same
    tensors (a kept graph reads their addresses)."""
    from omg.graphs import GraphSet
    graphs, made = GraphSet(), []

    def make(previous):
        made.append(previous)
        value = torch.zeros(2) if previous is None else previous
        return value.add_(1)

    first_run, second_run = object(), object()
    first = graphs.constant("kv", first_run, make)
    assert graphs.constant("kv", first_run, make) is first and made == [None]
    second = graphs.constant("kv", second_run, make)
    assert second is first and made[1] is first and second.tolist() == [2.0, 2.0]
    assert graphs.constant("other", second_run, make).tolist() == [1.0, 1.0]
