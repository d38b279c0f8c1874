"""The trace file contract: the data writers write and readers read, in one place.

``TraceData`` (span columns, tracks, counters, metadata) is what ``resolve`` produces
and every writer consumes; the constants below are what the files hold (categories,
flags, track ids and names, argument names, the tool name and the format version).
Nothing here imports torch.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

TOOL = "modtimeline"  # metadata.tool of every trace we write
# Bumped when a file's meaning changes; readers refuse files newer than they know.
FORMAT_VERSION = 1
CHROME_FORMAT = "modtimeline-chrome"
PFTRACE_FORMAT = "modtimeline-pftrace"
PFTRACE_METADATA = "modtimeline"  # name of the chrome_events metadata entry in .pftrace
PFTRACE_INCREMENTAL_CLOCK = 64  # the first sequence-scoped clock id: our incremental timestamps

ARG_NAMES = ("step", "call", "incomplete", "launch_lag_us", "approximate", "compiled", "fused")

CATEGORIES = ("forward", "backward", "recompute", "step")
FORWARD, BACKWARD, RECOMPUTE, STEP = range(4)

# Span flags. INCOMPLETE: the span did not end normally: it was still open when the trace
# was closed, or its forward raised ("incomplete": true). APPROXIMATE: its end could not be
# bounded by its own work and is the best bound there was ("approximate": true).
INCOMPLETE = 1
APPROXIMATE = 2
COMPILED = 4  # the call ran a torch.compile'd module ("compiled": true)
# FUSED: a span measured from compiled kernels, some of which computed several of its
# submodules at once (inductor fused them): their time is this, their deepest common
# ancestor's ("fused": true; metadata.compiled_detail.fused names the modules).
FUSED = 8

FLOW_NONE, FLOW_OUT, FLOW_IN = 0, 1, 2

# The lag column of spans that have none (CPU spans). A GPU span's lag can be negative:
# every device time carries the anchor's small constant offset.
NO_LAG = -(1 << 63)

# Track ids (Chrome "tid"). GPU tracks are numbered from GPU_TRACK_BASE.
STEPS_TRACK = 1
FORWARD_TRACK = 2
BACKWARD_TRACK = 10  # lanes: 10, 11, ...
GPU_TRACK_BASE = 100

# .pftrace track uuids: rank r owns uuids [r * PFTRACE_UUIDS_PER_RANK, ...): its group
# track and, from PFTRACE_TRACK_UUID_BASE on, one track per tid.
PFTRACE_UUIDS_PER_RANK = 1 << 24
PFTRACE_TRACK_UUID_BASE = 1000


def pftrace_process_uuid(rank: int) -> int:
    return 1 + rank * PFTRACE_UUIDS_PER_RANK


def pftrace_track_uuid(rank: int, tid: int) -> int:
    return PFTRACE_TRACK_UUID_BASE + tid + rank * PFTRACE_UUIDS_PER_RANK


def pftrace_rank_and_tid(uuid: int) -> tuple[int, int]:
    """(rank, tid) of a track uuid (the inverse of ``pftrace_track_uuid``)."""
    return uuid // PFTRACE_UUIDS_PER_RANK, uuid % PFTRACE_UUIDS_PER_RANK - PFTRACE_TRACK_UUID_BASE


# Two torch.profiler ranges a Timeline opens at each step boundary: the first named by
# the perf_counter_ns reading taken just before it opened, the second by the reading
# taken just after the first closed. In the profiler's trace they bracket our clock
# against the profiler's (``modtimeline merge --profiler``).
PROFILER_CLOCK_MARK = "modtimeline.clock "
PROFILER_CLOCK_MARK_AFTER = "modtimeline.clock-after "

GPU_TRACK_PREFIX = "cuda"  # GPU track names: "cuda:0 stream 7", "cuda:0 across streams"
# ``merge --profiler``'s per-stream tracks of kernels under their modules: "cuda:0 stream 7
# (kernels)". In the steps a file has them for, they are its GPU time (exact kernel time);
# the event spans of a ``device="cuda"`` Timeline stay in the file to be seen, not counted
# again in those steps.
KERNEL_TRACK_SUFFIX = " (kernels)"


def gpu_stream_track(device: object, stream: object) -> str:
    """A device="cuda" Timeline's track of the spans whose work ran on one stream."""
    return f"{GPU_TRACK_PREFIX}:{device} stream {stream}"


