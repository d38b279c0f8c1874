"""``modtimeline merge --profiler``: module spans inside a torch.profiler (Kineto) trace.

The output is the profiler's own Chrome trace with our forward, backward and step tracks
added as threads of the profiler's process, on the profiler's clock, so ops, kernels and
the modules that ran them are on one timeline in Perfetto UI.

Clocks. Kineto writes times in µs after ``baseTimeNanoseconds`` of its own clock (the
wall clock, as torch.profiler converts it); ours are ``perf_counter_ns``. At every step
boundary a Timeline reads its clock, opens and closes a profiler range named by that
reading, reads again, and opens a second range named by the second reading
(``format.PROFILER_CLOCK_MARK``/``_AFTER``). The first range began after the first reading
and ended before the second, which brackets the offset between the clocks:
``end - after <= offset <= begin - before``. The middle of the narrowest bracket is used,
taken separately in the first and second half of the run and interpolated between them
(a slow drift between the clocks is followed); half its width is the stated error.

Kernels. With GPU activities, each kernel is attributed to the innermost module span
whose time covers the CPU launch that started it (Kineto links launch and kernel by
``args.correlation``), and to every span around that one: the output holds, per GPU
stream, a ``cuda:N stream S (kernels)`` track with one span per (module, kernel), so
``summary`` and ``diff`` read exact per-module kernel time as device time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import orjson

from ..errors import TraceFormatError
from ..format import (FLOW_NONE, GPU_TRACK_PREFIX, KERNEL_TRACK_SUFFIX, NO_LAG, PROFILER_CLOCK_MARK, PROFILER_CLOCK_MARK_AFTER,
                      STEP, SpanColumns, Track, TraceData, gpu_stream_track)
from ..readers.load import load_trace
from ..readers.decoding import ReadLimits, guarded_read, read_bytes

TID_BASE = 1 << 28  # our tracks' thread ids in the profiler's process: clear of real tids
FLOW_BASE = 1 << 40  # our flow ids: clear of Kineto's
KERNEL_TID_BASE = TID_BASE + (1 << 20)
PROFILER_CLOCK_MARK_STEM = PROFILER_CLOCK_MARK.rstrip()  # both marker names start so


@dataclass
class ClockFit:
    """Our perf_counter_ns -> the profiler's absolute ns: ``t + offset(t)``."""

    points: list[tuple[int, int]]  # (our ns, offset ns), by our time
    markers: int
    error_ns: int | None  # half the narrowest marker bracket; None: no markers (wall clock)

    def offset(self, ns: int) -> int:
        """The line through the points (the clocks' drift), beyond them too."""
        points = self.points
        if len(points) == 1 or points[0][0] == points[-1][0]:
            return points[0][1]
        (t0, o0), (t1, o1) = points[0], points[-1]
        return o0 + round((o1 - o0) * (ns - t0) / (t1 - t0))


@dataclass
class ProfilerMergeResult:
    output: Path
    spans: int
    kernels_attributed: int
    kernels: int
    clock: ClockFit


@dataclass(frozen=True)
class Bracket:
    """One marker pair: the offset (profiler ns - our ns) lies in [low, high]."""

    ours: int  # our reading before the first range
    low: int
    high: int


def _brackets(events: list[Any], base_ns: int) -> tuple[list[Bracket], Any]:
    """Every clock-marker pair in the profiler's events, and the pid that holds them. The
    first range began after our reading ``before`` and ended before our reading ``after``:
    ``end - after <= offset <= begin - before``."""
    marks: dict[Any, list[tuple[int, str, int, int]]] = {}  # tid -> (profiler begin, kind, ours, profiler end)
    pid = None
    for event in events:
        if not isinstance(event, dict) or event.get("ph") != "X":
            continue
        name = event.get("name")
        if not isinstance(name, str) or not name.startswith(PROFILER_CLOCK_MARK_STEM):
            continue
        for prefix in (PROFILER_CLOCK_MARK, PROFILER_CLOCK_MARK_AFTER):
            if name.startswith(prefix):
                try:
                    ours = int(name[len(prefix):])
                    begin = base_ns + round(float(event["ts"]) * 1000)
                    end = begin + round(float(event.get("dur", 0)) * 1000)
                except (KeyError, TypeError, ValueError):
                    break
                marks.setdefault(event.get("tid"), []).append((begin, prefix, ours, end))
                pid = event.get("pid")
                break
    return paired_brackets(marks.values()), pid


