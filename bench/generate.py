"""A k-concept OMG image with full-size SDXL (random weights) at 1024x1024, 50 DDIM steps, blending over the
last 35, rank-64 kohya LoRAs on every kohya target: seconds per stage, UNet evaluations, peak memory, the
replay store's size. The default store is generate's ("auto": stage 1's attention outputs kept where memory allows);
--stores adds rows with other stores at k=store_k (recompute, with the LoRA factors only: merge_linears off, the
low-memory configuration).

Also, in the same process: the original code's schedule (bench/reference.py) at k=2 (--reference), the
UNet forward at batch 2 as the sampler runs it (a CUDA graph) against diffusers' eager SDPA forward with the
same weights (--unet), (--step-profile) the time per sampler step against the GPU time of its UNet calls
(bench/step_profile.py) at k=store_k, grouped and merged, with a torch.profiler kernel summary of a few steps, and
(--fp8) the fast mode fp8 against the exact path, and the graphed batch-7 UNet forward with and without it.

Random weights make the attention masks meaningless, so each concept gets a user box (a strip of the image):
the work per step is what real masks would cost.
Run on the GPU machine:  python -m bench.generate [--concepts 1 2 5] [--merged-k 2] [--reference] [--unet]
                         [--step-profile] [--fp8]
Writes bench/results/<name>_<gpu>.json (--name, default omg: the results of this bench are the omg_* files).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import time
from typing import Optional

import torch

from bench.common import DTYPES, device_name, time_ms, write_json
from bench.lora import kohya_lora, random_unet
from bench.step_profile import StepTimeline, kernel_summary, plain_unet_graph_ms, replay_alone_ms
from omg import graphs as omg_graphs
from omg.graphs import GraphedCall, release_graphs
from omg.lora import bind, load_lora
from omg.model import SDXL
from omg.pipeline import Concept, generate
from omg.reuse import release
from omg.text import SDXLTextEncoder
from omg.unet import UNetConfig
from omg.vae import AutoencoderKL, VAEConfig

TFLOP_PER_EVAL = 6.76  # one UNet forward at batch 1, 1024x1024 (torch FLOP counter)
H100_BF16_DENSE = 989.0
CLASSES = ["man", "woman", "dog", "cat", "robot"]
DEFAULT = "auto"  # generate's default store
PROMPT = "a man, a woman, a dog, a cat and a robot in a park"


def random_sdxl(dtype: torch.dtype) -> SDXL:
    unet = random_unet(UNetConfig.sdxl(), "cuda", dtype)
    with torch.device("cuda"):
        vae = AutoencoderKL(VAEConfig.sdxl()).to(dtype)  # stored in bf16: the VAE never holds fp16
        text = SDXLTextEncoder.sdxl().to(dtype)
    for module in (unet, vae, text):
        module.requires_grad_(False)
    return SDXL(unet, vae.eval(), text.eval())


def boxes(k: int, size: int = 1024) -> list[tuple[int, int, int, int]]:
    """k vertical strips, each a concept's region."""
    edges = [round(i * size / k) for i in range(k + 1)]
    return [(edges[i], 0, edges[i + 1], size) for i in range(k)]


def render(model: SDXL, loras: list, k: int, args, **options):
    """The bench's image: k concepts, each with a strip of the image as its user mask."""
    concepts = [Concept(CLASSES[i], f"a photo of sks {CLASSES[i]}", lora=loras[i], mask=box)
                for i, box in enumerate(boxes(k))]
    return generate(model, PROMPT, concepts, steps=args.steps, blend_steps=args.blend_steps, height=1024,
                    width=1024, progress=False, **options)


