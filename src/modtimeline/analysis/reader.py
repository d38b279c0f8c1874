"""Read modtimeline traces (``.json``, ``.json.gz``, ``.pftrace``) into per-step samples.

Never imports torch: a CI job that only compares traces does not need it.
"""

from __future__ import annotations

import gzip
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import orjson

from ..errors import TraceFileError, TraceFormatError
from ..gc_pause import paused_gc
from ..writers import TRACE_SUFFIXES

PHASES = ("forward", "backward", "recompute")

# (FQN, phase, device), e.g. ("GPT.blocks.0.attn", "backward", "cpu")
Key = tuple[str, str, str]


@dataclass
class Sample:
    """One module's time in one step: inclusive and self (minus nested spans) ns, calls."""

    inclusive_ns: int = 0
    self_ns: int = 0
    calls: int = 0


@dataclass(slots=True)
class Span:
    name: str
    phase: str
    device: str
    track: tuple[int, int]  # (pid, tid): spans nest within a track
    step: int
    begin_ns: int
    end_ns: int


@dataclass
class Trace:
    """A trace file as the analysis sees it: spans and the steps they belong to."""

    path: Path
    metadata: dict[str, Any]
    spans: list[Span]
    step_ns: dict[int, int] = field(default_factory=dict)  # step -> duration of its step span

    def steps(self) -> list[int]:
        """Steps in order; a trace without marked steps is one step, numbered -1."""
        return sorted({span.step for span in self.spans} | set(self.step_ns))


def trace_files(paths: list[str | Path]) -> list[Path]:
    """The trace files named by ``paths``; a directory stands for the traces inside it."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.name.endswith(TRACE_SUFFIXES) and p.is_file())
            if not found:
                raise TraceFileError(f"{path}: no trace files ({', '.join(TRACE_SUFFIXES)}) in this directory")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise TraceFileError(f"{path}: no such file or directory")
    return files


def read_trace(path: str | Path) -> Trace:
    """Read one trace file; a clear ``TraceFormatError`` if it is not a usable modtimeline trace."""
    with paused_gc():
        return _read_trace(Path(path))


def _read_trace(path: Path) -> Trace:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise TraceFileError(f"{path}: cannot read: {error.strerror or error}") from None
    if not raw:
        raise TraceFormatError(f"{path}: empty file")
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            raise TraceFormatError(f"{path}: damaged or truncated gzip data") from None
    if raw.lstrip()[:1] == b"{":
        trace = _read_chrome_json(path, raw)
    else:
        from .pftrace_reader import read_pftrace

        trace = read_pftrace(path, raw)
    if not any(span.phase in PHASES for span in trace.spans):
        raise TraceFormatError(f"{path}: the trace holds no module spans")
    return trace


def _read_chrome_json(path: Path, raw: bytes) -> Trace:
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise TraceFormatError(f"{path}: not valid JSON ({error.msg} at byte {error.pos}); truncated?") from None
    if not isinstance(document, dict) or not isinstance(document.get("traceEvents"), list):
        raise TraceFormatError(f"{path}: not a Chrome trace (no traceEvents list)")
    metadata = document.get("metadata")
    if not isinstance(metadata, dict) or metadata.get("tool") != "modtimeline":
        raise TraceFormatError(f"{path}: not a modtimeline trace (metadata.tool is not 'modtimeline')")
    thread_names: dict[tuple[int, int], str] = {}
    spans: list[Span] = []
    step_ns: dict[int, int] = {}
    try:
        for event in document["traceEvents"]:
            phase = event.get("ph")
            if phase == "X":
                begin = round(event["ts"] * 1000)
                end = begin + round(event["dur"] * 1000)
                step = int(event.get("args", {}).get("step", -1))
                category = event.get("cat", "")
                if category == "step":
                    step_ns[step] = end - begin
                else:  # device is filled in below, once thread names are known
                    spans.append(Span(event["name"], category, "", (event["pid"], event["tid"]), step, begin, end))
            elif phase == "M" and event.get("name") == "thread_name":
                thread_names[(event["pid"], event["tid"])] = event["args"]["name"]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise TraceFormatError(f"{path}: malformed trace event ({type(error).__name__}: {error})") from None
    device_of = {track: "cuda" if name.startswith("cuda") else "cpu" for track, name in thread_names.items()}
    for span in spans:
        span.device = device_of.get(span.track, "cpu")
    return Trace(path, metadata, spans, step_ns)


def samples(trace: Trace, warmup: int = 0) -> dict[Key, dict[int, Sample]]:
    """Per (FQN, phase, device), per step: inclusive time, self time and call count.

    Self time subtracts every span nested directly inside on the same track (children,
    and recompute inside a backward). The first ``warmup`` steps are left out.
    """
    with paused_gc():
        return _samples(trace, warmup)


def _samples(trace: Trace, warmup: int) -> dict[Key, dict[int, Sample]]:
    skipped = set(trace.steps()[:warmup])
    by_track: dict[tuple[int, int], list[Span]] = defaultdict(list)
    for span in trace.spans:
        if span.phase in PHASES:
            by_track[span.track].append(span)
    totals: dict[tuple[str, str, str, int], list[int]] = {}  # (fqn, phase, device, step) -> [incl, self, calls]
    for spans in by_track.values():
        # nesting order: begin ascending, end descending (two stable sorts, C-level keys)
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
            if span.step in skipped:
                continue
            key = (span.name, span.phase, span.device, span.step)
            total = totals.get(key)
            if total is None:
                totals[key] = [span.end_ns - span.begin_ns, max(self_ns, 0), 1]
            else:
                total[0] += span.end_ns - span.begin_ns
                total[1] += max(self_ns, 0)  # (a parent widened over a child's late hook)
                total[2] += 1
    result: dict[Key, dict[int, Sample]] = defaultdict(dict)
    for (name, phase, device, step), (inclusive, self_ns, calls) in totals.items():
        result[(name, phase, device)][step] = Sample(inclusive, self_ns, calls)
    return dict(result)
