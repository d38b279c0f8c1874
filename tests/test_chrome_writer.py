"""The writers' compiled and pure-Python halves: Chrome JSON rows give the same events,
.pftrace span packets the same bytes (and decode to the spans)."""

import io
from array import array
import random

import orjson
import pytest

from modtimeline.spans.resolve import (
    BACKWARD, FLOW_IN, FLOW_OUT, FORWARD, INCOMPLETE, NO_LAG, RECOMPUTE, SpanColumns, TraceData, Track,
)
from modtimeline.writers import chrome

pytestmark = pytest.mark.twin


def _trace(rows: int = 3000) -> TraceData:
    rng = random.Random(7)
    spans = SpanColumns()
    for i in range(rows):
        begin = rng.randrange(0, 10**12)
        spans.append(rng.choice((2, 10, 11, 100)), begin, begin + rng.randrange(0, 10**7), rng.randrange(4),
                     rng.choice((FORWARD, BACKWARD, RECOMPUTE)), i, rng.randrange(-1, 50),
                     rng.choice((0, INCOMPLETE)), rng.choice((0, FLOW_OUT, FLOW_IN)), rng.choice((NO_LAG, NO_LAG, -2500, 0, 1234567)))
    names = ["Model", 'Model.weird "quoted" \\ name', "Model.ünïcode", "Model.heads.100%"]
    tracks = [Track(2, "forward"), Track(10, "backward"), Track(11, "backward (2)"), Track(100, "cuda:0 stream 7")]
    return TraceData(3, 0, names, tracks, spans, metadata={"tool": "modtimeline"})


def _events(data: TraceData) -> list:
    stream = io.BytesIO()
    chrome.write_chrome_json(data, stream)
    return orjson.loads(stream.getvalue())["traceEvents"]


@pytest.mark.skipif(chrome._chrome_rows is None, reason="the C row formatter was not built here")
def test_compiled_and_python_rows_are_the_same_events(monkeypatch):
    data = _trace()
    compiled = _events(data)
    monkeypatch.setattr(chrome, "_chrome_rows", None)
    python = _events(data)
    assert len(compiled) == len(python) > 3000
    assert compiled == python


def test_times_keep_every_nanosecond():
    data = _trace(200)
    by_call = {e["args"]["call"]: e for e in _events(data) if e.get("ph") == "X"}
    for row in range(len(data.spans)):
        event = by_call[data.spans.call[row]]
        assert round(event["ts"] * 1000) == data.spans.begin[row]
        assert round(event["dur"] * 1000) == data.spans.end[row] - data.spans.begin[row]
        lag = data.spans.lag[row]
        assert event["args"].get("launch_lag_us") == (None if lag == NO_LAG else lag / 1000)


