"""Read modtimeline traces (``.json``, ``.json.gz``, ``.pftrace``) into per-step samples.

Never imports torch: a CI job that only compares traces does not need it.
"""

from __future__ import annotations

import math
import os
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ..errors import TraceFileError, TraceFormatError
from ..format import CATEGORIES, GPU_TRACK_PREFIX, TOOL, check_version
from ..gc_pause import paused_gc
from ..writers import TRACE_SUFFIXES

T = TypeVar("T")

PHASES = ("forward", "backward", "recompute")
_OUR_CATEGORIES = frozenset(CATEGORIES)


@dataclass(frozen=True)
class ReadLimits:
    """What one trace file may hold before reading it stops with a clear error (so a
    hostile or runaway file cannot take the machine's memory). ``--max-trace-mb`` and
    ``--max-events`` raise the first two."""

    max_bytes: int = 512 << 20  # the file's size, after gunzip
    max_events: int = 3_000_000  # trace events (spans, metadata)
    max_name: int = 4096  # characters in a module, track or category name


DEFAULT_LIMITS = ReadLimits()
# Timestamps and durations beyond this (µs, ~31 years) are damage, not time.
_MAX_MICROSECONDS = 1e15

# (FQN, phase, device), e.g. ("GPT.blocks.0.attn", "backward", "cpu")
Key = tuple[str, str, str]


@dataclass
class Sample:
    """One module's time in one step: inclusive and self (minus nested spans) ns, calls."""

    inclusive_ns: int = 0
    self_ns: int = 0
    calls: int = 0
    approximate: int = 0  # calls whose span's end is only a bound (args.approximate)


@dataclass(slots=True)
class Span:
    name: str
    phase: str
    device: str
    track: tuple[int, int]  # (pid, tid): spans nest within a track
    step: int
    begin_ns: int
    end_ns: int
    approximate: bool = False  # the span's end is only a bound (args.approximate)
    call: int = -1  # args.call: calls are numbered as their forwards begin (-1: not given)


UNMARKED = -1  # the step of a span recorded outside any ``timeline.step()``


@dataclass
class Trace:
    """A trace file as the analysis sees it: spans and the steps they belong to."""

    path: Path
    metadata: dict[str, Any]
    spans: list[Span]
    step_ns: dict[int, int] = field(default_factory=dict)  # step -> duration of its step span
    # rank (pid) -> step -> duration: a merged trace holds every rank's steps
    rank_step_ns: dict[int, dict[int, int]] = field(default_factory=dict)

    def steps(self) -> list[int]:
        """Steps in order; a trace without marked steps is one step, numbered -1."""
        return sorted({span.step for span in self.spans} | set(self.step_ns))

    @property
    def steps_marked(self) -> bool:
        return bool(self.step_ns) or any(span.step != UNMARKED for span in self.spans)

    def kept_steps(self, warmup: int) -> list[int]:
        """The steps per-step figures are made of: the marked steps after the first
        ``warmup``; spans recorded between marked steps belong to none. A trace without
        marked steps (a Timeline without ``timeline.step()``) is one step, the whole
        trace, which warm-up never leaves out: there is nothing else to show."""
        marked = [step for step in self.steps() if step != UNMARKED]
        if not marked:
            return [UNMARKED]
        return marked[warmup:]


def per_rank(trace: Trace) -> list[Trace]:
    """A merged trace as one trace per rank (as if its rank files had been read), so that
    summary and diff count each rank's step as one sample, never several ranks' as one."""
    ranks = sorted({span.track[0] for span in trace.spans})
    if len(ranks) < 2:
        return [trace]
    by_rank: dict[int, list[Span]] = {rank: [] for rank in ranks}
    for span in trace.spans:
        by_rank[span.track[0]].append(span)
    return [Trace(trace.path, {**trace.metadata, "rank": rank}, by_rank[rank], dict(trace.rank_step_ns.get(rank, {})),
                  {rank: dict(trace.rank_step_ns.get(rank, {}))}) for rank in ranks]


