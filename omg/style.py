"""Style LoRAs: a global look applied to the base model and to every concept model (the original's style_lora).

The original loads the style LoRA as one more adapter in both of its pipelines and runs the concept passes with
``set_adapters([concept, "style"], adapter_weights=[0.7, 0.5])``. Here each style LoRA, with its own scale, is
merged into the base UNet's weights for the duration of a generate call (restored bit for bit afterwards), so
stage 1, stage 2's base pass and every concept model (base + style + concept) see it, and in the grouped stage 2
all rows share it: no per-concept copy of its deltas. Its text-encoder modules apply to every prompt.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence, Union

from torch import nn

from omg.errors import OptionError
from omg.lora import LoraFile, load_lora, merge_lora_

DEFAULT_STYLE_SCALE = 0.5  # the original's style adapter weight (its concepts then run at 0.7)


@dataclass(frozen=True)
class StyleLora:
    """One style LoRA and its scale."""

    lora: Any  # a LoRA file path or a loaded omg.lora.LoraFile
    scale: float = DEFAULT_STYLE_SCALE

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise OptionError(f"style LoRA scale must be a number, got {self.scale!r}")
        if not isinstance(self.lora, (str, os.PathLike, LoraFile)):
            raise OptionError(f"a style LoRA must be a path or an omg.lora.LoraFile, got {type(self.lora).__name__}")

    @classmethod
    def parse(cls, value: Union[str, Mapping[str, Any], tuple, "StyleLora", LoraFile]) -> "StyleLora":
        """'FILE[:scale]', {"lora": FILE, "scale": s}, (FILE, scale), a LoraFile or a StyleLora."""
        if isinstance(value, StyleLora):
            return value
        if isinstance(value, (LoraFile, os.PathLike)):
            return cls(value)
        if isinstance(value, tuple) and len(value) == 2:
            return cls(*value)
        if isinstance(value, Mapping):
            if "lora" not in value or set(value) - {"lora", "scale"}:
                raise OptionError(f"a style LoRA needs 'lora' (and optionally 'scale'), got {sorted(value)}")
            return cls(**value)
        if not isinstance(value, str) or not value.strip():
            raise OptionError(f"style LoRA {value!r}: expected 'FILE[:scale]'")
        head, _, tail = value.strip().rpartition(":")
        if head:
            try:
                return cls(head, float(tail))
            except ValueError:
                pass  # a colon inside the path
        return cls(value.strip())

    def describe(self) -> dict[str, Any]:
        lora = self.lora.path if isinstance(self.lora, LoraFile) else os.fspath(self.lora)
        return {"lora": lora, "scale": self.scale}


def load_styles(styles: Sequence[StyleLora]) -> list[tuple[LoraFile, float]]:
    """The style LoRA files read (and checked) before any weight is touched: [(LoraFile, scale), ...]."""
    return [(s.lora if isinstance(s.lora, LoraFile) else load_lora(s.lora), float(s.scale)) for s in styles]


@contextmanager
def style_merged(unet: nn.Module, styles: Sequence[tuple[LoraFile, float]]) -> Iterator[nn.Module]:
    """The UNet with the style LoRAs merged into its weights for the with-block, restored exactly afterwards.

    The originals of the touched tensors are kept on the CPU: the GPU holds no second copy of them."""
    if not styles:
        yield unet
        return
    handle = merge_lora_(unet, list(styles), backup_device="cpu")
    try:
        yield unet
    finally:
        handle.restore()
