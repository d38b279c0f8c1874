"""The Chrome JSON writer: compiled and pure-Python rows give the same events."""

import io
import random

import orjson
import pytest

from modtimeline.resolve import (
    BACKWARD, FLOW_IN, FLOW_OUT, FORWARD, INCOMPLETE, NO_LAG, RECOMPUTE, SpanColumns, TraceData, Track,
)
from modtimeline.writers import chrome


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
