"""CUDA graphs for the sampler's repeated UNet calls: capture once, then replay with one launch.

Why: at batch 2 the eager SDXL forward is close to bound by the CPU that launches its kernels, and every
attention processor (capture, replay) adds Python time per layer, so the GPU waits (a trivial SDPA
processor alone measured 1.11x the bare forward). A replayed graph has no per-kernel CPU cost.

A graph is valid only while every Python-side decision inside the call stays the same between calls:
same shapes, same processor mode and stores, same weights (the graph keeps the pointers it saw). The
callers in omg.pipeline use it only where that holds (a store other than "maps", no self-attention replay).

KeptGraphs carries one generate call's graphs to the next on the same UNet (generate's `keep_graphs`): a repeated
render with the same configuration records nothing.
"""
from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Hashable, Iterator, Optional

import torch
from torch import Tensor


class GraphedCall:
    """fn(*tensors) -> Tensor, captured as a CUDA graph on the first call and replayed afterwards.

    The first call runs fn eagerly (on a side stream, as torch advises: lazy library init, Triton compilation)
    and returns that result, then records the graph; later calls copy their inputs into the graph's static
    buffers, replay it and return a clone of its output, so callers may keep it, or, with copy_output=False, the
    graph's output buffer itself (no copy per call): valid until the next replay of this graph or of another graph
    of the same memory pool (one recorded later may use the buffer's memory for its temporaries), for callers that
    are done with it by then (omg's stages with one call a step: guidance and the blend read it at once). ``heat`` (an
    omg.attention.TokenHeatmaps the call accumulates into) stays exact: recording runs no kernel, so only
    the Python-side layer counts moved, and they are set back and advanced by the same amount per replay.
    Shapes must not change between calls (a new shape is a new graph: build another GraphedCall).

    A capture that fails (a host sync inside fn) makes this call eager for good. Measured on torch 2.11: after
    such a failure CUDA's default generator can stay in capture mode, so later draws from it on the device
    fail; omg draws its noise on explicit generators (CPU by default), which are not affected.
    """

    # A benchmark's timing hook (bench.generate --step-profile), off when None (the default: no cost but this
    # check). When set, every capture runs as timing_hook(self, "capture", run) and every replay as
    # timing_hook(self, "replay", run): the hook calls run() once (around it, e.g. CUDA events) and returns its
    # result. Set for a with-block by omg.graphs.timed(hook).
    timing_hook: ClassVar[Optional[Callable[["GraphedCall", str, Callable[[], Any]], Any]]] = None

    def __init__(self, fn: Callable[..., Tensor], heat: Any = None, pool: Optional[Any] = None,
                 copy_output: bool = True):
        self.fn, self.heat, self.pool, self.copy_output = fn, heat, pool, copy_output
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_in: tuple[Tensor, ...] = ()
        self.static_out: Optional[Tensor] = None
        self.signature: Optional[tuple] = None
        self.count_delta: dict[int, int] = {}
        self.eager = False  # set when capture failed: every call then runs fn eagerly

    def __call__(self, *args: Tensor) -> Tensor:
        if self.eager:
            return self.fn(*args)
        signature = tuple((a.shape, a.dtype, a.device) for a in args)
        hook = GraphedCall.timing_hook
        if self.graph is None:
            if hook is not None:
                return hook(self, "capture", lambda: self._capture(args, signature))
            return self._capture(args, signature)
        if signature != self.signature:
            raise ValueError(f"a CUDA graph replays fixed shapes: captured {self.signature}, called with {signature}")
        for static, a in zip(self.static_in, args):
            static.copy_(a)
        if hook is not None:
            hook(self, "replay", self.graph.replay)
        else:
            self.graph.replay()
        if self.heat is not None:
            self.heat.add_counts(self.count_delta)
        return self.static_out.clone() if self.copy_output else self.static_out

    def _capture(self, args: tuple[Tensor, ...], signature: tuple) -> Tensor:
        if not all(a.is_cuda for a in args):
            raise ValueError("CUDA graphs need CUDA tensors")
        self.signature = signature
        self.static_in = tuple(a.clone() for a in args)
        current, side = torch.cuda.current_stream(), _capture_stream(args[0].device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = self.fn(*self.static_in)  # this call's result, heat additions included
        current.wait_stream(side)
        out.record_stream(current)  # used on the caller's stream from here on
        counts = dict(self.heat.counts) if self.heat is not None else None
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, pool=self.pool):
                self.static_out = self.fn(*self.static_in)
        except Exception as e:  # an op inside fn that a graph cannot hold (a host sync, a CPU copy)
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0]}); this call "
                          "runs eagerly from now on", RuntimeWarning, stacklevel=3)
            self.graph, self.static_out, self.eager = None, None, True
            if counts is not None:
                self.heat.counts = counts
            return out
        if counts is not None:
            self.count_delta = {n: c - counts.get(n, 0) for n, c in self.heat.counts.items()}
            self.heat.counts = counts
        self.fn = None  # replays never call it: let go of what it holds (a kept graph must not keep its UNet alive)
        return out


