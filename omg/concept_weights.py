"""How stage 2 holds the concept models: two strategies behind one interface (generate's `lora_mode`).

Each blending model call of stage 2 runs the base pass (replayed attention) and one pass per active concept
(its own weights and prompt). A strategy says which UNet calls do that (`passes`) and installs the weights of
a call's role while it runs (`applied`):

- GroupedWeights ("grouped"): the base weights are shared and each concept keeps only its LoRA factors
  (omg.lora.GroupedLora); each concept's low-rank delta goes to its own rows, so when every prompt encodes to
  the same number of tokens the base pass and all concept passes are one UNet call.
- MergedWeights ("merged"): each concept's touched tensors merged (omg.lora.ConceptWeights), swapped in for a
  call of its own.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager, Optional, Sequence, Union

from torch import nn

from omg.lora import ConceptWeights, GroupedLora, Patch


@dataclass(frozen=True)
class BaseWeights:
    """The base model's own weights."""


@dataclass(frozen=True)
class MergedConcept:
    """Active concept `concept`'s merged tensors swapped in."""
    concept: int


@dataclass(frozen=True)
class GroupedRows:
    """Grouped LoRA deltas: rows [0, first_row) untouched (the base pass), then each member's row block."""
    first_row: int
    members: range


@dataclass(frozen=True)
class FaceRows:
    """InstantID concepts (positions in the active list): the base weights, their face tokens and IdentityNet."""
    concepts: tuple[int, ...]


# whose weights a UNet call runs (a CUDA graph per role)
Role = Union[BaseWeights, MergedConcept, GroupedRows, FaceRows]


@dataclass(frozen=True)
class UNetPass:
    """One UNet call of a blending step: the base rows first (when `base`), then [uncond; cond] rows of each
    active concept in `concepts` (positions in the active list), under the weights of `role`."""
    role: Role
    base: bool
    concepts: tuple[int, ...]


class StageTwoWeights(ABC):
    """The concept models of stage 2, for the active concepts (those found in some image), in order."""

    @abstractmethod
    def passes(self, count: int, base_rows: int, one_call_possible: bool) -> list[UNetPass]:
        """The UNet calls of one blending step for `count` active concepts after `base_rows` base rows;
        one_call_possible: every prompt's conditioning has the same shape (so they can share a batch)."""

    @abstractmethod
    def applied(self, role: Role) -> ContextManager:
        """The role's weights installed on the UNet for the duration of a with-block."""

    @abstractmethod
    def identity(self) -> Optional[tuple]:
        """The objects holding what the roles install (compared by identity): a CUDA graph recorded under them reads
        those tensors (omg.graphs.KeptGraphs replays stage 2's graphs for weights of the same identity, and keeps
        them alive); None: made anew by each generate call, so stage 2's graphs are not kept."""


def _separate_passes(count: int, concept_role) -> list[UNetPass]:
    return [UNetPass(BaseWeights(), True, ())] + [UNetPass(concept_role(j), False, (j,)) for j in range(count)]


class GroupedWeights(StageTwoWeights):
    """Every concept's LoRA factors on the shared base UNet (rows_per_concept: [uncond; cond] x images); merge_linears:
    merged copies of the patched Linear layers on the concepts' rows (omg.lora.GroupedLora)."""

    def __init__(self, unet: nn.Module, patches: Sequence[Optional[dict[str, list[Patch]]]], images: int = 1,
                 merge_linears: bool = False):
        self.lora = GroupedLora(unet, list(patches), rows_per_concept=2 * images, merge_linears=merge_linears)

    def passes(self, count: int, base_rows: int, one_call_possible: bool) -> list[UNetPass]:
        if one_call_possible:
            return [UNetPass(GroupedRows(base_rows, range(count)), True, tuple(range(count)))]
        return _separate_passes(count, lambda j: GroupedRows(0, range(j, j + 1)))

    def applied(self, role: Role) -> ContextManager:
        if isinstance(role, GroupedRows):
            return self.lora.installed(role.first_row, role.members)
        return nullcontext()

    def identity(self) -> tuple:  # the stacked factors are kept for the same LoRAs (omg.lora.grouped)
        return ("grouped", self.lora.rows_per_concept) + tuple(self.lora.layers.items())


class MergedWeights(StageTwoWeights):
    """Each active concept's merged tensors (None: a concept without LoRA runs the base weights)."""

    def __init__(self, unet: nn.Module, weights: Sequence[Optional[ConceptWeights]]):
        self.unet, self.weights = unet, list(weights)

    def passes(self, count: int, base_rows: int, one_call_possible: bool) -> list[UNetPass]:
        return _separate_passes(count, MergedConcept)

    def applied(self, role: Role) -> ContextManager:
        if isinstance(role, MergedConcept) and self.weights[role.concept] is not None:
            return self.weights[role.concept].applied(self.unet)  # a captured graph keeps these tensors' pointers
        return nullcontext()

    def identity(self) -> Optional[tuple]:  # merged anew by each generate call (keeping them would hold gigabytes)
        return None
