"""OMG's Table 2 in the demo world: identity and presence of two concepts per image, for OMG and its baselines,
split by occlusion. Measured, not tuned: the demo model is weakly trained (weights/demo/train_log.json).

Methods (per seed: the same seed, so the same initial noise, and the same background word; 256x256, DDIM with
--steps, guidance 7.5, the pipeline's negative prompt everywhere, LoRA strength 0.8):
  omg           omg.generate with both concepts ("a ball and a box on a green background"; concept prompts
                "a sks ball", "a zwx box"), default replay store, blending over the last 70 % of the steps
  no_replay     the same with replay=False: stage 2's base pass runs plain attention instead of replaying
                stage 1's cross-attention (blending without the layout stage)
  simultaneous  both LoRAs merged at once into the base (UNet and text encoder), one joint prompt
                "a sks ball and a zwx box on a green background", plain sampling (omg.sample)
  alone         each concept's LoRA alone with its own prompt ("a sks ball on a green background"); scored for
                that concept only
Reference rows (no method): base = OMG's stage-1 image (the base model, no LoRA: identities hit by chance);
gt / gt_plain = ground-truth scenes with the two concepts / two plain class members, through the VAE round
trip (the metric's ceiling and its false-positive level).

Scores (bench/identity.py, a CNN trained only on ground-truth scenes): per image and concept, the region is
the best of one fixed set of candidate windows over the whole image (squares of 3/16 to 7/8 of the side,
stride a quarter window), the same for every method: identity = max over windows of
P(concept); presence = max over windows of P(concept) + P(its plain class) >= 0.5 (an object of the class,
any identity); identity hit = identity >= 0.5. No method's own masks are used, so no method is favoured.

Occlusion (per seed, from OMG's stage-1 layout, which no_replay and base share): the seed is "occluded" when
the two concepts' stage-1 masks (result.masks, latent pixels; disjoint by construction) overlap once each is
dilated by one latent pixel (8 image pixels, a 3x3 max-pool), i.e. when at most one empty latent pixel lies
between them; "separate" otherwise (also when a concept was not found). Attention masks are broad, so most
seeds touch: each record also keeps both masks (packed bits) and their contact, |grow(A) & grow(B)| / min(|A|,
|B|); --contact T counts a seed as occluded only above T (default 0: touching is enough).
simultaneous and alone draw their own layouts from the same noise; their rows follow the seed's split.
gt rows use the ground truth (occlusion on odd seeds).

Run:  python -m bench.quality [--seeds 100] [--steps 20] [--pairs sks_ball+zwx_box ...] [--markdown]
Appends each seed's record to bench/results/quality_cpu.jsonl (a rerun resumes: seeds already there with the
same settings are skipped) and rewrites bench/results/quality_cpu.json (summary + records) after every seed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.common import gpu_slug, write_json
from bench.identity import ClassifierConfig, IdentityNet, load_or_train, score_concepts, to_tensor, vae_round_trip
from demo.scenes import BACKGROUNDS, CONCEPTS, article, render_scene
from omg.lora import load_lora, merged_lora, text_encoder_lora
from omg.pipeline import DEFAULT_NEGATIVE, Concept, generate
from omg.txt2img import sample

METHODS = ("omg", "no_replay", "simultaneous", "alone")
REFERENCES = ("base", "gt", "gt_plain")
SPLITS = ("all", "occluded", "separate")
DEFAULT_PAIRS = ("sks_ball+zwx_box",)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_pair(text: str) -> tuple[str, str]:
    parts = text.split("+")
    if len(parts) != 2 or not all(p in CONCEPTS for p in parts) or parts[0] == parts[1]:
        raise ValueError(f"a pair is two different concepts joined by '+' ({', '.join(CONCEPTS)}), got {text!r}")
    if CONCEPTS[parts[0]].class_name == CONCEPTS[parts[1]].class_name:
        raise ValueError(f"{text}: the two concepts must be of different classes")
    return parts[0], parts[1]


def background_for(seed: int) -> str:
    return list(BACKGROUNDS)[seed % len(BACKGROUNDS)]


def prompts(pair: Sequence[str], background: str) -> dict:
    """The global, per-concept, joint and alone prompts of a pair ('a ball and a box on a green background')."""
    tail = f"on {article(background)} {background} background"
    classes = [CONCEPTS[c].class_name for c in pair]
    phrases = [f"a {CONCEPTS[c].phrase}" for c in pair]
    return {"global": f"{article(classes[0])} {classes[0]} and {article(classes[1])} {classes[1]} {tail}",
            "concepts": phrases,
            "joint": f"{phrases[0]} and {phrases[1]} {tail}",
            "alone": [f"{p} {tail}" for p in phrases]}


def masks_touch(masks: torch.Tensor, grow: int = 1) -> bool:
    """Whether two latent masks [2, h, w] overlap once each is dilated by `grow` pixels (square structuring
    element), i.e. whether at most 2 * grow - 1 empty pixels lie between them."""
    a, b = masks[0] > 0.5, masks[1] > 0.5
    if not a.any() or not b.any():
        return False
    k = 4 * grow + 1  # growing both by `grow` = growing one by 2 * grow
    grown = F.max_pool2d(a[None, None].float(), k, stride=1, padding=2 * grow)[0, 0] > 0
    return bool((grown & b).any())


def mask_contact(masks: torch.Tensor, grow: int = 1) -> float:
    """|grow(A) & grow(B)| / min(|A|, |B|) of two latent masks [2, h, w]: how much of the smaller one meets the
    other; 0 when either is empty (above 1 for a mask thinner than the growth)."""
    a, b = masks[0] > 0.5, masks[1] > 0.5
    if not a.any() or not b.any():
        return 0.0
    k = 2 * grow + 1
    ga, gb = (F.max_pool2d(m[None, None].float(), k, stride=1, padding=grow)[0, 0] > 0 for m in (a, b))
    return float((ga & gb).sum()) / float(min(a.sum(), b.sum()))


def pack_mask(mask: torch.Tensor) -> str:
    """A latent mask as hex of its packed bits (row-major); unpack with np.unpackbits(bytes.fromhex(s))."""
    return np.packbits((mask > 0.5).cpu().numpy().reshape(-1)).tobytes().hex()


class QualityBench:
    """Generates and scores one seed of one pair with every method; see the module docstring."""

    def __init__(self, model, loras: dict, net: IdentityNet, steps: int = 20, blend_steps: Optional[int] = None,
                 guidance: float = 7.5, lora_scale: float = 0.8, size: int = 256,
                 methods: Sequence[str] = METHODS + REFERENCES):
        self.model, self.loras, self.net = model, loras, net
        self.steps = steps
        self.blend_steps = round(0.7 * steps) if blend_steps is None else blend_steps
        self.guidance, self.lora_scale, self.size = guidance, lora_scale, size
        unknown = set(methods) - set(METHODS + REFERENCES)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS + REFERENCES}")
        self.methods = list(methods)

    @property
    def settings(self) -> dict:
        return {"steps": self.steps, "blend_steps": self.blend_steps, "guidance": self.guidance,
                "lora_scale": self.lora_scale, "size": self.size, "sampler": "ddim",
                "negative_prompt": DEFAULT_NEGATIVE}

    def _sample(self, prompt: str, concepts: Sequence[str], seed: int) -> Image.Image:
        """Plain sampling with the concepts' LoRAs merged into the UNet and text encoder, restored after."""
        specs = [(self.loras[c], self.lora_scale) for c in concepts]
        with merged_lora(self.model.unet, specs), text_encoder_lora(self.model.text, specs):
            return sample(self.model, prompt, DEFAULT_NEGATIVE, steps=self.steps, guidance=self.guidance,
                          seed=seed, height=self.size, width=self.size, progress=False)[0]

    def _omg(self, pair: Sequence[str], p: dict, seed: int, replay: bool):
        concepts = [Concept(CONCEPTS[c].class_name, phrase, lora=self.loras[c], lora_scale=self.lora_scale)
                    for c, phrase in zip(pair, p["concepts"])]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = generate(self.model, p["global"], concepts, steps=self.steps, blend_steps=self.blend_steps,
                              guidance=self.guidance, seed=seed, height=self.size, width=self.size,
                              progress=False, replay=replay)
        return result, [str(w.message) for w in caught]

    def _gt(self, pair: Sequence[str], seed: int, plain: bool) -> Image.Image:
        objects = [(CONCEPTS[c].class_name, None if plain else c) for c in pair]
        scene = render_scene(seed, self.size, objects=objects, occlusion=seed % 2 == 1)
        x = to_tensor(scene.image)[None].to(self.model.device)
        return vae_round_trip(self.model.vae, x)[0].cpu()

    def run_seed(self, pair: Sequence[str], seed: int, images: Optional[dict] = None) -> dict:
        """Every method's image of one seed, scored; images (if a dict) receives them by method name."""
        background = background_for(seed)
        p = prompts(pair, background)
        record = {"pair": "+".join(pair), "seed": seed, "background": background, "settings": self.settings,
                  "prompts": p, "gt_occluded": seed % 2 == 1, "methods": {}}
        images = {} if images is None else images

        def add(method: str, image, seconds: float, concepts: Sequence[str] = pair) -> None:
            scores = score_concepts(self.net, image, concepts)
            record["methods"].setdefault(method, {"seconds": 0.0, "scores": {}})
            entry = record["methods"][method]
            entry["seconds"] = round(entry["seconds"] + seconds, 3)
            entry["scores"].update(scores)
            images[method if len(concepts) > 1 else f"{method}_{concepts[0]}"] = image

        t0 = time.perf_counter()
        result, caught = self._omg(pair, p, seed, replay=True)
        t1 = time.perf_counter()
        record["occluded"] = masks_touch(result.masks)
        record["contact"] = round(mask_contact(result.masks), 4)
        record["masks"] = {"shape": list(result.masks.shape[1:]), "bits": [pack_mask(m) for m in result.masks]}
        record["masks_found"] = list(result.concept_masks.found)
        record["mask_area"] = [round(float((m > 0.5).float().mean()), 4) for m in result.masks]
        record["warnings"] = caught
        if "omg" in self.methods:
            add("omg", result.image, t1 - t0)
        if "base" in self.methods:
            add("base", result.stage1_image, result.timings["stage1"] + result.timings["decode_stage1"])
        if "no_replay" in self.methods:
            t0 = time.perf_counter()
            ablation, _ = self._omg(pair, p, seed, replay=False)
            # the same stage 1, hence the same layout and masks: the split applies to it exactly
            assert torch.equal(ablation.masks, result.masks), "stage 1 differs between replay on and off"
            add("no_replay", ablation.image, time.perf_counter() - t0)
        if "simultaneous" in self.methods:
            t0 = time.perf_counter()
            image = self._sample(p["joint"], pair, seed)
            add("simultaneous", image, time.perf_counter() - t0)
        if "alone" in self.methods:
            for c, prompt in zip(pair, p["alone"]):
                t0 = time.perf_counter()
                image = self._sample(prompt, [c], seed)
                add("alone", image, time.perf_counter() - t0, [c])
        for method, plain in (("gt", False), ("gt_plain", True)):
            if method in self.methods:
                t0 = time.perf_counter()
                image = self._gt(pair, seed, plain)
                add(method, image, time.perf_counter() - t0)
        return record