_capture_streams: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every warm-up and capture: libraries keep per-stream state (cuBLAS a
    workspace per stream: each new stream held more device memory)."""
    stream = _capture_streams.get(device)
    if stream is None:
        stream = _capture_streams[device] = torch.cuda.Stream(device)
    return stream


@dataclass
class GraphSet:
    """A stage's GraphedCalls by key (what a call's graph depends on beyond its inputs: role, shapes) and the
    memory pool they share (they replay one after another, never concurrently)."""
    calls: dict[Hashable, GraphedCall] = field(default_factory=dict)
    pool: Optional[Any] = None
    # what the graphs read besides their inputs that a run computes once (cross-attention keys and values): by key,
    # (the run that made it, the value)
    constants: dict[Hashable, tuple[object, Any]] = field(default_factory=dict)

    def constant(self, key: Hashable, run: object, make: Callable[[Optional[Any]], Any]) -> Any:
        """The value of `key` for `run` (any object naming one run of the graphs): made by make(previous) at the
        run's first request, where previous is the value an earlier run made (None: none), which make must
        overwrite in place and return, since a kept graph reads those very tensors."""
        made = self.constants.get(key)
        if made is None or made[0] is not run:
            made = self.constants[key] = (run, make(None if made is None else made[1]))
        return made[1]

    def get(self, key: Hashable, make: Callable[[Optional[Any]], GraphedCall]) -> GraphedCall:
        """The call of `key`, made by make(pool) unless kept (a call whose capture failed is made again: its
        function may belong to an earlier run)."""
        call = self.calls.get(key)
        if call is None or call.eager:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            call = self.calls[key] = make(self.pool)
        return call


@dataclass
class KeptGraphs:
    """One generate call's CUDA graphs, kept on the UNet for the next call that can replay them.

    A graph keeps the addresses of what it reads besides its inputs (which are copied in at each call: latents,
    timesteps, conditioning): the UNet's weights, the attention controller's tensors (heat sums, outputs store,
    slot: so the controller itself is kept, and reset for each run), the concepts' stacked LoRA factors. `key`
    names the controller's configuration and the weights (their addresses); stage 2's graphs also depend on the
    concept weights, `stage2_key` (the objects holding the tensors they install, compared by identity). A run whose
    key differs drops what is kept before it records anew. Nothing here refers to the UNet (the kept graphs outlive
    no model: they are kept by a weak reference to it).
    """
    key: tuple
    control: Any  # omg.attention.AttentionControl
    stage1: GraphSet = field(default_factory=GraphSet)
    stage2: GraphSet = field(default_factory=GraphSet)
    stage2_key: Optional[tuple] = None

    def stage2_for(self, key: Optional[tuple]) -> GraphSet:
        """Stage 2's graphs for concept weights of identity `key`: the kept ones, or a new set when it changed (kept
        for the next call), or for key None (weights made anew by each call) a set that is not kept."""
        if key is None or key != self.stage2_key:
            self.stage2, self.stage2_key = GraphSet(), key  # the old graphs and their pool are freed first
        return GraphSet() if key is None else self.stage2


_kept: "weakref.WeakKeyDictionary[torch.nn.Module, KeptGraphs]" = weakref.WeakKeyDictionary()


def kept_graphs(unet: torch.nn.Module) -> Optional[KeptGraphs]:
    """The graphs an earlier generate call left on this UNet (None: none)."""
    return _kept.get(unet)


def keep_graphs(unet: torch.nn.Module, kept: KeptGraphs) -> None:
    _kept[unet] = kept


def release_graphs(model: Any) -> None:
    """Free the CUDA graphs (their memory pools) and the replay store that generate kept for its next call
    (keep_graphs) on this model (an omg.SDXL or its UNet)."""
    _kept.pop(getattr(model, "unet", model), None)


@contextmanager
def timed(hook: Callable[[GraphedCall, str, Callable[[], Any]], Any]) -> Iterator[None]:
    """GraphedCall.timing_hook = hook inside the with-block (every GraphedCall's captures and replays)."""
    previous, GraphedCall.timing_hook = GraphedCall.timing_hook, hook
    try:
        yield
    finally:
        GraphedCall.timing_hook = previous


def graphs_usable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()
