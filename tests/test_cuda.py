"""On a real GPU: no synchronisation inside traced steps, nesting GPU tracks, and GPU
span times that agree with torch.profiler's kernel times. Skipped without CUDA; the
same resolution code runs on the CPU in test_clock.py through the fake backend."""

import pytest
import torch

from modtimeline import Timeline
from modtimeline.analysis import read_trace, samples

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


def test_no_sync_inside_traced_steps(tmp_path):
    model = Heavy(1024).cuda()
    x = torch.randn(512, 1024, device="cuda")
    model(x).backward()  # warm up outside
    timeline = Timeline(tmp_path / "t.json")
    with timeline:
        for _ in range(3):
            with timeline.step():
                torch.cuda.set_sync_debug_mode("error")
                try:
                    model(x).backward()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
    assert load(tmp_path / "t.json")["metadata"]["device"] == "cuda"


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
    assert len([t for t in gpu_tracks if "stream" in t]) >= 2, gpu_tracks
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
