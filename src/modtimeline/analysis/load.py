"""Read a trace file back into the writers' own data (``format.TraceData``), losing nothing
the writers wrote: tracks, spans with their calls, flags, flows and launch lags, counters,
metadata. ``modtimeline merge`` rewrites files through it.

A file holds one process per rank: one for a rank's own trace, several for a merged one.
``LoadedTrace.processes`` has a ``TraceData`` for each, all on the file's one time base.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from ..errors import TraceFileError, TraceFormatError
from ..format import (APPROXIMATE, CATEGORIES, COMPILED, FLOW_IN, FLOW_NONE, FLOW_OUT, INCOMPLETE, NO_LAG,
                      Counter, SpanColumns, Track, TraceData)
from ..gc_pause import paused_gc
from .reader import (ReadLimits, checked_int, checked_metadata, checked_microseconds, checked_name, chrome_document,
                     guarded_read, read_bytes)

_CATEGORY_INDEX = {name: index for index, name in enumerate(CATEGORIES)}


@dataclass
class LoadedTrace:
    path: Path
    metadata: dict[str, Any]  # the file's own metadata (a merged file's: the job's)
    processes: list[TraceData]  # one per rank, in rank order

    @property
    def merged(self) -> bool:
        return self.metadata.get("merged") is True


def load_trace(path: str | Path, limits: ReadLimits) -> LoadedTrace:
    """Read ``path`` (.json, .json.gz or .pftrace) completely; ``TraceFormatError`` for
    anything but a readable modtimeline trace."""
    path = Path(path)
    with paused_gc():
        return guarded_read(path, lambda: _load(path, limits))


def _load(path: Path, limits: ReadLimits) -> LoadedTrace:
    raw = read_bytes(path, limits)
    if not raw:
        raise TraceFormatError(f"{path}: empty file")
    if raw.lstrip()[:1] == b"{":
        return _load_chrome(path, raw, limits)
    return _load_pftrace(path, raw, limits)


class _Process:
    """One process's rows as they are read, turned into a ``TraceData`` at the end."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.names: list[str] = []
        self.name_index: dict[str, int] = {}
        self.tracks: dict[int, str] = {}
        self.spans = SpanColumns()
        self.counters: dict[tuple[int, str], Counter] = {}
        self.metadata: dict[str, Any] = {}

    def name(self, text: str) -> int:
        index = self.name_index.get(text)
        if index is None:
            index = self.name_index[text] = len(self.names)
            self.names.append(text)
        return index

    def counter(self, tid: int, name: str) -> Counter:
        counter = self.counters.get((tid, name))
        if counter is None:
            counter = self.counters[tid, name] = Counter(name, tid, array("q"), array("q"))
        return counter

    def data(self, base_ns: int) -> TraceData:
        tracks = [Track(tid, name) for tid, name in sorted(self.tracks.items())]
        return TraceData(self.rank, base_ns, self.names, tracks, self.spans.in_nesting_order(), list(self.counters.values()),
                         self.metadata)


def _category(path: Path, text: str) -> int:
    index = _CATEGORY_INDEX.get(text)
    if index is None:
        raise TraceFormatError(f"{path}: unknown span category {text[:40]!r}")
    return index


def _flags(args: dict[str, Any]) -> int:
    return ((INCOMPLETE if args.get("incomplete") is True else 0) | (APPROXIMATE if args.get("approximate") is True else 0)
            | (COMPILED if args.get("compiled") is True else 0))


def _processes(path: Path, metadata: dict[str, Any]) -> tuple[int, dict[int, _Process]]:
    """The file's base and an empty process per rank it declares."""
    base_ns = checked_int(path, metadata.get("base_ns", 0), "metadata.base_ns")
    if metadata.get("merged") is True:
        ranks = metadata.get("ranks")
        if not isinstance(ranks, list) or not ranks:
            raise TraceFormatError(f"{path}: a merged trace without its ranks' metadata")
        processes = {}
        for entry in ranks:
            entry = checked_metadata(path, entry)
            rank = checked_int(path, entry.get("rank"), "ranks[].rank")
            processes[rank] = _Process(rank)
            processes[rank].metadata = entry
        return base_ns, processes
    rank = checked_int(path, metadata.get("rank", 0), "metadata.rank")
    process = _Process(rank)
    process.metadata = metadata
    return base_ns, {rank: process}