# --------------------------------------------------------------------------------------------- aggregation

def split_of(record: dict, method: str, contact: float = 0.0) -> str:
    """'occluded' or 'separate': the ground truth for gt rows, else OMG's stage-1 masks (touching, with a
    contact above `contact`)."""
    if method in ("gt", "gt_plain"):
        occluded = record["gt_occluded"]
    else:
        occluded = record["occluded"] and record.get("contact", 1.0) > contact
    return "occluded" if occluded else "separate"


def aggregate(records: Sequence[dict], contact: float = 0.0) -> dict:
    """{pair: {method: {split: stats}}}; stats: n (images), and per concept the mean identity, identity hit
    rate (identity >= 0.5) and presence rate, with both_identity / both_present rates where a method
    scores both concepts of the pair in one image (not alone: its concepts come from two images)."""
    out: dict = {}
    for pair in sorted({r["pair"] for r in records}):
        concepts = pair.split("+")
        rows = [r for r in records if r["pair"] == pair]
        methods = [m for m in METHODS + REFERENCES if any(m in r["methods"] for r in rows)]
        out[pair] = {}
        for method in methods:
            out[pair][method] = {}
            for split in SPLITS:
                chosen = [r["methods"][method]["scores"] for r in rows if method in r["methods"]
                          and split in ("all", split_of(r, method, contact))]
                stats: dict = {"n": len(chosen)}
                for c in concepts:
                    vals = [s[c] for s in chosen if c in s]
                    stats[c] = {"n": len(vals),
                                "identity": _mean([v["identity"] for v in vals]),
                                "identity_hit": _mean([v["identity"] >= 0.5 for v in vals]),
                                "presence": _mean([v["presence"] for v in vals])}
                both = [s for s in chosen if all(c in s for c in concepts)] if method != "alone" else []
                if both:
                    stats["both_identity"] = _mean([all(s[c]["identity"] >= 0.5 for c in concepts) for s in both])
                    stats["both_present"] = _mean([all(s[c]["presence"] for c in concepts) for s in both])
                out[pair][method][split] = stats
    return out


