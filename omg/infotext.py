"""The "parameters" text of AUTOMATIC1111's web UI, which civitai and image viewers parse:

    a red ball and a blue box on a green background
    Negative prompt: blurry
    Steps: 30, Sampler: DDIM, CFG scale: 5.0, Seed: 1, Size: 256x256, Model hash: 1a2b3c4d5e, Model: demo_sdxl,
    Lora hashes: "sks_ball: 0123456789ab, bnha_box: ba9876543210", OMG concepts: "ball: a sks ball <lora:sks_ball:1.0>;
    box: ...", OMG blend steps: 21, Version: omg 0.1.0

(the last part one line). Values holding a comma, colon or newline are JSON-quoted, as A1111's infotext does.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

# omg's sampler names -> A1111's (modules/sd_samplers_kdiffusion.py)
A1111_SAMPLERS = {"ddim": "DDIM", "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
                  "dpm_2_ancestral": "DPM2 a", "lms": "LMS", "dpmpp_2s_ancestral": "DPM++ 2S a",
                  "dpmpp_sde": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
                  "dpmpp_3m_sde": "DPM++ 3M SDE"}


@dataclass(frozen=True)
class LoraInfo:
    """A concept as the infotext names it: class noun, prompt, LoRA name (file stem), scale and short hash."""
    class_name: str
    prompt: str
    name: Optional[str] = None
    scale: float = 1.0
    hash: Optional[str] = None


def quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def model_name(path: Optional[str]) -> Optional[str]:
    """A1111's "Model": the checkpoint's file name without extension (a folder's name for diffusers folders)."""
    if path is None:
        return None
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def a1111_parameters(prompt: str, options: Any, seed: int, model: Optional[str] = None,
                     model_hash: Optional[str] = None, concepts: Sequence[LoraInfo] = (),
                     version: Optional[str] = None) -> str:
    """The infotext of one image of a run with `options` (an omg.OMGOptions) and `seed`."""
    lines = [prompt]
    if options.negative_prompt:  # None: zero uncond embeddings, which A1111 writes as no negative prompt
        lines.append(f"Negative prompt: {options.negative_prompt}")
    fields: list[tuple[str, Any]] = [
        ("Steps", options.steps), ("Sampler", A1111_SAMPLERS.get(options.sampler, options.sampler)),
        ("Schedule type", "Karras" if options.spacing == "karras" else None),
        ("CFG scale", options.guidance), ("Seed", seed), ("Size", f"{options.width}x{options.height}"),
        ("Model hash", model_hash), ("Model", model),
        ("CFG rescale", options.guidance_rescale or None),
        ("Lora hashes", ", ".join(f"{c.name}: {c.hash}" for c in concepts if c.name and c.hash) or None),
        ("OMG concepts", "; ".join(f"{c.class_name}: {c.prompt}" + (f" <lora:{c.name}:{c.scale:g}>" if c.name else "")
                                   for c in concepts) or None),
        ("OMG blend steps", options.blend_steps), ("Timestep spacing", options.spacing),
        ("Version", f"omg {version}" if version else None),
    ]
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields if value is not None))
    return "\n".join(lines)