def _process(path: Path, processes: dict[int, _Process], pid: Any) -> _Process:
    process = processes.get(checked_int(path, pid, "event pid"))
    if process is None:
        raise TraceFormatError(f"{path}: an event of process {pid}, which the metadata does not name")
    return process


def _load_chrome(path: Path, raw: bytes, limits: ReadLimits) -> LoadedTrace:
    metadata, events = chrome_document(path, raw, limits)
    base_ns, processes = _processes(path, metadata)
    for event in events:
        if not isinstance(event, dict):
            raise TraceFormatError(f"{path}: a trace event is {type(event).__name__}, not an object")
        kind = event.get("ph")
        if kind not in ("X", "C", "M"):
            continue
        process = _process(path, processes, event.get("pid"))
        tid = checked_int(path, event.get("tid"), "event tid")
        args = event.get("args", {})
        if not isinstance(args, dict):
            raise TraceFormatError(f"{path}: event args is {type(args).__name__}, not an object")
        if kind == "M":
            if event.get("name") == "thread_name":
                process.tracks[tid] = checked_name(path, args.get("name"), "thread name", limits)
            continue
        time = base_ns + round(checked_microseconds(path, event.get("ts"), "ts") * 1000)
        name = checked_name(path, event.get("name"), "event name", limits)
        if kind == "C":
            process.counter(tid, name).times.append(time)
            process.counter(tid, name).values.append(checked_int(path, args.get("value"), "counter value"))
            continue
        duration = checked_microseconds(path, event.get("dur"), "dur")
        if duration < 0:
            raise TraceFormatError(f"{path}: event dur is negative ({duration})")
        flow = FLOW_OUT if event.get("flow_out") is True else FLOW_IN if event.get("flow_in") is True else FLOW_NONE
        lag = args.get("launch_lag_us")
        process.spans.append(
            tid, time, time + round(duration * 1000), process.name(name),
            _category(path, checked_name(path, event.get("cat", ""), "event cat", limits)),
            checked_int(path, args.get("call", -1), "event args.call"),
            checked_int(path, args.get("step", -1), "event args.step"), _flags(args), flow,
            NO_LAG if lag is None else round(checked_microseconds(path, lag, "launch_lag_us") * 1000))
    return LoadedTrace(path, metadata, [processes[rank].data(base_ns) for rank in sorted(processes)])


