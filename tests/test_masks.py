"""omg.masks: attention -> masks, same-class split, SAM refinement (tiny random SAM), user overrides, overlaps."""
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from omg import masks as M
from omg.errors import CheckpointError


def blob(h, w, cy, cx, sigma, amp=1.0):
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return amp * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma ** 2))


def no_double_owner(masks):
    return bool(((masks > 0).sum(0) <= 1).all())


# ------------------------------------------------------------------------------------------- tokens

def test_repeated_and_multi_token_class_nouns():
    # context positions: BOS at 0, then one token per word here
    assert M.concept_token_indices("a man and a man", ["man", "man"]) == [[2], [5]]
    assert M.concept_token_indices("a woman and a man", ["man", "woman"]) == [[5], [2]]  # "man" not inside "woman"
    idx = M.concept_token_indices("a man hugging a teddy bear", ["teddy bear", "man"])
    assert idx == [[5, 6], [2]]
    assert M.find_token_indices(["a", "b", "a", "b"], ["a", "b"]) == [[0, 1], [2, 3]]


def test_class_noun_missing_or_too_few_occurrences():
    with pytest.raises(ValueError, match="'dog' occurs 0"):
        M.concept_token_indices("a man and a woman", ["man", "dog"])
    with pytest.raises(ValueError, match="'man' occurs 2"):
        M.concept_token_indices("a man and a man", ["man", "man", "man"])


def test_token_heatmaps_from_selected_token_rows():
    maps = torch.rand(3, 4, 16, 16) * 0.01  # [layers, T, h, w]
    maps[:, 1] += blob(16, 16, 4, 4, 2)
    maps[:, 3] += blob(16, 16, 11, 12, 2)
    heat = M.token_heatmaps(maps, [[1], [3]])
    assert heat.shape == (2, 16, 16) and heat.min() >= 0 and heat.max() <= 1
    assert divmod(int(heat[0].argmax()), 16) == (4, 4) and divmod(int(heat[1].argmax()), 16) == (11, 12)
    # rows holding only the selected context positions (attention.TokenHeatmaps layout)
    same = M.token_heatmaps(maps[:, [1, 3]], [[7], [9]], map_tokens=[7, 9])
    torch.testing.assert_close(same, heat)
    with pytest.raises(ValueError, match="out of range"):
        M.token_heatmaps(maps, [[4]])


# ------------------------------------------------------------------------------------- attention masks

def test_masks_around_blobs_and_peak_component():
    heat = torch.stack([blob(32, 32, 8, 8, 3) + blob(32, 32, 24, 24, 3, amp=0.7), blob(32, 32, 20, 6, 4)])
    scores, masks = M.masks_from_attention(heat)
    assert masks.dtype == torch.bool and scores.shape == masks.shape == (2, 32, 32)
    assert masks[0, 8, 8] and not masks[0, 24, 24] and not masks[0, 0, 31]  # weaker second blob dropped
    assert masks[1, 20, 6] and not masks[1, 5, 25]
    _, both = M.masks_from_attention(heat, component_ratio=0.5)
    assert both[0, 8, 8] and both[0, 24, 24]
    _, loose = M.masks_from_attention(heat, threshold=0.05)
    assert loose[0].sum() > masks[0].sum()


def test_connected_components_labels_separate_regions():
    m = torch.zeros(10, 10, dtype=torch.bool)
    m[1:3, 1:3] = True
    m[6:9, 5:9] = True
    m[3, 3] = True  # diagonal neighbour: 8-connected to the first square
    labels = M.connected_components(m)
    assert len(labels[m].unique()) == 2 and labels[3, 3] == labels[1, 1] != labels[7, 7]
    assert (labels[~m] == 0).all()


def test_overlap_goes_to_higher_score_and_no_double_owner():
    heat = torch.stack([blob(32, 32, 14, 12, 5), blob(32, 32, 16, 19, 5, amp=0.8)])
    scores, masks = M.masks_from_attention(heat)
    overlap = masks[0] & masks[1]
    assert overlap.sum() > 10  # the test needs a real overlap
    resolved = M.resolve_overlaps(masks, scores)
    assert no_double_owner(resolved)
    assert torch.equal(resolved.any(0), masks.any(0))  # nothing lost, nothing added
    winner0 = scores[0] >= scores[1]
    assert torch.equal(resolved[0][overlap], winner0[overlap]) and torch.equal(resolved[1][overlap], ~winner0[overlap])