# ---------------------------------------------------------------- .pftrace packets
def _nested_trace(rows: int = 3000) -> TraceData:
    """Random spans that nest on each track (the writers' contract), with every flag,
    flow kind and lag, negative steps and large calls."""
    rng = random.Random(11)
    spans = SpanColumns()
    for track in (1, 2, 10, 11, 100):
        t = 0
        stack: list[int] = []
        for _ in range(rows // 5):
            t += rng.randrange(0, 5000)
            while stack and (rng.random() < 0.4 or spans.end[stack[-1]] <= t):
                closed = stack.pop()
                t = max(t, spans.end[closed])
            end = t + rng.randrange(0, 10**6)
            if stack:
                end = min(end, spans.end[stack[-1]])
            spans.append(track, t, end, rng.randrange(4), rng.choice((FORWARD, BACKWARD, RECOMPUTE)),
                         rng.randrange(0, 1 << 40), rng.randrange(-1, 50), rng.randrange(8),
                         rng.choice((0, FLOW_OUT, FLOW_IN)), rng.choice((NO_LAG, -2500, 0, 1234567)))
            stack.append(len(spans) - 1)
    return TraceData(0, 0, ["Model", "Model.a", "Model.b", "Model.c"], [], spans.in_nesting_order())


def _interleaved(data: TraceData) -> TraceData:
    """The same spans with the tracks' rows interleaved by time (as a trace read back from
    a file may hold them); each track's rows keep their nesting order."""
    spans = data.spans
    order = sorted(range(len(spans)), key=lambda row: (spans.begin[row], -spans.end[row]))
    mixed = SpanColumns()
    for row in order:
        mixed.append(*(getattr(spans, column)[row] for column in _COLUMNS))
    return TraceData(data.rank, data.base_ns, data.names, data.tracks, mixed)


_COLUMNS = ("track", "begin", "end", "name", "category", "call", "step", "flags", "flow", "lag")


def _packets(encode, data: TraceData, chunk_bytes: int, stack: int = 32) -> list[bytes]:
    """The chunks ``encode`` writes, driven as span_packets drives it (stacks grown when full)."""
    from modtimeline.writers.pftrace_rows import grow_full_stacks, new_state, track_runs

    spans = data.spans
    tids, runs, order = track_runs(spans.track)
    states = [new_state(runs[2 * k], stack) for k in range(len(tids))]
    chunks = []
    while True:
        chunk = encode(spans.begin, spans.end, spans.name, spans.category, spans.call, spans.step, spans.flags,
                       spans.flow, spans.lag, order, runs, list(range(2, 2 + len(tids))), states, data.base_ns,
                       1 << 40, chunk_bytes)
        grew = grow_full_stacks(states)
        if chunk:
            chunks.append(chunk)
        elif not grew:
            return chunks


def test_pftrace_packet_twins_write_the_same_bytes_in_any_chunks():
    from modtimeline.writers import pftrace_rows

    if pftrace_rows._pftrace_rows is None:
        pytest.skip("the compiled encoder is not built here")
    data = _nested_trace()
    mixed = _interleaved(data)
    assert pftrace_rows.track_runs(data.spans.track)[2] is None  # each track together: nothing per row
    assert pftrace_rows.track_runs(mixed.spans.track)[2] is not None  # tracks interleaved: rows sorted
    streams = []
    for trace in (data, mixed):
        whole = _packets(pftrace_rows._pftrace_rows.encode_spans, trace, 1 << 30)
        streams.append(whole[0])
        assert len(whole) == 1 and len(whole[0]) > 20 * len(trace.spans)
        assert _packets(pftrace_rows.encode_spans_python, trace, 1 << 30) == whole
        for chunk_bytes in (1, 997, 64 << 10):  # resumed walks give the same stream, chunk by chunk
            compiled = _packets(pftrace_rows._pftrace_rows.encode_spans, trace, chunk_bytes)
            assert b"".join(compiled) == whole[0]
            assert all(len(chunk) < chunk_bytes + 200 for chunk in compiled)
            assert _packets(pftrace_rows.encode_spans_python, trace, chunk_bytes) == compiled
        # Stacks that start with room for one open span and grow as the walk goes deeper.
        small = _packets(pftrace_rows._pftrace_rows.encode_spans, trace, 1 << 30, stack=1)
        assert b"".join(small) == whole[0] and len(small) > 1
        assert _packets(pftrace_rows.encode_spans_python, trace, 1 << 30, stack=1) == small
    assert streams[0] == streams[1]  # the same spans: the same packets, however the rows lie


def test_pftrace_track_runs_twins_agree():
    from array import array

    from modtimeline.writers import pftrace_rows

    if pftrace_rows._pftrace_rows is None:
        pytest.skip("the compiled encoder is not built here")
    for track in ([], [3], [1, 1, 2, 2, 2, 0], [1, 2, 1], [5, 5, 4, 4, 5]):
        column = array("q", track)
        assert pftrace_rows._pftrace_rows.track_runs(column) == pftrace_rows._track_runs_python(column)
    assert pftrace_rows._track_runs_python(array("q", [1, 1, 2, 2, 2, 0])) == [(0, 5, 6), (1, 0, 2), (2, 2, 5)]


def test_pftrace_packets_decode_field_by_field():
    """Decoded by the perfetto package's own protos: every span's begin and end, in time
    order per sequence, with its name, category, args and flow."""
    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent

    from modtimeline.format import ARG_NAMES
    from modtimeline.writers.pftrace_rows import span_packets, track_runs

    data = _nested_trace(500)
    spans = data.spans
    tids, runs, order = track_runs(spans.track)
    encoded = b"".join(span_packets(spans.begin, spans.end, spans.name, spans.category, spans.call, spans.step,
                                    spans.flags, spans.flow, spans.lag, order, runs,
                                    [2 + k for k in range(len(tids))], data.base_ns, 7, chunk_bytes=4096))
    clock: dict[int, int] = {}
    open_spans: dict[int, list] = {}
    found = []
    for packet in Trace.FromString(encoded).packet:
        sequence = packet.trusted_packet_sequence_id
        clock[sequence] = clock.get(sequence, 0) + packet.timestamp
        event = packet.track_event
        if event.type == TrackEvent.TYPE_SLICE_BEGIN:
            args = {ARG_NAMES[a.name_iid - 1]: (a.int_value if a.HasField("int_value") else a.bool_value
                    if a.HasField("bool_value") else a.double_value) for a in event.debug_annotations}
            open_spans.setdefault(sequence, []).append((clock[sequence], event.name_iid - 1, event.category_iids[0] - 1,
                                                        args, list(event.flow_ids), list(event.terminating_flow_ids)))
        else:
            begin, name, category, args, out, into = open_spans[sequence].pop()
            found.append((tids[sequence - 2], begin + data.base_ns, clock[sequence] + data.base_ns, name, category,
                          args["call"], args["step"], out, into))
    expected = []
    for row in range(len(spans)):
        flow = [7 + spans.call[row] + 1]
        expected.append((spans.track[row], spans.begin[row], spans.end[row], spans.name[row], spans.category[row],
                         spans.call[row], spans.step[row], flow if spans.flow[row] == FLOW_OUT else [],
                         flow if spans.flow[row] == FLOW_IN else []))
    assert sorted(found) == sorted(expected)
