"""Chrome trace (JSON object format) writer, streaming, no dict per event.

Each span becomes one ``"ph":"X"`` event. What repeats (pid, tid, name, category,
flow kind) is rendered once per distinct combination into a ``bytes %`` template;
the numbers are serialised a column at a time with orjson and split into per-row
pieces in C, and ``map(bytes.__mod__, ...)`` fills the templates, so no Python code
and no dict runs per event. Rows are written in chunks of 65,536, so memory stays
bounded however long the trace.

Times are microseconds relative to ``metadata.base_ns`` (a small float keeps every
nanosecond: ``123456.789``), never epoch microseconds, where a double loses sub-µs.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from itertools import repeat
from operator import sub, truediv
from typing import Any, BinaryIO

import orjson

from ..native.loader import compiled_part
from ..format import (APPROXIMATE, CATEGORIES, CHROME_FORMAT, COMPILED, FUSED, FLOW_IN, FLOW_OUT, FORMAT_VERSION, INCOMPLETE, NO_LAG,
                      STEP, SpanColumns, TraceData)

# The compiled row formatter (setup.py); without it, the Python path below.
_CHROME_ROWS_API = 3  # the format_spans arguments this file passes (_chrome_rows.c API_VERSION)
_chrome_rows = compiled_part("writers._chrome_rows", _CHROME_ROWS_API)

CHUNK_ROWS = 1 << 16


def _numbers(values: list[Any]) -> list[bytes]:
    """orjson-serialise a column and split it into one bytes object per value."""
    if not values:
        return []
    return orjson.dumps(values)[1:-1].split(b",")


# The end of a span event by (flow, flags). Every template takes the call number twice;
# "%.0b" prints nothing, so only rows with a flow repeat it (as bind_id).
def _tail(flow: int, flags: int) -> bytes:
    marks = ((b',"incomplete":true' if flags & INCOMPLETE else b"") + (b',"approximate":true' if flags & APPROXIMATE else b"")
             + (b',"compiled":true' if flags & COMPILED else b"") + (b',"fused":true' if flags & FUSED else b""))
    if flow == FLOW_OUT:
        return b'%b' + marks + b'},"bind_id":%b,"flow_out":true}'
    if flow == FLOW_IN:
        return b'%b' + marks + b'},"bind_id":%b,"flow_in":true}'
    return b'%b' + marks + b'}}%.0b'


_TAILS = {(flow, flags): _tail(flow, flags) for flow in (0, FLOW_OUT, FLOW_IN) for flags in range(16)}


def write_chrome_json(data: TraceData, stream: BinaryIO) -> None:
    """One rank's trace."""
    metadata = dict(data.metadata)
    metadata.update(base_ns=data.base_ns, rank=data.rank)
    writer = ChromeWriter(stream, metadata)
    writer.add_process(data, f"rank {data.rank}")
    writer.close()


class ChromeWriter:
    """A Chrome JSON trace of one or more processes (ranks), written as each is added."""

    def __init__(self, stream: BinaryIO, metadata: dict[str, Any]) -> None:
        self._stream = stream
        self._first = True
        stream.write(b'{"displayTimeUnit":"ns","metadata":')
        stream.write(orjson.dumps({**metadata, "format": CHROME_FORMAT, "format_version": FORMAT_VERSION}))
        stream.write(b',"traceEvents":[\n')

    def add_events(self, events: Iterable[bytes]) -> None:
        """Events already in JSON (another tool's, kept as they are)."""
        for event in events:
            if not self._first:
                self._stream.write(b",\n")
            self._first = False
            self._stream.write(event)

    def add_process(self, data: TraceData, name: str | None, flow_base: int = 0) -> None:
        """Write ``data`` as process ``data.rank`` named ``name`` (None: a process another
        tool named), times relative to ``data.base_ns``; flow ids are the calls plus
        ``flow_base``."""
        stream = self._stream
        spans = data.spans
        pid = data.rank
        base = data.base_ns
        meta_events: list[dict[str, object]] = [] if name is None else [
            {"ph": "M", "pid": pid, "tid": 0, "name": "process_name", "args": {"name": name}},
            {"ph": "M", "pid": pid, "tid": 0, "name": "process_sort_index", "args": {"sort_index": pid}},
        ]
        for track in data.tracks:
            meta_events.append({"ph": "M", "pid": pid, "tid": track.tid, "name": "thread_name", "args": {"name": track.name}})
            meta_events.append({"ph": "M", "pid": pid, "tid": track.tid, "name": "thread_sort_index",
                                "args": {"sort_index": track.tid}})
        if not self._first:
            stream.write(b",\n")
        self._first = False
        stream.write(b",\n".join(orjson.dumps(e) for e in meta_events))

        templates: dict[tuple[int, int, int, int, int], bytes] = {}
        names_json = list(map(orjson.dumps, data.names)) if _chrome_rows is not None else []
        for start in range(0, len(spans), CHUNK_ROWS):
            if _chrome_rows is not None:
                _write_span_chunk_compiled(stream, spans, start, start + CHUNK_ROWS, base, flow_base, pid, names_json)
            else:
                _write_span_chunk(stream, spans, start, start + CHUNK_ROWS, base, flow_base, pid, data.names, templates)

        for counter in data.counters:
            for ts, value in zip(counter.times, counter.values):
                stream.write(b",\n")
                stream.write(orjson.dumps({"ph": "C", "pid": pid, "tid": counter.tid, "name": counter.name,
                                           "ts": (ts - base) / 1000, "args": {"value": value}}))

    def close(self, extra: dict[str, Any] | None = None) -> None:
        """End the file; ``extra``: more top-level keys (another tool's)."""
        self._stream.write(b"\n]")
        for key, value in (extra or {}).items():
            self._stream.write(b"," + orjson.dumps(key) + b":" + orjson.dumps(value))
        self._stream.write(b"}\n")