def gpu_spread_track(device: object) -> str:
    """Its track of the spans whose work began on one stream and ended on another."""
    return f"{GPU_TRACK_PREFIX}:{device} across streams"


def is_gpu_event_track(name: str) -> bool:
    """One of the two above: spans timed by CUDA events (not kernels, not counters)."""
    head, _, tail = name.partition(" ")
    device = head[len(GPU_TRACK_PREFIX) + 1:]
    if not head.startswith(GPU_TRACK_PREFIX + ":") or not device.isdigit():
        return False
    if tail == "across streams":
        return True
    word, _, stream = tail.partition(" ")
    return word == "stream" and stream.lstrip("-").isdigit()


def is_kernel_track(name: str) -> bool:
    """``merge --profiler``'s kernels of one stream (``gpu_stream_track`` + the suffix)."""
    return name.endswith(KERNEL_TRACK_SUFFIX) and is_gpu_event_track(name[:-len(KERNEL_TRACK_SUFFIX)])


@dataclass
class Track:
    tid: int
    name: str


@dataclass
class SpanColumns:
    """One row per span. Columns, not objects: cheap to hold and to format."""

    track: array = field(default_factory=lambda: array("q"))
    begin: array = field(default_factory=lambda: array("q"))
    end: array = field(default_factory=lambda: array("q"))
    name: array = field(default_factory=lambda: array("q"))  # index into TraceData.names
    category: array = field(default_factory=lambda: array("b"))
    call: array = field(default_factory=lambda: array("q"))
    step: array = field(default_factory=lambda: array("q"))
    flags: array = field(default_factory=lambda: array("b"))
    flow: array = field(default_factory=lambda: array("b"))
    lag: array = field(default_factory=lambda: array("q"))  # GPU start - CPU launch, ns; NO_LAG on CPU

    def __len__(self) -> int:
        return len(self.begin)

    def in_nesting_order(self) -> SpanColumns:
        """The rows by track, then begin ascending, end descending (writers need each
        track's spans in nesting order)."""
        track, begin, end = self.track, self.begin, self.end
        order = sorted(range(len(begin)), key=lambda row: (track[row], begin[row], -end[row]))
        out = SpanColumns()
        for column in ("track", "begin", "end", "name", "category", "call", "step", "flags", "flow", "lag"):
            values = getattr(self, column)
            setattr(out, column, array(values.typecode, [values[row] for row in order]))
        return out

    def append(self, track: int, begin: int, end: int, name: int, category: int, call: int,
               step: int, flags: int = 0, flow: int = FLOW_NONE, lag: int = NO_LAG) -> None:
        self.track.append(track)
        self.begin.append(begin)
        self.end.append(end)
        self.name.append(name)
        self.category.append(category)
        self.call.append(call)
        self.step.append(step)
        self.flags.append(flags)
        self.flow.append(flow)
        self.lag.append(lag)


@dataclass
class Counter:
    name: str
    tid: int
    times: array
    values: array


@dataclass
class TraceData:
    """Everything a writer needs; all times are host ns on one monotonic clock."""

    rank: int
    base_ns: int  # every timestamp is written relative to this
    names: list[str]
    tracks: list[Track]
    spans: SpanColumns
    counters: list[Counter] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def check_version(metadata: dict[str, Any]) -> str | None:
    """Why a file's metadata cannot be read by this version, or None if it can."""
    version = metadata.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        return f"format_version is {version!r}, not a whole number"
    if version > FORMAT_VERSION:
        return (f"written by a newer modtimeline (format version {version}; this one reads up to "
                f"{FORMAT_VERSION}): upgrade modtimeline to read it")
    return None
