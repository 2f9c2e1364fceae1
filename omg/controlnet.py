"""The SDXL ControlNet (Zhang et al. 2023), written from scratch in the UNet's SGM layout, and its loader.

A ControlNet is a trainable copy of the UNet's encoder half and middle block. The condition image (pose
skeleton, edge or depth map) is embedded by a small convolutional net (``input_hint_block``) to the latent
size and added after the first convolution; every skip connection and the middle block's output then go
through a zero-initialised 1x1 convolution (``zero_convs``, ``middle_block_out``), and the results, times the
conditioning scale, are added to the UNet's skip connections and middle block (omg.unet.ControlResiduals).

    controlnet = load_controlnet("controlnet-openpose-sdxl-1.0", device="cuda", dtype=torch.float16)
    hint = controlnet.encode_hint(image)                      # (1, 3, H, W) in [0, 1] -> (1, 320, H/8, W/8)
    residuals = controlnet(x, t, context, y, hint, scale=0.8)
    eps = unet(x, t, context, y, control=residuals)

Files: diffusers folders (config.json + diffusion_pytorch_model.safetensors, as diffusers/controlnet-canny-sdxl-1.0
and thibaud/controlnet-openpose-sdxl-1.0 publish them), single .safetensors files with diffusers keys
(OpenPoseXL2.safetensors, diffusers_xl_*_full.safetensors) or with the original code's keys (input_hint_block,
zero_convs, middle_block_out; optionally under control_model.). The config comes from the shapes; every key
and shape is checked on the meta device before any tensor is read (omg.checkpoint).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from omg import checkpoint, keymap
from omg.errors import CheckpointError, ModelError
from omg.tensorfile import PathLike, TensorSource, _first, open_source
from omg.unet import (Attention, ControlResiduals, UNetConfig, embed, encoder_blocks, in_layout_of, middle_block,
                      preferred_memory_format, time_embeddings)


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig = field(default_factory=UNetConfig.sdxl)  # the encoder half's fields (out_channels unused)
    hint_channels: int = 3  # channels of the condition image
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)  # the condition embedding's levels, each halving

    @classmethod
    def sdxl(cls) -> "ControlNetConfig":
        """The published SDXL base 1.0 ControlNets (openpose, canny, depth): the full encoder of SDXL."""
        return cls()

    @classmethod
    def tiny(cls, unet: Optional[UNetConfig] = None) -> "ControlNetConfig":
        """A ControlNet for the tiny test UNet (or for `unet`)."""
        return cls(unet or UNetConfig.tiny(), hint_block_channels=(8, 8, 16, 16))

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], head_dim: int = 64, norm_groups: int = 32) -> "ControlNetConfig":
        """Infer the config from tensor shapes (SGM keys, no prefix); KeyError for a key every ControlNet has."""
        unet = UNetConfig.from_state_dict(sd, head_dim=head_dim, norm_groups=norm_groups)
        convs = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)))
        if not convs:
            raise KeyError("input_hint_block.0.weight")
        first = sd[f"input_hint_block.{convs[0]}.weight"]
        # convs: the first, then (same width, stride 2 to the next width) per level, then the last to model_channels
        widths = (first.shape[0],) + tuple(sd[f"input_hint_block.{i}.weight"].shape[0] for i in convs[2:-1:2])
        return cls(unet, hint_channels=first.shape[1], hint_block_channels=widths)


def hint_encoder(hint_channels: int, widths: tuple[int, ...], out_channels: int) -> nn.Sequential:
    """The condition embedding (SGM input_hint_block): conv, SiLU, then per level a conv and a stride-2 conv to the
    next width (each with SiLU), then a conv to the UNet's width: (B, 3, H, W) -> (B, C, H/8, W/8) for 4 widths."""
    layers: list[nn.Module] = [nn.Conv2d(hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for now, nxt in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(now, now, 3, padding=1), nn.SiLU(), nn.Conv2d(now, nxt, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(widths[-1], out_channels, 3, padding=1))
    return nn.Sequential(*layers)


class ControlNet(nn.Module):
    """SDXL ControlNet: residuals = controlnet(x, timesteps, context, y, hint_features, scale)."""

    def __init__(self, config: ControlNetConfig = ControlNetConfig()):
        super().__init__()
        self.config = config
        cfg = config.unet
        self.time_embed, self.label_emb = time_embeddings(cfg)
        self.input_hint_block = hint_encoder(config.hint_channels, config.hint_block_channels, cfg.model_channels)
        self.input_blocks, skip_channels = encoder_blocks(cfg)
        self.zero_convs = nn.ModuleList([nn.Sequential(nn.Conv2d(c, c, 1)) for c in skip_channels])
        self.middle_block = middle_block(cfg)
        width = cfg.model_channels * cfg.channel_mult[-1]
        self.middle_block_out = nn.Sequential(nn.Conv2d(width, width, 1))
        for name, module in self.named_modules():
            if isinstance(module, Attention):
                module.path = name

    @property
    def hint_downscale(self) -> int:
        """Pixels of the condition image per latent pixel (8 for SDXL's)."""
        return 2 ** (len(self.config.hint_block_channels) - 1)

    def encode_hint(self, image: Tensor) -> Tensor:
        """(B, hint_channels, H, W) condition image in [0, 1] -> its embedding (B, model_channels, H/8, W/8).

        It depends on the image alone: compute it once per run, not once per step."""
        dtype = next(self.parameters()).dtype
        return self.input_hint_block(image.to(dtype))

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor, hint_features: Tensor,
                scale: float = 1.0) -> ControlResiduals:
        """x (B, C, h, w) latents; hint_features (B or 1, C, h, w) from encode_hint; the rest as for the UNet.

        Guess mode off: every row gets the residuals of its own prompt, times `scale` (diffusers' conditioning_scale).
        """
        emb = embed(self.time_embed, self.label_emb, x, timesteps, y)
        context = context.to(x.dtype)
        x, hint_features = (in_layout_of(self.input_blocks[0][0], t) for t in (x, hint_features.to(x.dtype)))
        h = self.input_blocks[0](x, emb, context) + hint_features  # (B, 320, h, w)
        skips = [self.zero_convs[0](h)]
        for block, zero_conv in zip(self.input_blocks[1:], self.zero_convs[1:]):
            h = block(h, emb, context)
            skips.append(zero_conv(h))  # (B, C_l, h_l, w_l): what the UNet's skip connection l gets
        middle = self.middle_block_out(self.middle_block(h, emb, context))
        return ControlResiduals([s * scale for s in skips], middle * scale)


# ---------------------------------------------------------------------------------------------- files

def _layout(source: TensorSource) -> tuple[str, str]:
    """("diffusers" | "sgm", key prefix) of a ControlNet file, or a CheckpointError saying what the file is."""
    keys = source.keys()
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "diffusers", ""
    for prefix in ("", keymap.CONTROLNET_SGM_PREFIX):
        if prefix + "input_hint_block.0.weight" in keys:
            return "sgm", prefix
    if any(k.startswith(keymap.SGM_PREFIXES["unet"]) or k.startswith(("output_blocks.", "up_blocks.")) for k in keys):
        what = "an SDXL/UNet checkpoint (it has a decoder half)"
    elif any("lora" in k for k in keys[:200]):
        what = "a control-LoRA or LoRA file (low-rank factors), not a full ControlNet"
    elif any(k.startswith("adapter.") or k.startswith("body.") for k in keys):
        what = "a T2I-Adapter, not a ControlNet"
    else:
        what = "an unknown layout"
    raise CheckpointError(f"{source.path}: not a ControlNet: {what}; found {len(keys)} keys like {_first(keys[:4])}. "
                          f"Expected controlnet_cond_embedding.conv_in.weight (diffusers) or input_hint_block.0.weight "
                          f"(original layout)")


def _reject_other_bases(path: str, source: TensorSource, keys: list[str], label: str, to_k: list[str]) -> None:
    """SD 1.x/2.x ControlNets have no SDXL vector embedding and another text width: say so, before any shapes."""
    found = []
    if label not in keys:
        found.append(f"no {label} (SDXL's 2816-d vector embedding)")
        if to_k:
            width = source.meta(to_k[0]).shape[-1]
            era = {768: "SD 1.x", 1024: "SD 2.x"}.get(width, "not SDXL")
            found.append(f"text context width {width} ({era}; SDXL has 2048)")
    if found:
        raise CheckpointError(f"{path}: not an SDXL ControlNet: found " + "; ".join(found))


def controlnet_checkpoint(source: TensorSource, path: str, config: Optional[Mapping[str, Any]] = None
                          ) -> checkpoint.Checkpoint:
    """A ControlNet's tensors as a one-part Checkpoint ("controlnet"), its layout detected; config: the contents
    of a diffusers config.json (only what shapes cannot tell is read from it: head width, group count)."""
    layout, prefix = _layout(source)
    keys = source.keys()
    # what shapes cannot tell: a folder's config.json, else a file's metadata as omg writes it (omg.config)
    hints = checkpoint._hints_from_metadata(path, source.metadata).get("controlnet", {})
    if layout == "diffusers":
        _reject_other_bases(path, source, keys, "add_embedding.linear_1.weight",
                            [k for k in keys if k.endswith("attn2.to_k.weight")])
        recipes, unmapped = keymap.controlnet_recipes_from_diffusers(keys)
        hints = checkpoint._diffusers_unet_hints(path, dict(config)) if config else hints
        naming = keymap.UNetNaming.from_diffusers_keys(keys)
        back = {target: " + ".join(r.sources) for target, r in recipes.items()}

        def file_name(k: str) -> str:
            return back.get(k) or keymap.unet_sgm_name_to_diffusers(k, naming) or k
    else:
        own = [k for k in keys if k.startswith(prefix)]
        _reject_other_bases(path, source, own, prefix + "label_emb.0.0.weight",
                            [k for k in own if k.endswith("attn2.to_k.weight")])
        recipes = {k[len(prefix):]: keymap.Recipe((k,)) for k in own}
        unmapped = [k for k in keys if not k.startswith(prefix)]

        def file_name(k: str) -> str:
            return prefix + k
    part = checkpoint.Part("controlnet", source, recipes, unmapped, file_name, hints)
    return checkpoint.Checkpoint(path, f"controlnet-{layout}", {"controlnet": part}, [source])


def open_controlnet(path: PathLike) -> checkpoint.Checkpoint:
    """A ControlNet file (.safetensors, .bin) or diffusers folder (config.json + weights), its layout detected."""
    path = os.fspath(path)
    folder = os.path.isdir(path)
    source = checkpoint._component_source(path) if folder else open_source(path)
    try:
        config_path = os.path.join(path, "config.json")
        config = checkpoint._read_json(config_path) if folder and os.path.isfile(config_path) else None
        return controlnet_checkpoint(source, path, config)
    except CheckpointError:
        source.close()
        raise


def check_controlnet(path: PathLike) -> ControlNetConfig:
    """Validate a ControlNet file (layout, every key and shape, on the meta device: no tensor is read); its config."""
    with open_controlnet(path) as ckpt:
        return checkpoint.plan_checkpoint(ckpt)["controlnet"].config


def load_controlnet(path: PathLike, device: Union[str, torch.device] = "cpu",
                    dtype: torch.dtype = torch.float16) -> ControlNet:
    """Load a ControlNet (diffusers folder, or a single file in diffusers or the original layout), strictly."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelError(f"dtype must be a floating torch.dtype, not {dtype!r}")
    with open_controlnet(path) as ckpt:
        plans = checkpoint.plan_checkpoint(ckpt)
        controlnet = checkpoint.materialize(plans["controlnet"], torch.device(device), dtype)
    return controlnet.to(memory_format=preferred_memory_format(device))


def save_controlnet(controlnet: ControlNet, path: PathLike) -> None:
    """Write a ControlNet as one .safetensors in the original layout, with the head width and group count (which
    the shapes leave out) in its metadata; atomic (temp file + rename)."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    from omg.atomic import atomic_path
    tensors = {k: t.detach().contiguous().cpu() for k, t in controlnet.state_dict().items()}
    cfg = controlnet.config.unet
    metadata = {"omg.config": json.dumps({"controlnet": {"head_dim": cfg.head_dim, "norm_groups": cfg.norm_groups},
                                          "controlnet_config": dataclasses.asdict(controlnet.config)})}
    with atomic_path(os.fspath(path), ".safetensors.tmp") as tmp:
        save_file(tensors, tmp, metadata=metadata)