def trace_files(paths: Sequence[str | Path]) -> list[Path]:
    """The trace files named by ``paths``; a directory stands for the traces inside it."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            try:
                found = sorted(p for p in path.iterdir() if p.name.endswith(TRACE_SUFFIXES) and p.is_file())
            except OSError as error:
                raise TraceFileError(f"{path}: cannot list: {error.strerror or error}") from None
            if not found:
                raise TraceFileError(f"{path}: no trace files ({', '.join(TRACE_SUFFIXES)}) in this directory")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise TraceFileError(f"{path}: no such file or directory")
    return files


def read_trace(path: str | Path, limits: ReadLimits = DEFAULT_LIMITS) -> Trace:
    """Read one trace file; a clear ``TraceFormatError`` if it is not a usable modtimeline
    trace (never another exception for what a file holds)."""
    path = Path(path)
    with paused_gc():
        return guarded_read(path, lambda: _read_trace(path, limits))


def guarded_read(path: Path, read: Callable[[], T]) -> T:
    """``read()``, with whatever a damaged file makes the parsing raise turned into a
    ``TraceFormatError`` that names the file."""
    try:
        return read()
    except (TraceFileError, TraceFormatError):
        raise
    except MemoryError:
        raise TraceFormatError(f"{path}: too big to read in this process's memory") from None
    except RecursionError:
        raise TraceFormatError(f"{path}: nested too deeply") from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, UnicodeError, IndexError) as error:
        raise TraceFormatError(f"{path}: malformed trace ({type(error).__name__}: {error})") from None


def read_bytes(path: Path, limits: ReadLimits) -> bytes:
    try:
        size = os.stat(path).st_size
        if size > limits.max_bytes:
            raise TraceFormatError(f"{path}: {size / 2**20:.0f} MiB is over the {limits.max_bytes / 2**20:.0f} MiB "
                                   "limit (--max-trace-mb raises it)")
        with open(path, "rb") as stream:
            raw = stream.read(limits.max_bytes + 1)
    except OSError as error:
        raise TraceFileError(f"{path}: cannot read: {error.strerror or error}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    # gzip, inflated in bounded pieces: a small file can inflate to gigabytes.
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflate.decompress(raw, limits.max_bytes + 1)
        if len(out) > limits.max_bytes or inflate.unconsumed_tail:
            raise TraceFormatError(f"{path}: inflates to more than the {limits.max_bytes / 2**20:.0f} MiB limit "
                                   "(--max-trace-mb raises it)")
        if not inflate.eof:
            raise TraceFormatError(f"{path}: damaged or truncated gzip data")
    except zlib.error:
        raise TraceFormatError(f"{path}: damaged or truncated gzip data") from None
    return out


def _read_trace(path: Path, limits: ReadLimits) -> Trace:
    raw = read_bytes(path, limits)
    if not raw:
        raise TraceFormatError(f"{path}: empty file")
    if raw.lstrip()[:1] == b"{":
        trace = _read_chrome_json(path, raw, limits)
    else:
        from .pftrace_reader import read_pftrace

        trace = read_pftrace(path, raw, limits)
    if not any(span.phase in PHASES for span in trace.spans):
        raise TraceFormatError(f"{path}: the trace holds no module spans")
    return trace


def checked_name(path: Path, value: Any, what: str, limits: ReadLimits) -> str:
    """A name from a trace file: a string of bounded length."""
    if not isinstance(value, str):
        raise TraceFormatError(f"{path}: {what} is {type(value).__name__}, not a string")
    if len(value) > limits.max_name:
        raise TraceFormatError(f"{path}: {what} is {len(value):,} characters long (limit {limits.max_name:,})")
    return value


def checked_int(path: Path, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 1 << 62:
        raise TraceFormatError(f"{path}: {what} is not a whole number ({str(value)[:40]!r})")
    return value


def checked_microseconds(path: Path, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or abs(value) > _MAX_MICROSECONDS:
        raise TraceFormatError(f"{path}: event {what} is not a usable time ({str(value)[:40]!r})")
    return value


def checked_metadata(path: Path, metadata: Any) -> dict[str, Any]:
    if not isinstance(metadata, dict) or metadata.get("tool") != TOOL:
        raise TraceFormatError(f"{path}: not a modtimeline trace (metadata.tool is not {TOOL!r})")
    problem = check_version(metadata)
    if problem:
        raise TraceFormatError(f"{path}: {problem}")
    return metadata


# What a torch.profiler (Kineto) Chrome trace has that ours never do: its own top-level
# keys, and its event categories.
_PROFILER_KEYS = frozenset(("schemaVersion", "deviceProperties", "distributedInfo", "baseTimeNanoseconds",
                            "traceName", "record_shapes", "with_stack", "profile_memory"))
_PROFILER_CATEGORIES = frozenset(("cpu_op", "python_function", "user_annotation", "cuda_runtime", "cuda_driver",
                                  "kernel", "gpu_memcpy", "gpu_memset", "gpu_user_annotation", "ac2g",
                                  "cpu_instant_event"))


def is_profiler_trace(document: dict[str, Any]) -> bool:
    """A torch.profiler Chrome trace that holds no modtimeline spans (one that
    ``merge --profiler`` wrote is a modtimeline trace)."""
    metadata = document.get("metadata")
    if isinstance(metadata, dict) and metadata.get("tool") == TOOL:
        return False
    if _PROFILER_KEYS.intersection(document):
        return True
    events = document.get("traceEvents")
    return isinstance(events, list) and any(isinstance(e, dict) and e.get("cat") in _PROFILER_CATEGORIES
                                            for e in events[:1000])


def chrome_document(path: Path, raw: bytes, limits: ReadLimits) -> tuple[dict[str, Any], list[Any]]:
    """(metadata, trace events) of a modtimeline Chrome trace, checked."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise TraceFormatError(f"{path}: not valid JSON ({error.msg} at byte {error.pos}); truncated?") from None
    if not isinstance(document, dict) or not isinstance(document.get("traceEvents"), list):
        raise TraceFormatError(f"{path}: not a Chrome trace (no traceEvents list)")
    if is_profiler_trace(document):
        raise TraceFormatError(f"{path}: a torch.profiler trace, not a modtimeline one; add the modtimeline trace of "
                               f"the same run to it with `modtimeline merge --profiler {path} TRACE -o merged.json`, "
                               "and summarise merged.json")
    metadata = checked_metadata(path, document.get("metadata"))
    events = document["traceEvents"]
    if len(events) > limits.max_events:
        raise TraceFormatError(f"{path}: {len(events):,} events is over the {limits.max_events:,} limit "
                               "(--max-events raises it)")
    return metadata, events


