"""The demo world's gates: is it a world in which OMG's claim can be measured? One script, one JSON.

    python -m bench.world [--weights weights/demo] [--n 48] [--steps 50]

Every gate is measured on held-out seeds (never the training scenes) with the demo's sampling settings
(demo.world.SAMPLING: DDIM, zero unconditional embeddings) and the identity classifier of bench/identity.py
(trained only on ground-truth scenes). Writes bench/results/world_<gpu>.json with a top-level `gates`
object (name -> {value, threshold, pass}) and the raw per-concept figures.

- vae_psnr_plain / vae_psnr_concepts: autoencoder round trip of plain scenes / concept images (dB).
- text_loss_ratio: diffusion loss with each caption given to another scene, over the loss with the right
  captions, minus 1, for t in [500, 950] (fixed noise): how much the model uses its text.
- prompt_following: images sampled from held-out captions whose every object has a window that the
  classifier labels with that class (or one of its concepts) and that colour, and whose border has the
  background's colour.
- attention_iou: on noised ground-truth scenes (every timestep of the sampling schedule, fixed noise), the
  pipeline's own class-token masks (omg.masks.make_masks over the captured heat maps) against the visible
  ground-truth masks; class_map_correlation: Pearson correlation of two different classes' heat maps;
  same_class_split: scenes of two objects of one class ("a red ball and a yellow ball") whose two masks
  land on the two different objects.
- lora_identity_<concept>: each LoRA with its own prompt ("a sks ball on a grey background"), identity hit
  rate (classifier identity >= 0.5); lora_plain_prompt_<concept>: the same LoRA with the plain class prompt
  ("a red ball on ..."): hit rate, which must stay low (the identity is bound to the identifier).
- late_identity_<concept>: stage 1 the plain class prompt, stage 2 the concept over a whole-image mask for
  the last 70 % of the steps (omg.generate): mean identity over the concept model's own sample's.
- chance_identity: mean identity of each concept in images of the base model alone (no LoRA) whose prompt
  names the concept's class and colour.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import omg
from bench.common import write_json
from bench.identity import (CLASSES, COLOUR_NAMES, LABELS, ClassifierConfig, IdentityNet, grid_windows,
                            load_or_train, predict, score_concepts, to_tensor, vae_round_trip)
from demo.scenes import BACKGROUNDS, CONCEPTS, Scene, base_scenes, concept_images, render_scene
from demo.world import BLEND_FRACTION, LORA_SCALE, SAMPLING, concept_prompt, plain_prompt
from omg.attention import AttentionControl, RowLayout
from omg.lora import load_lora, merged_lora
from omg.masks import concept_token_indices, make_masks, token_heatmaps
from omg.sampling import NoiseSchedule
from omg.txt2img import sample

THRESHOLDS = {"vae_psnr_plain": (">=", 28.0), "vae_psnr_concepts": (">=", 28.0), "text_loss_ratio": (">=", 0.15),
              "prompt_following": (">=", 0.8), "attention_iou": (">=", 0.5), "class_map_correlation": ("<", 0.5),
              "same_class_split": (">=", 0.8), "lora_identity": (">=", 0.8), "lora_plain_prompt": ("<", 0.2),
              "late_identity": (">=", 0.8), "chance_identity": ("<=", 0.1)}


def gate(name: str, value: float) -> dict:
    op, threshold = THRESHOLDS[name.split(":")[0]]
    ok = {">=": value >= threshold, "<": value < threshold, "<=": value <= threshold}[op]
    return {"value": round(float(value), 4), "threshold": f"{op} {threshold}", "pass": bool(ok)}


# ---------------------------------------------------------------------------------------------- VAE and text

@torch.no_grad()
def psnr(vae, images: torch.Tensor) -> float:
    """Mean PSNR (dB, 8-bit quantised round trip) of images (B, 3, H, W) in [-1, 1]."""
    rec = vae_round_trip(vae, images.to(next(vae.parameters()).device)).cpu()
    mse = ((rec - images) / 2).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((-10 * torch.log10(mse)).mean())


@torch.no_grad()
def caption_loss_ratio(model, scenes: Sequence[Scene], size: int) -> tuple[float, float]:
    """(loss with the right captions, loss with rotated captions) at t spread over [500, 950], fixed noise."""
    device = model.device
    images = torch.stack([to_tensor(s.image) for s in scenes]).to(device)
    latents = model.vae.encode(images).float()  # scaled latents
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(latents.shape, generator=g).to(device)
    t = torch.linspace(500, 950, len(scenes)).round().long().to(device)
    a = NoiseSchedule.sdxl().alphas_cumprod.to(device)[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
    captions = [s.caption for s in scenes]
    losses = []
    for caps in (captions, captions[1:] + captions[:1]):
        context, pooled = model.text.encode(caps)
        y = _y(model, pooled, size)
        eps = model.unet(x_t.to(model.dtype), t, context.to(model.dtype), y.to(model.dtype)).float()
        losses.append(float(F.mse_loss(eps, noise)))
    return losses[0], losses[1]


def _y(model, pooled: torch.Tensor, size: int) -> torch.Tensor:
    """The conditional rows' SDXL y vector (SDXL.conditioning builds it for [uncond; cond] pairs only)."""
    from omg.text import sdxl_vector

    return sdxl_vector(pooled, (size, size), (0, 0), (size, size), embed_dim=model.size_embed_dim)


