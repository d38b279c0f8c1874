"""Chrome trace (JSON object format) writer, streaming, no dict per event.

Each span becomes one ``"ph":"X"`` event. The parts that repeat (pid, tid, name,
category) are rendered once per distinct (track, name, category) as a *head*; the
numbers are serialised a column at a time with orjson and split into per-row pieces
in C; one ``bytes.join`` interleaves heads and numbers. Rows are written in chunks,
so memory stays bounded however long the trace.

Times are microseconds relative to ``metadata.base_ns`` (a small float keeps every
nanosecond: ``123456.789``), never epoch microseconds, where a double loses sub-µs.
"""

from __future__ import annotations

from itertools import chain, repeat
from operator import sub, truediv
from typing import BinaryIO

import orjson

from ..resolve import CATEGORIES, FLOW_IN, FLOW_OUT, TraceData

CHUNK_ROWS = 1 << 16
FORMAT_NAME = "modtimeline-chrome"
FORMAT_VERSION = 1


def _numbers(values: list) -> list[bytes]:  # type: ignore[type-arg]
    """orjson-serialise a column and split it into one bytes object per value."""
    if not values:
        return []
    return orjson.dumps(values)[1:-1].split(b",")


# Tail of a span event by (flow, incomplete): what follows the call number.
_TAILS = {
    (0, 0): (b"}}", False, b""),
    (0, 1): (b',"incomplete":true}}', False, b""),
    (FLOW_OUT, 0): (b'},"bind_id":', True, b',"flow_out":true}'),
    (FLOW_OUT, 1): (b',"incomplete":true},"bind_id":', True, b',"flow_out":true}'),
    (FLOW_IN, 0): (b'},"bind_id":', True, b',"flow_in":true}'),
    (FLOW_IN, 1): (b',"incomplete":true},"bind_id":', True, b',"flow_in":true}'),
}


def write_chrome_json(data: TraceData, stream: BinaryIO) -> None:
    spans = data.spans
    pid = data.rank
    base = data.base_ns
    metadata = dict(data.metadata)
    metadata.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, base_ns=base, rank=pid)
    stream.write(b'{"displayTimeUnit":"ns","metadata":')
    stream.write(orjson.dumps(metadata))
    stream.write(b',"traceEvents":[\n')

    meta_events: list[dict[str, object]] = [
        {"ph": "M", "pid": pid, "tid": 0, "name": "process_name", "args": {"name": f"rank {pid}"}},
        {"ph": "M", "pid": pid, "tid": 0, "name": "process_sort_index", "args": {"sort_index": pid}},
    ]
    for track in data.tracks:
        meta_events.append({"ph": "M", "pid": pid, "tid": track.tid, "name": "thread_name", "args": {"name": track.name}})
        meta_events.append({"ph": "M", "pid": pid, "tid": track.tid, "name": "thread_sort_index", "args": {"sort_index": track.tid}})
    stream.write(b",\n".join(orjson.dumps(e) for e in meta_events))

    names = [orjson.dumps(name) for name in data.names]
    heads: dict[tuple[int, int, int], bytes] = {}
    for start in range(0, len(spans), CHUNK_ROWS):
        stop = start + CHUNK_ROWS
        _write_span_chunk(stream, spans, start, stop, base, pid, names, heads)

    for counter in data.counters:
        for ts, value in zip(counter.times, counter.values):
            stream.write(b",\n")
            stream.write(orjson.dumps({"ph": "C", "pid": pid, "tid": counter.tid, "name": counter.name,
                                       "ts": (ts - base) / 1000, "args": {"value": value}}))
    stream.write(b"\n]}\n")


def _write_span_chunk(stream: BinaryIO, spans, start: int, stop: int, base: int, pid: int,  # type: ignore[no-untyped-def]
                      names: list[bytes], heads: dict[tuple[int, int, int], bytes]) -> None:
    begin = spans.begin[start:stop]
    end = spans.end[start:stop]
    keys = list(zip(spans.track[start:stop], spans.name[start:stop], spans.category[start:stop]))
    for key in set(keys).difference(heads):
        tid, name, category = key
        heads[key] = (b',\n{"ph":"X","pid":%d,"tid":%d,"name":%s,"cat":"%s","ts":'
                      % (pid, tid, names[name], CATEGORIES[category].encode()))
    ts = _numbers(list(map(truediv, map(sub, begin, repeat(base)), repeat(1000))))
    dur = _numbers(list(map(truediv, map(sub, end, begin), repeat(1000))))
    steps = _numbers(spans.step[start:stop].tolist())
    calls = _numbers(spans.call[start:stop].tolist())
    lags = spans.lag[start:stop]
    row_tails = list(map(_TAILS.__getitem__, zip(spans.flow[start:stop], spans.flags[start:stop])))
    if any(lag >= 0 for lag in lags):
        # GPU spans carry the CPU->GPU launch lag; there are few tracks of them, so a
        # slower path that adds the field per row is fine.
        lag_parts = [b',"launch_lag_us":%s' % orjson.dumps(lag / 1000) if lag >= 0 else b"" for lag in lags]
    else:
        lag_parts = list(repeat(b"", len(begin)))
    pieces = chain.from_iterable(
        (head, t, b',"dur":', d, b',"args":{"step":', s, lag, b',"call":', c, tail, c if again else b"", end_)
        for head, t, d, s, lag, c, (tail, again, end_) in zip(
            map(heads.__getitem__, keys), ts, dur, steps, lag_parts, calls, row_tails
        )
    )
    stream.write(b"".join(pieces))

