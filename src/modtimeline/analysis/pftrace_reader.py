"""Read the ``.pftrace`` files modtimeline writes back into spans (see writers/perfetto.py);
the packet-level decoding (packets, metadata, each sequence's incremental state, track
identities) is shared with ``load.py``, which reads them back whole."""

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
from ..format import GPU_TRACK_PREFIX, PFTRACE_METADATA, pftrace_rank_and_tid
from .reader import ReadLimits, Span, Trace, checked_int, checked_metadata, checked_name


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


def read_pftrace(path: Path, raw: bytes, limits: ReadLimits) -> Trace:
    metadata: dict[str, Any] | None = None
    tracks: dict[int, tuple[int, int, str]] = {}  # uuid -> (pid, tid, name)
    state = SequenceState()
    open_spans: dict[int, list[tuple[int, str, str, int, bool, int]]] = {}  # track uuid -> stack
    # (track uuid, name, category, step, begin, end, approximate, call)
    spans: list[tuple[int, str, str, int, int, int, bool, int]] = []

    for packet in pftrace_packets(path, raw, limits):
        if not packet.HasField("track_event"):
            metadata = packet_metadata(path, packet) or metadata
            if packet.HasField("track_descriptor"):
                descriptor = packet.track_descriptor
                identity = track_identity(descriptor)
                if identity is not None and not identity[3]:
                    tracks[descriptor.uuid] = identity[:3]
            state.absorb(packet)
            continue
        # (A track event packet: nearly every packet. It may intern names as it goes.)
        if packet.HasField("interned_data"):
            state.absorb(packet)
        time, track = state.place(packet)
        kind = packet.track_event.type
        if kind == TrackEvent.TYPE_SLICE_BEGIN:
            name, category, args = state.begin(packet)
            step = checked_int(path, args.get("step", -1), "slice step")
            call = checked_int(path, args.get("call", -1), "slice call")
            open_spans.setdefault(track, []).append((time, checked_name(path, name, "slice name", limits),
                                                     checked_name(path, category, "slice category", limits), step,
                                                     args.get("approximate") is True, call))
        elif kind == TrackEvent.TYPE_SLICE_END:
            stack = open_spans.get(track)
            if not stack:
                raise TraceFormatError(f"{path}: a slice ends that never began (damaged trace)")
            begin, name, category, step, approximate, call = stack.pop()
            spans.append((track, name, category, step, begin, time, approximate, call))

    if metadata is None:
        raise TraceFormatError(f"{path}: not a modtimeline trace (no modtimeline metadata)")
    result: list[Span] = []
    step_ns: dict[int, int] = {}
    rank_step_ns: dict[int, dict[int, int]] = {}
    for track, name, category, step, begin, end, approximate, call in spans:
        pid, tid, track_name = tracks.get(track, (0, track, ""))
        if category == "step":
            step_ns[step] = end - begin
            rank_step_ns.setdefault(pid, {})[step] = end - begin
            continue
        device = "cuda" if track_name.startswith(GPU_TRACK_PREFIX) else "cpu"
        result.append(Span(name, category, device, (pid, tid), step, begin, end, approximate, call))
    return Trace(path, metadata, result, step_ns, rank_step_ns)