# ---------------------------------------------------------------------------------------------- classifier reads

def background_of(image: torch.Tensor) -> str:
    """The BACKGROUNDS name nearest to the median colour of the image's 4-pixel border."""
    x = ((image + 1) * 127.5).float()
    border = torch.cat([x[:, :4].reshape(3, -1), x[:, -4:].reshape(3, -1), x[:, :, :4].reshape(3, -1),
                        x[:, :, -4:].reshape(3, -1)], dim=1).median(dim=1).values
    names = list(BACKGROUNDS)
    ref = torch.tensor([BACKGROUNDS[n] for n in names], dtype=torch.float32)
    return names[int((ref - border).norm(dim=1).argmin())]


def follows(net: IdentityNet, image: torch.Tensor, scene: Scene) -> dict:
    """Does a generated image show every object of its caption (class and colour) on the right background?"""
    crops, _ = grid_windows(image.to(next(net.parameters()).device))
    probs, colours = predict(net, crops, colours=True)
    label, colour = probs.argmax(-1), colours.argmax(-1)
    found = []
    for obj in scene.objects:
        names = [obj.class_name] + [c for c, spec in CONCEPTS.items() if spec.class_name == obj.class_name]
        is_class = torch.zeros_like(label, dtype=torch.bool)
        for name in names:
            is_class |= label == LABELS.index(name)
        found.append(bool((is_class & (colour == COLOUR_NAMES.index(obj.colour))).any()))
    background = background_of(image) == scene.background
    return {"objects": found, "background": background, "all": all(found) and background}


# ---------------------------------------------------------------------------------------------- attention

