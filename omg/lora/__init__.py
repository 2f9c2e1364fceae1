"""LoRA files of every common SDXL format, and per-concept weights.

    lora = load_lora("sks.safetensors")                   # kohya, PEFT/diffusers, LyCORIS LoCon/LoHa/LoKr, DoRA, full
    concept = ConceptWeights.merge(model.unet, (lora, 0.8))  # touched tensors only, merged in fp32
    with concept.applied(model.unet):                       # pointer swap, restored on exit
        eps = model.unet(x, t, context, y)
    with text_encoder_lora(model.text, (lora, 0.8)) as te:  # te1 / te2 modules, restored exactly
        context, pooled = te.encode([prompt])

Other modes: merge_lora_ / merged_lora (in place, exact restore from backups), UnmergedLora
(forward hooks, optionally on a batch slice) and GroupedLora (several concepts' factors on one shared base
model, each on its own rows of one batched call: what omg.generate's stage 2 uses by default). See merge.py
for the trade-offs between them.
"""
from omg.lora.adapters import Adapter, Full, LoHa, LoKr, LowRank
from omg.lora.formats import LoraFile, load_lora
from omg.lora.merge import (ConceptWeights, MergedLora, Patch, bind, merge_lora_, merged_lora, merged_tensor,
                            text_encoder_lora)
from omg.lora.grouped import GroupedLora
from omg.lora.targets import Target, target_table
from omg.lora.unmerged import UnmergedLora

__all__ = ["Adapter", "LowRank", "LoHa", "LoKr", "Full", "LoraFile", "load_lora", "ConceptWeights", "MergedLora",
           "Patch", "bind", "merge_lora_", "merged_lora", "merged_tensor", "text_encoder_lora", "Target",
           "target_table", "UnmergedLora", "GroupedLora"]
