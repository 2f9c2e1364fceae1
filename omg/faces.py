"""Faces for InstantID concepts: a reference face's 512-d identity embedding and five keypoints, and the keypoint
image IdentityNet is conditioned on.

    face = load_face("taylor.safetensors")                   # precomputed: embedding (512,) [+ keypoints (5, 2)]
    face = load_face("taylor.jpg", face_models="antelopev2") # detected: insightface + onnxruntime, the user's models
    image = draw_keypoints(face.keypoints, (1024, 1024))    # InstantID's convention (its pipeline's draw_kps)

A precomputed face is a .safetensors with "embedding" (512,) and optionally "keypoints" (5, 2) in pixels of the
reference photo, or a .npy with the embedding alone; a tensor or array of 512 values is one too. Keypoints, in
insightface's order: left eye, right eye, nose, left and right mouth corners. Without keypoints a face gets
CANONICAL_KEYPOINTS. Nothing is downloaded: detection needs insightface installed and the antelopev2 folder.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from omg.errors import OmgError

EMBEDDING_DIM = 512
# a frontal face's five keypoints in a unit box (insightface's 112x112 arcface template / 112)
CANONICAL_KEYPOINTS = np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]],
                               dtype=np.float32) / 112.0
COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))  # one per keypoint
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))  # eyes and mouth corners to the nose
STICK_WIDTH, RADIUS, LIMB_DIM = 4, 10, 0.6


class FaceError(OmgError):
    """A face reference that gives no usable face: no face or several found, a wrong embedding size, no models."""


@dataclass(frozen=True)
class Face:
    embedding: Tensor  # (512,) float32, as insightface's recognition model gives it (not normalised)
    keypoints: np.ndarray  # (5, 2) pixels of the reference (or CANONICAL_KEYPOINTS in a unit box)
    source: str = ""


def _embedding(value: Any, what: str) -> Tensor:
    t = torch.as_tensor(np.asarray(value, dtype=np.float32) if not isinstance(value, Tensor) else value).float()
    if t.numel() != EMBEDDING_DIM or t.ndim > 2:
        raise FaceError(f"{what}: a face embedding must have {EMBEDDING_DIM} values (antelopev2's recognition "
                        f"embedding), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or float(t.abs().max()) == 0.0:
        raise FaceError(f"{what}: the face embedding is all zeros or not finite")
    return t.reshape(EMBEDDING_DIM).clone()


def _keypoints(value: Any, what: str) -> np.ndarray:
    k = np.asarray(value, dtype=np.float32)
    if k.shape != (5, 2) or not np.isfinite(k).all():
        raise FaceError(f"{what}: keypoints must be (5, 2) pixel coordinates (eyes, nose, mouth corners), got "
                        f"shape {k.shape}")
    return k


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_face(value: Any, face_models: Optional[str] = None) -> Face:
    """A Face from a precomputed file (.safetensors, .npy), an embedding (tensor/array), a Face, or a photo (path or
    PIL image: detected with insightface and the antelopev2 models in `face_models`)."""
    if isinstance(value, Face):
        return value
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not os.path.isfile(path):
            raise FaceError(f"face: no such file {path}")
        low = path.lower()
        if low.endswith(".safetensors"):
            from safetensors.torch import load_file
            try:
                tensors = load_file(path)
            except Exception as e:
                raise FaceError(f"{path}: cannot read as safetensors: {e}") from e
            if "embedding" not in tensors:
                raise FaceError(f"{path}: a face file needs an 'embedding' tensor ({EMBEDDING_DIM} values) and "
                                f"optionally 'keypoints' (5, 2); found {sorted(tensors)[:5]}")
            kps = _keypoints(tensors["keypoints"], path) if "keypoints" in tensors else CANONICAL_KEYPOINTS
            return Face(_embedding(tensors["embedding"], f"{path}: 'embedding'"), kps, path)
        if low.endswith(".npy"):
            try:
                array = np.load(path, allow_pickle=False)
            except ValueError as e:
                raise FaceError(f"{path}: cannot read as a plain .npy array (pickles are refused): {e}") from e
            return Face(_embedding(array, path), CANONICAL_KEYPOINTS, path)
        if low.endswith(IMAGE_SUFFIXES):
            with Image.open(path) as im:
                return detect_face(im.convert("RGB"), face_models, path)
        raise FaceError(f"face: {path}: expected a photo ({', '.join(IMAGE_SUFFIXES)}) or a precomputed face "
                        f"(.safetensors with 'embedding' [+ 'keypoints'], or .npy)")
    if isinstance(value, Image.Image):
        return detect_face(value.convert("RGB"), face_models, "face image")
    if isinstance(value, (Tensor, np.ndarray, list, tuple)):
        return Face(_embedding(value, "face"), CANONICAL_KEYPOINTS, "embedding")
    raise FaceError(f"face must be a photo, a .safetensors/.npy face file, an embedding or an omg.faces.Face, not "
                    f"{type(value).__name__}")


def check_face_source(value: Any, face_models: Optional[str]) -> None:
    """Before any weights move: a photo needs the detector and its models (the detection itself runs later)."""
    if isinstance(value, Image.Image) or (isinstance(value, (str, os.PathLike))
                                          and os.fspath(value).lower().endswith(IMAGE_SUFFIXES)):
        face_analysis(face_models)
    else:
        load_face(value, face_models)


# ------------------------------------------------------------------------------------------- detection

_ANALYSERS: dict[str, Any] = {}


def face_analysis(face_models: Optional[str]) -> Any:
    """insightface's FaceAnalysis over the antelopev2 ONNX models in folder `face_models` (CUDA where onnxruntime
    has it, else CPU); a FaceError saying what is missing otherwise."""
    if face_models is None:
        raise FaceError("a face photo needs face_models: the folder of insightface's antelopev2 ONNX models (or give "
                        "a precomputed face: a .safetensors with 'embedding' and 'keypoints', or a .npy)")
    folder = os.path.abspath(os.fspath(face_models))
    if not os.path.isdir(folder) or not any(f.endswith(".onnx") for f in os.listdir(folder)):
        raise FaceError(f"face_models: {folder} is no folder of antelopev2 .onnx models")
    if folder in _ANALYSERS:
        return _ANALYSERS[folder]
    try:
        import onnxruntime
        from insightface.app import FaceAnalysis
    except ImportError as e:
        raise FaceError("face detection needs insightface and onnxruntime (pip install insightface onnxruntime); "
                        f"import failed with: {e}. Or give a precomputed face (.safetensors/.npy)") from e
    # Only providers this onnxruntime has: asking for CUDA on a CPU build warns once per model.
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in onnxruntime.get_available_providers()] or None
    try:
        # The folder itself as the name: insightface 0.7.3 looks for root/models/name, which os.path.join turns
        # into the folder when name is absolute; 2.x takes a name that is a folder as it is, but a relative name
        # ("antelopev2") it first looks up in the working directory, where another ./antelopev2 would win.
        app = FaceAnalysis(name=folder, root=os.path.dirname(folder), providers=providers,
                           allowed_modules=["detection", "recognition"])
    except Exception as e:
        if isinstance(e, AssertionError) and not str(e):  # FaceAnalysis's bare `assert "detection" in self.models`
            raise FaceError(f"face_models: no face detector among the .onnx files of {folder} (antelopev2 has "
                            f"scrfd_10g_bnkps.onnx)") from e
        # onnxruntime refusing a file: truncated, not ONNX, an unsupported opset
        raise FaceError(f"face_models: insightface cannot load the models in {folder}: {e}") from e
    if "recognition" not in app.models:  # without it, faces would come back with no embedding
        raise FaceError(f"face_models: no face recognition model among the .onnx files of {folder} (antelopev2 "
                        f"has glintr100.onnx)")
    app.prepare(ctx_id=0, det_size=(640, 640))
    _ANALYSERS[folder] = app
    return app


def detect_faces(image: Image.Image, face_models: Optional[str]) -> list[dict]:
    """Every face insightface finds in an RGB image: dicts with bbox (4,), kps (5, 2) and embedding (512,)."""
    app = face_analysis(face_models)
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return [{"bbox": np.asarray(f["bbox"], np.float32), "kps": np.asarray(f["kps"], np.float32),
             "embedding": np.asarray(f["embedding"], np.float32)} for f in app.get(bgr)]


def detect_face(image: Image.Image, face_models: Optional[str], what: str = "face") -> Face:
    """The one face of a reference photo; a FaceError when none or several are found (an identity needs one)."""
    faces = detect_faces(image, face_models)
    if not faces:
        raise FaceError(f"{what}: no face found in the reference photo ({image.width}x{image.height})")
    if len(faces) > 1:
        boxes = ", ".join(str([int(v) for v in f["bbox"]]) for f in faces[:4])
        raise FaceError(f"{what}: {len(faces)} faces found in the reference photo (boxes {boxes}); crop it to the "
                        f"one identity")
    return Face(_embedding(faces[0]["embedding"], what), _keypoints(faces[0]["kps"], what), what)


# ------------------------------------------------------------------------------------------- drawing

def _ellipse_polygon(center: tuple[int, int], axes: tuple[int, int], angle: int) -> np.ndarray:
    """cv2.ellipse2Poly(center, axes, angle, 0, 360, 1): the ellipse's outline, a vertex every degree, rounded."""
    a, b = axes
    t = np.radians(np.arange(0, 361, 1, dtype=np.float64))
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    x = center[0] + a * np.cos(t) * ca - b * np.sin(t) * sa
    y = center[1] + a * np.cos(t) * sa + b * np.sin(t) * ca
    return np.stack([np.round(x), np.round(y)], axis=1)


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain: the hull's vertices, each turn to the left (cross > 0)."""
    pts = sorted(set(map(tuple, np.asarray(points, np.float64))))
    if len(pts) < 3:
        return np.array(pts)

    def half(seq):
        out: list = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]
    return np.array(half(pts) + half(pts[::-1]))


