"""On a real GPU: no synchronisation inside traced steps, nesting GPU tracks, and GPU
span times that agree with torch.profiler's kernel times and with events paired by
hand. Skipped without CUDA; the same clock code runs on the CPU in test_clock.py through
the strict fake backend."""

import re
import time

import pytest
import torch

from modtimeline import Schedule

from modtimeline import Timeline
from modtimeline.analysis.reader import read_trace, samples

from .trace_checks import assert_nested, load, spans, thread_names

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class Heavy(torch.nn.Module):
    """Matmul-heavy: three large linears and the loss, so kernels fill the GPU spans."""

    def __init__(self, dim: int = 4096) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(dim, dim) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).square().mean()


def _steps(model, x, timeline, count):
    for _ in range(count):
        with timeline.step():
            model(x).backward()


def test_no_sync_inside_traced_steps(tmp_path, monkeypatch):
    model = Heavy(1024).cuda()
    x = torch.randn(512, 1024, device="cuda")
    model(x).backward()  # warm up outside
    timeline = Timeline(tmp_path / "t.json")
    # set_sync_debug_mode does not see torch.cuda.synchronize or event waits: count them
    synchronize = torch.cuda.synchronize
    in_step = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: (in_step.append(timeline.in_step),
                                                                          synchronize(device)))
    with timeline:
        for _ in range(3):
            with timeline.step():
                torch.cuda.set_sync_debug_mode("error")
                try:
                    model(x).backward()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
    assert load(tmp_path / "t.json")["metadata"]["device"] == "cuda"
    assert in_step and not any(in_step)


def test_gpu_tracks_nest_per_stream(tmp_path):
    model = Heavy(1024).cuda()
    x = torch.randn(512, 1024, device="cuda")
    side = torch.cuda.Stream()
    path = tmp_path / "t.json"
    with Timeline(path, memory=True) as timeline:
        _steps(model, x, timeline, 2)
        with timeline.step(), torch.cuda.stream(side):
            model(x).backward()
    trace = load(path)
    assert_nested(trace)
    names = thread_names(trace)
    gpu_tracks = {names[e["tid"]] for e in spans(trace) if names[e["tid"]].startswith("cuda:")}
    assert len([t for t in gpu_tracks if re.fullmatch(r"cuda:\d+ stream \d+", t)]) >= 2, gpu_tracks
    assert any(e.get("ph") == "C" for e in trace["traceEvents"])
    for e in spans(trace):
        if names[e["tid"]].startswith("cuda:"):
            assert e["args"]["launch_lag_us"] >= 0


def test_gpu_span_time_matches_profiler_kernel_time(tmp_path):
    model = Heavy().cuda()
    x = torch.randn(4096, 4096, device="cuda")
    for _ in range(3):
        model(x).backward()
    torch.cuda.synchronize()
    path = tmp_path / "t.json"
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler, Timeline(path) as timeline:
        _steps(model, x, timeline, 5)
    kernel_us = sum(event.self_device_time_total for event in profiler.key_averages())
    per_key = samples(read_trace(path))
    module_us = sum(s.inclusive_ns for phase in ("forward", "backward")
                    for s in per_key[("Heavy", phase, "cuda")].values()) / 1000
    assert module_us == pytest.approx(kernel_us, rel=0.05), (module_us, kernel_us)


def _sleep_cycles(ms: float) -> int:
    """torch.cuda._sleep cycles that take about ``ms`` on this GPU."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return int(10_000_000 * ms / start.elapsed_time(end))


class Sleeper(torch.nn.Module):
    def __init__(self, cycles: int) -> None:
        super().__init__()
        self.cycles = cycles
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.cuda._sleep(self.cycles)
        return x * self.scale


def test_a_sleeping_module_is_timed_like_paired_events_after_two_minutes(tmp_path):
    model = Sleeper(_sleep_cycles(20)).cuda()
    x = torch.ones(4, device="cuda")
    paired = []

    def pre(module, args):
        module.start = torch.cuda.Event(enable_timing=True)
        module.start.record()

    def post(module, args, output):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        paired.append((module.start, end))

    model.register_forward_pre_hook(pre)
    model.register_forward_hook(post)
    path = tmp_path / "t.json"
    with Timeline(path) as timeline:
        with timeline.step():
            model(x).sum().backward()
        time.sleep(120)  # one window, two minutes long: float32 from one anchor would blur it
        with timeline.step():
            model(x).sum().backward()
    torch.cuda.synchronize()
    trace = load(path)
    names = thread_names(trace)
    gpu = [e for e in spans(trace) if e["name"] == "Sleeper" and e["cat"] == "forward"
           and names[e["tid"]].startswith("cuda") and e["args"]["step"] == 1]
    expected_us = paired[-1][0].elapsed_time(paired[-1][1]) * 1000
    assert gpu and gpu[0]["dur"] == pytest.approx(expected_us, rel=0.02)


def test_a_gpu_sleep_at_step_start_does_not_slow_the_host_step(tmp_path):
    cycles = _sleep_cycles(200)
    model = Heavy(256).cuda()
    x = torch.randn(64, 256, device="cuda")
    host = []
    with Timeline(tmp_path / "t.json", schedule=Schedule(wait=0, warmup=1, active=3, repeat=1)) as timeline:
        for _ in range(4):
            with timeline.step():
                start = time.perf_counter()
                torch.cuda._sleep(cycles)  # the GPU is 200 ms behind for the whole step
                model(x).backward()
                host.append(time.perf_counter() - start)
    assert max(host[1:]) < 0.1, host  # no wait for the GPU inside a step


def test_make_graphed_callables_inside_a_scheduled_timeline(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).cuda()
    x = torch.randn(8, 64, device="cuda", requires_grad=True)
    with pytest.warns(RuntimeWarning, match="captured"):
        with Timeline(tmp_path / "t.json", schedule=Schedule(wait=0, warmup=0, active=4, repeat=1)) as timeline:
            with timeline.step():
                graphed = torch.cuda.make_graphed_callables(model, (x,))
            for _ in range(3):
                with timeline.step():
                    graphed(x).sum().backward()
    trace = load(tmp_path / "t.000.json")
    assert trace["metadata"]["gpu_marks_skipped_in_capture"] > 0


def test_a_side_stream_modules_backward_lands_on_its_streams_track(tmp_path):
    class SideStream(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(512, 512)
            self.stream = torch.cuda.Stream()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                y = self.lin(x)
            torch.cuda.current_stream().wait_stream(self.stream)
            return y

    model = SideStream().cuda()
    x = torch.randn(64, 512, device="cuda", requires_grad=True)
    path = tmp_path / "t.json"
    with Timeline(path) as timeline:
        for _ in range(2):
            with timeline.step():
                model(x).sum().backward()
    trace = load(path)
    names = thread_names(trace)
    tracks = {names[e["tid"]] for e in spans(trace) if e["name"] == "SideStream.lin" and e["cat"] == "backward"
              and names[e["tid"]].startswith("cuda")}
    assert tracks == {f"cuda:0 stream {model.stream.stream_id}"}, tracks
