"""InstantID concepts (Wang et al. 2024) in OMG: one face photo per identity, no training.

InstantID = an IP-Adapter (omg.ip_adapter: 16 face tokens from the face embedding, decoupled cross-attention in every
attn2) + IdentityNet (an SDXL ControlNet, omg.controlnet, conditioned on the face keypoint image and attending to
the face tokens instead of the text). In stage 2 each InstantID concept's pass runs the base weights with its own
face tokens and its own IdentityNet residuals, the keypoints drawn where that concept's face is in the stage-1
image (from its mask, or a face detected inside it): one keypoint image per concept, not one for all.

    models = load_instantid("ip-adapter.bin", "InstantID/ControlNetModel", unet)
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from omg import faces as facelib
from omg.control import check_fits
from omg.controlnet import ControlNet, check_controlnet, load_controlnet
from omg.errors import OptionError
from omg.ip_adapter import IPAdapter, check_ip_adapter, load_ip_adapter
from omg.unet import ControlResiduals, UNet, UNetConfig


@dataclass
class InstantIDModels:
    adapter: IPAdapter
    identitynet: ControlNet


def check_instantid(face_adapter: Any, identitynet: Any, unet_config: UNetConfig) -> None:
    """Before any weights move: both models given, the adapter and IdentityNet files valid for this UNet."""
    if face_adapter is None or identitynet is None:
        raise OptionError("InstantID concepts (a concept with face=...) need face_adapter (InstantID's ip-adapter.bin) "
                          "and identitynet (its ControlNetModel folder)")
    if not isinstance(face_adapter, IPAdapter):
        check_ip_adapter(face_adapter, unet_config)
    config = identitynet.config if isinstance(identitynet, ControlNet) else check_controlnet(identitynet)
    check_fits(config, unet_config, f"identitynet ({identitynet if isinstance(identitynet, str) else 'loaded'})")


def load_instantid(face_adapter: Any, identitynet: Any, unet: UNet) -> InstantIDModels:
    """The adapter and IdentityNet on the UNet's device and dtype (paths are loaded, loaded models kept)."""
    p = next(unet.parameters())
    adapter = (face_adapter.to(p.device, p.dtype) if isinstance(face_adapter, IPAdapter)
               else load_ip_adapter(face_adapter, unet.config, p.device, p.dtype))
    net = identitynet if isinstance(identitynet, ControlNet) else load_controlnet(identitynet, p.device, p.dtype)
    q = next(net.parameters())
    if (q.device, q.dtype) != (p.device, p.dtype):
        raise OptionError(f"identitynet is {q.dtype} on {q.device}, the UNet {p.dtype} on {p.device}")
    return InstantIDModels(adapter, net)


def stage1_keypoints(reference: np.ndarray, mask: Tensor, size: tuple[int, int],
                     detected: Sequence[dict] = ()) -> Optional[np.ndarray]:
    """A concept's keypoints in the output image: of the face detected in the stage-1 image whose keypoints' centre
    lies deepest in the concept's mask (when a detector ran), else the reference's placed from the mask."""
    w, h = size
    best, score = None, 0.0
    for f in detected:
        cx, cy = f["kps"].mean(axis=0)
        i = min(max(int(cy * mask.shape[-2] / h), 0), mask.shape[-2] - 1)
        j = min(max(int(cx * mask.shape[-1] / w), 0), mask.shape[-1] - 1)
        if float(mask[i, j]) > max(score, 0.5):
            best, score = f["kps"], float(mask[i, j])
    return np.asarray(best, np.float32) if best is not None else facelib.concept_keypoints(reference, mask, size)


class FacePasses:
    """Stage 2's InstantID concepts: per active concept position, its [uncond x n; cond x n] face tokens and its
    IdentityNet condition embedding per image (rows b and n + b: image b's keypoint image)."""

    def __init__(self, models: InstantIDModels, tokens: dict[int, Tensor], hints: dict[int, Tensor],
                 keypoint_images: dict[int, list[Image.Image]], ip_scale: float, identitynet_scale: float):
        self.models, self.tokens, self.hints = models, tokens, hints
        self.keypoint_images = keypoint_images
        self.ip_scale, self.identitynet_scale = ip_scale, identitynet_scale

    @property
    def concepts(self) -> list[int]:
        return sorted(self.tokens)

    @classmethod
    def prepare(cls, models: InstantIDModels, faces: dict[int, facelib.Face], masks: Tensor, size: tuple[int, int],
                ip_scale: float, identitynet_scale: float, detected: Sequence[Sequence[dict]] = ()
                ) -> "FacePasses":
        """faces: active position -> Face; masks (n, k, h, w) of the active concepts; size (width, height)."""
        n = masks.shape[0]
        net = models.identitynet
        p = next(net.parameters())
        tokens, hints, drawn = {}, {}, {}
        for j, face in faces.items():
            pair = models.adapter.cfg_tokens(face.embedding)  # (2, T, C): [zero embedding; face]
            tokens[j] = pair.repeat_interleave(n, dim=0)
            images = []
            for b in range(n):
                kps = stage1_keypoints(face.keypoints, masks[b, j].cpu(), size, detected[b] if detected else ())
                images.append(facelib.draw_keypoints(kps if kps is not None else np.zeros((0, 5, 2)), size))
            drawn[j] = images
            features = net.encode_hint(torch.cat([facelib.keypoint_tensor(im) for im in images]).to(p.device))
            hints[j] = torch.cat([features, features])  # the uncond rows see the same keypoints
        return cls(models, tokens, hints, drawn, ip_scale, identitynet_scale)

    def residuals(self, concepts: Sequence[int], x: Tensor, t: Tensor, cond: tuple[Tensor, Tensor]) -> ControlResiduals:
        """IdentityNet over the rows of `concepts` (each [uncond x n; cond x n]), attending to their face tokens."""
        tokens = torch.cat([self.tokens[j] for j in concepts])
        hints = torch.cat([self.hints[j] for j in concepts])
        return self.models.identitynet(x, t, tokens, cond[1], hints, self.identitynet_scale)

    @contextmanager
    def applied(self, concepts: Sequence[int]) -> Iterator[None]:
        """The face tokens of `concepts` on every row of the UNet calls in the with-block."""
        with self.models.adapter.tokens(torch.cat([self.tokens[j] for j in concepts]), self.ip_scale):
            yield


def load_faces(values: Sequence[Any], face_models: Optional[str]) -> list[facelib.Face]:
    return [facelib.load_face(v, face_models) for v in values]


def face_path(value: Any) -> Optional[str]:
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
