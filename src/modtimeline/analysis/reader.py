"""The analysis's view of a trace: its module spans (``Span``: FQN, phase, device, track,
step, times) and its steps (``Trace``), derived from the file as decoded (``load``), and
per-step samples of them (``samples``): what summary, diff and --by-rank are made of.

Never imports torch: a CI job that only compares traces does not need it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

from ..errors import TraceFileError, TraceFormatError
from ..format import APPROXIMATE, CATEGORIES, GPU_TRACK_PREFIX, STEP, is_gpu_event_track, is_kernel_track
from ..gc_pause import paused_gc
from ..writers import TRACE_SUFFIXES
from ..readers.decoding import DEFAULT_LIMITS as DEFAULT_LIMITS  # (where the CLI and callers have always found them)
from ..readers.decoding import ReadLimits as ReadLimits
from ..readers.decoding import TraceFile
from ..readers.load import decode_trace

PHASES = ("forward", "backward", "recompute")

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

    @classmethod
    def of(cls, file: TraceFile) -> Trace:
        """The view of a decoded file: its spans (step spans give the steps' durations), a
        span's device told by its track's name, its track by (rank, tid). In a file merged
        with a profiler's kernels, the GPU time of the steps they cover is the kernels'
        (``format.is_kernel_track``): the event spans of those steps are not read as well."""
        spans: list[Span] = []
        step_ns: dict[int, int] = {}
        rank_step_ns: dict[int, dict[int, int]] = {}
        with paused_gc():
            for data in file.processes:
                rank = data.rank
                gpu = {track.tid for track in data.tracks if track.name.startswith(GPU_TRACK_PREFIX)}
                names = data.names
                columns = data.spans
                # Merged with a profiler's kernels: in the steps they cover, the kernels are
                # the GPU time, and the event spans beside them are not counted again.
                # (A file without kernel tracks, nearly every one, costs no pass over its spans.)
                kernels = {track.tid for track in data.tracks if is_kernel_track(track.name)}
                events: set[int] = set()
                kernel_steps: set[int] = set()
                if kernels:
                    events = {track.tid for track in data.tracks if is_gpu_event_track(track.name)}
                    kernel_steps = {step for tid, step in zip(columns.track, columns.step) if tid in kernels}
                for tid, begin, end, name, category, call, step, flags in zip(
                        columns.track, columns.begin, columns.end, columns.name, columns.category, columns.call,
                        columns.step, columns.flags):
                    if category == STEP:
                        step_ns[step] = end - begin
                        rank_step_ns.setdefault(rank, {})[step] = end - begin
                    elif tid not in events or step not in kernel_steps:
                        spans.append(Span(names[name], CATEGORIES[category], "cuda" if tid in gpu else "cpu",
                                          (rank, tid), step, begin, end, bool(flags & APPROXIMATE), call))
        return cls(file.path, file.metadata, spans, step_ns, rank_step_ns)

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


def distinct_recordings(traces: list[Trace]) -> tuple[list[Trace], list[str]]:
    """Each recording once: a trace of the same window of the same rank of the same run as
    one before it (a file named twice; a merged file beside its rank files) is left out,
    and a note says which. A window is known by its run id, rank, start (wall clock, ns)
    and steps, which a merge keeps (its times move to rank 0's clock; those do not)."""
    kept: list[Trace] = []
    notes: list[str] = []
    seen: dict[tuple[Any, ...], Trace] = {}
    for trace in traces:
        key = _recording(trace)
        first = seen.get(key)
        if first is not None:
            notes.append(f"{trace.path} holds the same steps of rank {key[1]} as {first.path}: counted once")
            continue
        seen[key] = trace
        kept.append(trace)
    return kept, notes


def _recording(trace: Trace) -> tuple[Any, ...]:
    """What tells one recorded window from another (see ``distinct_recordings``); a trace
    without a run id or start (written by another tool) is known by its file only."""
    metadata = trace.metadata
    rank = metadata.get("rank", trace.spans[0].track[0] if trace.spans else 0)
    start = metadata.get("base_wall_time_ns")
    if metadata.get("merged"):
        # (a merged file's rank: its first window's start, as merge kept it under "ranks")
        entry = next((r for r in metadata.get("ranks", []) if isinstance(r, dict) and r.get("rank") == rank), {})
        start = entry.get("base_wall_time_ns")
    run = metadata.get("run_id")
    if isinstance(run, str) and isinstance(start, int):
        return ("window", rank, run, start, tuple(trace.steps()))
    return ("file", rank, str(trace.path.resolve()))


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
    trace = Trace.of(decode_trace(path, limits, lossless=False))
    if not any(span.phase in PHASES for span in trace.spans):
        raise TraceFormatError(f"{path}: the trace holds no module spans")
    return trace


def samples(trace: Trace, warmup: int = 0) -> dict[Key, dict[int, Sample]]:
    """Per (FQN, phase, device), per step: inclusive time, self time and call count.

    Self time subtracts every span nested directly inside on the same track (children,
    and recompute inside a backward). Two spans of one track that cover the same time
    nest as their calls did: the call that began first (the smaller ``call``) is the
    outer one. So a wrapper's backward, which covers exactly the module it wraps
    (``Net (DistributedDataParallel)`` around ``Net``), has no self time, and the wrapped
    module has it, whatever order a file lists the two in (rank files, merged files,
    ``.json`` and ``.pftrace`` alike). A checkpointed region's recompute counts in the
    backward of the region and the modules above it, not in that of the module whose
    backward set it off (``_charge_recompute_to_its_region``). Only the steps of
    ``Trace.kept_steps(warmup)`` count.
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
        inclusive = [s.end_ns - s.begin_ns for s in spans]
        own = inclusive.copy()
        stack: list[int] = []
        ends: list[int] = []
        for i, span in enumerate(spans):
            begin = span.begin_ns
            while ends and ends[-1] <= begin:
                ends.pop()
                stack.pop()
            if stack:
                parent = spans[stack[-1]]
                own[stack[-1]] -= span.end_ns - begin
                if span.phase == "recompute" and parent.phase != "recompute":
                    _charge_recompute_to_its_region(spans, stack, span, inclusive)
            stack.append(i)
            ends.append(span.end_ns)
        for span, inclusive_ns, self_ns in zip(spans, inclusive, own):
            if span.step not in kept:
                continue
            key = (span.name, span.phase, span.device, span.step)
            total = totals.get(key)
            if total is None:
                totals[key] = [inclusive_ns, max(self_ns, 0), 1, int(span.approximate)]
            else:
                total[0] += inclusive_ns
                total[1] += max(self_ns, 0)  # (a parent widened over a child's late hook)
                total[2] += 1
                total[3] += span.approximate
    result: dict[Key, dict[int, Sample]] = defaultdict(dict)
    for (name, phase, device, step), (inclusive_ns, self_ns, calls, approximate) in totals.items():
        result[(name, phase, device)][step] = Sample(inclusive_ns, self_ns, calls, approximate)
    return dict(result)


_WRAPPER_SUFFIX = re.compile(r" \([^()]*\)$")  # "blocks.0 (CheckpointWrapper)": the wrapper of blocks.0


def _module_path(fqn: str) -> str:
    return _WRAPPER_SUFFIX.sub("", fqn)


def _charge_recompute_to_its_region(spans: list[Span], stack: list[int], recompute: Span, inclusive: list[int]) -> None:
    """A checkpointed region is recomputed inside the backward of whichever of its modules
    needs a saved tensor first (often its last, smallest layer): that backward span covers
    the whole recompute. The recompute is the region's cost (its own ``recompute`` rows),
    not that module's: it is left out of the inclusive backward time of every enclosing
    backward span whose module does not hold the recomputed one (the region and the
    modules above it keep it)."""
    path = _module_path(recompute.name)
    for index in reversed(stack):
        outer = spans[index]
        if outer.phase != "backward":
            continue
        outer_path = _module_path(outer.name)
        if path == outer_path or path.startswith(outer_path + "."):
            return  # this one and those around it hold the recomputed module
        # (what of the recompute lies inside this span: a hook stamped late may overhang)
        inclusive[index] -= max(0, min(recompute.end_ns, outer.end_ns) - max(recompute.begin_ns, outer.begin_ns))
