"""Read the ``.pftrace`` files modtimeline writes back into spans (see writers/perfetto.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from google.protobuf.message import DecodeError
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace as TraceProto
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import TrackDescriptor, TrackEvent

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


def read_pftrace(path: Path, raw: bytes, limits: ReadLimits) -> Trace:
    try:
        proto = TraceProto.FromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        raise TraceFormatError(f"{path}: neither JSON nor a Perfetto protobuf trace (or truncated)") from None
    if len(proto.packet) > limits.max_events:
        raise TraceFormatError(f"{path}: {len(proto.packet):,} packets is over the {limits.max_events:,} limit "
                               "(--max-events raises it)")

    metadata: dict[str, Any] | None = None
    tracks: dict[int, tuple[int, int, str]] = {}  # uuid -> (pid, tid, name)
    # Per packet sequence: default track, interned strings, running clock.
    default_track: dict[int, int] = {}
    names: dict[int, dict[int, str]] = {}
    categories: dict[int, dict[int, str]] = {}
    arg_names: dict[int, dict[int, str]] = {}
    clock: dict[int, int] = {}
    open_spans: dict[int, list[tuple[int, str, str, int, bool]]] = {}  # track uuid -> stack
    # (track uuid, name, category, step, begin, end, approximate)
    spans: list[tuple[int, str, str, int, int, int, bool]] = []

    for packet in proto.packet:
        sequence = packet.trusted_packet_sequence_id
        if packet.HasField("chrome_events"):
            for entry in packet.chrome_events.metadata:
                if entry.name == PFTRACE_METADATA:
                    try:
                        metadata = checked_metadata(path, orjson.loads(entry.json_value))
                    except orjson.JSONDecodeError:
                        raise TraceFormatError(f"{path}: damaged modtimeline metadata") from None
        if packet.HasField("track_descriptor"):
            descriptor = packet.track_descriptor
            identity = track_identity(descriptor)
            if identity is not None and not identity[3]:
                tracks[descriptor.uuid] = identity[:3]
        if packet.HasField("clock_snapshot"):
            clock[sequence] = 0
        if packet.HasField("trace_packet_defaults"):
            default_track[sequence] = packet.trace_packet_defaults.track_event_defaults.track_uuid
        if packet.HasField("interned_data"):
            interned = packet.interned_data
            names.setdefault(sequence, {}).update((e.iid, e.name) for e in interned.event_names)
            categories.setdefault(sequence, {}).update((e.iid, e.name) for e in interned.event_categories)
            arg_names.setdefault(sequence, {}).update((e.iid, e.name) for e in interned.debug_annotation_names)
        if not packet.HasField("track_event"):
            continue
        event = packet.track_event
        time = clock.get(sequence, 0) + packet.timestamp
        clock[sequence] = time
        track = event.track_uuid or default_track.get(sequence, 0)
        if event.type == TrackEvent.TYPE_SLICE_BEGIN:
            name = event.name or names.get(sequence, {}).get(event.name_iid, "")
            category = (categories.get(sequence, {}).get(event.category_iids[0], "") if event.category_iids
                        else ",".join(event.categories))
            step = -1
            approximate = False
            for annotation in event.debug_annotations:
                arg = arg_names.get(sequence, {}).get(annotation.name_iid, annotation.name)
                if arg == "step":
                    step = checked_int(path, annotation.int_value, "slice step")
                elif arg == "approximate":
                    approximate = bool(annotation.bool_value)
            open_spans.setdefault(track, []).append((time, checked_name(path, name, "slice name", limits),
                                                     checked_name(path, category, "slice category", limits), step,
                                                     approximate))
        elif event.type == TrackEvent.TYPE_SLICE_END:
            stack = open_spans.get(track)
            if not stack:
                raise TraceFormatError(f"{path}: a slice ends that never began (damaged trace)")
            begin, name, category, step, approximate = stack.pop()
            spans.append((track, name, category, step, begin, time, approximate))

    if metadata is None:
        raise TraceFormatError(f"{path}: not a modtimeline trace (no modtimeline metadata)")
    result: list[Span] = []
    step_ns: dict[int, int] = {}
    rank_step_ns: dict[int, dict[int, int]] = {}
    for track, name, category, step, begin, end, approximate in spans:
        pid, tid, track_name = tracks.get(track, (0, track, ""))
        if category == "step":
            step_ns[step] = end - begin
            rank_step_ns.setdefault(pid, {})[step] = end - begin
            continue
        device = "cuda" if track_name.startswith(GPU_TRACK_PREFIX) else "cpu"
        result.append(Span(name, category, device, (pid, tid), step, begin, end, approximate))
    return Trace(path, metadata, result, step_ns, rank_step_ns)