def _load_pftrace(path: Path, raw: bytes, limits: ReadLimits) -> LoadedTrace:
    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import TrackEvent

    from .pftrace_reader import SequenceState, packet_metadata, pftrace_packets, track_identity

    packets = pftrace_packets(path, raw, limits)
    metadata = packet_metadata(path, packets[0]) if len(packets) else None
    if metadata is None:
        raise TraceFormatError(f"{path}: not a modtimeline trace (no modtimeline metadata first)")
    base_ns, processes = _processes(path, metadata)

    threads: dict[int, tuple[_Process, int]] = {}  # span track uuid -> (process, tid)
    counters: dict[int, Counter] = {}  # counter track uuid -> its column
    state = SequenceState()
    # track uuid -> open slices: [begin, name, category, call, step, flags, flow, lag]
    open_spans: dict[int, list[list[Any]]] = {}
    for packet in packets:
        if packet.HasField("track_descriptor"):
            identity = track_identity(packet.track_descriptor)
            if identity is not None:
                pid, tid, track_name, is_counter = identity
                process = _process(path, processes, pid)
                track_name = checked_name(path, track_name, "track name", limits)
                if is_counter:
                    counters[packet.track_descriptor.uuid] = process.counter(tid, track_name)
                else:
                    threads[packet.track_descriptor.uuid] = (process, tid)
                    process.tracks[tid] = track_name
        state.absorb(packet)
        if not packet.HasField("track_event"):
            continue
        event = packet.track_event
        time, track = state.place(packet)
        if event.type == TrackEvent.TYPE_COUNTER:
            counter = counters.get(track)
            if counter is None:
                raise TraceFormatError(f"{path}: a counter value on a track that is not a counter")
            counter.times.append(base_ns + time)
            counter.values.append(checked_int(path, event.counter_value, "counter value"))
        elif event.type == TrackEvent.TYPE_SLICE_BEGIN:
            name, category, args = state.begin(packet)
            flow = FLOW_OUT if event.flow_ids else FLOW_IN if event.terminating_flow_ids else FLOW_NONE
            lag = args.get("launch_lag_us")
            open_spans.setdefault(track, []).append([
                base_ns + time, checked_name(path, name, "slice name", limits),
                _category(path, checked_name(path, category, "slice category", limits)),
                checked_int(path, args.get("call", -1), "slice call"), checked_int(path, args.get("step", -1), "slice step"),
                _flags(args), flow,
                NO_LAG if lag is None else round(checked_microseconds(path, lag, "launch_lag_us") * 1000)])
        elif event.type == TrackEvent.TYPE_SLICE_END:
            stack = open_spans.get(track)
            owner = threads.get(track)
            if not stack or owner is None:
                raise TraceFormatError(f"{path}: a slice ends that never began (damaged trace)")
            begin, name, category, call, step, flags, flow, lag = stack.pop()
            process, tid = owner
            process.spans.append(tid, begin, base_ns + time, process.name(name), category, call, step, flags, flow, lag)
    return LoadedTrace(path, metadata, [processes[rank].data(base_ns) for rank in sorted(processes)])


_PEEK_BYTES = 1 << 20  # a file's metadata comes first, within this many (decompressed) bytes


def read_metadata(path: str | Path, limits: ReadLimits) -> dict[str, Any]:
    """A trace file's metadata, read from its start (the writers put it first); the whole
    file is read only where the start does not hold it."""
    path = Path(path)
    with paused_gc():
        return guarded_read(path, lambda: _peek_metadata(path, limits) or _load(path, limits).metadata)


def _peek_metadata(path: Path, limits: ReadLimits) -> dict[str, Any] | None:
    import gzip
    import json

    try:
        with open(path, "rb") as raw:
            magic = raw.read(2)
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw) if magic == b"\x1f\x8b" else raw
            head = stream.read(_PEEK_BYTES)
    except OSError as error:
        raise TraceFileError(f"{path}: cannot read: {error.strerror or error}") from None
    except (EOFError, gzip.BadGzipFile):
        return None  # damaged: the full read says how
    if head.lstrip()[:1] == b"{":
        # {"displayTimeUnit":"ns","metadata":{...},"traceEvents":[
        at = head.find(b'"metadata":')
        if at < 0:
            return None
        try:
            value, _ = json.JSONDecoder().raw_decode(head.decode("utf-8", errors="replace"), at + len('"metadata":'))
        except ValueError:
            return None
        return checked_metadata(path, value)
    # .pftrace: the first TracePacket (field 1, length-delimited) holds the metadata.
    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import TracePacket

    if head[:1] != b"\x0a":
        return None
    length, shift, at = 0, 0, 1
    while at < len(head) and at < 11:
        byte = head[at]
        length |= (byte & 0x7F) << shift
        shift += 7
        at += 1
        if not byte & 0x80:
            break
    if at + length > len(head):
        return None
    from google.protobuf.message import DecodeError

    from .pftrace_reader import packet_metadata

    try:
        packet = TracePacket.FromString(head[at: at + length])
    except DecodeError:
        return None  # damaged: the full read says how
    return packet_metadata(path, packet)
