"""omg: occlusion-friendly multi-concept generation with SDXL, in PyTorch + Triton.

    model = omg.load_sdxl("sd_xl_base_1.0.safetensors", device="cuda", dtype=torch.float16)
    result = omg.generate(model, "a man and a woman in a park",
                          [omg.Concept("man", "a photo of sks man", lora="sks.safetensors"), ...],
                          omg.OMGOptions.paper(seed=3))
"""
from omg.control import Control
from omg.controlnet import load_controlnet
from omg.model import SDXL, load_sdxl
from omg.options import OMGOptions

__version__ = "0.1.0"  # setup.py reads it here

__all__ = ["SDXL", "load_sdxl", "OMGOptions", "Concept", "Control", "load_controlnet", "Result", "generate",
           "check_request", "StepEvent", "latent_preview", "sample", "regional_sample", "release_graphs",
           "release"]


def __getattr__(name: str):
    # the samplers pull in the text stack (transformers, open_clip): import them on first use
    if name in ("Concept", "Result", "generate"):
        from omg import pipeline
        return getattr(pipeline, name)
    if name == "release":  # everything generate keeps on a model for its next call (omg.reuse)
        from omg.reuse import release
        return release
    if name == "release_graphs":
        from omg.graphs import release_graphs
        return release_graphs
    if name == "check_request":
        from omg.pipeline import check_request
        return check_request
    if name == "StepEvent":
        from omg.callbacks import StepEvent
        return StepEvent
    if name == "latent_preview":
        from omg.preview import latent_preview
        return latent_preview
    if name == "sample":
        from omg.txt2img import sample
        return sample
    if name == "regional_sample":  # the Mix-of-Show-style baseline (omg.regional)
        from omg.regional import regional_sample
        return regional_sample
    raise AttributeError(f"module 'omg' has no attribute {name!r}")
