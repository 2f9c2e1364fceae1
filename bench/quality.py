"""OMG's claim, measured in the demo world: identity and presence of two concepts per image for OMG and its
baselines, split by occlusion, with bootstrap intervals and the chance levels beside them.

    python -m bench.quality [--seeds 200] [--steps 50] [--pairs sks_ball+bnha_box sks_ball+ohwx_ball ...]

Per seed (the same seed list for every method; the background word cycles with the seed), DDIM with the
demo's settings (demo.world: zero unconditional embeddings, guidance 5, LoRA strength 1, blending over the
last 70 % of the steps):
  omg           omg.generate: stage 1 the global prompt naming each concept's class and colour ("a red ball and
                a blue box on a green background"), masks from its class-token attention, stage 2 each concept's
                LoRA with its own prompt ("a sks ball on a green background") inside its mask
  no_replay     the same with replay=False: stage 2's base pass runs plain attention (no layout preservation)
  simultaneous  both LoRAs merged at once, one joint prompt ("a sks ball and a bnha box on ..."), omg.sample
  regional      both LoRAs merged at once, Mix-of-Show-style regional sampling (omg.regional): in every
                cross-attention layer the queries inside a concept's region attend to its prompt, the rest to
                the global prompt; the regions are OMG's own stage-1 masks of the same seed
  alone         each concept's LoRA alone with its own prompt; scored for that concept only (the ceiling)
References: base = OMG's stage-1 image (the base model, no LoRA: the chance level); gt / gt_plain = ground-truth
scenes with the two concepts / two plain class members of the same colours, through the VAE round trip (the
metric's ceiling and its false-positive level).

Scores (bench/identity.py, a CNN trained only on ground-truth scenes; the same fixed windows for every method):
identity = max over windows of P(concept); hit = identity >= 0.5; present = max over windows of P(concept) +
P(its plain class) >= 0.5. Occlusion (from OMG's stage-1 masks, which no_replay, regional and base share): the
seed is "occluded" when the two masks touch once each is grown by one latent pixel, else "separate".
Layout preservation: PSNR of OMG's image against its stage-1 image outside the (grown) masks, and how far each
concept's best presence window moved between them.

Writes bench/results/quality_<gpu>.json: settings, per-pair tables with 95 % bootstrap intervals (resampling
seeds), a top-level `claim` object (ratios with intervals), and every seed's record.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import omg
from bench.common import write_json
from bench.identity import score_concepts, to_tensor, vae_round_trip
from bench.world import load_world
from demo.scenes import BACKGROUNDS, CONCEPTS, article, render_scene
from demo.world import BLEND_FRACTION, LORA_SCALE, SAMPLING, concept_prompt, global_prompt
from omg.lora import load_lora, merged_lora, text_encoder_lora
from omg.regional import regional_sample
from omg.txt2img import sample

METHODS = ("omg", "no_replay", "simultaneous", "regional", "alone")
# opt-in (--methods ... omg_crop omg_fp8): omg with a fast mode's options, scored against omg itself
FAST_MODE_OPTIONS = {"omg_crop": {"concept_crop": True}, "omg_fp8": {"fp8": True}}
FAST_MODES = tuple(FAST_MODE_OPTIONS)
REFERENCES = ("base", "gt", "gt_plain")
SPLITS = ("all", "occluded", "separate")
DEFAULT_PAIRS = ("sks_ball+bnha_box", "sks_ball+ohwx_ball", "ohwx_ball+bnha_box")


def parse_pair(text: str) -> tuple[str, str]:
    parts = text.split("+")
    if len(parts) != 2 or not all(p in CONCEPTS for p in parts) or parts[0] == parts[1]:
        raise ValueError(f"a pair is two different concepts joined by '+' ({', '.join(CONCEPTS)}), got {text!r}")
    return parts[0], parts[1]


def background_for(seed: int) -> str:
    return list(BACKGROUNDS)[seed % len(BACKGROUNDS)]


def prompts(pair: Sequence[str], background: str) -> dict:
    """The global, per-concept and joint prompts of a pair."""
    phrases = [f"{article(CONCEPTS[c].phrase)} {CONCEPTS[c].phrase}" for c in pair]
    return {"global": global_prompt(pair, background), "concepts": [concept_prompt(c, background) for c in pair],
            "joint": f"{phrases[0]} and {phrases[1]} on {article(background)} {background} background"}


def grown(mask: torch.Tensor, px: int = 1) -> torch.Tensor:
    return F.max_pool2d(mask.float()[None, None], 2 * px + 1, stride=1, padding=px)[0, 0] > 0


def masks_touch(masks: torch.Tensor, grow: int = 1) -> bool:
    """Whether two latent masks [2, h, w] overlap once each is grown by `grow` pixels."""
    a, b = masks[0] > 0.5, masks[1] > 0.5
    return bool(a.any() and b.any() and (grown(a, grow) & grown(b, grow)).any())


def outside_psnr(image: Image.Image, reference: Image.Image, masks: torch.Tensor) -> Optional[float]:
    """PSNR (dB) of image against reference over the pixels outside every (grown) mask; None if there are none."""
    union = grown((masks > 0.5).any(0).cpu(), 1)
    keep = ~F.interpolate(union.float()[None, None], scale_factor=8, mode="nearest")[0, 0].bool()
    if not keep.any():
        return None
    a, b = to_tensor(image), to_tensor(reference)
    mse = ((a - b) / 2).square()[:, keep].mean().clamp_min(1e-10)
    return float(-10 * torch.log10(mse))


def _centre(box: Sequence[int]) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


# --------------------------------------------------------------------------------------------- rendering

class Renderer:
    """Every method's images for a pair and a list of seeds, rendered as batches where the API allows."""

    def __init__(self, model, loras: dict, steps: int, size: int, batch: int = 64):
        self.model, self.loras, self.steps, self.size, self.batch = model, loras, steps, size, batch
        self.blend_steps = round(BLEND_FRACTION * steps)

    @property
    def settings(self) -> dict:
        return {"steps": self.steps, "blend_steps": self.blend_steps, "lora_scale": LORA_SCALE, "size": self.size,
                "sampler": "ddim", **{k: v for k, v in SAMPLING.items()}}

    def _concepts(self, pair: Sequence[str], p: dict) -> list:
        return [omg.Concept(CONCEPTS[c].class_name, prompt, lora=self.loras[c], lora_scale=LORA_SCALE)
                for c, prompt in zip(pair, p["concepts"])]

    def _chunks(self, seeds: Sequence[int]) -> list[list[int]]:
        return [list(seeds[i:i + self.batch]) for i in range(0, len(seeds), self.batch)]

    def omg(self, pair: Sequence[str], p: dict, seeds: Sequence[int], replay: bool, **options) -> list:
        """One omg.Result per seed, the seeds rendered as batches (omg.generate(seeds=...)); options go to
        omg.generate (e.g. concept_crop=True)."""
        out = []
        for chunk in self._chunks(seeds):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a concept not found is recorded in the result, not printed
                results = omg.generate(self.model, p["global"], self._concepts(pair, p), steps=self.steps,
                                       blend_steps=self.blend_steps, seeds=chunk, height=self.size,
                                       width=self.size, progress=False, replay=replay, **SAMPLING, **options)
            out += results if isinstance(results, list) else [results]
        return out

    def merged(self, prompt: str, concepts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        """Plain sampling with the concepts' LoRAs merged (UNet and text encoder), restored after; batched."""
        specs = [(self.loras[c], LORA_SCALE) for c in concepts]
        out = []
        with merged_lora(self.model.unet, specs), text_encoder_lora(self.model.text, specs):
            for chunk in self._chunks(seeds):
                out += sample(self.model, prompt, steps=self.steps, seeds=chunk, height=self.size, width=self.size,
                              progress=False, **SAMPLING)
        return out

    def regional(self, pair: Sequence[str], p: dict, seeds: Sequence[int], masks: torch.Tensor) -> list[Image.Image]:
        """masks [n, 2, h, w]: each seed's OMG stage-1 masks."""
        out = []
        for i, chunk in enumerate(self._chunks(seeds)):
            out += regional_sample(self.model, p["global"], self._concepts(pair, p),
                                   masks[i * self.batch:(i + 1) * self.batch], steps=self.steps, seeds=chunk,
                                   height=self.size, width=self.size, progress=False, **SAMPLING)
        return out

    def ground_truth(self, pair: Sequence[str], seeds: Sequence[int], plain: bool) -> list[torch.Tensor]:
        images = []
        for s in seeds:
            objects = [(CONCEPTS[c].class_name, None, CONCEPTS[c].colour) if plain else (CONCEPTS[c].class_name, c)
                       for c in pair]
            scene = render_scene(s, self.size, objects=objects, occlusion=s % 2 == 1, background=background_for(s))
            images.append(to_tensor(scene.image))
        x = torch.stack(images).to(self.model.device)
        return list(vae_round_trip(self.model.vae, x).cpu())


def run_pair(renderer: Renderer, net, pair: Sequence[str], seeds: Sequence[int], methods: Sequence[str],
             strip: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Records of every seed of one pair (grouped by background, since each background has its prompts)."""
    records: dict[int, dict] = {}
    for background in BACKGROUNDS:
        group = [s for s in seeds if background_for(s) == background]
        if not group:
            continue
        p = prompts(pair, background)
        images: dict[str, list] = {}
        t0 = time.perf_counter()
        results = renderer.omg(pair, p, group, replay=True)
        seconds = {"omg": time.perf_counter() - t0}
        images["omg"] = [r.image for r in results]
        images["base"] = [r.stage1_image for r in results]
        masks = torch.stack([r.masks for r in results])
        if "no_replay" in methods:
            t0 = time.perf_counter()
            ablation = renderer.omg(pair, p, group, replay=False)
            seconds["no_replay"] = time.perf_counter() - t0
            images["no_replay"] = [r.image for r in ablation]
        for mode in (m for m in FAST_MODES if m in methods):
            t0 = time.perf_counter()
            fast = renderer.omg(pair, p, group, replay=True, **FAST_MODE_OPTIONS[mode])
            seconds[mode] = time.perf_counter() - t0
            images[mode] = [r.image for r in fast]
        if "simultaneous" in methods:
            t0 = time.perf_counter()
            images["simultaneous"] = renderer.merged(p["joint"], pair, group)
            seconds["simultaneous"] = time.perf_counter() - t0
        if "regional" in methods:
            t0 = time.perf_counter()
            images["regional"] = renderer.regional(pair, p, group, masks)
            seconds["regional"] = time.perf_counter() - t0
        if "alone" in methods:
            t0 = time.perf_counter()
            for c, prompt in zip(pair, p["concepts"]):
                images[f"alone:{c}"] = renderer.merged(prompt, [c], group)
            seconds["alone"] = time.perf_counter() - t0
        if "gt" in methods:
            images["gt"] = renderer.ground_truth(pair, group, plain=False)
        if "gt_plain" in methods:
            images["gt_plain"] = renderer.ground_truth(pair, group, plain=True)
        for j, seed in enumerate(group):
            result = results[j]
            record = {"pair": "+".join(pair), "seed": seed, "background": background, "prompts": p,
                      "occluded": masks_touch(result.masks), "masks_found": list(result.concept_masks.found),
                      "mask_area": [round(float((m > 0.5).float().mean()), 4) for m in result.masks],
                      "seconds_per_image": {m: round(s / len(group), 4) for m, s in seconds.items()}, "methods": {}}
            for name, imgs in images.items():
                method, _, only = name.partition(":")
                concepts = [only] if only else list(pair)
                record["methods"].setdefault(method, {}).update(score_concepts(net, imgs[j], concepts))
            shifts = [float(np.linalg.norm(_centre(record["methods"]["omg"][c]["presence_box"])
                                           - _centre(record["methods"]["base"][c]["presence_box"]))) for c in pair]
            record["layout"] = {"outside_psnr": outside_psnr(result.image, result.stage1_image, result.masks),
                                "position_shift_px": shifts}
            if "omg_crop" in images:  # the fast mode against the exact image outside the masks
                record["layout"]["crop_outside_psnr_vs_omg"] = outside_psnr(images["omg_crop"][j], result.image,
                                                                            result.masks)
            if "omg_fp8" in images:  # the fast mode against the exact image: everywhere, and outside the masks
                record["layout"]["fp8_psnr_vs_omg"] = outside_psnr(images["omg_fp8"][j], result.image,
                                                                   torch.zeros_like(result.masks))
                record["layout"]["fp8_outside_psnr_vs_omg"] = outside_psnr(images["omg_fp8"][j], result.image,
                                                                           result.masks)
            records[seed] = record
            if strip is not None and j == 0:
                strip({name: imgs[j] for name, imgs in images.items()} | {"_pair": pair, "_seed": seed})
    return [records[s] for s in seeds]


# --------------------------------------------------------------------------------------------- aggregation

def _bootstrap(values: np.ndarray, fn: Callable[[np.ndarray], float], n: int = 1000, seed: int = 0) -> list[float]:
    """95 % percentile interval of fn over resamples of the rows of values."""
    if len(values) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    stats = [fn(values[rng.integers(len(values), size=len(values))]) for _ in range(n)]
    return [round(float(np.percentile(stats, 2.5)), 4), round(float(np.percentile(stats, 97.5)), 4)]


def split_records(records: Sequence[dict], split: str) -> list[dict]:
    if split == "all":
        return list(records)
    return [r for r in records if r["occluded"] == (split == "occluded")]


def method_rows(records: Sequence[dict], method: str, pair: Sequence[str]) -> dict:
    """Mean identity / hit / presence per concept and both-hit / both-present, each with its interval."""
    rows = [r for r in records if method in r["methods"]]
    out: dict = {"n": len(rows)}
    if not rows:
        return out
    ident = np.array([[r["methods"][method][c]["identity"] for c in pair] for r in rows])
    present = np.array([[r["methods"][method][c]["presence"] for c in pair] for r in rows], dtype=float)
    for k, c in enumerate(pair):
        out[f"identity:{c}"] = [round(float(ident[:, k].mean()), 4), _bootstrap(ident[:, k], np.mean)]
        out[f"hit:{c}"] = [round(float((ident[:, k] >= 0.5).mean()), 4), _bootstrap(ident[:, k] >= 0.5, np.mean)]
        out[f"present:{c}"] = [round(float(present[:, k].mean()), 4), _bootstrap(present[:, k], np.mean)]
    if method != "alone":
        both_hit = (ident >= 0.5).all(1).astype(float)
        both_present = present.all(1).astype(float)
        out["both_hit"] = [round(float(both_hit.mean()), 4), _bootstrap(both_hit, np.mean)]
        out["both_present"] = [round(float(both_present.mean()), 4), _bootstrap(both_present, np.mean)]
    return out


def summarize(records: Sequence[dict], methods: Sequence[str]) -> dict:
    out = {}
    for pair_name in sorted({r["pair"] for r in records}):
        pair = pair_name.split("+")
        rs = [r for r in records if r["pair"] == pair_name]
        out[pair_name] = {m: {s: method_rows(split_records(rs, s), m, pair) for s in SPLITS}
                          for m in methods if any(m in r["methods"] for r in rs)}
        psnrs = [r["layout"]["outside_psnr"] for r in rs if r["layout"]["outside_psnr"] is not None]
        shifts = [v for r in rs for v in r["layout"]["position_shift_px"]]
        out[pair_name]["layout"] = {"outside_psnr_db": round(float(np.mean(psnrs)), 2) if psnrs else None,
                                    "position_shift_px_median": round(float(np.median(shifts)), 1) if shifts else None,
                                    "occluded_share": round(float(np.mean([r["occluded"] for r in rs])), 3)}
    return out


def _identity_matrix(records: Sequence[dict], method: str) -> np.ndarray:
    """(seeds, 2) identities of a method (alone: each concept's own image)."""
    return np.array([[r["methods"][method][c]["identity"] for c in r["pair"].split("+")] for r in records])


def claim(records: Sequence[dict]) -> dict:
    """The paper's claim over all pairs, as ratios/differences of means with bootstrap intervals over seeds."""
    rs = [r for r in records if all(m in r["methods"] for m in ("omg", "alone"))]
    if not rs:
        return {}
    omg_, alone = _identity_matrix(rs, "omg"), _identity_matrix(rs, "alone")
    both = np.concatenate([omg_, alone], axis=1)  # resampled together: paired by seed
    ratio = lambda v: float(v[:, :2].mean() / max(v[:, 2:].mean(), 1e-9))  # noqa: E731
    out = {"n_images": len(rs),
           "omg_identity": round(float(omg_.mean()), 4), "alone_identity": round(float(alone.mean()), 4),
           "omg_over_alone": [round(ratio(both), 4), _bootstrap(both, ratio)], "target_omg_over_alone": 0.9}
    for other in ("simultaneous", "regional", "no_replay", "base"):
        if all(other in r["methods"] for r in rs):
            diff = omg_ - _identity_matrix(rs, other)
            out[f"omg_minus_{other}"] = [round(float(diff.mean()), 4), _bootstrap(diff, np.mean)]
    present = np.array([[r["methods"]["omg"][c]["presence"] for c in r["pair"].split("+")] for r in rs]).all(1)
    out["omg_both_present"] = [round(float(present.mean()), 4), _bootstrap(present.astype(float), np.mean)]
    out["target_both_present"] = 0.95
    occ = np.array([r["occluded"] for r in rs])
    if occ.any() and (~occ).any():
        o, s = omg_[occ].mean(1), omg_[~occ].mean(1)
        rng = np.random.default_rng(1)
        stats = [o[rng.integers(len(o), size=len(o))].mean() / max(s[rng.integers(len(s), size=len(s))].mean(), 1e-9)
                 for _ in range(1000)]
        out["omg_occluded_over_separate"] = [round(float(o.mean() / max(s.mean(), 1e-9)), 4),
                                             [round(float(np.percentile(stats, 2.5)), 4),
                                              round(float(np.percentile(stats, 97.5)), 4)]]
    beats = all(out.get(f"omg_minus_{m}", [0, [0, 0]])[1][0] > 0 for m in ("simultaneous", "regional"))
    out["holds"] = bool(out["omg_over_alone"][0] >= 0.9 and beats and out["omg_both_present"][0] >= 0.95)
    return out


def _psnr_stats(values: Sequence[Optional[float]]) -> dict:
    psnrs = [v for v in values if v is not None]
    return {"mean": round(float(np.mean(psnrs)), 2) if psnrs else None,
            "p5": round(float(np.percentile(psnrs, 5)), 2) if psnrs else None,
            "min": round(float(np.min(psnrs)), 2) if psnrs else None}


def fast_modes(records: Sequence[dict]) -> dict:
    """omg_crop against omg on the same seeds: identity difference [95 % interval] and the PSNR of the cropped
    image against the exact one outside the masks (issue 19's bars: within 0.03 identity, >= 35 dB); omg_fp8 the
    same (omg_fp8_* keys), its PSNR over the whole image and outside the masks."""
    out: dict = {}
    rs = [r for r in records if "omg_crop" in r["methods"]]
    if rs:
        diff = _identity_matrix(rs, "omg_crop") - _identity_matrix(rs, "omg")
        out.update({"n_images": len(rs), "omg_crop_minus_omg_identity": [round(float(diff.mean()), 4),
                                                                          _bootstrap(diff, np.mean)],
                    "omg_crop_outside_psnr_vs_omg_db": _psnr_stats([r["layout"].get("crop_outside_psnr_vs_omg")
                                                                    for r in rs])})
    rs = [r for r in records if "omg_fp8" in r["methods"]]
    if rs:
        diff = _identity_matrix(rs, "omg_fp8") - _identity_matrix(rs, "omg")
        out.update({"omg_fp8_n_images": len(rs), "omg_fp8_minus_omg_identity": [round(float(diff.mean()), 4),
                                                                                 _bootstrap(diff, np.mean)],
                    "omg_fp8_psnr_vs_omg_db": _psnr_stats([r["layout"].get("fp8_psnr_vs_omg") for r in rs]),
                    "omg_fp8_outside_psnr_vs_omg_db": _psnr_stats([r["layout"].get("fp8_outside_psnr_vs_omg")
                                                                   for r in rs])})
    return out


def _fmt(v) -> str:
    if isinstance(v, list):
        return f"{v[0]:.2f} [{v[1][0]:.2f}, {v[1][1]:.2f}]"
    return "-" if v is None else f"{v:.2f}"


def markdown_table(summary: dict) -> str:
    out = []
    for pair_name, table in summary.items():
        pair = pair_name.split("+")
        cols = [f"identity:{c}" for c in pair] + [f"present:{c}" for c in pair] + ["both_hit", "both_present"]
        out.append(f"**{pair_name}** (identity = mean classifier probability of the concept, 95 % bootstrap "
                   f"interval; layout: {table['layout']})\n")
        out.append("| method | split | n | " + " | ".join(c.replace(":", " ") for c in cols) + " |")
        out.append("|" + "---|" * (len(cols) + 3))
        for method, splits in table.items():
            if method == "layout":
                continue
            for split, row in splits.items():
                if row.get("n"):
                    out.append(f"| {method} | {split} | {row['n']} | " + " | ".join(_fmt(row.get(c)) for c in cols)
                               + " |")
        out.append("")
    return "\n".join(out)


def strip_path(folder: str, pair: Sequence[str]) -> str:
    """quality_sks_ball_bnha_box.png: letters, digits and '_' only (the README's names; '+' is not a portable
    file-name character)."""
    return os.path.join(folder, f"quality_{'_'.join(pair)}.png")


def save_strip(images: dict, path: str) -> None:
    """One seed's images side by side, in method order."""
    tiles = [(k, v) for k, v in images.items() if not k.startswith("_")]
    pil = [v if isinstance(v, Image.Image) else Image.fromarray(
        ((v.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()) for _, v in tiles]
    w, h = pil[0].size
    strip = Image.new("RGB", (w * len(pil), h))
    for i, im in enumerate(pil):
        strip.paste(im, (i * w, 0))
    strip.save(path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=os.path.join("weights", "demo"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seeds", type=int, default=200, help="seeds per pair")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS))
    p.add_argument("--methods", nargs="+", default=list(METHODS + REFERENCES))
    p.add_argument("--name", default="quality")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--cache", default=os.path.join("bench", "results"), help="where the classifier is cached")
    p.add_argument("--strips", default=None, help="folder for one image strip per pair")
    args = p.parse_args(argv)
    pairs = [parse_pair(x) for x in args.pairs]
    unknown = set(args.methods) - set(METHODS + FAST_MODES + REFERENCES)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS + FAST_MODES + REFERENCES}")
    model, net, report, size = load_world(args.weights, args.device, args.cache)
    loras = {c: load_lora(os.path.join(args.weights, f"{c}.safetensors")) for pair in pairs for c in pair}
    renderer = Renderer(model, loras, args.steps, size)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    records: list[dict] = []
    t0 = time.perf_counter()
    for pair in pairs:
        strip = None
        if args.strips:
            os.makedirs(args.strips, exist_ok=True)
            strip = lambda imgs: save_strip(imgs, strip_path(args.strips, imgs["_pair"]))  # noqa: E731
        records += run_pair(renderer, net, pair, seeds, args.methods, strip)
        print(f"{'+'.join(pair)}: {len(seeds)} seeds ({time.perf_counter() - t0:.0f} s)", flush=True)
        done = pairs[:pairs.index(pair) + 1]  # written after every pair: a run cut short keeps what it measured
        summary = summarize(records, list(METHODS + FAST_MODES + REFERENCES))
        result = {"settings": renderer.settings, "seeds": [seeds[0], seeds[-1]], "pairs": ["+".join(x) for x in done],
                  "complete": len(done) == len(pairs), "classifier_test": report.get("test"),
                  "claim": claim(records), "fast_modes": fast_modes(records), "summary": summary,
                  "seconds": round(time.perf_counter() - t0, 1), "records": records}
        path = write_json(args.name, result, args.out)
    print(markdown_table(summary))
    print("claim:", result["claim"])
    if result["fast_modes"]:
        print("fast modes:", result["fast_modes"])
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