def test_same_class_pair_gets_distinct_regions():
    two = blob(32, 32, 16, 7, 3) + blob(32, 32, 15, 24, 3)
    heat = torch.stack([two, two])  # "a man and a man": both tokens attend to both men
    res = M.make_masks(["man A", "man B"], (256, 256), heat, classes=["man", "man"])
    m = res.masks > 0
    assert all(res.found) and no_double_owner(res.masks)
    assert m[0, 16, 7] and m[1, 15, 24]  # identical maps: first concept takes the left-most region
    assert not m[0, 15, 24] and not m[1, 16, 7]
    # the second token's own map leans left: the assignment follows it
    res = M.make_masks(["man A", "man B"], (256, 256), torch.stack([two, two + blob(32, 32, 16, 7, 3)]),
                       classes=["man", "man"])
    assert (res.masks[1] > 0)[16, 7] and (res.masks[0] > 0)[15, 24]


def test_identical_maps_are_split_even_without_class_names():
    two = blob(32, 32, 8, 16, 3) + blob(32, 32, 25, 16, 3)
    assert M.same_region_groups(torch.stack([two, two * 0.9])) == [[0, 1]]
    background = 0.5 + 0.05 * torch.rand(2, 32, 32)  # distinct blobs on a shared background are not grouped
    distinct = torch.stack([blob(32, 32, 8, 16, 3), blob(32, 32, 25, 16, 3)]) + background
    assert M.same_region_groups(distinct) == [] and M.same_region_groups(distinct, ["x", "x"]) == [[0, 1]]
    res = M.make_masks(["a", "b"], (256, 256), torch.stack([two, two]))
    assert (res.masks[0] > 0)[8, 16] and (res.masks[1] > 0)[25, 16] and no_double_owner(res.masks)


def test_too_similar_maps_of_two_classes_warn_and_say_split():
    """The split of the image between two classes' indistinguishable maps is a fallback: it warns, and each mask
    records how it was made; two concepts of one class are split without a warning (that is how they differ)."""
    two = blob(32, 32, 8, 16, 3) + blob(32, 32, 25, 16, 3)
    with pytest.warns(UserWarning, match=r"'man', 'woman'.* too alike.*split"):
        res = M.make_masks(["man", "woman"], (256, 256), torch.stack([two, two]), classes=["man", "woman"])
    assert res.sources == ["split", "split"] and all(res.found)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = M.make_masks(["man A", "man B"], (256, 256), torch.stack([two, two]), classes=["man", "man"])
        apart = M.make_masks(["man", "woman"], (256, 256), torch.stack([blob(32, 32, 8, 16, 3),
                                                                        blob(32, 32, 25, 16, 3)]))
    assert same.sources == ["attention", "attention"] and apart.sources == ["attention", "attention"]
    box = M.make_masks(["man", "woman"], (256, 256), torch.stack([two, two]), classes=["man", "woman"],
                       user_masks=[(0, 0, 64, 64), None])
    assert box.sources == ["user", "split"]


# -------------------------------------------------------------------------------------------- user masks

def test_user_box_and_masks_override_attention():
    H = W = 128  # latent 16x16
    heat = torch.stack([blob(16, 16, 4, 4, 2), blob(16, 16, 12, 12, 2)])
    full = np.zeros((H, W), dtype=bool)
    full[64:128, 0:64] = True
    res = M.make_masks(["a", "b"], (H, W), heat, user_masks=[(8, 16, 40, 64), Image.fromarray(full)])
    assert res.sources == ["user", "user"]
    box = torch.zeros(16, 16, dtype=torch.bool)
    box[2:8, 1:5] = True  # rows 16/8..64/8, cols 8/8..40/8
    assert torch.equal(res.masks[0] > 0, box)
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[8:, :8] = True
    assert torch.equal(res.masks[1] > 0, expected)
    latent = M.user_mask(torch.from_numpy(full[::8, ::8].copy()).float()[None], (H, W), "a")  # [1, h, w] float
    assert torch.equal(latent, expected)
    # a user mask outranks attention where they overlap; attention keeps the rest
    res = M.make_masks(["a", "b"], (H, W), heat, user_masks=[None, (0, 0, 48, 48)])
    assert res.sources == ["attention", "user"] and (res.masks[1] > 0)[4, 4] and not (res.masks[0] > 0)[4, 4]


