"""resolve(): events -> spans that nest strictly on every track."""

from array import array

from modtimeline.buffer import (
    BACKWARD_BEGIN, BACKWARD_END, CALL_SHIFT, FORWARD_BEGIN, FORWARD_END, KIND_BITS,
    RECOMPUTE_BEGIN, RECOMPUTE_END, STEP_BEGIN, STEP_END, EventBuffer, unpack,
)
from modtimeline.resolve import BACKWARD_TRACK, FORWARD_TRACK, INCOMPLETE, resolve


def events(*rows):
    ts, codes = array("q"), array("q")
    for t, kind, call, module in rows:
        ts.append(t)
        codes.append(call << CALL_SHIFT | module << KIND_BITS | kind)
    return ts, codes


def table(data):
    s = data.spans
    return [(s.track[i], s.begin[i], s.end[i], data.names[s.name[i]], s.flags[i]) for i in range(len(s))]


def test_pack_roundtrip():
    buffer = EventBuffer()
    buffer.record(BACKWARD_END, 123456789, 1048575)
    assert unpack(buffer.codes[0]) == (BACKWARD_END, 1048575, 123456789)


def test_parent_backward_widened_over_child_that_ends_later():
    # Bar (call 0) > Bar.foo (call 1); post_bw Bar fires 1 ns before post_bw Bar.foo.
    ts, codes = events(
        (0, FORWARD_BEGIN, 0, 0), (1, FORWARD_BEGIN, 1, 1), (2, FORWARD_END, 1, 1), (3, FORWARD_END, 0, 0),
        (10, BACKWARD_BEGIN, 0, 0), (11, BACKWARD_BEGIN, 1, 1), (20, BACKWARD_END, 0, 0), (21, BACKWARD_END, 1, 1),
    )
    data = resolve(ts, codes, ["Bar", "Bar.foo"], close_ns=100)
    bw = [row for row in table(data) if row[0] == BACKWARD_TRACK]
    assert bw == [(BACKWARD_TRACK, 10, 21, "Bar", 0), (BACKWARD_TRACK, 11, 21, "Bar.foo", 0)]


def test_partial_overlap_of_unrelated_spans_goes_to_a_second_lane():
    # two sibling branches whose backward interleaves: A [10, 30], B [20, 40]
    ts, codes = events(
        (0, FORWARD_BEGIN, 0, 0), (1, FORWARD_END, 0, 0), (2, FORWARD_BEGIN, 1, 1), (3, FORWARD_END, 1, 1),
        (10, BACKWARD_BEGIN, 0, 0), (20, BACKWARD_BEGIN, 1, 1), (30, BACKWARD_END, 0, 0), (40, BACKWARD_END, 1, 1),
    )
    data = resolve(ts, codes, ["A", "B"], close_ns=100)
    rows = table(data)
    assert (BACKWARD_TRACK, 10, 30, "A", 0) in rows
    assert (BACKWARD_TRACK + 1, 20, 40, "B", 0) in rows
    assert [t.name for t in data.tracks] == ["forward", "backward", "backward (2)"]


def test_open_spans_close_at_close_time_flagged():
    ts, codes = events((0, STEP_BEGIN, 0, 0), (1, FORWARD_BEGIN, 0, 0), (2, FORWARD_BEGIN, 1, 1), (3, FORWARD_END, 1, 1))
    data = resolve(ts, codes, ["Root", "Root.a"], close_ns=50)
    assert sorted(table(data)) == [
        (1, 0, 50, "step 0", INCOMPLETE),
        (FORWARD_TRACK, 1, 50, "Root", INCOMPLETE),
        (FORWARD_TRACK, 2, 3, "Root.a", 0),
    ]


def test_recompute_goes_to_backward_track_and_step_numbers_follow():
    ts, codes = events(
        (0, STEP_BEGIN, 7, 0), (1, FORWARD_BEGIN, 0, 0), (2, FORWARD_END, 0, 0),
        (3, BACKWARD_BEGIN, 0, 0), (4, RECOMPUTE_BEGIN, 1, 0), (5, RECOMPUTE_END, 1, 0), (6, BACKWARD_END, 0, 0),
        (7, STEP_END, 7, 0), (8, FORWARD_BEGIN, 2, 0), (9, FORWARD_END, 2, 0),
    )
    data = resolve(ts, codes, ["M"], close_ns=10)
    s = data.spans
    rows = {(s.begin[i], s.category[i]): (s.track[i], s.step[i]) for i in range(len(s))}
    assert rows[(4, 2)] == (BACKWARD_TRACK, 7)
    assert rows[(1, 0)] == (FORWARD_TRACK, 7)
    assert rows[(8, 0)] == (FORWARD_TRACK, -1)


def test_end_without_begin_is_ignored():
    ts, codes = events((5, BACKWARD_END, 3, 0), (6, FORWARD_END, 4, 0))
    assert len(resolve(ts, codes, ["M"], close_ns=10).spans) == 0
