"""The README's demo-world pictures, regenerated from the shipped weights:

    python -m demo.pictures [--out docs]

- demo_world.png: ground-truth training scenes (top) and the three concepts with their plain classes (bottom);
- demo_generate.png: a bare `omg generate` (the demo spec, on the CPU): stage 1, its masks, the OMG image.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

from PIL import Image

from demo.scenes import CONCEPTS, base_scenes, concept_images


def strip(images: Sequence[Image.Image], rows: int = 1) -> Image.Image:
    """Images of one size in a grid of `rows` rows, left to right, top to bottom."""
    cols = -(-len(images) // rows)
    w, h = images[0].size
    out = Image.new("RGB", (w * cols, h * rows), "white")
    for i, im in enumerate(images):
        out.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return out


def world_picture(size: int = 256) -> Image.Image:
    scenes = [s.image for s in base_scenes(6, size, seed=21)]
    concepts = []
    for name in sorted(CONCEPTS):
        concepts += [concept_images(name, 1, size, seed=3)[0].image,
                     concept_images(name, 1, size, seed=3, plain=True)[0].image]
    return strip(scenes + concepts, rows=2)


def generate_picture() -> tuple[Image.Image, float]:
    """(stage 1 | masks | OMG) of a bare `omg generate`, and its wall time in seconds."""
    from omg import cli

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.png")
        t0 = time.perf_counter()
        if cli.main(["generate", "--out", out, "--save-masks", "--no-progress"]) != 0:
            raise SystemExit("omg generate failed")
        seconds = time.perf_counter() - t0
        names = ["out_stage1.png", "out_masks.png", "out.png"]
        return strip([Image.open(os.path.join(tmp, n)).copy() for n in names]), seconds


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    world_picture().save(os.path.join(args.out, "demo_world.png"))
    picture, seconds = generate_picture()
    picture.save(os.path.join(args.out, "demo_generate.png"))
    print(f"wrote {args.out}/demo_world.png, {args.out}/demo_generate.png (omg generate: {seconds:.1f} s)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