def _read_chrome_json(path: Path, raw: bytes, limits: ReadLimits) -> Trace:
    metadata, events = chrome_document(path, raw, limits)
    thread_names: dict[tuple[int, int], str] = {}
    spans: list[Span] = []
    step_ns: dict[int, int] = {}
    rank_step_ns: dict[int, dict[int, int]] = {}
    for event in events:
        if not isinstance(event, dict):
            raise TraceFormatError(f"{path}: a trace event is {type(event).__name__}, not an object")
        phase = event.get("ph")
        if phase == "X":
            category = checked_name(path, event.get("cat", ""), "event cat", limits)
            if category not in _OUR_CATEGORIES:
                continue  # another tool's (a torch.profiler trace we were merged into)
            track = (checked_int(path, event.get("pid"), "event pid"), checked_int(path, event.get("tid"), "event tid"))
            begin = round(checked_microseconds(path, event.get("ts"), "ts") * 1000)
            duration = checked_microseconds(path, event.get("dur"), "dur")
            if duration < 0:
                raise TraceFormatError(f"{path}: event dur is negative ({duration})")
            end = begin + round(duration * 1000)
            args = event.get("args", {})
            if not isinstance(args, dict):
                raise TraceFormatError(f"{path}: event args is {type(args).__name__}, not an object")
            step = checked_int(path, args.get("step", -1), "event args.step")
            name = checked_name(path, event.get("name"), "event name", limits)
            call = checked_int(path, args.get("call", -1), "event args.call")
            if category == "step":
                step_ns[step] = end - begin
                rank_step_ns.setdefault(track[0], {})[step] = end - begin
            else:  # device is filled in below, once thread names are known
                spans.append(Span(name, category, "", track, step, begin, end, args.get("approximate") is True, call))
        elif phase == "M" and event.get("name") == "thread_name":
            if not isinstance(event.get("pid"), int) or not isinstance(event.get("tid"), int):
                continue  # another tool's process names its pid (torch.profiler's "Spans")
            track = (checked_int(path, event.get("pid"), "event pid"), checked_int(path, event.get("tid"), "event tid"))
            args = event.get("args")
            if not isinstance(args, dict):
                raise TraceFormatError(f"{path}: thread_name args is not an object")
            thread_names[track] = checked_name(path, args.get("name"), "thread name", limits)
    device_of = {track: "cuda" if name.startswith(GPU_TRACK_PREFIX) else "cpu" for track, name in thread_names.items()}
    for span in spans:
        span.device = device_of.get(span.track, "cpu")
    return Trace(path, metadata, spans, step_ns, rank_step_ns)


