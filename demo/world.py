"""The demo world's prompts and sampling settings, in one place: bench/world.py, bench/quality.py and the demo
spec (weights/demo/demo.yaml) use what the shipped model was trained with."""
from __future__ import annotations

from typing import Sequence

from demo.scenes import CONCEPTS, article

# The model was trained with captions dropped to all-zero embeddings (not to a negative prompt), so the
# unconditional branch is the zero embedding; a small model wants a moderate guidance scale.
SAMPLING = {"negative_prompt": None, "guidance": 5.0}
LORA_SCALE = 1.0  # the LoRAs were trained at alpha / rank = 1
BLEND_FRACTION = 0.7  # OMG blends over the last 70 % of the steps (the paper's 35 of 50)


def concept_prompt(concept: str, background: str) -> str:
    """'a sks ball on a grey background': the concept's own prompt, as its LoRA was trained (scenes.caption_for)."""
    phrase = CONCEPTS[concept].phrase
    return f"{article(phrase)} {phrase} on {article(background)} {background} background"


def plain_prompt(concept: str, background: str) -> str:
    """'a red ball on a grey background': the concept's class and colour, no identifier."""
    spec = CONCEPTS[concept]
    return f"{article(spec.colour)} {spec.colour} {spec.class_name} on {article(background)} {background} background"


def global_prompt(concepts: Sequence[str], background: str) -> str:
    """'a red ball and a blue box on a green background': stage 1's prompt for a set of concepts, naming each
    one's class and colour (the coarse look), back to front."""
    parts = [f"{article(CONCEPTS[c].colour)} {CONCEPTS[c].colour} {CONCEPTS[c].class_name}" for c in concepts]
    names = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{names} on {article(background)} {background} background"