def _mean(values: Sequence) -> Optional[float]:
    return round(float(np.mean([float(v) for v in values])), 4) if len(values) else None


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def table_rows(summary: dict, pair: str) -> tuple[list[str], list[list[str]]]:
    a, b = pair.split("+")
    header = ["method", "split", "n", f"identity {a}", f"identity {b}", f"hit {a}", f"hit {b}",
              f"present {a}", f"present {b}", "both hit", "both present"]
    rows = []
    for method, splits in summary[pair].items():
        for split in SPLITS:
            s = splits[split]
            rows.append([method, split, str(s["n"]),
                         *[_fmt(s[c]["identity"]) for c in (a, b)], *[_fmt(s[c]["identity_hit"]) for c in (a, b)],
                         *[_fmt(s[c]["presence"]) for c in (a, b)],
                         _fmt(s.get("both_identity")), _fmt(s.get("both_present"))])
    return header, rows


def format_table(summary: dict) -> str:
    lines = []
    for pair in summary:
        header, rows = table_rows(summary, pair)
        widths = [max(len(x) for x in col) for col in zip(header, *rows)]
        lines.append(f"== {pair}")
        for row in [header] + rows:
            lines.append("  ".join(x.ljust(w) for x, w in zip(row, widths)))
    return "\n".join(lines)


