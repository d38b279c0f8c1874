"""Perfetto protobuf (``.pftrace``) writer: descriptors and each sequence's first packet
through the perfetto package's builder, the span packets encoded straight from the
columns (``pftrace_rows.py``, compiled in ``_pftrace_rows.c``).

Same tracks, spans, flows and counters as the Chrome JSON, several times smaller:

* every track (forward, backward, steps, each GPU stream) writes on its own packet
  sequence, whose defaults name the track (no track uuid per event) and whose clock is
  incremental (each timestamp is a small delta from the previous one on that track);
* names, categories and argument names are interned once (``interned_data``, with
  ``SEQ_INCREMENTAL_STATE_CLEARED`` on each sequence's first packet and
  ``SEQ_NEEDS_INCREMENTAL_STATE`` after);
* per track, BEGIN/END events come from a stack walk over the spans (already in nesting
  order), so at one timestamp children close before parents and ends come before begins;
  the tracks' events are merged by time; counters follow;
* the span packets, which are nearly all of a trace, go in zlib-compressed chunks
  (``TracePacket.compressed_packets``, which Perfetto's own tracing service writes and
  every trace processor reads): a span takes 10–18 bytes instead of 56.

Timestamps are nanoseconds relative to ``metadata.base_ns``, exactly the JSON's
microseconds, so both formats hold identical spans.
"""

from __future__ import annotations

import heapq
import os
from array import array
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain, islice
from typing import Any, BinaryIO

import orjson
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import ClockSnapshot, TrackDescriptor, TracePacket, TrackEvent
from perfetto.trace_builder.proto_builder import StreamingTraceProtoBuilder

from ..format import (ARG_NAMES, CATEGORIES, FORMAT_VERSION, PFTRACE_FORMAT, PFTRACE_INCREMENTAL_CLOCK, PFTRACE_METADATA,
                      TraceData, pftrace_process_uuid, pftrace_track_uuid)
from .pftrace_rows import compressed_packets, span_packets, track_runs


_CLEARED = TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
_NEEDS_STATE = TracePacket.SEQ_NEEDS_INCREMENTAL_STATE
_COUNTER = TrackEvent.TYPE_COUNTER
_EXPLICIT = TrackDescriptor.EXPLICIT  # children in sibling_order_rank order
_BUILTIN_BOOTTIME = 6  # the trace's global clock
_FIRST_USER_CLOCK = PFTRACE_INCREMENTAL_CLOCK  # sequence-scoped clocks start here

# Interned debug annotation names: ARG_NAMES from iid 1 (pftrace_rows.py encodes them).
_ARG_NAMES = ARG_NAMES


def write_pftrace(data: TraceData, stream: BinaryIO) -> None:
    """One rank's trace."""
    metadata = dict(data.metadata)
    metadata.update(base_ns=data.base_ns, rank=data.rank)
    writer = PftraceWriter(stream, metadata)
    writer.add_process(data, f"rank {data.rank}")


class PftraceWriter:
    """A .pftrace of one or more processes (ranks), written as each is added: the metadata
    first, then per process its descriptors and one packet sequence per track."""

    def __init__(self, stream: BinaryIO, metadata: dict[str, Any]) -> None:
        self._builder = StreamingTraceProtoBuilder(stream)
        self._stream = stream  # (span packets come encoded: written as they are)
        self._next_sequence = 2
        # Sequence 1: metadata and track descriptors.
        header = self._builder.create_packet()
        header.trusted_packet_sequence_id = 1
        header.sequence_flags = _CLEARED
        entry = header.chrome_events.metadata.add()
        entry.name = PFTRACE_METADATA
        entry.json_value = orjson.dumps({**metadata, "format": PFTRACE_FORMAT,
                                         "format_version": FORMAT_VERSION}).decode()
        self._builder.write_packet(header)

    def add_process(self, data: TraceData, name: str, flow_base: int = 0) -> None:
        """Write ``data`` as rank ``data.rank``'s group of tracks, named ``name``; flow ids
        are the calls plus ``flow_base`` (distinct per file in a merged trace). A rank added
        twice (two windows) fills the same tracks."""
        builder = self._builder
        rank = data.rank
        # Named tracks, not process and thread tracks: Perfetto shows pid 0 as its
        # "System" process and labels thread tracks "forward 2" (name and tid).
        root_uuid = pftrace_process_uuid(rank)
        root = _descriptor_packet(root_uuid)
        root.track_descriptor.name = name
        root.track_descriptor.child_ordering = _EXPLICIT
        root.track_descriptor.sibling_order_rank = rank
        builder.write_packet(root)
        for track in data.tracks:
            packet = _descriptor_packet(pftrace_track_uuid(rank, track.tid), parent=root_uuid)
            packet.track_descriptor.name = track.name
            packet.track_descriptor.sibling_order_rank = track.tid
            builder.write_packet(packet)
        for counter in data.counters:
            packet = _descriptor_packet(pftrace_track_uuid(rank, counter.tid), parent=root_uuid)
            packet.track_descriptor.name = counter.name
            packet.track_descriptor.sibling_order_rank = counter.tid
            packet.track_descriptor.counter.SetInParent()
            builder.write_packet(packet)

        # One sequence per track; each starts with its clock, defaults and interned names.
        spans = data.spans
        tids, runs, order = track_runs(spans.track)
        sequences = []
        for tid in tids:
            sequence = self._sequence()
            builder.write_packet(_sequence_start(sequence, pftrace_track_uuid(rank, tid), data.names))
            sequences.append(sequence)
        # Every span's begin and end packet, merged by time, a chunk at a time
        # (pftrace_rows.py says how), each chunk compressed.
        chunks = span_packets(spans.begin, spans.end, spans.name, spans.category, spans.call, spans.step,
                              spans.flags, spans.flow, spans.lag, order, runs, sequences, data.base_ns, flow_base)
        _write_compressed(chunks, self._stream)
        streams = []
        for counter in data.counters:
            sequence = self._sequence()
            builder.write_packet(_sequence_start(sequence, pftrace_track_uuid(rank, counter.tid), data.names))
            streams.append(_counter_packets(counter.times, counter.values, sequence, data.base_ns))
        for _, packet in heapq.merge(*streams, key=lambda item: item[0]):
            builder.write_packet(packet)

    def _sequence(self) -> int:
        sequence = self._next_sequence
        self._next_sequence += 1
        return sequence


