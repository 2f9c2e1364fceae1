"""omg.stage2's blend inputs: the concept rows of a UNet output, as views where the layout allows."""
import torch

import kernels
from omg.stage2 import BlendedEps


def blocks_of(out: torch.Tensor, concepts: tuple, images: int) -> list:
    return [(concepts, out.view(len(concepts), 2, images, *out.shape[1:]))]


def test_one_image_with_every_concept_of_the_pass_is_a_view_of_the_output():
    out = torch.randn(4, 4, 6, 5)  # [u0, c0, u1, c1] of two concepts, one image
    rows = BlendedEps._concept_rows(blocks_of(out, (0, 1), 1), [0, 1], 0)
    assert isinstance(rows, torch.Tensor) and rows.shape == (2, 2, 4, 6, 5)
    assert rows.data_ptr() == out.data_ptr() and rows.is_contiguous()
    assert torch.equal(rows[1, 0], out[2]) and torch.equal(rows[1, 1], out[3])


def test_several_images_and_subsets_pick_each_images_rows():
    n = 3
    out = torch.randn(2 * 2 * n, 4, 6, 5)  # concept j: [u x n; c x n]
    blocks = blocks_of(out, (0, 1), n)
    for b in range(n):
        for found in ([0, 1], [1], []):
            got = kernels.stack_concepts(BlendedEps._concept_rows(blocks, found, b), out[:1])
            want = torch.stack([torch.stack([out[2 * n * j + b], out[2 * n * j + n + b]]) for j in found]) \
                if found else out.new_zeros(0, 2, 4, 6, 5)
            assert torch.equal(got, want)
    # concepts in passes of their own (merged weights, crops): found across the passes
    separate = blocks_of(out[:2 * n], (0,), n) + blocks_of(out[2 * n:], (1,), n)
    got = kernels.stack_concepts(BlendedEps._concept_rows(separate, [0, 1], 1), out[:1])
    assert torch.equal(got, kernels.stack_concepts(BlendedEps._concept_rows(blocks, [0, 1], 1), out[:1]))