def _head(pid: int, tid: int, name: str, category: int) -> bytes:
    """The start of one kind of span event, up to its "ts" value."""
    return b'{"ph":"X","pid":%d,"tid":%d,"name":%s,"cat":"%s","ts":' % (
        pid, tid, orjson.dumps(name), CATEGORIES[category].encode())


def _template(pid: int, tid: int, name: str, category: int, flow: int, flags: int) -> bytes:
    """The text of one kind of span event, numbers left as %b. The head is escaped: a
    module name may hold a "%" (ModuleDict keys can)."""
    return (_head(pid, tid, name, category).replace(b"%", b"%%")
            + b'%b,"dur":%b,"args":{"step":%b%b,"call":' + _TAILS[flow, flags])


# Module spans come back in every window (and Timeline) of a long run: their templates
# are kept. (Step spans' are not: "step N" is a new name every step.)
_module_template = lru_cache(maxsize=1 << 14)(_template)


_CATEGORY_BYTES = [category.encode() for category in CATEGORIES]


def _write_span_chunk_compiled(stream: BinaryIO, spans: SpanColumns, start: int, stop: int, base: int, flow_base: int,
                               pid: int, names_json: list[bytes]) -> None:
    """Rows ``start:stop`` by the C formatter: the same events (heads as ``_head`` writes
    them), times as exact integer µs."""
    rows = slice(start, stop)
    stream.write(b",\n")
    stream.write(_chrome_rows.format_spans(  # type: ignore[union-attr]
        spans.track[rows], spans.name[rows], spans.category[rows], spans.begin[rows], spans.end[rows],
        spans.step[rows], spans.call[rows], spans.flags[rows], spans.flow[rows], spans.lag[rows], base, flow_base,
        pid, names_json, _CATEGORY_BYTES))


def _write_span_chunk(stream: BinaryIO, spans: SpanColumns, start: int, stop: int, base: int, flow_base: int,
                      pid: int, names: list[str], templates: dict[tuple[int, int, int, int, int], bytes]) -> None:
    """Format rows ``start:stop``. Every per-row step runs in C (map/zip over builtins,
    ``bytes % tuple`` on a template per distinct track/name/category/flow/flag)."""
    begin = spans.begin[start:stop]
    end = spans.end[start:stop]
    keys = list(zip(spans.track[start:stop], spans.name[start:stop], spans.category[start:stop],
                    spans.flow[start:stop], spans.flags[start:stop]))
    for key in set(keys).difference(templates):
        tid, name, category, flow, flags = key
        render = _template if category == STEP else _module_template
        templates[key] = render(pid, tid, names[name], category, flow, flags)
    ts = _numbers(list(map(truediv, map(sub, begin, repeat(base)), repeat(1000))))
    dur = _numbers(list(map(truediv, map(sub, end, begin), repeat(1000))))
    steps = _numbers(spans.step[start:stop].tolist())
    calls = _numbers(spans.call[start:stop].tolist())
    binds = _numbers([call + flow_base for call in spans.call[start:stop]]) if flow_base else calls
    lags = spans.lag[start:stop]
    lag_parts: Iterable[bytes] = repeat(b"")
    if any(lag != NO_LAG for lag in lags):
        # GPU spans carry the CPU->GPU launch lag.
        lag_parts = [b',"launch_lag_us":%s' % orjson.dumps(lag / 1000) if lag != NO_LAG else b"" for lag in lags]
    rows = map(bytes.__mod__, map(templates.__getitem__, keys), zip(ts, dur, steps, lag_parts, calls, binds))
    stream.write(b",\n")
    stream.write(b",\n".join(rows))
