"""resolve(): events -> spans that nest strictly on every track."""

import contextlib
import random
from array import array

import pytest
import torch

from modtimeline import Timeline
from modtimeline import resolve as resolve_module
from modtimeline.buffer import (
    BACKWARD_BEGIN, BACKWARD_DONE, BACKWARD_END, CALL_SHIFT, FORWARD_BEGIN, FORWARD_END, GRADIENT_READY,
    KIND_BITS, LINK_BEGIN, LINK_SHIFT, RECOMPUTE_BEGIN, RECOMPUTE_END, STEP_BEGIN, STEP_END, EventBuffer, unpack,
)
from modtimeline.resolve import BACKWARD_TRACK, FORWARD_TRACK, INCOMPLETE, resolve

from .models import Tree, shapes_model


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


# ---------------------------------------------------------------- compiled resolve

needs_compiled = pytest.mark.skipif(resolve_module._resolve_cpu is None, reason="_resolve_cpu is not built")


def both_resolves(monkeypatch, *args, **kwargs):
    compiled = resolve(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(resolve_module, "_resolve_cpu", None)
        python = resolve(*args, **kwargs)
    return compiled, python


def assert_same(compiled, python):
    assert compiled.names == python.names
    assert compiled.tracks == python.tracks
    for field in ("track", "begin", "end", "name", "category", "call", "step", "flags", "flow", "lag"):
        assert list(getattr(compiled.spans, field)) == list(getattr(python.spans, field)), field
    assert compiled.counters == python.counters == []


def recorded(timeline):
    buffer = timeline.buffer
    return dict(
        timestamps=buffer.timestamps, codes=buffer.codes, module_names=timeline.tracker.module_names,
        close_ns=buffer.timestamps[-1] + 1000, links=(buffer.link_node, buffer.link_code),
        raised_calls=set(timeline.tracker.raised_calls), raised_steps=set(timeline._raised_steps),
    )


@needs_compiled
@pytest.mark.parametrize("raises", [False, True])
def test_compiled_resolve_matches_python_on_real_steps(monkeypatch, tmp_path, raises):
    model, run = shapes_model()
    tree = Tree()
    timeline = Timeline(tmp_path / "t.json")
    timeline._flush = lambda *args, **kwargs: None  # keep the buffer to resolve it twice
    with pytest.raises(RuntimeError) if raises else contextlib.nullcontext():
        with timeline:
            for _ in range(3):
                with timeline.step():
                    run(model)
                    tree(torch.randint(0, 16, (4, 5))).sum().backward()
            if raises:
                with timeline.step():
                    tree(torch.randint(0, 16, (4, 5))).sum()
                    raise RuntimeError("mid-step")
    compiled, python = both_resolves(monkeypatch, **recorded(timeline))
    assert len(compiled.spans) > 100
    assert_same(compiled, python)
    if raises:
        assert INCOMPLETE in list(compiled.spans.flags)


@needs_compiled
@pytest.mark.parametrize("seed", range(40))
def test_compiled_resolve_matches_python_on_random_events(monkeypatch, seed):
    """Arbitrary event streams, tied timestamps included: every rule, every odd case."""
    rng = random.Random(seed)
    ts, codes = array("q"), array("q")
    link_node, link_code = array("q"), array("q")
    nodes = rng.randint(1, 12)
    calls = rng.randint(1, 30)
    for _ in range(rng.randint(0, 25)):
        link_node.append(rng.randrange(nodes + 2))  # some links name nodes that never fire
        link_code.append(rng.randrange(calls) << LINK_SHIFT | rng.randrange(5) << 1 | rng.choice((0, LINK_BEGIN)))
    t = 0
    kinds = [FORWARD_BEGIN, FORWARD_END, BACKWARD_BEGIN, BACKWARD_END, RECOMPUTE_BEGIN, RECOMPUTE_END,
             STEP_BEGIN, STEP_END, GRADIENT_READY, BACKWARD_DONE]
    begun = 0  # as recorded: every forward or recompute begins a new call number
    for _ in range(rng.randint(0, 120)):
        t += rng.choice((0, 0, 1, 5, 100))
        kind = rng.choice(kinds)
        if kind == GRADIENT_READY:
            call = rng.randrange(nodes + 3)
        elif kind in (FORWARD_BEGIN, RECOMPUTE_BEGIN):
            call, begun = begun, begun + 1
        else:
            call = rng.randrange(calls)
        ts.append(t)
        codes.append(call << CALL_SHIFT | rng.randrange(5) << KIND_BITS | kind)
    raised_calls = {rng.randrange(calls) for _ in range(rng.randint(0, 3))}
    raised_steps = {rng.randrange(calls) for _ in range(rng.randint(0, 2))}
    compiled, python = both_resolves(
        monkeypatch, ts, codes, ["A", "A.b", "A.c", "A.b.d", "A.e"], t + 10, links=(link_node, link_code),
        raised_calls=raised_calls, raised_steps=raised_steps, rank=3, base_ns=7, metadata={"x": 1})
    assert_same(compiled, python)
    assert (compiled.rank, compiled.base_ns, compiled.metadata) == (3, 7, {"x": 1})
