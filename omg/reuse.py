"""What a generate call keeps for the next one, so that a repeated render (the same concepts and prompts, another
seed) redoes none of its setup: the LoRA files it read, their patches bound to the UNet and the prompts' encodings.

    reuse = Reuse.begin()                        # what the last call kept, for this one
    loras = reuse.loras(concepts)                 # files read again only when changed on disk
    patches = reuse.bound(unet, lora, scale)      # omg.lora.bind, once per UNet, file and scale
    encoded = reuse.encodings(weights_key(text), loras)  # SDXL.conditioning's `encoded` for these weights
    reuse.keep()                                  # this call's, for the next (the last call's are dropped)

Each is held until the next call has made its own: only what that call used again survives it. The stacked LoRA
factors and merged copies are kept by omg.lora.grouped, stage 2's CUDA graphs by omg.graphs; `release(model)`
frees all of it.
"""
from __future__ import annotations

import os
import weakref
from typing import ClassVar, Optional, Sequence

from torch import nn

from omg.graphs import release_graphs
from omg.lora import LoraFile, bind, load_lora
from omg.lora.grouped import release_kept
from omg.lora.merge import Patch


def weights_key(module: nn.Module) -> tuple:
    """What identifies a module's current weights: each parameter's device, address and version counter (bumped by
    every in-place write, e.g. a LoRA merged in place); a tensor swapped in has another address."""
    return tuple((p.device, p.data_ptr(), p._version) for p in module.parameters())


def release(model: nn.Module) -> None:
    """Free all that generate keeps on a model (an omg.SDXL or its UNet) for its next call: the CUDA graphs and the
    replay store they write (omg.graphs), the concepts' merged copies and stacked factors (omg.lora.grouped), and the
    last call's LoRA files, bound patches and prompt encodings."""
    unet = getattr(model, "unet", model)
    release_graphs(unet)
    release_kept(unet)
    Reuse._last = None


class Reuse:
    """One generate call's view of what the last call kept (see the module doc)."""

    _last: ClassVar[Optional["Reuse"]] = None

    def __init__(self, last: Optional["Reuse"] = None):
        self._files: dict[tuple, LoraFile] = {}
        # by (id(unet), id(lora), scale): (a weak reference to the UNet, the LoraFile (alive, so its id is not
        # another's), the patches)
        self._bound: dict[tuple, tuple[weakref.ref, LoraFile, dict[str, list[Patch]]]] = {}
        # by (the base text encoder's weights_key, (id, scale) of the LoRAs merged on it for the encoding): (those
        # LoRAs, alive, and SDXL.conditioning's `encoded` dict: encodings by prompts and padding)
        self._encodings: dict[tuple, tuple[list, dict]] = {}
        self._last = last

    @classmethod
    def begin(cls) -> "Reuse":
        return cls(cls._last)

    def keep(self) -> None:
        """This call's for the next call (the last call's are dropped)."""
        self._last, Reuse._last = None, self

    def loras(self, concepts: Sequence) -> list[Optional[LoraFile]]:
        """Each concept's LoRA (a path read, a LoraFile as given, None): a file read by the last call is read again
        only when its real path, size or modification time changed."""
        out: list[Optional[LoraFile]] = []
        for c in concepts:
            if c.lora is None or isinstance(c.lora, LoraFile):
                out.append(c.lora)
                continue
            st = os.stat(c.lora)
            key = (os.path.realpath(c.lora), st.st_size, st.st_mtime_ns)
            lora = self._files.get(key) or (self._last._files.get(key) if self._last else None) or load_lora(c.lora)
            self._files[key] = lora
            out.append(lora)
        return out

    def bound(self, unet: nn.Module, lora: LoraFile, scale: float) -> dict[str, list[Patch]]:
        """omg.lora.bind(unet, (lora, scale)): the matching depends only on the UNet's module tree (which
        omg.lora.target_table also takes as fixed) and the file, so it is made once for them."""
        key = (id(unet), id(lora), scale)
        found = self._bound.get(key) or (self._last._bound.get(key) if self._last else None)
        if found is None or found[0]() is not unet:
            found = (weakref.ref(unet), lora, bind(unet, (lora, scale)))
        self._bound[key] = found
        return found[2]

    def encodings(self, key: tuple, loras: Sequence[tuple[LoraFile, float]] = ()) -> dict:
        """The `encoded` dict of SDXL.conditioning for the text encoder whose weights_key (before any LoRA is merged
        on it) is `key`, with `loras` merged: the same prompts are encoded once for it across calls."""
        full = (key, tuple((id(lora), scale) for lora, scale in loras))
        found = self._encodings.get(full) or (self._last._encodings.get(full) if self._last else None)
        if found is None:
            found = (list(loras), {})
        self._encodings[full] = found
        return found[1]
