"""GPU: what one device mark costs the host, and how many marks a module call makes.

A ``device="cuda"`` Timeline records a CUDA event at each span boundary: the forward's
begin and end of every module call, and in backward each gradient-ready and node-done
mark of the autograd nodes the calls link to. This reporter says, per workload of
``benchmarks/gpu.py``, how many marks of each kind one step makes per module call
(through the fake backend on a CPU, the real one on a GPU), and on a GPU the host time
of each part of one mark (medians of repeated loops), so a cut can aim at what costs.

    python benchmarks/gpu_marks.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu import count_calls, workloads  # noqa: E402
from report import machine, save  # noqa: E402

from modtimeline import Timeline  # noqa: E402
from modtimeline.capture import buffer  # noqa: E402
from modtimeline.device.clock import CudaBackend, DeviceClock  # noqa: E402
from modtimeline.device.fake import FakeBackend  # noqa: E402

KIND_NAMES = {getattr(buffer, name): name for name in ("FORWARD_BEGIN", "FORWARD_END", "GRADIENT_READY", "NODE_DONE",
                                                        "BACKWARD_DONE", "RECOMPUTE_BEGIN", "RECOMPUTE_END")}


def marks_per_call(device: str, folder: Path) -> dict[str, Any]:
    """Marks by kind in one recorded step, per module call."""
    results: dict[str, Any] = {}
    for name, (model, x) in workloads(device).items():
        calls = count_calls(model, x)
        seen: Counter[str] = Counter()
        original = DeviceClock.record_event

        def counting(self: DeviceClock, host_event: int, kind: int, module: int, call: int = 0) -> None:
            if kind in KIND_NAMES:
                seen[KIND_NAMES[kind]] += 1
            original(self, host_event, kind, module, call)

        DeviceClock.record_event = counting  # type: ignore[method-assign]
        try:
            backend: Any = FakeBackend() if device == "cpu" else CudaBackend()
            backend.marks_type = None  # (counted where Python makes them: the same marks)
            with Timeline(folder / f"{name}.json", device="cuda", device_backend=backend) as timeline:
                model(x).sum().backward()  # (the first step: devices seen and anchored)
                seen.clear()
                with timeline.step():
                    model(x).sum().backward()
        finally:
            DeviceClock.record_event = original  # type: ignore[method-assign]
        results[name] = {"module_calls": calls, "marks": dict(seen),
                         "marks_per_call": sum(seen.values()) / calls}
    return results


def timed(run: Callable[[], Any], loops: int = 2000, repeats: int = 7) -> float:
    """Median ns of one ``run()`` over ``repeats`` loops of ``loops`` calls."""
    medians = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(loops):
            run()
        medians.append((time.perf_counter_ns() - start) / loops)
    return statistics.median(medians)


def mark_parts() -> dict[str, float]:
    """Host ns of each call one mark makes, and of the whole mark."""
    cuda = torch.cuda
    events = [cuda.Event(enable_timing=True) for _ in range(4096)]
    for event in events:
        event.record()
    stream = cuda.current_stream(0)
    backend = CudaBackend()
    cycle = iter(events * 1000)
    done_a, done_b = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)  # (outside the cycle)
    done_a.record()
    done_b.record()
    torch.cuda.synchronize()

    def record_as_before() -> None:  # (CudaBackend.record before 2026-12-04)
        event = next(cycle)
        stream = cuda.current_stream(0)
        event.record(stream)

    parts = {
        "torch.cuda.current_stream(0)": timed(lambda: cuda.current_stream(0)),
        "torch._C._cuda_getCurrentStream(0)": timed(lambda: torch._C._cuda_getCurrentStream(0)),
        "torch.cuda.current_device()": timed(cuda.current_device),
        "torch.cuda.is_current_stream_capturing()": timed(cuda.is_current_stream_capturing),
        "Event.record(stream)": timed(lambda: next(cycle).record(stream)),
        "a record as before (current_stream + Event.record)": timed(record_as_before),
        "CudaBackend.record (cached stream, torch._C record)": timed(lambda: backend.record(next(cycle), 0)),
        "Event.query() (completed)": timed(done_b.query),
        "Event.elapsed_time (completed)": timed(lambda: done_a.elapsed_time(done_b)),
        "time.perf_counter_ns()": timed(time.perf_counter_ns),
    }
    # The whole mark, as a forward begin of a module on device 0 (pool refilled outside).
    clock = DeviceClock(backend, module_device=lambda module: 0)
    clock.record_event(0, buffer.FORWARD_BEGIN, 0)
    clock.begin_step()

    def mark() -> None:
        clock.record_event(0, buffer.FORWARD_BEGIN, 0)

    whole = []
    for _ in range(7):
        clock.begin_step()  # (resolves what completed: the pool is refilled, outside the timing)
        torch.cuda.synchronize()
        whole.append(timed(mark, loops=2000, repeats=1))
    parts["DeviceClock.record_event (one whole mark)"] = statistics.median(whole)
    if backend.marks_type is not None:  # the same mark made in C++ (_cuda_marks), called from Python here
        compiled = DeviceClock(backend, module_device=lambda module: 0, marks_type=backend.marks_type)
        assert compiled.marks is not None
        compiled_mark = functools.partial(compiled.marks.mark, 0, buffer.FORWARD_BEGIN, 0)
        whole = []
        for _ in range(7):
            compiled.begin_step()  # (takes the marks back, lends events for the next 2000)
            torch.cuda.synchronize()
            whole.append(timed(compiled_mark, loops=2000, repeats=1))
        parts["CudaMarks.mark (compiled, one whole mark, from Python)"] = statistics.median(whole)
    # The boundary's read of completed marks, per mark (2000 marks a boundary).
    harvest = []
    for _ in range(5):
        clock.begin_step()
        for _ in range(2000):
            mark()
        torch.cuda.synchronize()
        start = time.perf_counter_ns()
        clock.begin_step()
        harvest.append((time.perf_counter_ns() - start) / 2000)
    parts["DeviceClock.begin_step, per completed mark read"] = statistics.median(harvest)
    return parts


def step_split(folder: Path, steps: int = 20) -> dict[str, Any]:
    """Host ms per step of the tiny modules: the model's work (forward, backward) and the
    Timeline's step boundaries apart, untraced, host spans, GPU spans."""
    model, x = workloads("cuda")["tiny-modules"]
    results: dict[str, Any] = {}
    def python_marks() -> CudaBackend:
        backend = CudaBackend()
        backend.marks_type = None
        return backend

    for variant, device, backend in (("untraced", None, None), ("Timeline device=cpu", "cpu", None),
                                     ("Timeline device=cuda, marks in Python", "cuda", python_marks()),
                                     ("Timeline device=cuda", "cuda", None)):
        work, boundary = [], []
        timeline = Timeline(folder / f"split-{variant}.json", device=device, device_backend=backend) if device else None
        with timeline if timeline is not None else contextlib.nullcontext():
            for _ in range(steps + 2):
                torch.cuda.synchronize()
                start = time.perf_counter_ns()
                step = timeline.step() if timeline is not None else contextlib.nullcontext()
                step.__enter__()
                entered = time.perf_counter_ns()
                model(x).sum().backward()
                worked = time.perf_counter_ns()
                step.__exit__(None, None, None)
                done = time.perf_counter_ns()
                work.append((worked - entered) / 1e6)
                boundary.append((entered - start + done - worked) / 1e6)
        results[variant] = {"work_ms": statistics.median(work[2:]), "boundaries_ms": statistics.median(boundary[2:])}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}" if gpu else f"{machine()}, fake device backend"
    with tempfile.TemporaryDirectory() as tmp:
        results: dict[str, Any] = {"device": where, "marks": marks_per_call(device, Path(tmp))}
    if gpu:
        results["mark_parts_ns"] = mark_parts()
        with tempfile.TemporaryDirectory() as tmp:
            results["step_split"] = step_split(Path(tmp))
    lines = [f"{where}.", "", "| workload | module calls | marks per call | by kind (one step) |", "|---|---:|---:|---|"]
    for name, row in results["marks"].items():
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(row["marks"].items()))
        lines.append(f"| {name} | {row['module_calls']} | {row['marks_per_call']:.2f} | {kinds} |")
    if gpu:
        lines += ["", "| part of a mark | host ns |", "|---|---:|"]
        lines += [f"| {part} | {ns:.0f} |" for part, ns in results["mark_parts_ns"].items()]
        lines += ["", "| tiny modules, host ms a step | model's work (forward, backward) | step boundaries |",
                  "|---|---:|---:|"]
        lines += [f"| {variant} | {row['work_ms']:.2f} | {row['boundaries_ms']:.2f} |"
                  for variant, row in results["step_split"].items()]
    save("gpu-marks" if gpu else "gpu-marks-fake", results, "\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
