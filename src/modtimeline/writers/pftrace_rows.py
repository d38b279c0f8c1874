"""Span columns -> Perfetto TracePackets, one SLICE_BEGIN and one SLICE_END per span.

The compiled twin (``_pftrace_rows.c``) writes the same bytes about 30x faster; this file
is the reference and the fallback. The encoding, per event:

* per track, a nesting walk over its spans (one run of rows in nesting order, see
  ``track_runs``): before each span begins, the spans that ended by then close,
  innermost first;
* the tracks' events merged by time, ties going to the track listed first;
* written in chunks of about ``CHUNK_BYTES``: each call resumes every track's walk where
  the last one stopped (its state is an array the caller keeps), so the writer never
  holds more than a chunk of packets, however long the trace;
* each event is one ``Trace.packet`` (field 1), length-delimited::

      TracePacket { timestamp (8): ns since the previous packet of its sequence,
                    trusted_packet_sequence_id (10): its track's sequence,
                    track_event (11): TrackEvent, sequence_flags (13): NEEDS_INCREMENTAL_STATE }
      TrackEvent (begin) { category_iids (3), debug_annotations (4): step, call,
                           [incomplete, approximate, compiled: bool], [launch_lag_us: double],
                           type (9) = SLICE_BEGIN, name_iid (10),
                           [flow_ids (47) | terminating_flow_ids (48): fixed64 call + 1 + flow base] }
      TrackEvent (end)   { type (9) = SLICE_END }

Names, categories and argument names are the iids the sequence's first packet interned
(index + 1, in writers/perfetto.py).
"""

from __future__ import annotations

import struct
import zlib
from array import array
from collections.abc import Iterator, Sequence
from itertools import groupby

from ..native.loader import compiled_part
from ..format import APPROXIMATE, COMPILED, FUSED, FLOW_IN, FLOW_OUT, INCOMPLETE, NO_LAG

_API = 3  # the encode_spans this file calls (_pftrace_rows.c API_VERSION)
_pftrace_rows = compiled_part("writers._pftrace_rows", _API)

# Interned debug annotation names (iids): format.ARG_NAMES in order, from 1.
ARG_STEP, ARG_CALL, ARG_INCOMPLETE, ARG_LAG, ARG_APPROXIMATE, ARG_COMPILED, ARG_FUSED = range(1, 8)
_SEQ_NEEDS_INCREMENTAL_STATE = 2
_END_EVENT = b"\x48\x02"  # type = SLICE_END