def run(model: SDXL, loras: list, k: int, store: str, args, self_replay: int = 0, graphs: bool = True,
        lora_mode: str = "grouped", keep: Optional[dict] = None, crop: Optional[int] = None, fp8: bool = False,
        repeat: bool = True, merge_linears: bool = True) -> dict:
    """One configuration: with CUDA graphs (and repeat) its first image (graph recording, LoRA stacking) and then
    the timed one, the steady state of repeated renders (what generate keeps between them, as a user's loop would
    have it); without, one image. Nothing is kept from the configuration before (omg.release)."""
    release(model)
    gc.collect()
    torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated()
    graphs = graphs and store != "maps" and not self_replay  # where generate can run CUDA graphs
    options = dict(store=store, self_replay_steps=self_replay, cuda_graphs=graphs, lora_mode=lora_mode,
                   concept_crop=crop is not None, crop_margin=8 if crop is None else crop, fp8=fp8,
                   merge_linears=merge_linears)
    first = None
    if graphs and repeat:
        first = render(model, loras, k, args, **options).timings["total"]
    torch.cuda.reset_peak_memory_stats()
    result = render(model, loras, k, args, **options)
    peak = torch.cuda.max_memory_allocated()
    t = result.timings
    seconds = t["total"]
    row = dict(k=k, store=result.store, store_option=store, self_replay_steps=self_replay, lora_mode=lora_mode,
               crop_margin=crop, fp8=fp8,
               merge_linears=(merge_linears and not fp8) if lora_mode == "grouped" else None,
               triton=os.environ.get("OMG_DISABLE_TRITON") != "1",
               cuda_graphs=graphs, seconds=round(seconds, 3), timings={n: round(v, 3) for n, v in t.items()},
               first_seconds=None if first is None else round(first, 3),
               unet_evaluations=result.unet_evaluations, peak_gib=round(peak / 2**30, 2),
               peak_above_model_gib=round((peak - resident) / 2**30, 2),
               store_gib=round(result.store_bytes / 2**30, 3),
               utilisation=round(result.unet_evaluations * TFLOP_PER_EVAL / seconds / H100_BF16_DENSE, 3))
    if keep is not None:
        keep[(k, store, self_replay, graphs, lora_mode) + (() if crop is None else ("crop",))
             + (("fp8",) if fp8 else ())] = result.latent
        keep[("masks", k)] = result.masks
    print(f"k={k} {lora_mode}{' factors only' if row['merge_linears'] is False else ''}"
          f"{' fp8' if fp8 else ''}{'' if crop is None else f' crop {crop}'} store={store:9s} "
          f"self-replay {self_replay} "
          f"graphs {row['cuda_graphs']:d}: "
          f"{seconds:6.2f} s{'' if first is None else f' (first {first:.2f} s)'} "
          f"(stage1 {t['stage1']:.2f}, masks {t['masks']:.2f}, "
          f"stage2 {t['stage2']:.2f}, decode {t['decode'] + t['decode_stage1']:.2f}, setup {t['setup']:.2f}); "
          f"{result.unet_evaluations} evals; peak {row['peak_gib']:.2f} GiB; store {row['store_gib']:.2f} GiB; "
          f"utilisation {row['utilisation']:.1%}", flush=True)
    del result
    return row


def latent_psnr(a: torch.Tensor, ref: torch.Tensor) -> Optional[float]:
    """PSNR in dB of latents a against ref, peak = ref's largest magnitude (inf when equal)."""
    if ref.numel() == 0:  # no latent pixels there (e.g. strips that cover the image leave no outside)
        return None
    mse = (a.float() - ref.float()).pow(2).mean().item()
    peak = ref.float().abs().max().item()
    return float("inf") if mse == 0 else round(10 * math.log10(peak * peak / mse), 2)