def _fill_convex(canvas: np.ndarray, poly: np.ndarray, color: Sequence[float]) -> None:
    """Paint every pixel centre inside (or on) a convex polygon."""
    h, w = canvas.shape[:2]
    x0, y0 = max(int(poly[:, 0].min()), 0), max(int(poly[:, 1].min()), 0)
    x1, y1 = min(int(poly[:, 0].max()), w - 1), min(int(poly[:, 1].max()), h - 1)
    if x1 < x0 or y1 < y0:
        return
    ys, xs = np.mgrid[y0:y1 + 1, x0:x1 + 1]
    inside = np.ones(xs.shape, bool)
    hull = _convex_hull(poly)  # counter-clockwise in x-right, y-down coordinates seen as a plane
    for (ax, ay), (bx, by) in zip(hull, np.roll(hull, -1, axis=0)):
        inside &= (bx - ax) * (ys - ay) - (by - ay) * (xs - ax) >= 0
    canvas[y0:y1 + 1, x0:x1 + 1][inside] = color


def draw_keypoints(keypoints: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The keypoint image of one or several faces, InstantID's convention (draw_kps): on black, each eye and mouth
    corner joined to the nose by an ellipse 2 * 4 px thick in the colour of its first keypoint at 60 %, then a disc of
    radius 10 per keypoint in its colour (red, green, blue, yellow, magenta). keypoints (5, 2) or (faces, 5, 2) in
    pixels; size (width, height). Several faces are drawn as one would draw each alone (the original's
    draw_kps_multi dims the faces drawn earlier once more per later face)."""
    kps_all = np.asarray(keypoints, np.float64).reshape(-1, 5, 2)
    w, h = size
    limbs = np.zeros((h, w, 3), np.float64)
    for kps in kps_all:
        for i, j in LIMBS:
            (xa, ya), (xb, yb) = kps[i], kps[j]
            length = math.hypot(xa - xb, ya - yb)
            angle = math.degrees(math.atan2(ya - yb, xa - xb))
            poly = _ellipse_polygon((int(np.mean([xa, xb])), int(np.mean([ya, yb]))), (int(length / 2), STICK_WIDTH),
                                    int(angle))
            _fill_convex(limbs, poly, COLORS[i])
    out = (limbs * LIMB_DIM).astype(np.uint8)
    ys, xs = np.mgrid[0:h, 0:w]
    for kps in kps_all:
        for k, (x, y) in enumerate(kps):
            disc = (xs - int(x)) ** 2 + (ys - int(y)) ** 2 <= RADIUS ** 2
            out[disc] = COLORS[k]
    return Image.fromarray(out)


# ------------------------------------------------------------------------------------------- placing

def face_box_from_mask(mask: Tensor) -> Optional[tuple[float, float, float]]:
    """Where a person's face is, from its region (H, W) in the image: (centre x, centre y, face width) in the mask's
    pixels, or None for an empty mask. The head is the top of the region: its width is that of the region's
    topmost fifth (at most the region's width, at least an eighth of its height), its centre that band's centroid."""
    m = mask.float() > 0.5
    rows = torch.nonzero(m.any(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    height = bottom - top
    band = m[top:top + max(1, height // 5)]
    cols = torch.nonzero(band.any(dim=0)).flatten()
    width = float(cols[-1] - cols[0] + 1)
    ys, xs = torch.nonzero(band, as_tuple=True)
    cx = float(xs.float().mean()) + 0.5
    face_w = max(min(width, float(torch.nonzero(m.any(dim=0)).numel())), height / 8)
    cy = top + 0.6 * face_w  # the keypoints' centre sits about 0.6 face widths below the top of the head
    return cx, cy, face_w


def place_keypoints(reference: np.ndarray, box: tuple[float, float, float]) -> np.ndarray:
    """The reference face's keypoints (5, 2) moved into a face box (centre x, centre y, face width): same shape,
    centred there, scaled so the eye-to-mouth span is as in the canonical face of that width."""
    ref = np.asarray(reference, np.float64)
    cx, cy, face_w = box
    span = float(np.ptp(ref, axis=0).max()) or 1.0
    canon = float(np.ptp(CANONICAL_KEYPOINTS, axis=0).max())
    scale = canon * face_w / span
    return ((ref - ref.mean(axis=0)) * scale + np.array([cx, cy])).astype(np.float32)


def concept_keypoints(reference: np.ndarray, mask: Tensor, size: tuple[int, int]) -> Optional[np.ndarray]:
    """A concept's keypoints in the output image (width, height) from its mask (any resolution)."""
    box = face_box_from_mask(mask)
    if box is None:
        return None
    w, h = size
    sx, sy = w / mask.shape[-1], h / mask.shape[-2]
    cx, cy, fw = box
    return place_keypoints(reference, (cx * sx, cy * sy, fw * sx))


def keypoint_tensor(image: Union[Image.Image, np.ndarray]) -> Tensor:
    """(1, 3, H, W) float in [0, 1], as IdentityNet takes it (diffusers' control image processor, no normalising)."""
    return torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()
