"""Deterministic synthetic scenes for the demo world: 1 to 3 simple objects with occlusion, captions and masks.

The world is built so that OMG's setting holds in it. A caption fixes the coarse content: every object's class,
its colour and the background ("a red ball and a yellow ball on a green background"; two objects may share a
class, never a colour). A concept's identity is a late, local, fine feature: a pattern of marks at least two
latent pixels (16 image pixels) wide that only its LoRA draws ("a sks ball" is a red ball with light-red
stripes); plain class members and backgrounds never carry a pattern, so the base model never learns one.

"Late" is a matter of contrast. A diffusion model can read a feature from x_t once its energy over the noise's
is large: a full-contrast pattern (red and white stripes) over a ball of ~100 latent pixels is already legible
at t ~ 700 of SDXL's schedule (signal-to-noise 0.09 a pixel), so whatever draws the first 30 % of the steps
decides it, as measured on an earlier world. The marks are therefore the object's own colour mixed 40 % of the
way to white or black (MARK_MIX): a sixth of the energy, legible only from t ~ 500 on, while class, position
and colour (the whole object against its ground) are legible from the first steps.

Objects are drawn back to front, so each object's ground-truth mask is its shape minus every shape in front of
it (the visible pixels); masks of one scene are therefore disjoint. numpy and PIL only; the same seed gives the
same scene, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from PIL import Image

CLASSES = ("ball", "box", "tower", "cone")
# object colours and background colours are disjoint hues, so an object never melts into its ground
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "yellow": (235, 200, 40), "purple": (140, 60, 180),
           "orange": (240, 130, 30), "brown": (120, 75, 40)}
BACKGROUNDS = {"green": (90, 160, 90), "grey": (150, 150, 150), "pink": (225, 165, 185), "sand": (215, 200, 160)}
WHITE, BLACK = (250, 250, 250), (20, 20, 20)
MARK_MIX = 0.4  # marks: the object's colour 40 % of the way to WHITE or BLACK (see the module docstring)


@dataclass(frozen=True)
class ConceptSpec:
    """A personalised concept: a class member with one colour and one pattern, called "<identifier> <class>"."""
    name: str
    identifier: str
    class_name: str
    colour: str
    pattern: str  # "stripes", "checker" or "dots"
    mark: tuple[int, int, int]  # what the pattern's marks are mixed towards (white or black)

    @property
    def pattern_colour(self) -> tuple[int, int, int]:
        """The marks' colour at full light: the object's colour MARK_MIX of the way to the mark colour."""
        base = np.array(COLOURS[self.colour], np.float32)
        return tuple(int(v) for v in np.round(base + MARK_MIX * (np.array(self.mark, np.float32) - base)))

    @property
    def phrase(self) -> str:
        return f"{self.identifier} {self.class_name}"


# identifiers are single, otherwise unused tokens of CLIP's vocabulary; two concepts share the class "ball".
# Marks at full light: sks (232, 124, 124) on red, ohwx (149, 128, 32) on yellow, bnha (124, 148, 232) on blue.
CONCEPTS = {
    "sks_ball": ConceptSpec("sks_ball", "sks", "ball", "red", "stripes", WHITE),
    "ohwx_ball": ConceptSpec("ohwx_ball", "ohwx", "ball", "yellow", "dots", BLACK),
    "bnha_box": ConceptSpec("bnha_box", "bnha", "box", "blue", "checker", WHITE),
}
OBJECT_SCALES = (0.45, 0.34, 0.26)  # object width / image side in scenes of 1, 2, 3 objects
PATTERN_PERIOD = 32  # pixels: marks of half a period = 16 px = 2 latent pixels, the finest the VAE keeps


@dataclass
class SceneObject:
    class_name: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the shape's bounding box (pixels, exclusive end)
    identity: Optional[str] = None  # concept name, or None for a plain class member


@dataclass
class Scene:
    image: Image.Image
    caption: str
    objects: list[SceneObject]  # back to front: objects[i] is occluded by objects[j > i]
    masks: np.ndarray  # (k, H, W) bool: visible pixels of each object, disjoint
    background: str
    seed: int
    meta: dict = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return [o.class_name for o in self.objects]

    @property
    def colours(self) -> list[str]:
        return [o.colour for o in self.objects]

    @property
    def identities(self) -> list[Optional[str]]:
        return [o.identity for o in self.objects]


def shape_mask(class_name: str, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """(size, size) bool mask of a class's figure inside box."""
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    inside = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    if class_name in ("box", "tower"):
        return inside
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if class_name == "ball":
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    if class_name == "cone":  # apex at the top centre, base along the bottom edge
        frac = (yy - y0) / max(y1 - y0, 1)
        return inside & (np.abs(xx - cx) <= rx * frac)
    raise ValueError(f"unknown class {class_name!r}; choose one of {CLASSES}")