def unet_speed(model: SDXL, rounds: int = 3) -> dict:
    """ms per batch-2 forward: ours replayed as a CUDA graph (what the sampler runs) and eager, and diffusers'
    UNet2DConditionModel (eager, SDPA) with the same weights; best of interleaved rounds."""
    from bench.reference import diffusers_unet
    dtype = next(model.unet.parameters()).dtype
    theirs = diffusers_unet(model.unet, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 4, 128, 128, device="cuda", generator=g).to(dtype)
    t = torch.full((2,), 500.0, device="cuda")
    ctx = torch.randn(2, 77, 2048, device="cuda", generator=g).to(dtype)
    y = torch.randn(2, 2816, device="cuda", generator=g).to(dtype)
    added = {"text_embeds": y[:, :1280], "time_ids": torch.full((2, 6), 1024.0, device="cuda", dtype=dtype)}
    graphed = GraphedCall(lambda x_, t_: model.unet(x_, t_, ctx, y), copy_output=False)  # as the stages run it
    variants = {"omg_cuda_graph": lambda: graphed(x, t), "omg_eager": lambda: model.unet(x, t, ctx, y),
                "diffusers_eager_sdpa": lambda: theirs(x, t, ctx, added_cond_kwargs=added).sample}
    best = {name: float("inf") for name in variants}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in variants.items():
                best[name] = min(best[name], time_ms(fn, warmup=3, iters=10))
    result = {f"{name}_ms": round(ms, 2) for name, ms in best.items()}
    result["speedup_graph_vs_diffusers"] = round(best["diffusers_eager_sdpa"] / best["omg_cuda_graph"], 3)
    result["speedup_eager_vs_diffusers"] = round(best["diffusers_eager_sdpa"] / best["omg_eager"], 3)
    print("UNet forward, batch 2, 1024x1024:", result, flush=True)
    return result