def paired_brackets(marks: Iterable[list[tuple[int, str, int, int]]]) -> list[Bracket]:
    """The brackets of clock-marker pairs, per thread: (profiler begin, kind, our reading,
    profiler end) of each marker range; a "before" range followed by its "after" one brackets
    the offset. In our reading's order. (Also used on a live profile: capture/inductor_detail.py.)"""
    brackets = []
    for found in marks:
        found.sort()
        for (begin, kind, before, end), (_, next_kind, after, _) in zip(found, found[1:]):
            if kind == PROFILER_CLOCK_MARK and next_kind == PROFILER_CLOCK_MARK_AFTER and after >= before:
                brackets.append(Bracket(before, end - after, begin - before))
    return sorted(brackets, key=lambda b: b.ours)


def fit_clock(brackets: list[Bracket]) -> ClockFit:
    """The offset from marker brackets: in each half of the run, the middle of the
    narrowest bracket (interpolated between the halves, which follows a slow drift); its
    half-width is the error."""
    halves = [brackets[: len(brackets) // 2], brackets[len(brackets) // 2:]] if len(brackets) >= 4 else [brackets]
    points = []
    error = 0
    for half in halves:
        best = min(half, key=lambda b: b.high - b.low)
        points.append((best.ours, (best.low + best.high) // 2))
        error = max(error, (best.high - best.low + 1) // 2)
    return ClockFit(sorted(points), len(brackets), error)


def merge_profiler(profiler_path: str | Path, trace_path: str | Path, output: str | Path, limits: ReadLimits) -> \
        ProfilerMergeResult:
    """Write ``output``: the profiler's trace with ``trace_path``'s spans in it (``output``
    may be ``profiler_path``: it is replaced atomically)."""
    profiler_path = Path(profiler_path)
    return guarded_read(profiler_path, lambda: _merge_profiler(profiler_path, Path(trace_path), Path(output), limits))


def _merge_profiler(profiler_path: Path, trace_path: Path, output: Path, limits: ReadLimits) -> ProfilerMergeResult:
    raw = read_bytes(profiler_path, limits)
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise TraceFormatError(f"{profiler_path}: not valid JSON ({error.msg} at byte {error.pos}); is it a "
                               "torch.profiler trace (export_chrome_trace)?") from None
    if not isinstance(document, dict) or not isinstance(document.get("traceEvents"), list):
        raise TraceFormatError(f"{profiler_path}: not a Chrome trace (no traceEvents list)")
    their_metadata = document.get("metadata")
    if isinstance(their_metadata, dict) and their_metadata.get("tool") == "modtimeline":
        raise TraceFormatError(f"{profiler_path}: a modtimeline trace, not a torch.profiler one; give the profiler's "
                               "trace first: --profiler KINETO.json TRACE")
    events: list[Any] = document["traceEvents"]
    if len(events) > limits.max_events:
        raise TraceFormatError(f"{profiler_path}: {len(events):,} events is over the {limits.max_events:,} limit "
                               "(--max-events raises it)")
    base_ns = document.get("baseTimeNanoseconds", 0)
    if isinstance(base_ns, bool) or not isinstance(base_ns, int):
        raise TraceFormatError(f"{profiler_path}: baseTimeNanoseconds is not a whole number")

    loaded = load_trace(trace_path, limits)
    if loaded.merged or len(loaded.processes) != 1:
        raise TraceFormatError(f"{trace_path}: a merged trace of several ranks; give the one rank file that ran "
                               "under this profiler")
    data = loaded.processes[0]
    brackets, pid = _brackets(events, base_ns)
    if pid is None:
        pid = _main_pid(events)
    if brackets:
        clock = fit_clock(brackets)
    else:
        # No markers (the Timeline ran outside the profile): the wall clock read when the
        # window started; its error is unknown.
        wall, base = data.metadata.get("base_wall_time_ns"), data.metadata.get("base_ns")
        if not isinstance(wall, int) or not isinstance(base, int):
            raise TraceFormatError(f"{trace_path}: no clock markers in the profiler's trace and no wall-clock time in "
                                   "the trace's metadata: they cannot be lined up")
        clock = ClockFit([(base, wall - base)], 0, None)

    spans = data.spans
    offset = clock.offset
    ours = TraceData(pid if isinstance(pid, int) else 0, base_ns, data.names,
                     [Track(TID_BASE + t.tid, t.name if t.name.startswith(GPU_TRACK_PREFIX) else f"modtimeline {t.name}")
                      for t in data.tracks], SpanColumns())
    for row in range(len(spans)):
        begin, end = spans.begin[row], spans.end[row]
        ours.spans.append(TID_BASE + spans.track[row], begin + offset(begin), end + offset(end), spans.name[row],
                          spans.category[row], spans.call[row], spans.step[row], spans.flags[row], spans.flow[row],
                          spans.lag[row])
    attributed, kernels = _attribute_kernels(events, ours, base_ns)

    metadata = dict(data.metadata)
    metadata.update(merged_with_profiler=str(profiler_path), base_ns=base_ns, rank=data.rank,
                    profiler_clock_offset_ns=clock.points[0][1], profiler_clock_error_ns=clock.error_ns,
                    profiler_clock_markers=clock.markers, kernels_attributed=attributed)
    extra = {key: value for key, value in document.items() if key not in ("traceEvents", "metadata")}
    _write(output, metadata, events, ours, extra)
    return ProfilerMergeResult(output, len(spans), attributed, kernels, clock)


def _main_pid(events: list[Any]) -> Any:
    for event in events:
        if isinstance(event, dict) and event.get("ph") == "X" and event.get("cat") == "cpu_op":
            return event.get("pid")
    return 0


def _attribute_kernels(events: list[Any], ours: TraceData, base_ns: int) -> tuple[int, int]:
    """Per GPU kernel, a span for each host module span (forward, backward, recompute)
    around its CPU launch, on a kernels track of its stream. Returns (attributed, kernels)."""
    launches: dict[Any, int] = {}  # correlation -> launch time (profiler ns)
    kernels = []
    for event in events:
        if not isinstance(event, dict) or event.get("ph") != "X":
            continue
        category = event.get("cat")
        args = event.get("args")
        correlation = args.get("correlation") if isinstance(args, dict) else None
        if correlation is None:
            continue
        if category in ("cuda_runtime", "cuda_driver"):
            launches[correlation] = base_ns + round(float(event["ts"]) * 1000)
        elif category in ("kernel", "gpu_memcpy", "gpu_memset"):
            kernels.append(event)
    if not kernels:
        return 0, 0
    spans = ours.spans
    # Sweep each track's spans (in nesting order) against the launches in time order: the
    # spans open at a launch are the ones that cover it.
    timed = sorted((launches[k["args"]["correlation"]], n) for n, k in enumerate(kernels)
                   if k["args"]["correlation"] in launches)
    covering: dict[int, list[int]] = {n: [] for _, n in timed}
    # Host tracks only: a launch is a host time, and a GPU track's spans are device times
    # (a GPU running behind the host has them tens of ms later than the launches).
    device_tracks = {track.tid for track in ours.tracks if track.name.startswith(GPU_TRACK_PREFIX)}
    by_track: dict[int, list[int]] = {}
    for row in range(len(spans)):
        if spans.category[row] != STEP and spans.track[row] not in device_tracks:
            by_track.setdefault(spans.track[row], []).append(row)
    for rows in by_track.values():
        stack: list[int] = []
        next_row = 0
        for launch, n in timed:
            while next_row < len(rows) and spans.begin[rows[next_row]] <= launch:
                row = rows[next_row]
                while stack and spans.end[stack[-1]] < spans.begin[row]:
                    stack.pop()
                stack.append(row)
                next_row += 1
            while stack and spans.end[stack[-1]] < launch:
                stack.pop()
            covering[n].extend(r for r in stack if spans.end[r] >= launch)
    attributed = 0
    kernel_tracks: dict[tuple[Any, Any], int] = {}
    rows_out: list[tuple[int, int, int, int, int, int, int, int]] = []
    for n, rows in covering.items():
        if not rows:
            continue
        kernel = kernels[n]
        attributed += 1
        device = kernel["args"].get("device", kernel.get("pid"))
        stream = kernel["args"].get("stream", kernel.get("tid"))
        tid = kernel_tracks.get((device, stream))
        if tid is None:
            tid = kernel_tracks[device, stream] = KERNEL_TID_BASE + len(kernel_tracks)
            ours.tracks.append(Track(tid, gpu_stream_track(device, stream) + KERNEL_TRACK_SUFFIX))
        begin = base_ns + round(float(kernel["ts"]) * 1000)
        end = begin + round(float(kernel.get("dur", 0)) * 1000)
        for r in rows:
            rows_out.append((tid, begin, end, spans.end[r] - spans.begin[r], spans.name[r], spans.category[r],
                             spans.call[r], spans.step[r]))
    # One kernel under several modules: the same interval once per module, outermost
    # (longest module span) first, so they nest on the kernels track.
    rows_out.sort(key=lambda r: (r[0], r[1], -r[2], -r[3]))
    for tid, begin, end, _, name, category, call, step in rows_out:
        spans.append(tid, begin, end, name, category, call, step, 0, FLOW_NONE, NO_LAG)
    return attributed, len(kernels)


def _write(output: Path, metadata: dict[str, Any], events: list[Any], ours: TraceData, extra: dict[str, Any]) -> None:
    from ..writers import format_for, trace_output
    from ..writers.chrome import ChromeWriter

    fmt = format_for(output)
    if fmt == "pftrace":
        raise TraceFormatError("a profiler merge writes .json or .json.gz (the profiler's own events are JSON)")
    with trace_output(output, fmt) as stream:
        writer = ChromeWriter(stream, metadata)
        writer.add_events(orjson.dumps(event) for event in events)
        writer.add_process(ours, None, FLOW_BASE)
        writer.close(extra)
