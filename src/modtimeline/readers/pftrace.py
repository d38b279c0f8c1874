"""Decode the ``.pftrace`` (Perfetto protobuf) traces modtimeline writes into a
``TraceFile`` (see writers/perfetto.py): packets (compressed ones expanded within the
limits), each sequence's incremental state, track identities."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from google.protobuf.message import DecodeError
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace as TraceProto
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import TrackDescriptor, TrackEvent, TracePacket

from ..errors import TraceFormatError
from ..format import FLOW_IN, FLOW_NONE, FLOW_OUT, NO_LAG, PFTRACE_METADATA, Counter, pftrace_rank_and_tid
from .decoding import (CATEGORY_INDEX, ProcessRows, Processes, ReadLimits, TraceFile, checked_int, checked_metadata,
                       checked_microseconds, checked_name, span_flags)

_FOREIGN = -1  # the category of another tool's slice: read past, not kept


def track_identity(descriptor: TrackDescriptor) -> tuple[int, int, str, bool] | None:
    """(rank, tid, name, is_counter) of a track we write: a named track under its rank's
    group (uuid = rank and tid), or a thread track (as files of 0.1 have); None for a
    rank's group track itself."""
    if descriptor.HasField("thread"):
        return descriptor.thread.pid, descriptor.thread.tid, descriptor.thread.thread_name, False
    if not descriptor.parent_uuid:
        return None
    rank, tid = pftrace_rank_and_tid(descriptor.uuid)
    return rank, tid, descriptor.name, descriptor.HasField("counter")


def pftrace_packets(path: Path, raw: bytes, limits: ReadLimits) -> Sequence[TracePacket]:
    """The packets of a Perfetto protobuf trace, within the limits; compressed packets
    (``compressed_packets``, as our writer and Perfetto's service write) expanded in place."""
    try:
        proto = TraceProto.FromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        raise TraceFormatError(f"{path}: neither JSON nor a Perfetto protobuf trace (or truncated)") from None
    packets: Sequence[TracePacket] = proto.packet
    if any(packet.HasField("compressed_packets") for packet in packets):
        packets = _expanded(path, packets, limits, len(raw))
    if len(packets) > limits.max_events:
        raise TraceFormatError(f"{path}: {len(packets):,} packets is over the {limits.max_events:,} limit "
                               "(--max-events raises it)")
    return packets


def _expanded(path: Path, packets: Sequence[TracePacket], limits: ReadLimits, size: int) -> list[TracePacket]:
    out: list[TracePacket] = []
    for packet in packets:
        if not packet.HasField("compressed_packets"):
            out.append(packet)
            continue
        # Bounded: a small file must not expand past the size limit (a zlib bomb).
        inflater = zlib.decompressobj()
        try:
            body = inflater.decompress(packet.compressed_packets, limits.max_bytes - size + 1)
        except zlib.error:
            raise TraceFormatError(f"{path}: damaged compressed packets") from None
        size += len(body)
        if size > limits.max_bytes or inflater.unconsumed_tail:
            raise TraceFormatError(f"{path}: over the {limits.max_bytes >> 20:,} MB limit once expanded "
                                   "(--max-trace-mb raises it)")
        try:
            out.extend(TraceProto.FromString(body).packet)
        except (DecodeError, RuntimeError, ValueError):
            raise TraceFormatError(f"{path}: damaged compressed packets") from None
        if len(out) > limits.max_events:
            break  # (the caller says so)
    return out


def packet_metadata(path: Path, packet: TracePacket) -> dict[str, Any] | None:
    """The modtimeline metadata a packet holds (the first one of our files), if any."""
    if not packet.HasField("chrome_events"):
        return None
    for entry in packet.chrome_events.metadata:
        if entry.name == PFTRACE_METADATA:
            try:
                return checked_metadata(path, orjson.loads(entry.json_value))
            except orjson.JSONDecodeError:
                raise TraceFormatError(f"{path}: damaged modtimeline metadata") from None
    return None


_NOTHING: dict[int, str] = {}  # (an interned table a sequence never sent; never written to)