def test_attention_masks_are_made_only_for_concepts_without_a_user_mask(monkeypatch):
    """make_masks thresholds only the maps of concepts without a user mask (none at all when every concept has one):
    the same masks as thresholding every map. Before, every map was thresholded and the user's masks written over
    them (a connected-components pass per map, a device sync per iteration)."""
    H = W = 128
    heat = torch.stack([blob(16, 16, 4, 4, 2), blob(16, 16, 12, 12, 2), blob(16, 16, 4, 12, 2)])
    seen, real = [], M.masks_from_attention
    monkeypatch.setattr(M, "masks_from_attention", lambda h, *a: seen.append(len(h)) or real(h, *a))
    boxes = [(8, 16, 40, 64), None, (64, 0, 128, 40)]
    some = M.make_masks(["a", "b", "c"], (H, W), heat, user_masks=boxes)
    every = M.make_masks(["a", "b", "c"], (H, W), heat, user_masks=[boxes[0], (0, 64, 128, 128), boxes[2]])
    assert seen == [1] and some.sources == ["user", "attention", "user"]
    scores, masks = real(M.normalize(heat))  # every map thresholded; the users' masks then override theirs
    users = M.prepare_user_masks(boxes, (H, W), ["a", "b", "c"])
    for i in (0, 2):
        masks[i], scores[i] = users[i], users[i].float() * M.USER_SCORE
    expected = M.feather(M.resolve_overlaps(masks, scores), 0.0)
    assert torch.equal(some.masks, expected) and torch.equal(some.scores, scores)
    assert every.sources == ["user"] * 3


@pytest.mark.parametrize("spec, match", [
    (np.zeros((100, 128)), r"'hat'.*\(128, 128\).*\(16, 16\)"),
    (np.zeros((16, 17)), r"'hat'.*image size"),
    ((0, 0, 200, 10), r"'hat'.*box"),
    ((30, 0, 10, 10), r"'hat'.*box"),
])
def test_wrong_user_mask_rejected(spec, match):
    with pytest.raises(ValueError, match=match):
        M.prepare_user_masks([None, spec], (128, 128), ["man", "hat"])


def test_bad_sizes_rejected():
    with pytest.raises(ValueError, match="multiples of 8"):
        M.make_masks(["a"], (100, 128), torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="h:w"):
        M.make_masks(["a"], (128, 256), torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="need attention heat maps"):
        M.make_masks(["a", "b"], (128, 128), None, user_masks=[(0, 0, 8, 8), None])


# ---------------------------------------------------------------------------------------- not found

def test_not_found_warns_and_skips_or_raises_in_strict_mode():
    heat = torch.stack([blob(16, 16, 5, 5, 2), torch.zeros(16, 16)])
    with pytest.warns(UserWarning, match="'dog'.*not found.*skipped"):
        res = M.make_masks(["man", "dog"], (128, 128), heat)
    assert res.found == [True, False] and res.skipped == ["dog"] and res.masks[1].abs().sum() == 0
    with pytest.raises(ValueError, match="'dog'"):
        M.make_masks(["man", "dog"], (128, 128), heat, strict=True)
    # a concept entirely behind a user mask is not found either
    with pytest.warns(UserWarning, match="'man'.*hidden"):
        res = M.make_masks(["man", "dog"], (128, 128), heat[:1].repeat(2, 1, 1), classes=["man", "dog"],
                           same_map_similarity=2, user_masks=[None, (0, 0, 128, 128)])
    assert res.found == [False, True]


# ---------------------------------------------------------------------------------- dilation, feathering

def test_dilated_and_feathered_masks_stay_valid():
    heat = torch.stack([blob(32, 32, 14, 10, 4), blob(32, 32, 16, 20, 4, amp=0.9), blob(32, 32, 5, 28, 2)])
    hard = M.make_masks(["a", "b", "c"], (256, 256), heat)
    dil = M.make_masks(["a", "b", "c"], (256, 256), heat, dilate_px=2)
    assert no_double_owner(dil.masks) and ((hard.masks > 0) <= (dil.masks > 0)).all()
    assert (dil.masks > 0).sum() > (hard.masks > 0).sum()
    soft = M.make_masks(["a", "b", "c"], (256, 256), heat, dilate_px=1, feather_px=3)
    assert soft.masks.dtype == torch.float32 and soft.masks.shape == (3, 32, 32)
    assert soft.masks.min() >= 0 and soft.masks.max() <= 1
    assert soft.masks.sum(0).max() <= 1 + 1e-6
    assert ((soft.masks > 0) & (soft.masks < 1)).any()  # really soft


def test_dilation_only_takes_unowned_pixels():
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, :12, :8], masks[1, :12, 8:] = True, True  # disjoint cores sharing an edge; rows 12.. owned by none
    scores = torch.stack([torch.ones(16, 16), torch.full((16, 16), 0.5)])  # "a" outscores "b" everywhere
    grown = M.grow(masks, scores, 2)
    assert torch.equal(grown[:, :12], masks[:, :12])  # "a" does not eat into "b"'s core
    assert grown[0, 12:14, :8].all() and grown[1, 12:14, 10:].all() and not grown[:, 14:].any()
    assert grown[0, 12, 8] and not grown[1, 12, 8]  # where both fringes reach, the higher score wins
    assert no_double_owner(grown.float())