def varint(value: int) -> bytes:
    """Protobuf varint of a uint64 (a negative int64 as its two's complement: 10 bytes)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _int_arg(name: int, value: int) -> bytes:
    body = b"\x08" + bytes((name,)) + b"\x20" + varint(value)
    return b"\x22" + varint(len(body)) + body


def _bool_arg(name: int) -> bytes:
    return b"\x22\x04\x08" + bytes((name,)) + b"\x10\x01"


def _double_arg(name: int, value: float) -> bytes:
    return b"\x22\x0b\x08" + bytes((name,)) + b"\x29" + struct.pack("<d", value)


def _begin_event(category: int, step: int, call: int, flags: int, lag: int, name: int, flow: int,
                 flow_base: int) -> bytes:
    event = b"\x18" + varint(category + 1) + _int_arg(ARG_STEP, step) + _int_arg(ARG_CALL, call)
    if flags & INCOMPLETE:
        event += _bool_arg(ARG_INCOMPLETE)
    if flags & APPROXIMATE:
        event += _bool_arg(ARG_APPROXIMATE)
    if flags & COMPILED:
        event += _bool_arg(ARG_COMPILED)
    if flags & FUSED:
        event += _bool_arg(ARG_FUSED)
    if lag != NO_LAG:
        event += _double_arg(ARG_LAG, lag / 1000)
    event += b"\x48\x01\x50" + varint(name + 1)
    if flow == FLOW_OUT:
        event += varint(47 << 3 | 1) + struct.pack("<Q", flow_base + call + 1)
    elif flow == FLOW_IN:
        event += varint(48 << 3 | 1) + struct.pack("<Q", flow_base + call + 1)
    return event


# zlib level 1: about as small as the default level on these packets, several times faster.
COMPRESSION_LEVEL = 1


def compressed_packets(packets: bytes) -> bytes:
    """``packets`` (a run of encoded ``Trace.packet`` fields) as one packet holding them
    zlib-compressed: ``Trace.packet (1) { TracePacket.compressed_packets (50) }``, which
    trace processors expand in place, in order."""
    body = zlib.compress(packets, COMPRESSION_LEVEL)
    inner = varint(50 << 3 | 2) + varint(len(body)) + body
    return b"\x0a" + varint(len(inner)) + inner


def _packet(delta: int, sequence: int, event: bytes) -> bytes:
    body = (b"\x40" + varint(delta) + b"\x50" + varint(sequence) + b"\x5a" + varint(len(event)) + event
            + b"\x68" + bytes((_SEQ_NEEDS_INCREMENTAL_STATE,)))
    return b"\x0a" + varint(len(body)) + body


# A track's walk, resumable: an array('q') of [next position to begin, depth, last
# timestamp written (relative to base), the open rows...] (the compiled twin updates it in
# place). The stack holds as many rows as the array has room for: a walk that would go
# deeper stops its chunk there, and ``span_packets`` grows the stack and goes on, so the
# writer holds room for the nesting depth, not for every row.
_NEXT, _DEPTH, _PREVIOUS, _STACK = range(4)
# Uncompressed packet bytes per chunk (per call), each compressed on its own: small enough
# that several compress at once and the writer's memory stays bounded, big enough that
# zlib finds the repeats (a chunk holds ~9,500 spans).
CHUNK_BYTES = 512 << 10
_FIRST_STACK = 32


def new_state(start: int, stack: int = _FIRST_STACK) -> array[int]:
    """A walk that begins at position ``start`` of its run, with room for ``stack`` open rows."""
    state = array("q", bytes(8 * (_STACK + stack)))
    state[_NEXT] = start
    return state


def grow_full_stacks(states: Sequence[array[int]]) -> bool:
    """Double the stack of every walk whose stack is full; whether any grew."""
    grew = False
    for state in states:
        if state[_DEPTH] == len(state) - _STACK:
            state.frombytes(bytes(8 * max(len(state) - _STACK, 1)))
            grew = True
    return grew


def track_runs(track: array[int]) -> tuple[list[int], array[int], array[int] | None]:
    """Each track's rows as one run: (tids, runs, order), the rows of ``tids[k]`` being
    ``order[runs[2k]:runs[2k+1]]`` (``order`` None: the rows themselves, in which case
    nothing per row is held). Resolve writes each track's spans together; a trace read
    back from a file may not, and then ``order`` sorts them (stable: nesting order kept)."""
    found = _pftrace_rows.track_runs(track) if _pftrace_rows is not None else _track_runs_python(track)
    order = None
    if found is None:  # a track in more than one run
        order = array("q", sorted(range(len(track)), key=track.__getitem__))
        found = _track_runs_python(array("q", map(track.__getitem__, order)))
        assert found is not None
    tids = [tid for tid, _, _ in found]
    runs = array("q")
    for _, start, stop in found:
        runs.extend((start, stop))
    return tids, runs, order


def _track_runs_python(track: array[int]) -> list[tuple[int, int, int]] | None:
    found: list[tuple[int, int, int]] = []
    seen: set[int] = set()
    start = 0
    for tid, group in groupby(track):
        if tid in seen:
            return None
        seen.add(tid)
        stop = start + sum(1 for _ in group)
        found.append((tid, start, stop))
        start = stop
    return sorted(found)


def _peek(state: array[int], stop: int, order: array[int] | None, begin: array[int], end: array[int]) -> tuple[int, int, bool] | None:
    """The walk's next event: (time, row, begins), or None when it has none left."""
    depth = state[_DEPTH]
    top = state[_STACK + depth - 1] if depth else -1
    if state[_NEXT] < stop:
        candidate = order[state[_NEXT]] if order is not None else state[_NEXT]
        if depth and end[top] <= begin[candidate]:
            return end[top], top, False
        return begin[candidate], candidate, True
    if depth:
        return end[top], top, False
    return None


def encode_spans_python(begin: array[int], end: array[int], name: array[int], category: array[int], call: array[int], step: array[int],
                        flags: array[int], flow: array[int], lag: array[int], order: array[int] | None, runs: array[int],
                        sequences: Sequence[int], states: Sequence[array[int]], base: int, flow_base: int,
                        max_bytes: int) -> bytes:
    """What ``_pftrace_rows.encode_spans`` does, in Python (the same bytes, the same states)."""
    out: list[bytes] = []
    size = 0
    while size < max_bytes:
        best: tuple[int, int, bool] | None = None
        best_track = -1
        for k, state in enumerate(states):  # the earliest next event; ties: the track listed first
            event = _peek(state, runs[2 * k + 1], order, begin, end)
            if event is not None and (best is None or event[0] < best[0]):
                best, best_track = event, k
        if best is None:
            break
        time, row, begins = best
        state = states[best_track]
        if begins:
            if state[_DEPTH] == len(state) - _STACK:
                break  # the stack is full: span_packets grows it
            state[_STACK + state[_DEPTH]] = row
            state[_DEPTH] += 1
            state[_NEXT] += 1
        else:
            state[_DEPTH] -= 1
        encoded = _begin_event(category[row], step[row], call[row], flags[row], lag[row], name[row], flow[row],
                               flow_base) if begins else _END_EVENT
        relative = time - base
        packet = _packet(relative - state[_PREVIOUS], sequences[best_track], encoded)
        state[_PREVIOUS] = relative
        out.append(packet)
        size += len(packet)
    return b"".join(out)


def span_packets(begin: array[int], end: array[int], name: array[int], category: array[int], call: array[int], step: array[int], flags: array[int],
                 flow: array[int], lag: array[int], order: array[int] | None, runs: array[int], sequences: Sequence[int], base: int,
                 flow_base: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Every span's begin and end packet, merged by time, in chunks of about
    ``chunk_bytes``; compiled where it is built. The tracks are ``track_runs``'s."""
    encode = _pftrace_rows.encode_spans if _pftrace_rows is not None else encode_spans_python
    states = [new_state(runs[2 * k]) for k in range(len(runs) // 2)]
    while True:
        chunk = encode(begin, end, name, category, call, step, flags, flow, lag, order, runs, sequences, states, base,
                       flow_base, chunk_bytes)
        grew = grow_full_stacks(states)
        if chunk:
            yield chunk
        elif not grew:
            return
