"""segment-anything refinement of the concept masks (segment_anything is imported only when a SamRefiner is built)."""
from __future__ import annotations

import itertools
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from omg.errors import CheckpointError, MaskError

LATENT_SCALE = 8  # SDXL's VAE: one latent pixel per 8x8 image pixels
SAM_TYPES = {12: "vit_b", 24: "vit_l", 32: "vit_h"}  # image-encoder depth -> segment-anything model type


class SamRefiner:
    """segment-anything refinement, prompted per concept with the box of its attention mask, a positive point at
    its peak and negative points at the other concepts' peaks; keeps the best multimask output by predicted IoU.

    sam: a checkpoint path (.pth state dict or .safetensors; model_type inferred from the encoder depth when None)
    or an already-built segment_anything Sam module (any img_size).
    """

    def __init__(self, sam: Any, model_type: Optional[str] = None, device: Any = "cpu"):
        try:
            from segment_anything import SamPredictor, sam_model_registry
        except ImportError as e:
            raise ImportError("SAM refinement needs the segment-anything package: pip install segment-anything "
                              "(or give no SAM checkpoint to use attention-only masks)") from e
        if isinstance(sam, (str, os.PathLike)):
            sam = _load_sam(os.fspath(sam), model_type, sam_model_registry)
        self.model = sam.to(device).eval()
        self.predictor = SamPredictor(self.model)

    @torch.no_grad()
    def refine(self, image: Any, masks: Tensor, anchors: Sequence[Optional[tuple[int, int]]],
               active: Sequence[bool]) -> tuple[Tensor, Tensor]:
        """(masks [k,h,w] bool, scores [k,h,w]) at latent size for the active concepts (others: all False / 0)."""
        array = image_array(image)
        k, h, w = masks.shape
        if array.shape[:2] != (h * LATENT_SCALE, w * LATENT_SCALE):
            raise MaskError(f"stage-1 image is {array.shape[1]}x{array.shape[0]}, expected "
                            f"{w * LATENT_SCALE}x{h * LATENT_SCALE} for latent masks of {w}x{h}")
        out_masks, out_scores = torch.zeros(k, h, w, dtype=torch.bool), torch.zeros(k, h, w)
        if not any(active):
            return out_masks, out_scores
        self.predictor.set_image(array)

        def px(yx: tuple[int, int]) -> list[float]:  # latent (y, x) -> pixel (x, y)
            return [(yx[1] + 0.5) * LATENT_SCALE, (yx[0] + 0.5) * LATENT_SCALE]

        for i in range(k):
            if not active[i]:
                continue
            ys, xs = torch.nonzero(masks[i].cpu(), as_tuple=True)
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32) * LATENT_SCALE
            others = [a for j, a in enumerate(anchors) if j != i and a is not None]
            coords = np.array([px(anchors[i])] + [px(a) for a in others], dtype=np.float32)
            labels = np.array([1] + [0] * len(others))
            logits, iou, _ = self.predictor.predict(point_coords=coords, point_labels=labels, box=box,
                                                    multimask_output=True, return_logits=True)
            logit = torch.as_tensor(np.asarray(logits[int(np.argmax(iou))]), dtype=torch.float32)[None, None]
            hard = (logit > self.model.mask_threshold).float()
            out_masks[i] = F.avg_pool2d(hard, LATENT_SCALE)[0, 0] >= 0.5  # majority of each 8x8 block
            out_scores[i] = F.avg_pool2d(logit.sigmoid(), LATENT_SCALE)[0, 0]
        return out_masks.to(masks.device), out_scores.to(masks.device)