@torch.no_grad()
def scene_heatmaps(model, scene: Scene, class_names: Sequence[str], steps: int, size: int) -> torch.Tensor:
    """The class-token heat maps the pipeline would capture, on the scene's ground-truth latent noised at
    every timestep of the sampling schedule (one row per timestep, fixed noise): [k, h, w]."""
    device, dtype = model.device, model.dtype
    latent = model.vae.encode(to_tensor(scene.image)[None].to(device)).float()
    schedule = NoiseSchedule.sdxl()
    t = schedule.timesteps(steps).to(device)
    noise = torch.randn((len(t), *latent.shape[1:]), generator=torch.Generator().manual_seed(scene.seed)).to(device)
    a = schedule.alphas_cumprod.to(device)[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * latent + (1 - a).sqrt() * noise
    token_indices = concept_token_indices(scene.caption, class_names)
    flat = sorted({i for idx in token_indices for i in idx})
    context, pooled = model.text.encode([scene.caption])
    y = _y(model, pooled, size)
    control = AttentionControl(model.unet, "recompute", heatmap_tokens=flat, latent_hw=tuple(latent.shape[-2:]))
    rows = RowLayout(images=len(t))  # [uncond x T | cond x T]: the cond rows are captured, as in stage 1
    control.set_call("capture", 0, rows)
    n = rows.rows
    with control:
        model.unet(torch.cat([x_t, x_t]).to(dtype), t.repeat(2), context.to(dtype).expand(n, -1, -1),
                   y.to(dtype).expand(n, -1))
    return token_heatmaps(control.heatmaps.result(), token_indices, flat)


def latent_masks(scene: Scene, latent: int) -> torch.Tensor:
    """Visible ground-truth masks at latent resolution (area share > 0.5)."""
    m = torch.from_numpy(scene.masks).float()[:, None]
    return F.adaptive_avg_pool2d(m, latent)[:, 0] > 0.5


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def attention_gates(model, n: int, steps: int, size: int) -> dict:
    """attention_iou and class_map_correlation on two-object scenes of two classes; same_class_split on scenes
    of two objects of one class. Held-out seeds."""
    latent = size // 8
    ious, corrs, splits = [], [], []
    seed = 9_000_000
    while len(corrs) < n or len(splits) < n:
        seed += 1
        rng = np.random.default_rng(seed)
        same = len(splits) < n and (len(corrs) >= n or seed % 2 == 0)
        if same:
            cls = CLASSES[int(rng.integers(len(CLASSES)))]
            objects = [(cls, None), (cls, None)]
        else:
            a, b = rng.choice(len(CLASSES), 2, replace=False)
            objects = [(CLASSES[a], None), (CLASSES[b], None)]
        try:
            scene = render_scene(seed, size, objects=objects, occlusion=bool(rng.integers(2)))
        except RuntimeError:
            continue
        names = [o.class_name for o in scene.objects]
        heat = scene_heatmaps(model, scene, names, steps, size)
        masks = make_masks(names, (size, size), heat.cpu(), classes=names).masks > 0.5
        truth = latent_masks(scene, latent)
        if same:
            overlap = torch.stack([(masks[i][None] & truth).flatten(1).sum(1) for i in range(2)])  # [mask, object]
            picks = overlap.argmax(1)
            splits.append(bool(masks[0].any() and masks[1].any() and picks[0] != picks[1]))
        else:
            ious += [iou(masks[i], truth[i]) for i in range(2)]
            h = heat.flatten(1).cpu()
            corrs.append(float(torch.corrcoef(h)[0, 1]))
    return {"attention_iou": float(np.mean(ious)), "class_map_correlation": float(np.mean(corrs)),
            "same_class_split": float(np.mean(splits)), "attention_scenes": n}


# ---------------------------------------------------------------------------------------------- LoRA gates

def _identities(net: IdentityNet, images, concept: str) -> list[float]:
    return [score_concepts(net, im, [concept])[concept]["identity"] for im in images]


def lora_gates(model, net: IdentityNet, weights: str, n: int, steps: int, size: int, seed: int = 5_000) -> dict:
    """Per concept: identity hit rate alone (own prompt), with the plain class prompt, the late-identity ratio
    and the chance level (base model, class and colour prompt)."""
    out = {}
    for name, spec in sorted(CONCEPTS.items()):
        lora = load_lora(os.path.join(weights, f"{name}.safetensors"))
        backgrounds = [list(BACKGROUNDS)[i % len(BACKGROUNDS)] for i in range(n)]
        own = [concept_prompt(name, bg) for bg in backgrounds]
        plain = [plain_prompt(name, bg) for bg in backgrounds]
        kw = dict(steps=steps, seed=seed, height=size, width=size, progress=False, **SAMPLING)
        with merged_lora(model.unet, (lora, LORA_SCALE)):
            alone = _identities(net, sample(model, own, **kw), name)
            bound = _identities(net, sample(model, plain, **kw), name)
        base = _identities(net, sample(model, plain, **kw), name)
        late = []
        for i in range(min(n, max(2, n // 4))):
            concept = omg.Concept(spec.class_name, own[i], lora=lora, lora_scale=LORA_SCALE, mask=(0, 0, size, size))
            result = generate_demo(model, plain[i], [concept], steps=steps, seed=seed + i, size=size)
            late.append(_identities(net, [result.image], name)[0])
        own_mean = float(np.mean(alone[:len(late)]))
        out[name] = {"alone_hit": float(np.mean([v >= 0.5 for v in alone])), "alone_mean": float(np.mean(alone)),
                     "plain_prompt_hit": float(np.mean([v >= 0.5 for v in bound])),
                     "plain_prompt_mean": float(np.mean(bound)), "chance_mean": float(np.mean(base)),
                     "late_mean": float(np.mean(late)), "late_own_mean": own_mean,
                     "late_ratio": float(np.mean(late)) / max(own_mean, 1e-6)}
    return out


def generate_demo(model, prompt: str, concepts, *, steps: int, seed: int, size: int, **extra):
    """omg.generate with the demo world's settings (what weights/demo/demo.yaml asks for)."""
    blend = round(BLEND_FRACTION * steps)
    return omg.generate(model, prompt, concepts, steps=steps, blend_steps=blend, seed=seed, height=size,
                        width=size, progress=False, **SAMPLING, **extra)


# ---------------------------------------------------------------------------------------------- main

def demo_size(weights: str) -> int:
    """The image side the demo weights were trained at (their train_log.json), 256 without a log."""
    path = os.path.join(weights, "train_log.json")
    if not os.path.exists(path):
        return 256
    with open(path) as f:
        return int(json.load(f)["size"])


def load_world(weights: str, device: str, cache: str, log=print) -> tuple:
    """(model, identity classifier, its report, image size) of a demo-world weights folder."""
    model = omg.load_sdxl(os.path.join(weights, "demo_sdxl.safetensors"), device=device, dtype=torch.float32)
    size = demo_size(weights)
    cfg = ClassifierConfig(size=size) if size == 256 else ClassifierConfig.tiny()
    net, report = load_or_train(cfg, model.vae, cache, log)
    return model, net.to(device), report, size


def measure(weights: str, device: str, n: int, steps: int, cache: str = os.path.join("bench", "results"),
            log=print) -> dict:
    t0 = time.perf_counter()
    model, net, report, size = load_world(weights, device, cache, log)
    figures: dict = {"classifier_test": report.get("test"), "size": size, "steps": steps, "n": n}
    plain = torch.stack([to_tensor(s.image) for s in base_scenes(n, size, seed=777)])
    concepts = torch.stack([to_tensor(s.image) for c in sorted(CONCEPTS) for s in concept_images(c, max(2, n // 3),
                                                                                                 size, seed=555)])
    figures["vae_psnr_plain"], figures["vae_psnr_concepts"] = psnr(model.vae, plain), psnr(model.vae, concepts)
    log(f"VAE PSNR plain {figures['vae_psnr_plain']:.2f} dB, concepts {figures['vae_psnr_concepts']:.2f} dB")
    held_out = base_scenes(n, size, seed=4242)
    right, rotated = caption_loss_ratio(model, held_out, size)
    figures.update(caption_loss=right, rotated_caption_loss=rotated, text_loss_ratio=rotated / right - 1)
    log(f"caption loss {right:.4f}, rotated {rotated:.4f} (+{100 * (rotated / right - 1):.1f} %)")
    scenes = [s for s in base_scenes(3 * n, size, seed=4343) if len(s.objects) <= 2][:n]
    images = sample(model, [s.caption for s in scenes], steps=steps, seed=77, height=size, width=size,
                    progress=False, **SAMPLING)
    reads = [follows(net, to_tensor(im), s) for im, s in zip(images, scenes)]
    figures["prompt_following"] = float(np.mean([r["all"] for r in reads]))
    figures["prompt_following_parts"] = {"objects": float(np.mean([o for r in reads for o in r["objects"]])),
                                         "background": float(np.mean([r["background"] for r in reads]))}
    log(f"prompt following {figures['prompt_following']:.3f} {figures['prompt_following_parts']}")
    figures.update(attention_gates(model, n, steps, size))
    log(f"attention IoU {figures['attention_iou']:.3f}, class-map correlation {figures['class_map_correlation']:.3f}, "
        f"same-class split {figures['same_class_split']:.3f}")
    figures["concepts"] = lora_gates(model, net, weights, n, steps, size)
    log(f"LoRAs: {figures['concepts']}")
    gates = {k: gate(k, figures[k]) for k in ("vae_psnr_plain", "vae_psnr_concepts", "text_loss_ratio",
                                              "prompt_following", "attention_iou", "class_map_correlation",
                                              "same_class_split")}
    for name, c in figures["concepts"].items():
        gates[f"lora_identity:{name}"] = gate("lora_identity", c["alone_hit"])
        gates[f"lora_plain_prompt:{name}"] = gate("lora_plain_prompt", c["plain_prompt_hit"])
        gates[f"late_identity:{name}"] = gate("late_identity", c["late_ratio"])
    gates["chance_identity"] = gate("chance_identity", max(c["chance_mean"] for c in figures["concepts"].values()))
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    return {"gates": gates, "all_pass": all(g["pass"] for g in gates.values()), "figures": figures}


def markdown(result: dict) -> str:
    rows = ["| gate | value | threshold | pass |", "| --- | --- | --- | --- |"]
    for name, g in result["gates"].items():
        rows.append(f"| {name} | {g['value']:g} | {g['threshold']} | {'yes' if g['pass'] else '**no**'} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=os.path.join("weights", "demo"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=48, help="scenes / images per gate")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--name", default="world")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--cache", default=os.path.join("bench", "results"), help="where the classifier is cached")
    args = p.parse_args(argv)
    result = measure(args.weights, args.device, args.n, args.steps, args.cache)
    path = write_json(args.name, result, args.out)
    print(markdown(result))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