def _descriptor_packet(uuid: int, parent: int | None = None) -> TracePacket:
    packet = TracePacket()
    packet.trusted_packet_sequence_id = 1
    packet.track_descriptor.uuid = uuid
    if parent is not None:
        packet.track_descriptor.parent_uuid = parent
    return packet


_COMPRESSING_THREADS = min(4, os.cpu_count() or 1)


def _write_compressed(chunks: Iterator[bytes], stream: BinaryIO) -> None:
    """Write each chunk compressed, in order. zlib is nearly all of a big trace's writing
    time and releases the GIL: past the first chunk, chunks are compressed on a few
    threads while the next ones are encoded (at most two per thread in flight, so memory
    stays bounded). A small trace (one chunk) starts no thread."""
    head = list(islice(chunks, 2))
    if len(head) < 2 or _COMPRESSING_THREADS == 1:
        for chunk in chain(head, chunks):
            stream.write(compressed_packets(chunk))
        return
    with ThreadPoolExecutor(_COMPRESSING_THREADS, thread_name_prefix="modtimeline-zlib") as pool:
        pending: deque[Future[bytes]] = deque()
        for chunk in chain(head, chunks):
            pending.append(pool.submit(compressed_packets, chunk))
            if len(pending) > 2 * _COMPRESSING_THREADS:
                stream.write(pending.popleft().result())
        while pending:
            stream.write(pending.popleft().result())


def _sequence_start(sequence: int, track_uuid: int, names: list[str]) -> TracePacket:
    packet = TracePacket()
    packet.trusted_packet_sequence_id = sequence
    packet.sequence_flags = _CLEARED
    packet.timestamp = 0
    # An incremental clock scoped to this sequence: timestamps are deltas.
    snapshot = packet.clock_snapshot
    for clock_id, incremental in ((_BUILTIN_BOOTTIME, False), (_FIRST_USER_CLOCK, True)):
        clock = snapshot.clocks.add()
        clock.clock_id = clock_id
        clock.timestamp = 0
        if incremental:
            clock.is_incremental = True
    snapshot.primary_trace_clock = ClockSnapshot.Clock.BOOTTIME
    defaults = packet.trace_packet_defaults
    defaults.timestamp_clock_id = _FIRST_USER_CLOCK
    defaults.track_event_defaults.track_uuid = track_uuid
    interned = packet.interned_data
    for iid, name in enumerate(names, start=1):
        entry = interned.event_names.add()
        entry.iid = iid
        entry.name = name
    for iid, name in enumerate(CATEGORIES, start=1):
        entry = interned.event_categories.add()
        entry.iid = iid
        entry.name = name
    for iid, name in enumerate(_ARG_NAMES, start=1):
        entry = interned.debug_annotation_names.add()
        entry.iid = iid
        entry.name = name
    return packet


def _counter_packets(times: array[int], values: array[int], sequence: int, base_ns: int) -> Iterator[tuple[int, TracePacket]]:
    previous = 0
    for time, value in zip(times, values):
        packet = TracePacket()
        packet.trusted_packet_sequence_id = sequence
        packet.sequence_flags = _NEEDS_STATE
        packet.timestamp = time - base_ns - previous
        previous = time - base_ns
        packet.track_event.type = _COUNTER
        packet.track_event.counter_value = value
        yield time, packet