def step_profile(model: SDXL, loras: list, k: int, args, lora_mode: str = "grouped", window: int = 3) -> dict:
    """Per sampler step of a warm image (CUDA graphs): GPU ms of the step (event to event between step
    callbacks), of its graph replays (the UNet calls), their difference (the overhead outside the UNet) and the
    host ms; each stage's graphs replayed alone and the bare UNet graph at the same batches; the recordings
    (first call of each graph). With window > 0 a second image runs under torch.profiler for `window` steps of
    each stage (after a synchronize): the top kernels and the kernel time outside the replays."""
    release_graphs(model)  # the profiled image records its graphs (their recording is reported)
    gc.collect()
    torch.cuda.empty_cache()
    timeline = StepTimeline()
    with omg_graphs.timed(timeline.hook):  # keep_stage2: stage 2's graphs keep pointers into its weights
        result = render(model, loras, k, args, cuda_graphs=True, lora_mode=lora_mode, keep_stage2=True,
                        callback=timeline.callback)
    torch.cuda.synchronize()
    profile = dict(k=k, lora_mode=lora_mode, timings={n: round(v, 3) for n, v in result.timings.items()},
                   stages=timeline.summary())
    blend_start = args.steps - args.blend_steps
    for stage, s in profile["stages"].items():
        calls = timeline.calls(stage)
        alone = [replay_alone_ms(c) for c in calls]
        s["unet_alone_ms"] = round(sum(alone), 2)  # the step's graphs, each replayed once, alone
        s["unet_alone_ms_by_call"] = [dict(rows=c.signature[0][0][0], ms=ms) for c, ms in zip(calls, alone)]
        by_rows = {c.signature[0][0][0]: c for c in calls}  # one bare graph per batch size
        s["plain_unet_graph_ms"] = {str(rows): plain_unet_graph_ms(model.unet, c) for rows, c in by_rows.items()}
        if s["step_ms"]["median"] is not None:
            s["step_minus_unet_alone_ms"] = round(s["step_ms"]["median"] - s["unet_alone_ms"], 3)
        # the whole stage against its steady steps: setup, graph recording, the stage-2 steps before the blend
        total_ms = result.timings[stage] * 1e3
        counted = args.steps if stage == "stage1" else args.blend_steps
        s["stage_ms"] = round(total_ms, 1)
        s["stage_ms_per_step"] = round(total_ms / counted, 2)
        if s["step_ms"]["median"] is not None:
            s["stage_ms_beyond_steady_steps"] = round(total_ms - counted * s["step_ms"]["median"], 1)
    del result, timeline
    gc.collect()
    if window > 0:
        try:
            profile["kernels"] = profiled_steps(model, loras, k, args, lora_mode, window, blend_start)
        except Exception as e:  # the profiler is optional: the step figures stand without it
            profile["kernels"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    for stage, s in profile["stages"].items():
        print(f"step profile k={k} {lora_mode} {stage}: {s['steps']} steps, step {s['step_ms']['median']} ms, "
              f"UNet {s['unet_ms']['median']} ms (alone {s['unet_alone_ms']}, bare UNet graph "
              f"{s['plain_unet_graph_ms']}), overhead {s['overhead_ms']['median']} ms median / "
              f"{s['overhead_ms']['mean']} mean, host {s['host_ms']['median']} ms; captures "
              f"{[(c['rows'], c['host_ms']) for c in s['captures']]}; stage {s['stage_ms']} ms "
              f"({s.get('stage_ms_beyond_steady_steps')} ms beyond its steady steps)", flush=True)
    for stage, kern in profile.get("kernels", {}).items():
        if isinstance(kern, dict) and "kernel_ms" in kern:
            print(f"kernels {stage} over {kern['steps']} steps: {kern['kernel_ms']} ms, in replays "
                  f"{kern['kernel_in_replays_ms']}, outside {kern['kernel_outside_replays_ms']} "
                  f"({kern['classified_by']}); top outside: "
                  f"{[(r['name'][:40], r['outside_graph_ms']) for r in kern['top_outside'][:5]]}", flush=True)
    return profile


def profiled_steps(model: SDXL, loras: list, k: int, args, lora_mode: str, window: int, blend_start: int) -> dict:
    """torch.profiler over `window` steps of each stage of one more image (stage 1 from step 10, stage 2 from
    the blend start + 2), each window between synchronizes; kernel_summary of each."""
    from torch.profiler import ProfilerActivity, profile, record_function

    starts = {"stage1": min(10, args.steps - window - 1), "stage2": blend_start + 2}
    found: dict = {}
    state: dict = {}
    timeline = StepTimeline(annotate=record_function)

    def callback(step) -> None:
        timeline.callback(step)
        first = starts.get(step.stage)
        if step.step == first:
            torch.cuda.synchronize()
            state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            state["prof"].start()
            state["mark"] = len(timeline.marks)
        elif first is not None and step.step == first + window and "prof" in state:
            torch.cuda.synchronize()
            prof = state.pop("prof")
            prof.stop()
            replays = [m for m in timeline.marks[state["mark"]:] if m.kind == "replay"]
            summary = kernel_summary(prof)
            summary["steps"] = window
            summary["replay_event_ms"] = round(sum(m.start.elapsed_time(m.end) for m in replays), 3)
            summary["kernel_outside_replays_ms_per_step"] = round(summary["kernel_outside_replays_ms"] / window, 3)
            found[step.stage] = summary

    with omg_graphs.timed(timeline.hook):
        render(model, loras, k, args, cuda_graphs=True, lora_mode=lora_mode, callback=callback)
    if "prof" in state:
        state.pop("prof").stop()
    return found


def step_summary(profiles: dict, k: int) -> dict:
    """bench.generate's summary figures of the step profiles (medians of the steady steps, ms)."""
    out = {}
    for mode, p in profiles.items():
        prefix = f"k{k}_" if mode == "grouped" else f"k{k}_{mode}_"
        for stage, s in p["stages"].items():
            out[f"{prefix}{stage}_step_ms"] = s["step_ms"]["median"]
            out[f"{prefix}{stage}_unet_ms"] = s["unet_ms"]["median"]
            out[f"{prefix}{stage}_unet_alone_ms"] = s["unet_alone_ms"]
            out[f"{prefix}{stage}_step_overhead_ms"] = s["overhead_ms"]["median"]
            out[f"{prefix}{stage}_graph_capture_ms"] = round(sum(c["host_ms"] for c in s["captures"]), 1)
    grouped = profiles.get("grouped")
    if grouped:  # the figure against issue 19's target: the larger stage's overhead outside the UNet
        values = [s["overhead_ms"]["median"] for s in grouped["stages"].values() if s["overhead_ms"]["median"]
                  is not None]
        if values:
            out["step_overhead_ms"] = round(max(values), 3)
    return out


def unet_fp8_speed(model: SDXL, batch: int = 7, rounds: int = 3) -> dict:
    """ms per forward at stage 2's batch (7 rows at k = 2), replayed as a CUDA graph, 16-bit and with fp8 Linear
    layers (omg.fp8); best of interleaved rounds."""
    from omg.fp8 import fp8_linears
    dtype = next(model.unet.parameters()).dtype
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, 4, 128, 128, device="cuda", generator=g).to(dtype)
    t = torch.full((batch,), 500.0, device="cuda")
    ctx = torch.randn(batch, 77, 2048, device="cuda", generator=g).to(dtype)
    y = torch.randn(batch, 2816, device="cuda", generator=g).to(dtype)
    exact = GraphedCall(lambda x_, t_: model.unet(x_, t_, ctx, y))
    fast = GraphedCall(lambda x_, t_: model.unet(x_, t_, ctx, y))
    best = {"exact": float("inf"), "fp8": float("inf")}
    with torch.no_grad():
        for _ in range(rounds):
            best["exact"] = min(best["exact"], time_ms(lambda: exact(x, t), warmup=3, iters=10))
            with fp8_linears(model.unet):
                best["fp8"] = min(best["fp8"], time_ms(lambda: fast(x, t), warmup=3, iters=10))
        out_exact = exact(x, t).float()
        with fp8_linears(model.unet):
            out_fp8 = fast(x, t).float()
    cos = torch.nn.functional.cosine_similarity(out_exact.flatten(), out_fp8.flatten(), dim=0).item()
    result = {f"batch{batch}_graph_ms": round(best["exact"], 2), f"batch{batch}_graph_fp8_ms": round(best["fp8"], 2),
              "speedup_fp8": round(best["exact"] / best["fp8"], 3), "eps_cosine_fp8_vs_exact": round(cos, 5)}
    print(f"UNet forward, batch {batch}, 1024x1024, CUDA graph:", result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--stores", nargs="*", default=["recompute"],
                        help="rows with these stores at k=store_k, compared with the default ('auto'); recompute is "
                             "the low-memory configuration")
    parser.add_argument("--store-k", type=int, default=2, help="k at which the store modes are compared")
    parser.add_argument("--self-replay", type=int, default=4, help="a k=store_k row with this many self-replay steps")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--blend-steps", type=int, default=35)
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--eager-k", type=int, nargs="*", default=[2], help="also run these k without CUDA graphs")
    parser.add_argument("--merged-k", type=int, nargs="*", default=[2],
                        help="also run these k with lora_mode='merged' (one call per concept, merged weights), "
                             "with CUDA graphs, and as the unoptimised path (eager, OMG_DISABLE_TRITON=1)")
    parser.add_argument("--reference", action="store_true", help="time the original's schedule at k=2 too")
    parser.add_argument("--unet", action="store_true", help="time the UNet forward against diffusers' too")
    parser.add_argument("--crop", type=int, nargs="*", default=[],
                        help="also run k=store_k with concept_crop at these margins (latent pixels), against the exact "
                             "path: time ratio and final-latent PSNR outside and inside the masks")
    parser.add_argument("--step-profile", action="store_true",
                        help="time each sampler step against its UNet calls at k=store_k, grouped and (with "
                             "--merged-k) merged, plus a torch.profiler kernel summary (bench/step_profile.py)")
    parser.add_argument("--profile-window", type=int, default=3, help="--step-profile: steps under torch.profiler "
                        "per stage (0: none)")
    parser.add_argument("--fp8", action="store_true",
                        help="also run k=store_k with fp8=True (e4m3 Linear layers) against the exact path: time "
                             "ratio and final-latent PSNR; and the graphed UNet forward at batch 7 with and without")
    parser.add_argument("--name", default="omg", help="JSON name: bench/results/<name>_<gpu>.json")
    args = parser.parse_args()
    model = random_sdxl(DTYPES[args.dtype])
    start = time.perf_counter()
    loras = [load_lora(kohya_lora(model.unet, 64, locon=False, seed=i + 1), device="cuda")
             for i in range(max(args.concepts + [args.store_k]))]
    torch.cuda.synchronize()
    lora_seconds = (time.perf_counter() - start) / len(loras)
    # cold: the process's first image (kernel autotuning, CUDA graph recording, the first LoRA stacking); every row
    # after it renders its configuration twice and times the second (the steady state of repeated renders)
    cold = run(model, loras, args.store_k, DEFAULT, args, repeat=False)
    latents: dict = {}
    rows = [run(model, loras, k, DEFAULT, args, keep=latents) for k in args.concepts]  # the defaults
    rows += [run(model, loras, k, DEFAULT, args, graphs=False, keep=latents) for k in args.eager_k]
    rows += [run(model, loras, k, DEFAULT, args, lora_mode="merged", keep=latents) for k in args.merged_k]
    # the unoptimised path: merged weights, eager, torch's ops only, the stage-1 rows recomputed in the batch (the
    # original code's replay)
    os.environ["OMG_DISABLE_TRITON"] = "1"
    rows += [run(model, loras, k, "recompute", args, lora_mode="merged", graphs=False, keep=latents)
             for k in args.merged_k]
    del os.environ["OMG_DISABLE_TRITON"]
    # recompute with the LoRA factors only (merge_linears off): the low-memory configuration
    rows += [run(model, loras, args.store_k, s, args, merge_linears=s != "recompute")
             for s in args.stores if s != DEFAULT]
    if args.self_replay:
        rows.append(run(model, loras, args.store_k, "recompute", args, self_replay=args.self_replay))
    default = lambda r: (r["store_option"] == DEFAULT and not r["self_replay_steps"]  # noqa: E731
                         and r["lora_mode"] == "grouped" and not r["fp8"])
    by_k = {r["k"]: r for r in rows if default(r) and r["cuda_graphs"]}
    summary = {f"k{r['k']}_eager_over_graphs": round(r["seconds"] / by_k[r["k"]]["seconds"], 3) for r in rows
               if not r["cuda_graphs"] and default(r) and r["k"] in by_k}
    for row in rows:  # the other stores (recompute: the low-memory configuration) against the default
        s = row["store_option"]
        if (s != DEFAULT and s in args.stores and not row["self_replay_steps"] and row["k"] in by_k
                and row["lora_mode"] == "grouped" and row["cuda_graphs"]):
            summary[f"k{row['k']}_store_{s}_s"] = row["seconds"]
            summary[f"k{row['k']}_store_{s}_over_default"] = round(row["seconds"] / by_k[row["k"]]["seconds"], 3)
            summary[f"k{row['k']}_store_{s}_peak_gib"] = row["peak_gib"]
    for k in args.merged_k:  # the unoptimised path: merged weights, one call per concept, eager
        for row in (r for r in rows if r["k"] == k and r["lora_mode"] == "merged"):
            name = f"k{k}_merged_graphs" if row["cuda_graphs"] else f"k{k}_unoptimised"
            summary[name + "_over_default"] = round(row["seconds"] / by_k[k]["seconds"], 3)
            summary[name + "_peak_gib"] = row["peak_gib"]
        ref = latents[(k, "recompute", 0, False, "merged")]
        diff = latents[(k, DEFAULT, 0, True, "grouped")] - ref
        summary[f"k{k}_final_latent_vs_unoptimised_max_abs_diff"] = round(diff.abs().max().item(), 5)
        summary[f"k{k}_final_latent_vs_unoptimised_rms_diff"] = round(diff.pow(2).mean().sqrt().item(), 6)
        summary[f"k{k}_final_latent_max_abs"] = round(ref.abs().max().item(), 3)
    def fast_mode(label: str, tag: str, **mode) -> None:  # a fast mode against the exact path (default row, same k)
        k = args.store_k
        row = run(model, loras, k, DEFAULT, args, keep=latents, **mode)
        rows.append(row)
        exact = latents[(k, DEFAULT, 0, True, "grouped")]
        fast = latents[(k, DEFAULT, 0, True, "grouped", tag)]
        inside = latents[("masks", k)].sum(0) > 0
        summary[f"k{k}_{label}_over_default"] = round(row["seconds"] / by_k[k]["seconds"], 3)
        if tag == "fp8":
            summary[f"k{k}_{label}_latent_psnr_db"] = latent_psnr(fast, exact)
        for where, sel in (("outside", ~inside), ("inside", inside)):
            summary[f"k{k}_{label}_latent_psnr_{where}_db"] = latent_psnr(fast[..., sel], exact[..., sel])

    for margin in args.crop:
        fast_mode(f"crop{margin}", "crop", crop=margin)
    if args.fp8:
        fast_mode("fp8", "fp8", fp8=True)
    summary[f"k{args.store_k}_cold_s"] = cold["seconds"]
    summary["lora_make_and_load_s_per_concept"] = round(lora_seconds, 3)
    if args.store_k in by_k:
        summary[f"k{args.store_k}_warm_s"] = by_k[args.store_k]["seconds"]
        # the first image of the configuration in a warm process: graph recording and LoRA stacking, no autotuning
        summary[f"k{args.store_k}_first_s"] = by_k[args.store_k]["first_seconds"]
    if 1 in by_k and 5 in by_k:
        summary["time_k5_over_k1"] = round(by_k[5]["seconds"] / by_k[1]["seconds"], 3)
    touched = sum(model.unet.get_parameter(name).numel() * model.unet.get_parameter(name).element_size()
                  for name in bind(model.unet, loras[0]))
    summary["lora_touched_gib_per_concept"] = round(touched / 2**30, 3)
    ks = sorted(by_k)
    if len(ks) > 1:
        growth = (by_k[ks[-1]]["peak_gib"] - by_k[ks[0]]["peak_gib"]) / (ks[-1] - ks[0])
        summary["peak_growth_per_concept_gib"] = round(growth, 3)
    extra = {}
    if args.step_profile:
        modes = ["grouped"] + (["merged"] if args.merged_k else [])
        profiles = {mode: step_profile(model, loras, args.store_k, args, mode,
                                       args.profile_window if mode == "grouped" else 0) for mode in modes}
        extra["step_profile"] = profiles
        summary.update(step_summary(profiles, args.store_k))
    if args.unet:
        extra["unet"] = unet_speed(model)
    if args.fp8:
        extra["unet_fp8"] = unet_fp8_speed(model)
    if args.reference:
        del model, loras, latents
        gc.collect()
        torch.cuda.empty_cache()
        from bench.reference import NOTE, run_reference
        extra["reference"] = dict(run_reference(k=2, dtype=DTYPES[args.dtype]), note=NOTE)
        if 2 in by_k:
            summary["k2_speedup_vs_reference"] = round(extra["reference"]["total_s"] / by_k[2]["seconds"], 3)
    print(summary)
    note = ("random weights; user boxes as masks; PyTorch eager kernels, each repeated UNet call replayed as a CUDA "
            "graph where cuda_graphs is true")
    path = write_json(args.name, {**extra, "cold": cold, "steps": args.steps, "blend_steps": args.blend_steps,
                                  "dtype": args.dtype,
                                  "resolution": 1024, "lora_rank": 64, "rows": rows, "summary": summary, "note": note})
    print("wrote", path, "on", device_name())


if __name__ == "__main__":
    main()
