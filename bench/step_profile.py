"""Per-step time of omg.generate against the GPU time of its UNet calls (bench.generate --step-profile).

A StepTimeline is at once generate's step callback (a CUDA event at each step's callback, which runs after the
step's model call) and omg.graphs' timing hook (CUDA events around every graph replay and capture), so its
entries are in the order the host queued them. Between two consecutive callbacks of a stage lies exactly one
sampler step (its update, then the next step's model call): its GPU time, the GPU time of the graph replays
inside it (the UNet calls), and overhead = step - UNet. The first model call of each stage records its graph
(eager run + capture: GraphedCall); it lies before the stage's first callback, so it is in no step and is
reported apart (`captures`).

    timeline = StepTimeline()
    with omg.graphs.timed(timeline.hook):
        generate(..., cuda_graphs=True, callback=timeline.callback)
    torch.cuda.synchronize()
    summary = timeline.summary()  # per stage: steps, step/unet/overhead ms (mean, median), captures

The callback adds one small kernel per reported step (StepEvent's VP latent) and some host time; without a
callback generate runs none of it. CPU timelines (tests) use any event with record() and elapsed_time(other).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


def _cuda_event() -> Any:
    return torch.cuda.Event(enable_timing=True)


@dataclass
class Mark:
    kind: str  # "step", "replay" or "capture"
    start: Any  # event recorded before (a step: at its callback)
    end: Any = None  # event recorded after (replay, capture)
    host: float = 0.0  # host clock at start (seconds)
    host_s: float = 0.0  # host seconds of a capture or replay call
    stage: str = ""  # a step's stage
    step: int = -1  # a step's index
    call: Any = None  # the GraphedCall of a replay or capture
    rows: int = 0  # the call's batch


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "min": None, "max": None}
    return {"mean": round(statistics.fmean(values), 3), "median": round(statistics.median(values), 3),
            "min": round(min(values), 3), "max": round(max(values), 3)}


@dataclass
class StepTimeline:
    """generate's callback and omg.graphs' timing hook at once; summary() after a synchronize."""
    event: Callable[[], Any] = _cuda_event
    clock: Callable[[], float] = time.perf_counter
    annotate: Optional[Callable[[str], Any]] = None  # e.g. torch.profiler.record_function, around every replay
    marks: list[Mark] = field(default_factory=list)

    def callback(self, step: Any) -> None:
        """generate(callback=...): step is an omg.StepEvent."""
        ev = self.event()
        ev.record()
        self.marks.append(Mark("step", ev, host=self.clock(), stage=step.stage, step=step.step))

    def hook(self, call: Any, kind: str, run: Callable[[], Any]) -> Any:
        """omg.graphs.GraphedCall.timing_hook."""
        start, end = self.event(), self.event()
        host = self.clock()
        start.record()
        if self.annotate is not None and kind == "replay":
            with self.annotate("omg_graph_replay"):
                out = run()
        else:
            out = run()
        end.record()
        rows = call.signature[0][0][0] if getattr(call, "signature", None) else 0
        self.marks.append(Mark(kind, start, end, host, self.clock() - host, call=call, rows=int(rows)))
        return out

    def calls(self, stage: str) -> list[Any]:
        """Every GraphedCall that replayed in the steps of `stage` (the stage of the next callback), in order."""
        seen: dict[int, Any] = {}
        pending: list[Mark] = []
        for m in self.marks:
            if m.kind == "replay":
                pending.append(m)
            elif m.kind == "step":
                if m.stage == stage:
                    for r in pending:
                        seen.setdefault(id(r.call), r.call)
                pending = []
        return list(seen.values())

    def steps(self) -> list[dict]:
        """One row per step between consecutive callbacks of a stage: GPU ms of the step and of its replays."""
        rows, last = [], None
        between: list[Mark] = []
        for m in self.marks:
            if m.kind != "step":
                between.append(m)
                continue
            if last is not None and last.stage == m.stage and m.step == last.step + 1:
                replays = [r for r in between if r.kind == "replay"]
                step_ms = last.start.elapsed_time(m.start)
                unet_ms = sum(r.start.elapsed_time(r.end) for r in replays)
                rows.append(dict(stage=m.stage, step=m.step, step_ms=step_ms, unet_ms=unet_ms,
                                 overhead_ms=step_ms - unet_ms, host_ms=(m.host - last.host) * 1e3,
                                 replays=len(replays), batches=[r.rows for r in replays],
                                 captures=sum(r.kind == "capture" for r in between)))
            last, between = m, []
        return rows

    def captures(self) -> list[dict]:
        """Each graph recording (the first call of a GraphedCall: eager run + capture), by the stage whose next
        callback follows it."""
        out, pending = [], []
        for m in self.marks:
            if m.kind == "capture":
                pending.append(m)
            elif m.kind == "step" and pending:
                out += [dict(stage=m.stage, rows=c.rows, host_ms=round(c.host_s * 1e3, 2),
                             gpu_ms=round(c.start.elapsed_time(c.end), 2)) for c in pending]
                pending = []
        return out

    def summary(self) -> dict:
        """Per stage: the steady steps (no capture inside) as mean/median/min/max of step, UNet, overhead and host
        ms, and the captures."""
        steps, captures = self.steps(), self.captures()
        result = {}
        for stage in dict.fromkeys(r["stage"] for r in steps):
            rows = [r for r in steps if r["stage"] == stage and not r["captures"] and r["replays"]]
            result[stage] = dict(
                steps=len(rows), replays_per_step=sorted({r["replays"] for r in rows}),
                batches=sorted({b for r in rows for b in r["batches"]}),
                step_ms=_stats([r["step_ms"] for r in rows]), unet_ms=_stats([r["unet_ms"] for r in rows]),
                overhead_ms=_stats([r["overhead_ms"] for r in rows]), host_ms=_stats([r["host_ms"] for r in rows]),
                captures=[c for c in captures if c["stage"] == stage])
        return result


def replay_alone_ms(call: Any, warmup: int = 3, iters: int = 20) -> float:
    """Median GPU ms of one replay of a recorded GraphedCall's graph, alone (nothing else queued between)."""
    from bench.common import time_ms

    return round(time_ms(call.graph.replay, warmup=warmup, iters=iters), 2)


