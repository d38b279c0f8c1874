"""Synthetic modtimeline traces with known per-step timing distributions (no torch)."""

from __future__ import annotations

import random
from pathlib import Path

from modtimeline.analysis.reader import Span, Trace
from modtimeline.format import BACKWARD, FORWARD, FORWARD_TRACK, BACKWARD_TRACK, STEP, STEPS_TRACK, SpanColumns, TraceData, Track
from modtimeline.writers import write_trace


def module_names(count: int) -> list[str]:
    return ["Model"] + [f"Model.layers.{i}" for i in range(count - 1)]


def step_durations(count: int, steps: int, seed: int, cv: float = 0.05, slow: dict[int, float] | None = None,
                   base_us: float = 200.0) -> list[list[float]]:
    """Per step, per child module: a lognormal-ish duration in ns around base_us (x slow factor)."""
    rng = random.Random(seed)
    means = [base_us * (0.5 + (i % 7) / 4) for i in range(count - 1)]
    slow = slow or {}
    return [[means[i] * slow.get(i + 1, 1.0) * 1000 * rng.lognormvariate(0, cv) for i in range(count - 1)]
            for _ in range(steps)]


def in_memory(count: int, steps: int, seed: int, **kwargs) -> Trace:
    """A Trace object as the reader would build it: root spans contain sequential children."""
    spans: list[Span] = []
    t = 0
    for step, durations in enumerate(step_durations(count, steps, seed, **kwargs)):
        for phase, track in (("forward", (0, FORWARD_TRACK)), ("backward", (0, BACKWARD_TRACK))):
            start = t
            for i, d in enumerate(durations if phase == "forward" else reversed(durations)):
                spans.append(Span(f"Model.layers.{i if phase == 'forward' else len(durations) - 1 - i}", phase, "cpu",
                                  track, step, t, t + int(d)))
                t += int(d)
            spans.append(Span("Model", phase, "cpu", track, step, start, t))
    return Trace(Path(f"memory-{seed}"), {"tool": "modtimeline"}, spans)


def write(path: Path, count: int, steps: int, seed: int, **kwargs) -> Path:
    """The same trace written by the real writer, as a file."""
    write_trace(trace_data(count, steps, seed, **kwargs), path)
    return path


def trace_data(count: int, steps: int, seed: int, **kwargs) -> TraceData:
    """The same trace as the writers take it."""
    names = module_names(count)
    columns = SpanColumns()
    t = 0
    call = 0
    for step, durations in enumerate(step_durations(count, steps, seed, **kwargs)):
        step_start = t
        for category, track in ((FORWARD, FORWARD_TRACK), (BACKWARD, BACKWARD_TRACK)):
            start = t
            order = range(len(durations)) if category == FORWARD else reversed(range(len(durations)))
            children = []
            for i in order:
                children.append((t, t + int(durations[i]), i + 1))
                t += int(durations[i])
            columns.append(track, start, t, 0, category, call, step)
            for begin, end, name in children:
                columns.append(track, begin, end, name, category, call + name, step)
        columns.append(STEPS_TRACK, step_start, t, len(names) + step, STEP, step, step)
        call += count
    data = TraceData(0, 0, names + [f"step {s}" for s in range(steps)],
                     [Track(STEPS_TRACK, "steps"), Track(FORWARD_TRACK, "forward"), Track(BACKWARD_TRACK, "backward")],
                     columns, metadata={"tool": "modtimeline", "steps": list(range(steps))})
    return data
