"""Concept masks for OMG stage 2: from stage-1 cross-attention, refined by segment-anything, or given by the user.

make_masks: per-concept heat maps -> latent size -> same-class split -> threshold + peak component -> user
overrides -> SAM refinement -> overlap resolution (one owner per latent pixel) -> dilation -> feathering.
Everything lives at latent resolution (H/8, W/8). A per-pixel *score* decides who owns a pixel claimed
twice: the normalised attention (in [0, 1]), SAM's sigmoid(logit), or USER_SCORE for user masks.
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from omg.errors import MaskError
from omg.sam import LATENT_SCALE, SamRefiner, image_array

USER_SCORE = 2.0  # above any attention/SAM score: a user mask always owns the pixels it covers


# --------------------------------------------------------------------------------------------- tokens

def find_token_indices(tokens: Sequence, class_tokens: Sequence) -> list[list[int]]:
    """Every non-overlapping occurrence of the sequence class_tokens in tokens, as position lists, in order."""
    n, found, i = len(class_tokens), [], 0
    if n == 0:
        raise MaskError("the class noun has no tokens")
    while i + n <= len(tokens):
        if list(tokens[i:i + n]) == list(class_tokens):
            found.append(list(range(i, i + n)))
            i += n
        else:
            i += 1
    return found


def concept_token_indices(prompt: str, class_names: Sequence[str]) -> list[list[int]]:
    """Context positions of each concept's class noun in prompt; the j-th concept of a class takes its j-th occurrence.

    Positions index the SDXL context [77 * chunks]: chunk c, token t -> 77c + 1 + t (BOS first). Matching is
    on BPE tokens, whose end-of-word marker keeps "man" from matching inside "woman" (nor "men", "man's").
    """
    from omg.text import CHUNK, chunk_tokens, word_tokens  # needs open_clip's BPE, not needed elsewhere here
    ids, pos = [], []
    for c, chunk in enumerate(chunk_tokens(prompt)):
        ids += chunk
        pos += [c * (CHUNK + 2) + 1 + t for t in range(len(chunk))]
    used: dict[tuple, int] = {}
    out = []
    for name in class_names:
        cls = tuple(t for word in word_tokens(name) for t in word)
        occurrences = find_token_indices(ids, cls)
        j = used.get(cls, 0)
        if j >= len(occurrences):
            raise MaskError(f"class noun {name!r} occurs {len(occurrences)} time(s) in the prompt {prompt!r}, "
                            f"but {j + 1} concept(s) of that class need one occurrence each")
        used[cls] = j + 1
        out.append([pos[i] for i in occurrences[j]])
    return out


def token_heatmaps(maps: Tensor, token_indices: Sequence[Sequence[int]], map_tokens: Optional[Sequence[int]] = None,
                   sigma: float = 1.0) -> Tensor:
    """Per-concept heat maps [k, h, w] in [0, 1]: mean of the concept's token maps, Gaussian blur, min-max.

    maps: [..., T, h, w] (leading dims averaged). map_tokens: the context position of each row of maps when
    it holds only selected tokens (attention.TokenHeatmaps with heatmap_tokens=map_tokens).
    """
    maps = maps.float().reshape(-1, *maps.shape[-3:]).mean(0)
    rows = {p: r for r, p in enumerate(map_tokens)} if map_tokens is not None else None
    heat = []
    for idx in token_indices:
        r = [rows[p] for p in idx] if rows is not None else list(idx)
        if not r or min(r) < 0 or max(r) >= maps.shape[0]:
            raise MaskError(f"token indices {list(idx)} out of range for {maps.shape[0]} token maps")
        heat.append(maps[r].mean(0))
    return normalize(gaussian_blur(torch.stack(heat), sigma))


# ----------------------------------------------------------------------------------------- image ops

def normalize(x: Tensor) -> Tensor:
    """Min-max each map of [k, h, w] to [0, 1]; a flat map becomes all zeros."""
    lo, hi = x.amin((1, 2), keepdim=True), x.amax((1, 2), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(x))


def gaussian_blur(x: Tensor, sigma: float, radius: Optional[int] = None) -> Tensor:
    """Separable Gaussian blur of [k, h, w] with replicate padding (a convex combination: keeps [0, 1] and sums)."""
    if sigma <= 0:
        return x
    r = radius if radius is not None else math.ceil(3 * sigma)
    g = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=torch.float32) / sigma) ** 2)
    g = (g / g.sum()).to(x.dtype)
    y = F.pad(x[:, None], (r, r, r, r), mode="replicate")
    y = F.conv2d(F.conv2d(y, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    return y[:, 0]


def otsu_threshold(x: Tensor, bins: int = 256) -> Tensor:
    """Otsu's threshold (max between-class variance) of each map of [k, h, w] with values in [0, 1] -> [k]."""
    hist = torch.stack([torch.histc(v.float(), bins, 0.0, 1.0) for v in x])
    p = hist / hist.sum(1, keepdim=True).clamp_min(1)
    centers = (torch.arange(bins, device=x.device) + 0.5) / bins
    w0, mu = p.cumsum(1), (p * centers).cumsum(1)
    between = (mu[:, -1:] * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    return (between.argmax(1) + 1).float() / bins  # upper edge of the last background bin


def connected_components(mask: Tensor) -> Tensor:
    """8-connected labels of a [h, w] bool mask (0 = background) by max-label propagation (iterations = diameter)."""
    h, w = mask.shape
    labels = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(h, w) * mask
    while True:  # float labels are exact below 2**24 pixels
        grown = F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0] * mask
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def keep_peak_components(mask: Tensor, heat: Tensor, ratio: float = 1.0) -> Tensor:
    """Keep the components of mask whose own peak heat is >= ratio x the mask's peak (1.0: the peak's component)."""
    if not mask.any():
        return mask
    labels = connected_components(mask)
    comp_peak = torch.zeros(labels.numel() + 1, device=mask.device).scatter_reduce(
        0, labels.flatten(), heat.flatten().float(), "amax", include_self=False)
    keep = comp_peak >= ratio * heat[mask].max()
    keep[0] = False
    return keep[labels]