# ---------------------------------------------------------------------------------------------- SAM

def tiny_sam(img_size=128, dim=32):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    emb = img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=dim, depth=2, num_heads=2,
                                      mlp_ratio=2, out_chans=dim, qkv_bias=True, use_rel_pos=True, window_size=4,
                                      global_attn_indexes=(1,), norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(emb, emb),
                                     input_image_size=(img_size, img_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=16,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2)),
    )
    return sam.eval()


def test_sam_path_end_to_end_with_tiny_random_sam():
    sam = tiny_sam()
    refiner = M.SamRefiner(sam)
    calls = []
    predict = refiner.predictor.predict
    refiner.predictor.predict = lambda **kw: calls.append(kw) or predict(**kw)
    image = Image.fromarray((np.random.default_rng(0).random((128, 192, 3)) * 255).astype(np.uint8))  # 192x128
    heat = torch.stack([blob(8, 12, 3, 3, 1.5), blob(8, 12, 4, 8, 1.5)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random SAM may well "find" nothing
        res = M.make_masks(["man", "woman"], (128, 192), heat, image=image, sam=refiner)
    assert len(calls) == 2  # one SamPredictor.predict per concept ...
    for i, kw in enumerate(calls):  # ... with a box, a positive point and a negative point at the other peak
        assert kw["box"].shape == (4,) and list(kw["point_labels"]) == [1, 0] and kw["multimask_output"]
    assert refiner.predictor.original_size == (128, 192)  # the image went through set_image
    assert res.sources == ["sam", "sam"]
    assert res.masks.shape == (2, 16, 24) and res.masks.dtype == torch.float32
    assert no_double_owner(res.masks) and res.masks.min() >= 0 and res.masks.max() <= 1
    assert res.scores.shape == (2, 16, 24) and ((res.scores >= 0) & (res.scores <= 1)).all()


def test_a_sam_of_another_size_is_built_from_its_checkpoints_shapes(tmp_path):
    """A small SAM (not vit_b/l/h) loads from its file, its config read from the shapes; the official layouts
    read back as the registry builds them (vit_b on the meta device: no memory)."""
    from segment_anything import sam_model_registry

    from omg.sam import _sam_from_shapes
    sam = tiny_sam()
    torch.save(sam.state_dict(), tmp_path / "tiny.pth")
    loaded = M.SamRefiner(tmp_path / "tiny.pth").model
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sam.state_dict().values()))
    assert loaded.image_encoder.img_size == 128 and loaded.image_encoder.blocks[0].window_size == 4
    with torch.device("meta"):
        vit_b = sam_model_registry["vit_b"]()
        built = _sam_from_shapes("vit_b", vit_b.state_dict())
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in vit_b.state_dict().items()}
    assert [(b.attn.num_heads, b.window_size) for b in built.image_encoder.blocks] == \
        [(b.attn.num_heads, b.window_size) for b in vit_b.image_encoder.blocks]


def test_sam_masks_come_from_predictor_output():
    sam = tiny_sam()
    refiner = M.SamRefiner(sam)
    logits = np.full((3, 64, 64), -5.0, dtype=np.float32)
    logits[1, 8:24, 16:40] = 5.0  # best by predicted IoU
    logits[2] = 5.0
    refiner.predictor.predict = lambda **kw: (logits, np.array([0.1, 0.9, 0.5]), None)
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    res = M.make_masks(["cat"], (64, 64), blob(8, 8, 3, 3, 1.5)[None], image=image, sam=refiner)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1:3, 2:5] = True
    assert torch.equal(res.masks[0] > 0, expected)


def test_sam_checkpoint_errors(tmp_path):
    path = tmp_path / "tiny_sam.pth"
    torch.save(tiny_sam().state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit SAM vit_b"):
        M.SamRefiner(path, "vit_b")
    with pytest.raises(CheckpointError, match="unknown SAM model_type 'vit_s'"):
        M.SamRefiner(path, "vit_s")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        M.SamRefiner(tmp_path / "junk.pth")


# ------------------------------------------------------------------------------------------- overlays

def test_overlays_have_image_size():
    image = Image.new("RGB", (96, 64), (10, 20, 30))
    res = M.make_masks(["a", "b"], (64, 96), torch.stack([blob(8, 12, 3, 3, 1.5), blob(8, 12, 4, 9, 1.5)]))
    over = M.overlay_masks(image, res.masks)
    assert over.size == (96, 64) and over.getpixel((3 * 8 + 4, 3 * 8 + 4)) != (10, 20, 30)
    assert M.overlay_heatmap(image, res.heatmaps[0]).size == (96, 64)