def _load_sam(path: str, model_type: Optional[str], registry: dict) -> Any:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read a SAM checkpoint ({type(e).__name__}: {e})") from e
    key = "image_encoder.patch_embed.proj.weight"
    if not isinstance(sd, dict) or key not in sd:
        raise CheckpointError(f"{path}: not a segment-anything state dict (no key {key!r})")
    depth = len({k.split(".")[2] for k in sd if k.startswith("image_encoder.blocks.")})
    model_type = model_type or SAM_TYPES.get(depth)
    if model_type is not None and (model_type not in registry or model_type == "default"):
        raise CheckpointError(f"{path}: unknown SAM model_type {model_type!r}; expected one of "
                              f"{sorted(SAM_TYPES.values())} (vit_b 12 blocks, vit_l 24, vit_h 32) or None")
    with torch.device("meta"):  # no random init of 0.6B parameters only to overwrite them
        sam = registry[model_type]() if model_type is not None else _sam_from_shapes(path, sd)
        model_type = model_type or f"of {depth} blocks"
    try:
        sam.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit SAM {model_type}: {str(e)[:500]}") from e
    assert not any(t.is_meta for t in itertools.chain(sam.parameters(), sam.buffers())), "SAM tensor left on meta"
    return sam


def _sam_from_shapes(path: str, sd: dict) -> Any:
    """A segment-anything Sam of another size than vit_b/l/h (a small test model), its config read from the
    tensor shapes. Not in the shapes: the mask decoder's attention heads (SAM's 8, or 1 when the width is
    not divisible) and the image encoder's when it has no relative positions (SAM's 12)."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise CheckpointError(f"{path}: not a segment-anything state dict (no key {key!r})")
        return tuple(sd[key].shape)

    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    dim, _, patch, _ = shape("image_encoder.patch_embed.proj.weight")
    grid = shape("image_encoder.pos_embed")[1]
    depth = count("image_encoder.blocks.")
    rel = [shape(f"image_encoder.blocks.{i}.attn.rel_pos_h") if f"image_encoder.blocks.{i}.attn.rel_pos_h" in sd
           else None for i in range(depth)]
    use_rel = rel[0] is not None
    heads = dim // rel[0][1] if use_rel else 12
    global_blocks = tuple(i for i, r in enumerate(rel) if r is not None and r[0] == 2 * grid - 1)
    windows = [(r[0] + 1) // 2 for i, r in enumerate(rel) if r is not None and i not in global_blocks]
    mlp = shape("image_encoder.blocks.0.mlp.lin1.weight")[0]
    out_chans = shape("image_encoder.neck.0.weight")[0]
    width = shape("mask_decoder.iou_token.weight")[1]
    cross = shape("mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0]
    decoder_heads = 8 if cross % 8 == 0 else 1
    img_size = grid * patch
    return Sam(
        image_encoder=ImageEncoderViT(img_size=img_size, patch_size=patch, embed_dim=dim, depth=depth,
                                      num_heads=heads, mlp_ratio=mlp / dim, out_chans=out_chans, qkv_bias=True,
                                      use_rel_pos=use_rel, window_size=windows[0] if windows else 0,
                                      global_attn_indexes=global_blocks,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)),
        prompt_encoder=PromptEncoder(embed_dim=width, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size),
                                     mask_in_chans=shape("prompt_encoder.mask_downscaling.3.weight")[0]),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=shape("mask_decoder.mask_tokens.weight")[0] - 1, transformer_dim=width,
            iou_head_depth=count("mask_decoder.iou_prediction_head.layers."),
            iou_head_hidden_dim=shape("mask_decoder.iou_prediction_head.layers.0.weight")[0],
            transformer=TwoWayTransformer(depth=count("mask_decoder.transformer.layers."), embedding_dim=width,
                                          mlp_dim=shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
                                          num_heads=decoder_heads, attention_downsample_rate=width // cross)))


def image_array(image: Any) -> np.ndarray:
    """HxWx3 uint8 RGB array from a PIL image or a uint8 array/tensor (HxWx3 or 3xHxW)."""
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))  # a writable copy
    a = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise MaskError(f"image must be PIL or uint8 HxWx3, got {a.dtype} array of shape {a.shape}")
    return np.ascontiguousarray(a)