def dilate(masks: Tensor, px: int) -> Tensor:
    """Grow each bool mask of [k, h, w] by a disk of radius px."""
    if px <= 0:
        return masks
    r = torch.arange(-px, px + 1, device=masks.device, dtype=torch.float32)
    disk = ((r[:, None] ** 2 + r[None] ** 2) <= px * px + 1e-6).float()[None, None]
    return F.conv2d(masks.float()[:, None], disk, padding=px)[:, 0] > 0.5


def feather(masks: Tensor, px: float) -> Tensor:
    """Soft masks in [0, 1]: disjoint hard masks blurred (sigma px/2, radius px); per-pixel sum over concepts <= 1.

    The blur is linear and convex, so Σ blur(M_i) = blur(∪M) <= 1 already; the renormalisation only guards rounding.
    """
    soft = gaussian_blur(masks.float(), px / 2, radius=max(1, math.ceil(px))) if px > 0 else masks.float()
    total = soft.sum(0, keepdim=True)
    return torch.where(total > 1, soft / total, soft).clamp(0, 1)


def grow(masks: Tensor, scores: Tensor, px: int) -> Tensor:
    """Dilate disjoint masks by px into pixels no concept owns (by score where fringes meet); cores are kept."""
    if px <= 0:
        return masks
    return masks | resolve_overlaps(dilate(masks, px) & ~masks.any(0), scores)


def resolve_overlaps(masks: Tensor, scores: Tensor) -> Tensor:
    """Each pixel to at most one concept: the highest-scoring mask that claims it (the first concept on ties)."""
    claimed = torch.where(masks, scores.float(), torch.tensor(-math.inf, device=masks.device))
    owner = claimed.argmax(0)
    k = masks.shape[0]
    return masks.any(0) & (owner == torch.arange(k, device=masks.device)[:, None, None])


