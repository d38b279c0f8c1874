"""Device clock resolution, driven on the CPU by the fake backend (same code as CUDA)."""

import time

import pytest
import torch

from modtimeline import Timeline
from modtimeline.clock import DeviceClock, FakeBackend

from .models import Tree, train_step
from .trace_checks import assert_nested, load, spans, thread_names


def test_known_event_times_map_to_host_clock():
    backend = FakeBackend(lag_ns=5_000)
    clock = DeviceClock(backend)
    before = time.perf_counter_ns()
    clock.mark(0)
    clock.mark(1)
    marks = clock.resolve()
    assert list(marks.host_event) == [0, 1]
    # exact: no drift, the device's own clock offset cancels, the fake's anchor is ideal
    assert list(marks.time_ns) == [done for stream, done in backend.recorded]
    assert marks.time_ns[0] >= before + 5_000
    assert marks.streams == [(0, 7)]


def test_drift_error_is_bounded_by_one_window():
    rate = 1 + 100e-6  # a GPU clock 100 ppm fast
    backend = FakeBackend(lag_ns=0, rate=rate)
    clock = DeviceClock(backend)
    clock.mark(0)  # first sight of the device: anchors it
    anchor_host_ns = clock._anchors[0][0]
    time.sleep(0.05)
    clock.mark(1)
    marks = clock.resolve()
    true_ns = backend.recorded[-1][1]
    # error grows with the time since the anchor: exactly the drift over it
    assert abs((marks.time_ns[1] - true_ns) - (rate - 1) * (true_ns - anchor_host_ns)) <= 1
    assert marks.time_ns[1] - true_ns >= 4_000  # 100 ppm of >= 50 ms
    # resolve() re-anchored: the next window starts accurate again
    clock.mark(2)
    again = clock.resolve()
    new_anchor_ns = clock._anchors[0][0]
    assert new_anchor_ns > anchor_host_ns
    assert abs(again.time_ns[0] - backend.recorded[-1][1]) < 4_000


def test_several_streams_and_pool_reuse():
    backend = FakeBackend()
    clock = DeviceClock(backend)
    for _ in range(3):  # three windows
        for i in range(10):
            backend.stream = (0, 7) if i % 2 else (0, 9)
            clock.mark(i)
        marks = clock.resolve()
        assert sorted(set(marks.stream)) == [0, 1]
        assert marks.streams == [(0, 9), (0, 7)]
    # 10 events + 1 anchor, reused in every window
    assert clock.events_created == 11
    assert clock.pending() == 0


def test_no_synchronize_while_recording():
    backend = FakeBackend()
    clock = DeviceClock(backend)
    clock.mark(0)  # first sight of the device anchors it (one synchronize)
    syncs = backend.synchronizations
    for i in range(1, 100):
        clock.mark(i)
    assert backend.synchronizations == syncs


def test_timeline_synchronizes_only_outside_steps(tmp_path):
    backend = FakeBackend()
    model = Tree()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    in_step = []
    original = backend.synchronize

    def synchronize(device):
        in_step.append(timeline._in_step)
        original(device)

    backend.synchronize = synchronize
    timeline = Timeline(tmp_path / "t.json", device="cuda", device_backend=backend)
    with timeline:
        for _ in range(3):
            with timeline.step():
                train_step(model, optimizer)
    assert in_step and not any(in_step)


def _gpu_timeline(tmp_path, backend, fail=False, memory=False):
    model = Tree()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path / "gpu.json"
    timeline = Timeline(path, device="cuda", device_backend=backend, memory=memory)
    with timeline:
        with timeline.step():
            train_step(model, optimizer)
        if fail:
            with timeline.step():
                model.layers[1].forward = lambda x: (_ for _ in ()).throw(ValueError("mid-step"))
                train_step(model, optimizer)
    return load(path)


def test_gpu_spans_on_stream_tracks_nest_and_lag(tmp_path):
    backend = FakeBackend(lag_ns=30_000)
    trace = _gpu_timeline(tmp_path, backend, memory=True)
    names = thread_names(trace)
    events = spans(trace)
    gpu = [e for e in events if names[e["tid"]].startswith("cuda:0 stream 7")]
    cpu = [e for e in events if names[e["tid"]] in ("forward", "backward")]
    assert len(gpu) == len(cpu)
    assert {e["cat"] for e in gpu} == {"forward", "backward", "recompute"}
    for e in gpu:
        assert e["args"]["launch_lag_us"] >= 30.0
    assert_nested(trace)
    counters = [e for e in trace["traceEvents"] if e.get("ph") == "C"]
    assert counters and counters[0]["name"] == "cuda:0 memory allocated (bytes)"
    assert trace["metadata"]["device"] == "cuda"


def test_module_spread_over_two_streams_gets_its_own_track(tmp_path):
    backend = FakeBackend()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))

    def switch_stream(module, args, output):
        backend.stream = (0, 13)

    model[0].register_forward_hook(switch_stream)
    path = tmp_path / "spread.json"
    with Timeline(path, device="cuda", device_backend=backend):
        model(torch.randn(2, 4))
    trace = load(path)
    names = thread_names(trace)
    by_track = {(names[e["tid"]], e["name"]) for e in spans(trace)}
    assert ("cuda:0 across streams", "Sequential") in by_track  # began on 7, ended on 13
    assert ("cuda:0 stream 7", "Sequential.0") in by_track
    assert ("cuda:0 stream 13", "Sequential.1") in by_track
    assert_nested(trace)


def test_exception_mid_step_with_device_clock(tmp_path):
    backend = FakeBackend()
    with pytest.raises(ValueError, match="mid-step"):
        _gpu_timeline(tmp_path, backend, fail=True)
    trace = load(tmp_path / "gpu.json")
    assert_nested(trace)
    names = thread_names(trace)
    steps = {e["args"]["step"] for e in spans(trace) if names[e["tid"]].startswith("cuda")}
    assert steps == {0, 1}


class _StandInCuda:
    """Just enough of the torch.cuda API, with a fake clock, to run CudaBackend on a CPU."""

    def __init__(self):
        self.synchronized = []
        self._stream = type("Stream", (), {"device": torch.device("cuda", 0), "stream_id": 7})()

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing, "events must be created with timing enabled"
            self.recorded_at = None

        def record(self, stream=None):
            self.recorded_at = time.perf_counter_ns() + 10_000

        def elapsed_time(self, end):
            return (end.recorded_at - self.recorded_at) / 1e6  # milliseconds, like CUDA

    def current_stream(self, device=None):
        return self._stream

    def current_device(self):
        return 0

    def synchronize(self, device=None):
        self.synchronized.append(device)

    def memory_allocated(self, device=None):
        return 4096


def test_cuda_backend_calls_through_a_stand_in_torch_cuda(tmp_path):
    from modtimeline.clock import CudaBackend

    backend = CudaBackend()
    backend._cuda = _StandInCuda()
    model = Tree()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path / "cuda.json"
    with Timeline(path, device="cuda", device_backend=backend, memory=True) as timeline:
        with timeline.step():
            train_step(model, optimizer)
    trace = load(path)
    names = thread_names(trace)
    gpu = [e for e in spans(trace) if names[e["tid"]] == "cuda:0 stream 7"]
    assert len(gpu) == len([e for e in spans(trace) if names[e["tid"]] in ("forward", "backward")])
    # every event, the anchor too, completes 10 µs after its record: that offset cancels
    assert all(-50.0 < e["args"]["launch_lag_us"] < 1000.0 for e in gpu)
    assert backend._cuda.synchronized  # anchoring and resolving synchronise, outside the step