def pattern_mask(pattern: str, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """(size, size) bool: where a concept's pattern colour goes (relative to the object's box, so it moves with it)."""
    x0, y0, x1, y1 = box
    period = max(PATTERN_PERIOD, (x1 - x0) // 3)
    yy, xx = np.mgrid[0:size, 0:size]
    u, v = xx - x0, yy - y0
    if pattern == "stripes":
        return (v // (period // 2)) % 2 == 1
    if pattern == "checker":
        return ((u // (period // 2)) + (v // (period // 2))) % 2 == 1
    if pattern == "dots":
        cu, cv = u % period - period / 2, v % period - period / 2
        return cu ** 2 + cv ** 2 <= (period * 0.27) ** 2
    raise ValueError(f"unknown pattern {pattern!r}")


def object_shade(box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """(size, size) light factor of an object: 1 at its top, falling to 0.75 at its bottom (lit from above)."""
    shade = 1.0 - 0.25 * (np.mgrid[0:size, 0:size][0] - box[1]) / max(box[3] - box[1], 1)
    return np.clip(shade, 0.7, 1.0).astype(np.float32)


def _background(rng: np.random.Generator, size: int, name: Optional[str] = None) -> tuple[np.ndarray, str]:
    """A named base colour with a smooth gradient, float (H, W, 3). No texture: a striped or noisy ground would
    be a pattern the base model learns to draw, and noise caps the autoencoder's PSNR."""
    pick = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    name = pick if name is None else name
    base = np.array(BACKGROUNDS[name], np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)
    ramp = (ramp - ramp.mean())[..., None] * rng.uniform(10, 40)
    return base + ramp, name


def _place(rng: np.random.Generator, class_name: str, size: int, scale: float) -> tuple[int, int, int, int]:
    w = int(size * scale * rng.uniform(0.8, 1.1))
    h = int(w * 2.0) if class_name == "tower" else w
    h = min(h, size - 8)
    x0 = int(rng.integers(2, size - w - 2))
    y0 = int(rng.integers(2, size - h - 2))
    return x0, y0, x0 + w, y0 + h


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _visible_share(j: int, shapes: Sequence[np.ndarray], new: np.ndarray) -> float:
    """Share of shape j left visible by the shapes after it and a new front-most shape."""
    front = np.any([*shapes[j + 1:], new], axis=0)
    return float((shapes[j] & ~front).sum() / max(int(shapes[j].sum()), 1))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(objects: Sequence[SceneObject], background: str) -> str:
    """'a red ball and a blue box on a green background'; concepts by their phrase ('a sks ball')."""
    parts = []
    for o in objects:
        noun = CONCEPTS[o.identity].phrase if o.identity else f"{o.colour} {o.class_name}"
        parts.append(f"{article(noun)} {noun}")
    names = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{names} on {article(background)} {background} background"


def _layout(rng: np.random.Generator, objects: Sequence[tuple[str, Optional[str]]], colours: Sequence[str],
            size: int, scale: float, occlusion: bool) -> Optional[list[SceneObject]]:
    """Boxes back to front by rejection sampling for the overlap condition; None when an object finds no place."""
    placed: list[SceneObject] = []
    shapes: list[np.ndarray] = []
    for i, (cls, identity) in enumerate(objects):
        colour = colours[i]
        for _ in range(500):
            box = _place(rng, cls, size, scale)
            ov = [_overlap(box, p.box) for p in placed]
            area = (box[2] - box[0]) * (box[3] - box[1])
            if not placed:
                break
            if occlusion and max(ov) > 0.15 * area and all(o < 0.6 * area for o in ov):
                # every earlier object must keep at least 35 % of its shape visible (none vanishes)
                cover = shape_mask(cls, box, size)
                if all(_visible_share(j, shapes, cover) >= 0.35 for j in range(len(shapes))):
                    break
                continue
            if not occlusion and max(ov) == 0:
                break
        else:
            return None
        placed.append(SceneObject(cls, colour, box, identity))
        shapes.append(shape_mask(cls, box, size))
    return placed


def render_scene(seed: int, size: int = 256, n_objects: Optional[int] = None, occlusion: Optional[bool] = None,
                 objects: Optional[Sequence[tuple]] = None, background: Optional[str] = None,
                 scale: Optional[float] = None) -> Scene:
    """One scene from a seed.

    n_objects: 1 to 3 (random when None). occlusion: True makes every later object overlap an earlier one,
    False keeps all apart, None picks at random. objects: optional (class_name, concept name or None[, colour])
    per object, back to front; a concept fixes the class and colour; random classes may repeat (two balls),
    drawn colours never do (colours the caller fixes may: the classifier's training scenes hold twin concepts).
    background: a BACKGROUNDS name (random when None). scale: object width / image side (default by object
    count: 0.45, 0.34, 0.26).
    """
    rng = np.random.default_rng([seed, size])
    if objects is None:
        n = int(rng.integers(1, 4)) if n_objects is None else n_objects
        if not 1 <= n <= 3:
            raise ValueError(f"n_objects must be 1 to 3, got {n}")
        picks = rng.choice(len(CLASSES), size=n, replace=True)
        objects = [(CLASSES[i], None) for i in picks]
    n = len(objects)
    occlusion = bool(rng.integers(2)) if occlusion is None else occlusion
    if background is not None and background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose one of {sorted(BACKGROUNDS)}")
    canvas, background = _background(rng, size, background)
    fixed = [o[2] if len(o) > 2 else CONCEPTS[o[1]].colour if o[1] else None for o in objects]
    free = [c for c in COLOURS if c not in fixed]
    drawn = [free[i] for i in rng.choice(len(free), size=n, replace=False)]
    colours = [f if f is not None else d for f, d in zip(fixed, drawn)]
    scale = OBJECT_SCALES[n - 1] if scale is None else scale
    for cls, identity, *_ in objects:
        if cls not in CLASSES:
            raise ValueError(f"unknown class {cls!r}; choose one of {CLASSES}")
        if identity is not None and CONCEPTS[identity].class_name != cls:
            raise ValueError(f"concept {identity} is a {CONCEPTS[identity].class_name}, not a {cls}")
    pairs = [(o[0], o[1]) for o in objects]
    for _ in range(50):  # an early box can leave no room for a later one: then lay the whole scene out again
        placed = _layout(rng, pairs, colours, size, scale, occlusion)
        if placed is not None:
            break
    else:
        raise RuntimeError(f"seed {seed}: no layout found in 50 attempts")  # assert-like
    masks = np.zeros((n, size, size), bool)
    for i, o in enumerate(placed):  # back to front: later shapes cover earlier ones
        shape = shape_mask(o.class_name, o.box, size)
        masks[:i] &= ~shape
        masks[i] = shape
        colour = np.array(COLOURS[o.colour], np.float32)
        shade = object_shade(o.box, size)
        canvas[shape] = colour * shade[shape][:, None]
        if o.identity:  # marks are lit as the object is, so their contrast is the same top to bottom
            spec = CONCEPTS[o.identity]
            marks = shape & pattern_mask(spec.pattern, o.box, size)
            canvas[marks] = np.array(spec.pattern_colour, np.float32) * shade[marks][:, None]
    image = Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8))
    return Scene(image, caption_for(placed, background), placed, masks, background, seed,
                 {"occlusion": occlusion})


def concept_images(concept: str, n: int = 16, size: int = 256, seed: int = 0, plain: bool = False) -> list[Scene]:
    """n images of one concept alone (DreamBooth's instance set), captioned 'a sks ball on a grey background',
    at every object scale of the multi-object scenes. plain=True: the same class in the concept's colour without
    its pattern, captioned 'a red ball on a grey background' (DreamBooth's class set for prior preservation)."""
    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; choose one of {sorted(CONCEPTS)}")
    spec = CONCEPTS[concept]
    obj = (spec.class_name, None, spec.colour) if plain else (spec.class_name, concept)
    first = seed * 100_003 + (50_021 if plain else 0)
    return [render_scene(first + 7_919 * (i + 1), size, objects=[obj], scale=OBJECT_SCALES[i % 3])
            for i in range(n)]


def _base_scene(args: tuple[int, int, float]) -> Scene:
    s, size, occlusion_fraction = args
    rng = np.random.default_rng([s, 1])
    k = int(rng.integers(1, 4))
    occ = bool(rng.random() < occlusion_fraction) if k > 1 else False
    return render_scene(s, size, n_objects=k, occlusion=occ)


def base_scenes(n: int, size: int = 256, seed: int = 0, occlusion_fraction: float = 0.5,
                workers: int = 1) -> list[Scene]:
    """n multi-object scenes of plain class members for base training; a fixed share with occlusion.

    Each scene depends on its own seed only, so workers > 1 (processes) gives the same list."""
    jobs = [(seed * 1_000_003 + i, size, occlusion_fraction) for i in range(n)]
    if workers <= 1 or n < 64:
        return [_base_scene(j) for j in jobs]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_base_scene, jobs, chunksize=32)


def to_tensor_batch(scenes: Sequence[Scene]):
    """Images as a float tensor (B, 3, H, W) in [-1, 1]."""
    import torch

    arr = np.stack([np.asarray(s.image, np.float32) for s in scenes]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
