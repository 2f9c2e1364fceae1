"""bench.step_profile (bench.generate --step-profile): steps between callbacks, their replays, the report row; the
timing hook of omg.graphs is off by default and set only inside omg.graphs.timed."""
import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch

from bench import report
from bench.step_profile import StepTimeline
from omg import graphs
from omg.graphs import GraphedCall


class FakeClock:
    """A clock the test advances; FakeEvent.record() stamps its time, like a CUDA event on an idle stream."""

    def __init__(self):
        self.now = 0.0  # ms

    def __call__(self) -> float:
        return self.now / 1e3


class FakeEvent:
    def __init__(self, clock: FakeClock):
        self.clock, self.at = clock, None

    def record(self) -> None:
        self.at = self.clock.now

    def elapsed_time(self, other: "FakeEvent") -> float:
        return other.at - self.at


class FakeCall:
    def __init__(self, rows: int):
        self.signature = None
        self.rows = rows

    def record(self):  # what _capture leaves behind
        self.signature = ((torch.Size([self.rows, 4, 8, 8]), torch.float16, "cuda"), (torch.Size([self.rows]),))


def simulate(timeline: StepTimeline, clock: FakeClock, stage: str, steps: range, calls: list, unet_ms: list,
             overhead_ms: float, capture_ms: float = 50.0) -> None:
    """A stage as generate runs it: the first model call records each graph, every later step replays them."""
    for i in steps:
        for call, ms in zip(calls, unet_ms):
            kind = "capture" if call.signature is None else "replay"

            def run(call=call, ms=ms, kind=kind):
                clock.now += capture_ms if kind == "capture" else ms
                if kind == "capture":
                    call.record()
                return "out"
            assert timeline.hook(call, kind, run) == "out"
        clock.now += overhead_ms  # the DDIM update, guidance, blend: outside the UNet
        timeline.callback(SimpleNamespace(stage=stage, step=i))


def test_timeline_splits_each_step_into_unet_and_overhead():
    clock = FakeClock()
    timeline = StepTimeline(event=lambda: FakeEvent(clock), clock=clock)
    stage1, base, concept = FakeCall(2), FakeCall(3), FakeCall(2)
    simulate(timeline, clock, "stage1", range(0, 6), [stage1], [35.0], 1.5)
    clock.now += 1000.0  # decode, masks, stage-2 setup: between the stages, in no step
    simulate(timeline, clock, "stage2", range(2, 6), [base, concept], [60.0, 40.0], 3.0)
    s = timeline.summary()
    assert s["stage1"]["steps"] == 5 and s["stage2"]["steps"] == 3  # the intervals between callbacks of a stage
    assert s["stage1"]["step_ms"]["median"] == 36.5 and s["stage1"]["unet_ms"]["median"] == 35.0
    assert s["stage1"]["overhead_ms"] == {"mean": 1.5, "median": 1.5, "min": 1.5, "max": 1.5}
    assert s["stage2"]["unet_ms"]["median"] == 100.0 and s["stage2"]["overhead_ms"]["median"] == 3.0
    assert s["stage2"]["replays_per_step"] == [2] and s["stage2"]["batches"] == [2, 3]
    # each graph's recording lies before its stage's first callback: reported apart, with its batch
    assert s["stage1"]["captures"] == [dict(stage="stage1", rows=2, host_ms=50.0, gpu_ms=50.0)]
    assert [c["rows"] for c in s["stage2"]["captures"]] == [3, 2]
    assert timeline.calls("stage1") == [stage1] and timeline.calls("stage2") == [base, concept]


def test_timeline_leaves_out_steps_with_a_capture_inside():
    """A graph recorded mid-stage (e.g. a ControlNet starting to act) makes that step no steady one."""
    clock = FakeClock()
    timeline = StepTimeline(event=lambda: FakeEvent(clock), clock=clock)
    simulate(timeline, clock, "stage1", range(0, 3), [FakeCall(2)], [30.0], 1.0)
    simulate(timeline, clock, "stage1", range(3, 6), [FakeCall(2)], [30.0], 1.0, capture_ms=500.0)
    steps = timeline.steps()
    assert [r["captures"] for r in steps] == [0, 0, 1, 0, 0]
    assert timeline.summary()["stage1"]["step_ms"]["max"] == 31.0


def test_the_timing_hook_is_off_unless_inside_timed():
    assert GraphedCall.timing_hook is None
    seen = []
    with pytest.raises(RuntimeError):
        with graphs.timed(lambda call, kind, run: seen.append(kind) or run()):
            assert GraphedCall.timing_hook is not None
            raise RuntimeError("the block fails")
    assert GraphedCall.timing_hook is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_timed_graphed_call_returns_what_the_untimed_one_does():
    seen = []

    def hook(call, kind, run):
        seen.append(kind)
        return run()

    x = torch.arange(8.0, device="cuda")
    plain, timed = GraphedCall(lambda a: a * 2 + 1), GraphedCall(lambda a: a * 2 + 1)
    with graphs.timed(hook):
        outs = [timed(x + i) for i in range(3)]
    assert seen == ["capture", "replay", "replay"]
    assert all(torch.equal(o, plain(x + i)) for i, o in enumerate(outs))


def test_report_row_shows_the_overhead_when_measured_and_not_measured_otherwise():
    d = json.load(open(os.path.join(report.RESULTS, "omg_h200.json")))
    d["summary"] = {key: v for key, v in d["summary"].items() if "overhead" not in key}  # a run without --step-profile
    assert "| per-step overhead outside the UNet < 10 ms (k = 2, CUDA graphs, median step) | not measured" in \
        report.h200_targets_section(d)
    measured = copy.deepcopy(d)
    measured["summary"].update(step_overhead_ms=4.25, k2_stage1_step_overhead_ms=1.1, k2_stage1_step_ms=36.3,
                               k2_stage1_unet_ms=35.2, k2_stage2_step_overhead_ms=4.25, k2_stage2_step_ms=135.0,
                               k2_stage2_unet_ms=130.75)
    text = report.h200_targets_section(measured)
    assert ("4.25 ms: stage 1 1.10 ms (step 36.3 ms, its UNet calls 35.2 ms); stage 2 4.25 ms (step 135.0 ms, its "
            "UNet calls 130.8 ms) | yes |") in text


def test_report_judges_the_ratio_against_the_originals_fastest_run():
    """The original's schedule is host-bound: a run on a slow host must not turn the ratio target into a 'yes'."""
    d = json.load(open(os.path.join(report.RESULTS, "omg_h200.json")))
    ours = next(r["seconds"] for r in d["rows"] if r["k"] == 2 and r.get("cuda_graphs") and r.get("lora_mode") ==
                "grouped" and not r.get("fp8") and r.get("crop_margin") is None and r["store"] == "outputs")
    slow, fast = copy.deepcopy(d), copy.deepcopy(d)
    slow["reference"]["total_s"] = 10.0 * ours  # 10x in this run
    fast["reference"]["total_s"] = 4.0 * ours  # 4x in an earlier one
    fast["summary"]["k2_speedup_vs_reference"] = 4.0
    row = lambda text: next(line for line in text.splitlines() if "the original's schedule" in line)  # noqa: E731
    assert row(report.h200_targets_section(slow)).endswith("| yes |")
    judged = row(report.h200_targets_section(slow, others=[fast]))
    assert judged.endswith("| **no** |") and "10.00x" in judged and "4.00x" in judged