# -------------------------------------------------------------------------------------- from attention

def masks_from_attention(heat: Tensor, threshold: Optional[float] = None,
                         component_ratio: float = 1.0) -> tuple[Tensor, Tensor]:
    """(scores [k,h,w] in [0,1], masks [k,h,w] bool) from heat maps.

    threshold None: Otsu per map (attention's background level varies with prompt, seed and layer mix, so a
    fixed fraction of the peak over- or under-segments; Otsu picks the valley between background and object).
    A float: that fraction of each map's peak. Then only components peaking near the map's peak are kept.
    """
    scores = normalize(heat.float())
    t = otsu_threshold(scores) if threshold is None else torch.full((len(scores),), float(threshold))
    masks = (scores >= t.to(scores.device)[:, None, None]) & (scores > 0)
    masks = torch.stack([keep_peak_components(m, s, component_ratio) for m, s in zip(masks, scores)])
    return scores, masks


def same_region_groups(heat: Tensor, classes: Optional[Sequence[str]] = None,
                       similarity: float = 0.9) -> list[list[int]]:
    """Concepts whose heat maps cannot tell them apart: the same class noun, or Pearson correlation >= similarity.

    Correlation rather than cosine: attention maps share a broad background level that makes any two look alike.
    """
    flat = heat.flatten(1).float()
    flat = F.normalize(flat - flat.mean(1, keepdim=True), dim=1)
    sim = flat @ flat.T
    group = list(range(len(heat)))
    for i, j in itertools.combinations(range(len(heat)), 2):
        if (classes is not None and classes[i] == classes[j]) or sim[i, j] >= similarity:
            old, new = group[j], group[i]
            group = [new if g == old else g for g in group]
    members = [[i for i in range(len(heat)) if group[i] == g] for g in sorted(set(group))]
    return [m for m in members if len(m) > 1]