def markdown_table(summary: dict) -> str:
    """The summary as markdown tables (one per pair), for the README."""
    out = []
    for pair in summary:
        header, rows = table_rows(summary, pair)
        out.append(f"**{pair}**\n")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" for _ in header) + "|")
        out += ["| " + " | ".join(row) + " |" for row in rows]
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- files

def read_records(path: str, settings: dict) -> list[dict]:
    """Records of a jsonl file made with these settings (others are left in the file and ignored)."""
    if not os.path.exists(path):
        return []
    records, other = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
            if r.get("settings") == settings:
                records.append(r)
            else:
                other += 1
    if other:
        print(f"{path}: ignoring {other} records made with other settings")
    return records


def append_record(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_strip(images: dict, path: str) -> None:
    """The methods' images side by side, in a fixed order."""
    order = ["base", "omg", "no_replay", "simultaneous"] + sorted(k for k in images if k.startswith("alone_")) \
        + ["gt", "gt_plain"]
    pics = []
    for key in order:
        im = images.get(key)
        if im is None:
            continue
        if isinstance(im, torch.Tensor):
            im = Image.fromarray(((im.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
        pics.append(im)
    if pics:
        strip = Image.new("RGB", (sum(p.width for p in pics), max(p.height for p in pics)))
        x = 0
        for p in pics:
            strip.paste(p, (x, 0))
            x += p.width
        strip.save(path)


def run(bench: QualityBench, pairs: Sequence[tuple[str, str]], seeds: Sequence[int], out_dir: str,
        classifier_report: dict, image_dir: Optional[str] = None, n_images: int = 0, contact: float = 0.0,
        log=print) -> dict:
    """Every (pair, seed) not yet in the jsonl, appended as it finishes; returns the JSON payload written."""
    os.makedirs(out_dir, exist_ok=True)
    jsonl = os.path.join(out_dir, f"quality_{gpu_slug()}.jsonl")
    settings = {**bench.settings, "classifier": classifier_report.get("cache_key")}
    records = read_records(jsonl, settings)
    done = {(r["pair"], r["seed"]) for r in records}
    payload: dict = {}

    def write() -> None:
        payload.clear()
        summary = aggregate(records, contact)
        per_seed = [sum(m["seconds"] for m in r["methods"].values()) for r in records]
        payload.update({"settings": settings, "pairs": ["+".join(p) for p in pairs], "methods": bench.methods,
                        "classifier": classifier_report, "seconds_per_seed": _mean(per_seed),
                        "occlusion_contact": contact,
                        "summary": summary, "records": records,
                        "notes": "demo world (weights/demo); see bench/quality.py's docstring for the metric"})
        write_json("quality", payload, out_dir)

    for pair in pairs:
        for seed in seeds:
            if ("+".join(pair), seed) in done:
                continue
            t0 = time.perf_counter()
            images: dict = {}
            record = bench.run_seed(pair, seed, images)
            record["settings"] = settings
            record["seconds"] = round(time.perf_counter() - t0, 2)
            append_record(jsonl, record)
            records.append(record)
            if image_dir and seed < seeds[0] + n_images:
                os.makedirs(image_dir, exist_ok=True)
                save_strip(images, os.path.join(image_dir, f"{record['pair']}_{seed:04d}.png"))
            ids = " ".join(f"{m}=" + "/".join(f"{v['identity']:.2f}" for v in e["scores"].values())
                           for m, e in record["methods"].items())
            log(f"{record['pair']} seed {seed}: {split_of(record, 'omg', contact)} (contact {record['contact']:.2f}); "
                f"identity {ids} "
                f"({record['seconds']:.1f} s)")
            write()
    write()
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=100, help="seeds 0..N-1 (from --first-seed)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--blend-steps", type=int, default=None, help="default: 70 %% of steps (35 of 50)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS),
                        help="concept pairs, e.g. sks_ball+zwx_box zwx_box+qrv_tower sks_ball+qrv_tower")
    parser.add_argument("--methods", nargs="+", default=list(METHODS + REFERENCES))
    parser.add_argument("--checkpoint", default=os.path.join(ROOT, "weights/demo/demo_sdxl.safetensors"))
    parser.add_argument("--lora-dir", default=os.path.join(ROOT, "weights/demo"), help="<concept>.safetensors")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench/results"), help="results folder")
    parser.add_argument("--images", default=None, help="save the first --n-images seeds' images here")
    parser.add_argument("--n-images", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--contact", type=float, default=0.0,
                        help="a seed is occluded when OMG's masks touch with a contact above this (see above)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a redirected log as they come
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = [parse_pair(p) for p in args.pairs]
    import omg

    model = omg.load_sdxl(args.checkpoint, device=args.device, dtype=torch.float32)
    size = 256
    net, report = load_or_train(ClassifierConfig(size=size), model.vae, args.checkpoint, args.out)
    test = report["test"]
    print("classifier held-out accuracy: " + ", ".join(
        f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in test.items() if isinstance(v, dict)))
    loras = {c: load_lora(os.path.join(args.lora_dir, f"{c}.safetensors"), device=args.device)
             for c in sorted({c for p in pairs for c in p})}
    bench = QualityBench(model, loras, net, steps=args.steps, blend_steps=args.blend_steps, guidance=args.guidance,
                         size=size, methods=args.methods)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    payload = run(bench, pairs, seeds, args.out, report, args.images, args.n_images, args.contact)
    print(format_table(payload["summary"]))
    if args.markdown:
        print(markdown_table(payload["summary"]))
    print("wrote", os.path.join(args.out, f"quality_{gpu_slug()}.json"), f"({payload['seconds_per_seed']} s a seed)")


if __name__ == "__main__":
    main()