def samples(trace: Trace, warmup: int = 0) -> dict[Key, dict[int, Sample]]:
    """Per (FQN, phase, device), per step: inclusive time, self time and call count.

    Self time subtracts every span nested directly inside on the same track (children,
    and recompute inside a backward). Two spans of one track that cover the same time
    nest as their calls did: the call that began first (the smaller ``call``) is the
    outer one. So a wrapper's backward, which covers exactly the module it wraps
    (``Net (DistributedDataParallel)`` around ``Net``), has no self time, and the wrapped
    module has it, whatever order a file lists the two in (rank files, merged files,
    ``.json`` and ``.pftrace`` alike). Only the steps of ``Trace.kept_steps(warmup)``
    count.
    """
    with paused_gc():
        return _samples(trace, warmup)


def _samples(trace: Trace, warmup: int) -> dict[Key, dict[int, Sample]]:
    kept = set(trace.kept_steps(warmup))
    by_track: dict[tuple[int, int], list[Span]] = defaultdict(list)
    for span in trace.spans:
        if span.phase in PHASES:
            by_track[span.track].append(span)
    totals: dict[tuple[str, str, str, int], list[int]] = {}  # (fqn, phase, device, step) -> [incl, self, calls]
    for spans in by_track.values():
        # nesting order: begin ascending, end descending, then the outer call first (three
        # stable sorts, C-level keys)
        spans.sort(key=attrgetter("call"))
        spans.sort(key=attrgetter("end_ns"), reverse=True)
        spans.sort(key=attrgetter("begin_ns"))
        own = [s.end_ns - s.begin_ns for s in spans]
        stack: list[int] = []
        ends: list[int] = []
        for i, span in enumerate(spans):
            begin = span.begin_ns
            while ends and ends[-1] <= begin:
                ends.pop()
                stack.pop()
            if stack:
                own[stack[-1]] -= span.end_ns - begin
            stack.append(i)
            ends.append(span.end_ns)
        for span, self_ns in zip(spans, own):
            if span.step not in kept:
                continue
            key = (span.name, span.phase, span.device, span.step)
            total = totals.get(key)
            if total is None:
                totals[key] = [span.end_ns - span.begin_ns, max(self_ns, 0), 1, int(span.approximate)]
            else:
                total[0] += span.end_ns - span.begin_ns
                total[1] += max(self_ns, 0)  # (a parent widened over a child's late hook)
                total[2] += 1
                total[3] += span.approximate
    result: dict[Key, dict[int, Sample]] = defaultdict(dict)
    for (name, phase, device, step), (inclusive, self_ns, calls, approximate) in totals.items():
        result[(name, phase, device)][step] = Sample(inclusive, self_ns, calls, approximate)
    return dict(result)