def split_same_class(heat: Tensor, groups: Sequence[Sequence[int]], peak_distance: float = 0.125,
                     iters: int = 10) -> Tensor:
    """Give each concept of a group its own region of the group's mean heat map.

    The n strongest peaks at least peak_distance x max(h, w) apart seed an attention-weighted k-means on the
    pixel coordinates of the group's foreground (Otsu); pixels then go to the nearest centre. Regions go to
    concepts by the assignment maximising each concept's own heat in its region; exact ties (identical maps)
    give the first concept the left-most region (then top-most).
    """
    out = heat.clone().float()
    h, w = heat.shape[1:]
    ys, xs = torch.meshgrid(torch.arange(h, device=heat.device), torch.arange(w, device=heat.device), indexing="ij")
    pts = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    for g in groups:
        n = len(g)
        combined = normalize(heat[list(g)].float().mean(0, keepdim=True))
        weight = (combined * (combined >= otsu_threshold(combined)[:, None, None]))[0].flatten()
        suppressed, centres = combined[0].flatten().clone(), []
        for _ in range(n):  # separated peaks
            c = pts[suppressed.argmax()]
            centres.append(c)
            suppressed[((pts - c) ** 2).sum(1) < (peak_distance * max(h, w)) ** 2] = -1
        centres = torch.stack(centres)
        for _ in range(iters):
            near = ((pts[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
            for c in range(n):
                wc = weight * (near == c)
                if wc.sum() > 0:
                    centres[c] = (pts * wc[:, None]).sum(0) / wc.sum()
        region = ((pts[:, None] - centres[None]) ** 2).sum(-1).argmin(1)  # Voronoi cells
        order = sorted(range(n), key=lambda c: (centres[c, 1].item(), centres[c, 0].item()))
        gain = torch.stack([torch.stack([(heat[i].flatten().float() * (region == c)).sum() for c in order])
                            for i in g])
        best, best_perm = -math.inf, None
        for perm in itertools.permutations(range(n)):
            total = sum(gain[i, perm[i]].item() for i in range(n))
            if best_perm is None or total > best + 1e-6 * abs(best):  # float ties keep the earlier order
                best, best_perm = total, perm
        for i, concept in enumerate(g):
            out[concept] = normalize((combined[0].flatten() * (region == order[best_perm[i]])).view(1, h, w))[0]
    return out


# ----------------------------------------------------------------------------------------- user masks

def user_mask(spec: Any, image_size: tuple[int, int], name: str) -> Tensor:
    """A user mask or box as a latent-size bool mask [H/8, W/8].

    Box: (x0, y0, x1, y1) in image pixels -> the latent cells whose centres it covers (at least one). Mask: PIL
    image, array or tensor (bool, uint8 0..255 or float 0..1; a singleton channel is allowed) of exactly the
    image size (H, W) -> majority of each 8x8 block, or of the latent size (H/8, W/8). Anything else: MaskError.
    """
    H, W = image_size
    h, w = H // LATENT_SCALE, W // LATENT_SCALE
    if isinstance(spec, (tuple, list)) and len(spec) == 4 and all(isinstance(v, (int, float)) for v in spec):
        x0, y0, x1, y1 = map(float, spec)
        if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
            raise MaskError(f"concept {name!r}: box {tuple(spec)} must be (x0, y0, x1, y1) pixels with "
                            f"0 <= x0 < x1 <= {W} and 0 <= y0 < y1 <= {H}")
        c0, r0 = min(round(x0 / LATENT_SCALE), w - 1), min(round(y0 / LATENT_SCALE), h - 1)
        c1, r1 = max(round(x1 / LATENT_SCALE), c0 + 1), max(round(y1 / LATENT_SCALE), r0 + 1)
        m = torch.zeros(h, w, dtype=torch.bool)
        m[r0:r1, c0:c1] = True
        return m
    if isinstance(spec, Image.Image):
        a = np.asarray(spec.convert("L"), dtype=np.float32) / 255
    else:
        a = spec.detach().cpu().numpy() if isinstance(spec, Tensor) else np.asarray(spec)
        a = a.astype(np.float32) / 255 if a.dtype == np.uint8 else a.astype(np.float32)
        if a.ndim == 3 and a.shape[0] == 1:
            a = a[0]
        elif a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
    if a.shape == (H, W):
        return F.avg_pool2d(torch.from_numpy((a >= 0.5).astype(np.float32))[None], LATENT_SCALE)[0] >= 0.5
    if a.shape == (h, w):
        return torch.from_numpy(a >= 0.5)
    raise MaskError(f"concept {name!r}: mask of shape {tuple(a.shape)}; expected the image size (H, W) = {(H, W)} "
                    f"or the latent size (H/8, W/8) = {(h, w)}")


def prepare_user_masks(specs: Optional[Sequence[Any]], image_size: tuple[int, int],
                       names: Sequence[str]) -> list[Optional[Tensor]]:
    """Validate and convert all user masks/boxes (None = no override) before any sampling."""
    if specs is None:
        return [None] * len(names)
    if len(specs) != len(names):
        raise MaskError(f"{len(specs)} user masks for {len(names)} concepts; use None for concepts without one")
    return [None if s is None else user_mask(s, image_size, n) for s, n in zip(specs, names)]


# ---------------------------------------------------------------------------------------------- top

@dataclass
class ConceptMasks:
    masks: Tensor       # [k, H/8, W/8] float in [0, 1], per-pixel sum <= 1; zeros for concepts not found
    scores: Tensor      # [k, H/8, W/8] ownership scores (attention in [0,1], SAM sigmoid, USER_SCORE)
    heatmaps: Tensor    # [k, H/8, W/8] normalised attention heat maps after the same-class split (zeros: none)
    names: list[str]
    found: list[bool]
    sources: list[str]  # per concept: "attention", "split" (maps too alike: a split of the image), "sam" or "user"

    @property
    def skipped(self) -> list[str]:
        return [n for n, f in zip(self.names, self.found) if not f]


def make_masks(names: Sequence[str], image_size: tuple[int, int], heatmaps: Optional[Tensor] = None, *,
               classes: Optional[Sequence[str]] = None, image: Any = None, sam: Optional[SamRefiner] = None,
               user_masks: Optional[Sequence[Any]] = None, threshold: Optional[float] = None,
               component_ratio: float = 1.0, same_map_similarity: float = 0.9, peak_distance: float = 0.125,
               dilate_px: int = 0, feather_px: float = 0.0, min_area: float = 0.001,
               strict: bool = False) -> ConceptMasks:
    """Latent-size concept masks for OMG blending (see the module docstring for the order of the steps).

    heatmaps [k, h, w]: per-concept heat maps at any resolution with the image's aspect (token_heatmaps).
    A concept whose mask is empty or under min_area x the latent pixels (not found, or hidden entirely
    behind concepts in front) gets a zero mask and a warning, or a MaskError when strict. Concepts of different
    classes whose maps are too alike get a split of the image (source "split") and a warning.
    """
    H, W = image_size
    if H % LATENT_SCALE or W % LATENT_SCALE or H <= 0 or W <= 0:
        raise MaskError(f"image size {W}x{H} must be positive multiples of {LATENT_SCALE}")
    k, h, w = len(names), H // LATENT_SCALE, W // LATENT_SCALE
    if k == 0:
        empty = torch.zeros(0, h, w)
        return ConceptMasks(empty, empty, empty, [], [], [])
    users = prepare_user_masks(user_masks, image_size, names)
    device = heatmaps.device if heatmaps is not None else torch.device("cpu")
    heat = torch.zeros(k, h, w, device=device)
    if heatmaps is not None:
        if heatmaps.ndim != 3 or heatmaps.shape[0] != k or heatmaps.shape[1] * w != heatmaps.shape[2] * h:
            raise MaskError(f"heatmaps of shape {tuple(heatmaps.shape)}; expected [{k}, h, w] with h:w = {h}:{w}")
        heat = normalize(F.interpolate(heatmaps.float()[None], (h, w), mode="bilinear", align_corners=False)[0])
        groups = same_region_groups(heat, classes, same_map_similarity)
        heat = split_same_class(heat, groups, peak_distance)
        fallback = _warn_split_fallback(groups, names, classes, same_map_similarity)
    elif any(u is None for u in users):
        raise MaskError("concepts without a user mask need attention heat maps: "
                        + ", ".join(repr(n) for n, u in zip(names, users) if u is None))
    else:
        fallback = set()
    # attention masks for the concepts without a user mask only (each map is thresholded on its own)
    scores, masks = heat.clone(), torch.zeros(k, h, w, dtype=torch.bool, device=device)
    auto = [i for i, u in enumerate(users) if u is None]
    if auto:
        scores[auto], masks[auto] = masks_from_attention(heat[auto], threshold, component_ratio)
    sources = ["split" if i in fallback else "attention" for i in range(k)]
    for i, u in enumerate(users):
        if u is not None:
            masks[i], scores[i], sources[i] = u.to(device), u.to(device).float() * USER_SCORE, "user"
    if sam is not None:
        if image is None:
            raise MaskError("SAM refinement needs the stage-1 image")
        active = [s in ("attention", "split") and bool(m.any()) for s, m in zip(sources, masks)]
        sam_masks, sam_scores = sam.refine(image, masks, [_anchor(m, s) for m, s in zip(masks, heat)], active)
        for i in (i for i in range(k) if active[i]):
            masks[i], scores[i], sources[i] = sam_masks[i], sam_scores[i], "sam"
    hard = grow(resolve_overlaps(masks, scores), scores, dilate_px)
    found = [int(m.sum()) >= max(1, math.ceil(min_area * h * w)) for m in hard]
    def why(i: int) -> str:
        if not masks[i].any():
            return f"empty {sources[i]} mask"
        if not hard[i].any():
            return "hidden behind other concepts"
        return f"{int(hard[i].sum())} latent pixels < min_area {min_area:g}"

    missing = [f"{names[i]!r} ({why(i)})" for i in range(k) if not found[i]]
    if missing and strict:
        raise MaskError("concept(s) not found in the stage-1 image: " + ", ".join(missing))
    for m in missing:
        warnings.warn(f"concept {m} not found in the stage-1 image; it is skipped", stacklevel=2)
    hard &= torch.tensor(found, device=hard.device)[:, None, None]
    return ConceptMasks(feather(hard, feather_px), scores, heat, list(names), found, sources)


def _warn_split_fallback(groups: Sequence[Sequence[int]], names: Sequence[str], classes: Optional[Sequence[str]],
                         similarity: float) -> set[int]:
    """The concepts of other classes whose maps were too alike to tell apart, so that their masks come from a
    split of the image (split_same_class) rather than from their own attention; warns about each group."""
    fallback: set[int] = set()
    for g in groups:
        if classes is not None and len({classes[i] for i in g}) == 1:
            continue  # two concepts of one class: splitting is how they are told apart
        fallback.update(g)
        warnings.warn(f"the attention maps of {', '.join(repr(names[i]) for i in g)} are too alike to tell apart "
                      f"(correlation >= {similarity:g}); their masks split the image between them instead "
                      f"(mask source 'split'); give user masks or boxes, or a SAM checkpoint", stacklevel=3)
    return fallback


def _anchor(mask: Tensor, heat: Tensor) -> Optional[tuple[int, int]]:
    """Latent (y, x) of the heat peak inside mask; without heat there, the mask pixel nearest its centroid."""
    if not mask.any():
        return None
    pts = torch.nonzero(mask).float()
    centrality = -((pts - pts.mean(0)) ** 2).sum(1)
    weight = heat[mask].float() + 1e-6 * centrality / centrality.abs().max().clamp_min(1)
    y, x = pts[weight.argmax()].long().tolist()
    return y, x


# -------------------------------------------------------------------------------------------- overlays

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60)]


def overlay_masks(image: Any, masks: Tensor, alpha: float = 0.5,
                  names: Optional[Sequence[str]] = None) -> Image.Image:
    """The image with each concept's mask [k, h, w] tinted in its palette colour (for --save-masks); with `names`,
    a legend band below the image names each concept beside a swatch of its colour."""
    base = torch.from_numpy(image_array(image)).float()
    m = F.interpolate(masks.float().cpu()[None], base.shape[:2], mode="nearest")[0]
    colours = torch.tensor([PALETTE[i % len(PALETTE)] for i in range(len(m))], dtype=torch.float32)
    tint = torch.einsum("khw,kc->hwc", m, colours)
    cover = alpha * m.sum(0).clamp(0, 1)[..., None]
    tinted = Image.fromarray((base * (1 - cover) + alpha * tint).clamp(0, 255).byte().numpy())
    return tinted if names is None else _with_legend(tinted, names)


LEGEND_ROW = 14  # pixels per legend line: the default bitmap font is 11 pixels high


def _with_legend(image: Image.Image, names: Sequence[str]) -> Image.Image:
    from PIL import ImageDraw

    out = Image.new("RGB", (image.width, image.height + LEGEND_ROW * len(names) + 4), (0, 0, 0))
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, name in enumerate(names):
        top = image.height + 2 + LEGEND_ROW * i
        draw.rectangle((2, top + 1, 12, top + 11), fill=PALETTE[i % len(PALETTE)])
        draw.text((16, top), f"{i}: {name}", fill=(255, 255, 255))
    return out


def overlay_heatmap(image: Any, heat: Tensor, alpha: float = 0.5) -> Image.Image:
    """The image under a jet-coloured heat map [h, w] in [0, 1]."""
    base = torch.from_numpy(image_array(image)).float()
    v = F.interpolate(heat.float().cpu()[None, None], base.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    v = v.clamp(0, 1)[..., None]
    jet = torch.cat([(1.5 - (4 * v - c).abs()).clamp(0, 1) for c in (3, 2, 1)], -1) * 255
    return Image.fromarray((base * (1 - alpha) + jet * alpha).clamp(0, 255).byte().numpy())
