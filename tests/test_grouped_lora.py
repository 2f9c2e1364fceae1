"""GroupedLora: several concepts' LoRAs on one shared base UNet, each on its own rows of one call.

The oracle for each concept's rows is that concept's merged weights (ConceptWeights) on a call of its own;
the base rows must stay the plain model's.
"""
import pytest
import torch

from omg.lora import ConceptWeights, GroupedLora, bind, load_lora
from omg.lora.grouped import _Stacked
from test_lora import CONV, FF, K2, OUT, Q, W, kohya, lr, mixed_lora, unet  # noqa: F401 (fixture)


def kohya_lowrank(unet, paths, rank, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path in paths:
        w = W(unet, path)
        sd[kohya(path) + ".lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g)
        sd[kohya(path) + ".lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g)
        sd[kohya(path) + ".alpha"] = torch.tensor(rank / 2)
    return load_lora(sd)


def inputs(rows, seed=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, 16, 16, generator=g), torch.full((rows,), 321.0),
            torch.randn(rows, 7, 48, generator=g), torch.randn(rows, 64, generator=g))


def concepts(unet):
    """Three concepts: low-rank Linear LoRAs of different ranks and targets (the batched-matmul path), a mixed
    LoRA (LoCon, LoHa, full diff, DoRA: the per-concept path on the layers it shares), and one without LoRA."""
    return [(kohya_lowrank(unet, [Q, K2, FF], rank=4, seed=1), 0.8),
            None,
            (mixed_lora(unet), 0.6),
            (kohya_lowrank(unet, [Q, OUT], rank=8, seed=2), 1.0)]


@pytest.mark.parametrize("merge_linears", [False, True])
def test_grouped_rows_equal_each_concept_merged(unet, merge_linears):
    """The Linear layers with only low-rank patches run stacked factors, or (merge_linears) the concepts' merged copies
    on their rows; the other patches one delta per concept. The same rows as merging each concept."""
    from omg.lora.grouped import _MergedRows
    specs = concepts(unet)
    grouped = GroupedLora(unet, [None if s is None else bind(unet, s) for s in specs], merge_linears=merge_linears)
    low_rank = [name for name, layer in grouped.layers.items() if isinstance(layer, (_Stacked, _MergedRows))]
    assert 0 < len(low_rank) < len(grouped.layers)  # both paths run
    merged_rows = [name for name, layer in grouped.layers.items() if isinstance(layer, _MergedRows)]
    assert merged_rows == (low_rank if merge_linears else []) and FF in low_rank
    base_rows = 3
    x, t, ctx, y = inputs(base_rows + 2 * len(specs))
    with torch.no_grad():
        plain = unet(x, t, ctx, y)
        with grouped.installed(base_rows):
            got = unet(x, t, ctx, y)
        after = unet(x, t, ctx, y)
        for i, spec in enumerate(specs):
            rows = slice(base_rows + 2 * i, base_rows + 2 * i + 2)
            if spec is None:
                expected = plain[rows]
            else:
                with ConceptWeights.merge(unet, spec).applied(unet):
                    expected = unet(x[rows], t[rows], ctx[rows], y[rows])
                assert (expected - plain[rows]).abs().max() > 1e-2  # the concept does change its rows
            assert (got[rows] - expected).abs().max() <= 1e-4, i
    assert (got[:base_rows] - plain[:base_rows]).abs().max() <= 1e-5  # base rows untouched
    assert torch.equal(after, plain)  # hooks removed
    assert all("forward" not in m.__dict__ for m in unet.modules())  # the replaced forwards restored


def test_members_select_a_consecutive_run_of_concepts(unet):
    specs = concepts(unet)
    grouped = GroupedLora(unet, [None if s is None else bind(unet, s) for s in specs])
    x, t, ctx, y = inputs(4)
    with torch.no_grad():
        with grouped.installed(0, range(2, 4)):  # concepts 2 and 3 only, no base rows
            got = unet(x, t, ctx, y)
        for j, spec in enumerate(specs[2:4]):
            rows = slice(2 * j, 2 * j + 2)
            with ConceptWeights.merge(unet, spec).applied(unet):
                expected = unet(x[rows], t[rows], ctx[rows], y[rows])
            assert (got[rows] - expected).abs().max() <= 1e-4
        with pytest.raises(ValueError, match="rows"), grouped.installed(1, range(2, 4)):
            unet(x, t, ctx, y)  # 4 rows given, 1 + 2 x 2 expected
        with pytest.raises(ValueError, match="consecutive"), grouped.installed(0, range(0, 4, 2)):
            pass


def test_memory_is_the_factors_not_the_touched_tensors(unet):
    """Two LoRAs of one rank on the same layers (the bulk-copy path): factors only, and still each concept's rows."""
    loras = [(kohya_lowrank(unet, [Q, K2, FF, OUT], rank=4, seed=3 + i), 0.7 + 0.2 * i) for i in range(2)]
    grouped = GroupedLora(unet, [bind(unet, spec) for spec in loras])
    factors = sum(t.numel() * 4 for lora, _ in loras for a in lora.adapters.values() for t in (a.up, a.down))
    touched = sum(W(unet, p).numel() * 4 for p in (Q, K2, FF, OUT))
    assert grouped.extra_bytes == factors and grouped.extra_bytes < 2 * touched
    assert grouped.stacked_layers == len(grouped.layers) == 4
    x, t, ctx, y = inputs(5)
    with torch.no_grad():
        with grouped.installed(1):
            got = unet(x, t, ctx, y)
        for i, spec in enumerate(loras):
            rows = slice(1 + 2 * i, 3 + 2 * i)
            with ConceptWeights.merge(unet, spec).applied(unet):
                assert (got[rows] - unet(x[rows], t[rows], ctx[rows], y[rows])).abs().max() <= 1e-4


def test_the_stacking_is_kept_for_the_same_concepts(unet):
    """A second GroupedLora of the same LoRA files and strengths (new patches from bind, as each generate call
    makes) reuses the stacked factors; another strength or another order stacks anew, with its own values."""
    from omg.lora.grouped import _Stacked

    specs = [s for s in concepts(unet) if s is not None]
    first = GroupedLora(unet, [bind(unet, s) for s in specs])
    stacked = [name for name, layer in first.layers.items() if isinstance(layer, _Stacked)]
    assert stacked
    again = GroupedLora(unet, [bind(unet, s) for s in specs])
    assert all(again.layers[name] is first.layers[name] for name in stacked)
    name = next(n for n in stacked if first.layers[n].up[0].abs().max() > 0)
    swapped = GroupedLora(unet, [bind(unet, s) for s in reversed(specs)])
    assert swapped.layers[name] is not first.layers[name]
    torch.testing.assert_close(swapped.layers[name].up[-1], first.layers[name].up[0])
    (lora, strength), rest = specs[0], specs[1:]
    weaker = GroupedLora(unet, [bind(unet, (lora, strength / 2))] + [bind(unet, s) for s in rest])
    assert weaker.layers[name] is not first.layers[name]
    torch.testing.assert_close(weaker.layers[name].up[0] * 2, first.layers[name].up[0])


def test_the_merged_copies_are_kept_for_the_same_concepts_and_base_weights(unet):
    """merge_linears: a second GroupedLora of the same LoRAs and strengths reuses the merged copies; a base weight
    written in place (a style LoRA merged into it) merges anew, from the new values."""
    from omg.lora.grouped import _MergedRows

    specs = [s for s in concepts(unet) if s is not None]
    first = GroupedLora(unet, [bind(unet, s) for s in specs], merge_linears=True)
    merged = [name for name, layer in first.layers.items() if isinstance(layer, _MergedRows)]
    again = GroupedLora(unet, [bind(unet, s) for s in specs], merge_linears=True)
    assert merged and all(again.layers[name] is first.layers[name] for name in merged)
    weight = unet.get_submodule(merged[0]).weight
    kept = weight.detach().clone()
    copy = next(w for w in first.layers[merged[0]].weights if w is not None)
    with torch.no_grad():
        weight.add_(1.0)
    try:
        moved = GroupedLora(unet, [bind(unet, s) for s in specs], merge_linears=True)
        new = next(w for w in moved.layers[merged[0]].weights if w is not None)
    finally:
        with torch.no_grad():
            weight.copy_(kept)
    assert moved.layers[merged[0]] is not first.layers[merged[0]]
    torch.testing.assert_close(new - 1.0, copy)


def test_installing_looks_up_no_module(unet, monkeypatch):
    """The patched modules are looked up once, at construction: installing the hooks (every grouped call eagerly,
    each stage-2 run for its cross-attention keys and values) walks no module path. Before, it called get_submodule
    for each patched layer (722 on SDXL, 38 ms of host time)."""
    grouped = GroupedLora(unet, [bind(unet, s) for s in concepts(unet) if s is not None])
    looked_up = []
    get_submodule = torch.nn.Module.get_submodule
    monkeypatch.setattr(torch.nn.Module, "get_submodule",
                        lambda self, target: looked_up.append(target) or get_submodule(self, target))
    with grouped.installed(1):
        pass
    assert looked_up == [] and len(grouped.modules) == len(grouped.layers)