def plain_unet_graph_ms(unet: torch.nn.Module, like: Any) -> float:
    """GPU ms of the bare UNet (no attention processor, no LoRA) at a recorded call's batch, replayed as a graph."""
    from omg.graphs import GraphedCall

    x, t = like.static_in[0], like.static_in[1]
    dtype = next(unet.parameters()).dtype
    g = torch.Generator(device=x.device).manual_seed(0)
    ctx = torch.randn(x.shape[0], 77, unet.config.context_dim, device=x.device, generator=g).to(dtype)
    y = torch.randn(x.shape[0], unet.config.adm_in_channels, device=x.device, generator=g).to(dtype)
    call = GraphedCall(lambda x_, t_: unet(x_.to(dtype), t_, ctx, y))
    with torch.no_grad():
        call(x.clone(), t.clone())
        ms = replay_alone_ms(call)
    del call
    return ms


def kernel_summary(prof: Any, top: int = 20) -> dict:
    """Of a torch.profiler run whose graph replays were annotated "omg_graph_replay" (StepTimeline.annotate):
    the top kernels by total GPU time, the kernel time in all, inside the replays and outside them.

    A kernel is inside a replay when its GPU start lies within a GPU-side "omg_graph_replay" annotation or, where
    the profiler left none, when it links to the CPU-side annotation (the graph launch inside it)."""
    from torch.autograd import DeviceType

    events = list(prof.events())
    device = [e for e in events if e.device_type != DeviceType.CPU]
    annotations = [e for e in device if e.is_user_annotation or e.name == "omg_graph_replay"]
    windows = sorted((e.time_range.start, e.time_range.end) for e in annotations if e.name == "omg_graph_replay")
    cpu_names = {e.id: e.name for e in events if e.device_type == DeviceType.CPU}
    kernels = [e for e in device if not e.is_user_annotation and e.name != "omg_graph_replay"]

    def inside(e: Any) -> bool:
        if windows:
            start = e.time_range.start
            return any(a <= start <= b for a, b in windows)
        return cpu_names.get(getattr(e, "linked_correlation_id", 0)) == "omg_graph_replay"

    by_name: dict[str, dict] = {}
    total = in_graph = 0.0
    for e in kernels:
        us = e.time_range.end - e.time_range.start
        flag = inside(e)
        total += us
        in_graph += us if flag else 0.0
        row = by_name.setdefault(e.name, dict(name=e.name[:120], count=0, total_ms=0.0, outside_graph_ms=0.0))
        row["count"] += 1
        row["total_ms"] += us / 1e3
        row["outside_graph_ms"] += 0.0 if flag else us / 1e3
    ranked = sorted(by_name.values(), key=lambda r: r["total_ms"], reverse=True)[:top]
    outside = sorted((r for r in by_name.values() if r["outside_graph_ms"] > 0), key=lambda r: r["outside_graph_ms"],
                     reverse=True)[:top]
    for r in ranked + outside:
        r["total_ms"], r["outside_graph_ms"] = round(r["total_ms"], 3), round(r["outside_graph_ms"], 3)
    return dict(kernel_ms=round(total / 1e3, 3), kernel_in_replays_ms=round(in_graph / 1e3, 3),
                kernel_outside_replays_ms=round((total - in_graph) / 1e3, 3), kernels=len(kernels),
                classified_by="gpu annotation" if windows else "linked cpu annotation", top=ranked,
                top_outside=outside)