class SequenceState:
    """What the packets of each sequence mean by what came before them: a running
    (incremental) clock, a default track, interned names, categories and argument names."""

    def __init__(self) -> None:
        self._clock: dict[int, int] = {}
        self._track: dict[int, int] = {}
        self._names: dict[int, dict[int, str]] = {}
        self._categories: dict[int, dict[int, str]] = {}
        self._args: dict[int, dict[int, str]] = {}

    def absorb(self, packet: TracePacket) -> None:
        """Take in a packet's clock snapshot, defaults and interned data."""
        sequence = packet.trusted_packet_sequence_id
        if packet.HasField("clock_snapshot"):
            self._clock[sequence] = 0
        if packet.HasField("trace_packet_defaults"):
            self._track[sequence] = packet.trace_packet_defaults.track_event_defaults.track_uuid
        if packet.HasField("interned_data"):
            interned = packet.interned_data
            self._names.setdefault(sequence, {}).update((e.iid, e.name) for e in interned.event_names)
            self._categories.setdefault(sequence, {}).update((e.iid, e.name) for e in interned.event_categories)
            self._args.setdefault(sequence, {}).update((e.iid, e.name) for e in interned.debug_annotation_names)

    def place(self, packet: TracePacket) -> tuple[int, int]:
        """(time, track uuid) of a track event packet; its sequence's clock runs on by the
        packet's delta."""
        sequence = packet.trusted_packet_sequence_id
        time = self._clock.get(sequence, 0) + packet.timestamp
        self._clock[sequence] = time
        return time, packet.track_event.track_uuid or self._track.get(sequence, 0)

    def begin(self, packet: TracePacket) -> tuple[str, str, dict[str, Any]]:
        """(name, category, arguments by name) of a slice's begin event."""
        sequence = packet.trusted_packet_sequence_id
        event = packet.track_event
        name = event.name or self._names.get(sequence, _NOTHING).get(event.name_iid, "")
        category_iids = event.category_iids
        if category_iids:
            category = self._categories.get(sequence, _NOTHING).get(category_iids[0], "")
        else:
            category = ",".join(event.categories)
        names = self._args.get(sequence, _NOTHING)
        args: dict[str, Any] = {}
        for annotation in event.debug_annotations:
            kind = annotation.WhichOneof("value")
            args[names.get(annotation.name_iid, annotation.name)] = getattr(annotation, kind) if kind else None
        return name, category, args


def read_pftrace(path: Path, raw: bytes, limits: ReadLimits, lossless: bool) -> TraceFile:
    """The trace in ``raw`` (see ``decoding`` for what ``lossless`` reads)."""
    processes = Processes(path, lossless)
    threads: dict[int, tuple[ProcessRows, int]] = {}  # span track uuid -> (process, tid)
    counters: dict[int, Counter] = {}  # counter track uuid -> its column
    state = SequenceState()
    # track uuid -> open slices: (begin, name, category, call, step, flags, flow, lag)
    open_spans: dict[int, list[tuple[int, str, int, int, int, int, int, int]]] = {}
    for packet in pftrace_packets(path, raw, limits):
        state.absorb(packet)  # (a track event packet too may set defaults and intern names)
        if not packet.HasField("track_event"):
            metadata = packet_metadata(path, packet)
            if metadata is not None and processes.metadata is None:
                processes.declare(metadata)
            if packet.HasField("track_descriptor"):
                identity = track_identity(packet.track_descriptor)
                if identity is not None:
                    if processes.metadata is None and lossless:
                        raise TraceFormatError(f"{path}: not a modtimeline trace (no modtimeline metadata first)")
                    pid, tid, track_name, is_counter = identity
                    process = processes.of(pid)
                    track_name = checked_name(path, track_name, "track name", limits)
                    if is_counter:
                        counters[packet.track_descriptor.uuid] = process.counter(tid, track_name)
                    else:
                        threads[packet.track_descriptor.uuid] = (process, tid)
                        process.tracks[tid] = track_name
            continue
        time, track = state.place(packet)
        event = packet.track_event
        kind = event.type
        if kind == TrackEvent.TYPE_SLICE_BEGIN:
            name, category_name, args = state.begin(packet)
            name = checked_name(path, name, "slice name", limits)
            category = CATEGORY_INDEX.get(checked_name(path, category_name, "slice category", limits))
            if category is None:
                if lossless:
                    raise TraceFormatError(f"{path}: unknown span category {category_name[:40]!r}")
                category = _FOREIGN  # (its end still closes it)
            step = checked_int(path, args.get("step", -1), "slice step")
            call = checked_int(path, args.get("call", -1), "slice call")
            flow = FLOW_OUT if event.flow_ids else FLOW_IN if event.terminating_flow_ids else FLOW_NONE
            # (launch lags are only kept, not analysed: checked where they are kept)
            lag = args.get("launch_lag_us") if lossless else None
            open_spans.setdefault(track, []).append((
                time, name, category, call, step, span_flags(args), flow,
                NO_LAG if lag is None else round(checked_microseconds(path, lag, "launch_lag_us") * 1000)))
        elif kind == TrackEvent.TYPE_SLICE_END:
            stack = open_spans.get(track)
            if not stack:
                raise TraceFormatError(f"{path}: a slice ends that never began (damaged trace)")
            begin, name, category, call, step, flags, flow, lag = stack.pop()
            if category == _FOREIGN:
                continue
            owner = threads.get(track)
            if owner is None:
                if lossless:
                    raise TraceFormatError(f"{path}: a slice ends that never began (damaged trace)")
                owner = (processes.of(0), track)  # a track no descriptor named
            process, tid = owner
            process.spans.append(tid, processes.base_ns + begin, processes.base_ns + time, process.name(name),
                                 category, call, step, flags, flow, lag)
        elif kind == TrackEvent.TYPE_COUNTER and lossless:
            counter = counters.get(track)
            if counter is None:
                raise TraceFormatError(f"{path}: a counter value on a track that is not a counter")
            counter.times.append(processes.base_ns + time)
            counter.values.append(checked_int(path, event.counter_value, "counter value"))
    if processes.metadata is None:
        raise TraceFormatError(f"{path}: not a modtimeline trace (no modtimeline metadata)")
    return processes.trace_file()
