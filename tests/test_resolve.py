"""resolve(): events -> spans that nest strictly on every track."""

import random
from array import array

import pytest
from modtimeline.capture.buffer import (
    BACKWARD_DONE, CALL_SHIFT, FORWARD_BEGIN, FORWARD_END, GRADIENT_READY, NODE_DONE,
    KIND_BITS, LINK_BEGIN, LINK_SHIFT, RECOMPUTE_BEGIN, RECOMPUTE_END, STEP_BEGIN, STEP_END, EventBuffer, unpack,
)
from modtimeline.spans.resolve import APPROXIMATE, BACKWARD_TRACK, FORWARD_TRACK, INCOMPLETE, resolve
from .trace_checks import assert_nested_columns

pytestmark = pytest.mark.twin


def events(*rows):
    ts, codes = array("q"), array("q")
    for t, kind, call, module in rows:
        ts.append(t)
        codes.append(call << CALL_SHIFT | module << KIND_BITS | kind)
    return ts, codes


def table(data):
    s = data.spans
    return [(s.track[i], s.begin[i], s.end[i], data.names[s.name[i]], s.flags[i]) for i in range(len(s))]


def links(*rows):
    """(node, call, module, begins) rows -> (link_node, link_code)."""
    node_column, code_column = array("q"), array("q")
    for node, call, module, begins in rows:
        node_column.append(node)
        code_column.append(call << LINK_SHIFT | module << 1 | (LINK_BEGIN if begins else 0))
    return node_column, code_column


def test_pack_roundtrip():
    buffer = EventBuffer()
    buffer.record(GRADIENT_READY, 123456789, 1048575)
    assert unpack(buffer.codes[0]) == (GRADIENT_READY, 1048575, 123456789)


# Bar (call 0) > Bar.foo (call 1): node 0 is the output node of both; foo's node 1 and
# Bar's node 2 lead out of them (they end them when they have run).
FORWARD_BAR = ((0, FORWARD_BEGIN, 0, 0), (1, FORWARD_BEGIN, 1, 1), (2, FORWARD_END, 1, 1), (3, FORWARD_END, 0, 0))
BAR_LINKS = links((0, 0, 0, True), (0, 1, 1, True), (1, 1, 1, False), (2, 0, 0, False))


def test_backward_span_from_output_node_to_input_node():
    ts, codes = events(*FORWARD_BAR, (10, GRADIENT_READY, 0, 0), (20, NODE_DONE, 1, 0),
                       (30, NODE_DONE, 2, 0), (40, BACKWARD_DONE, 0, 0))
    data = resolve(ts, codes, ["Bar", "Bar.foo"], close_ns=100, links=BAR_LINKS)
    bw = [row for row in table(data) if row[0] == BACKWARD_TRACK]
    assert bw == [(BACKWARD_TRACK, 10, 30, "Bar", 0), (BACKWARD_TRACK, 10, 20, "Bar.foo", 0)]


def test_parent_backward_widened_over_child_that_ends_later():
    # foo's end node is marked after Bar's (hooks "at the same moment" in another order).
    ts, codes = events(*FORWARD_BAR, (10, GRADIENT_READY, 0, 0), (20, NODE_DONE, 2, 0),
                       (21, NODE_DONE, 1, 0), (40, BACKWARD_DONE, 0, 0))
    data = resolve(ts, codes, ["Bar", "Bar.foo"], close_ns=100, links=BAR_LINKS)
    bw = [row for row in table(data) if row[0] == BACKWARD_TRACK]
    assert bw == [(BACKWARD_TRACK, 10, 21, "Bar", 0), (BACKWARD_TRACK, 10, 21, "Bar.foo", 0)]


def test_span_ends_with_the_last_of_its_end_nodes():
    # call 0 has two nodes leading out of it (1 and 2): its backward ends when both have run.
    ts, codes = events((0, FORWARD_BEGIN, 0, 0), (1, FORWARD_END, 0, 0), (10, GRADIENT_READY, 0, 0),
                       (20, NODE_DONE, 1, 0), (35, NODE_DONE, 2, 0), (40, BACKWARD_DONE, 0, 0))
    data = resolve(ts, codes, ["M"], close_ns=100, links=links((0, 0, 0, True), (1, 0, 0, False), (2, 0, 0, False)))
    assert [row for row in table(data) if row[0] == BACKWARD_TRACK] == [(BACKWARD_TRACK, 10, 35, "M", 0)]


def test_unbounded_span_is_flagged_bounded_by_its_parent_and_widens_nothing():
    # Bar (call 0) > foo (call 1); foo has no end node, so nothing marks its end.
    ts, codes = events(*FORWARD_BAR, (10, GRADIENT_READY, 0, 0), (30, NODE_DONE, 2, 0),
                       (90, BACKWARD_DONE, 0, 0))
    data = resolve(ts, codes, ["Bar", "Bar.foo"], close_ns=100,
                   links=links((0, 0, 0, True), (0, 1, 1, True), (2, 0, 0, False)))
    bw = [row for row in table(data) if row[0] == BACKWARD_TRACK]
    assert bw == [(BACKWARD_TRACK, 10, 30, "Bar", 0), (BACKWARD_TRACK, 10, 30, "Bar.foo", APPROXIMATE)]


def test_unbounded_root_ends_with_its_backward_pass():
    ts, codes = events((0, FORWARD_BEGIN, 0, 0), (1, FORWARD_END, 0, 0), (10, GRADIENT_READY, 0, 0),
                       (90, BACKWARD_DONE, 0, 0))
    data = resolve(ts, codes, ["Root"], close_ns=100, links=links((0, 0, 0, True)))
    assert [row for row in table(data) if row[0] == BACKWARD_TRACK] == [(BACKWARD_TRACK, 10, 90, "Root", APPROXIMATE)]


def test_partial_overlap_of_unrelated_spans_goes_to_a_second_lane():
    # two sibling branches whose backward interleaves: A [10, 30], B [20, 40]
    ts, codes = events(
        (0, FORWARD_BEGIN, 0, 0), (1, FORWARD_END, 0, 0), (2, FORWARD_BEGIN, 1, 1), (3, FORWARD_END, 1, 1),
        (10, GRADIENT_READY, 0, 0), (20, GRADIENT_READY, 1, 0), (30, NODE_DONE, 2, 0),
        (40, NODE_DONE, 3, 0), (50, BACKWARD_DONE, 0, 0),
    )
    data = resolve(ts, codes, ["A", "B"], close_ns=100,
                   links=links((0, 0, 0, True), (1, 1, 1, True), (2, 0, 0, False), (3, 1, 1, False)))
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


def test_backward_that_never_finished_keeps_the_end_it_saw_flagged():
    ts, codes = events((0, FORWARD_BEGIN, 0, 0), (1, FORWARD_END, 0, 0), (10, GRADIENT_READY, 0, 0),
                       (20, NODE_DONE, 1, 0))
    data = resolve(ts, codes, ["M"], close_ns=100, links=links((0, 0, 0, True), (1, 0, 0, False)))
    assert [row for row in table(data) if row[0] == BACKWARD_TRACK] == [(BACKWARD_TRACK, 10, 20, "M", INCOMPLETE)]


def test_recompute_goes_to_backward_track_and_step_numbers_follow():
    ts, codes = events(
        (0, STEP_BEGIN, 7, 0), (1, FORWARD_BEGIN, 0, 0), (2, FORWARD_END, 0, 0),
        (3, GRADIENT_READY, 0, 0), (4, RECOMPUTE_BEGIN, 1, 0), (5, RECOMPUTE_END, 1, 0), (6, NODE_DONE, 1, 0),
        (6, BACKWARD_DONE, 0, 0), (7, STEP_END, 7, 0), (8, FORWARD_BEGIN, 2, 0), (9, FORWARD_END, 2, 0),
    )
    data = resolve(ts, codes, ["M"], close_ns=10, links=links((0, 0, 0, True), (1, 0, 0, False)))
    s = data.spans
    rows = {(s.begin[i], s.category[i]): (s.track[i], s.step[i]) for i in range(len(s))}
    assert rows[(4, 2)] == (BACKWARD_TRACK, 7)
    assert rows[(3, 1)] == (BACKWARD_TRACK, 7)
    assert rows[(1, 0)] == (FORWARD_TRACK, 7)
    assert rows[(8, 0)] == (FORWARD_TRACK, -1)


def test_end_without_begin_is_ignored():
    ts, codes = events((5, NODE_DONE, 3, 0), (6, FORWARD_END, 4, 0), (7, BACKWARD_DONE, 0, 0))
    assert len(resolve(ts, codes, ["M"], close_ns=10, links=links((3, 0, 0, False))).spans) == 0


def random_stream(seed: int) -> tuple[tuple, dict]:
    """Arbitrary event streams, tied timestamps included: resolve()'s (args, kwargs)."""
    rng = random.Random(seed)
    ts, codes = array("q"), array("q")
    link_node, link_code = array("q"), array("q")
    nodes = rng.randint(1, 12)
    calls = rng.randint(1, 30)
    for _ in range(rng.randint(0, 25)):
        link_node.append(rng.randrange(nodes + 2))  # some links name nodes that never fire
        link_code.append(rng.randrange(calls) << LINK_SHIFT | rng.randrange(5) << 1 | rng.choice((0, LINK_BEGIN)))
    t = 0
    kinds = [FORWARD_BEGIN, FORWARD_END, RECOMPUTE_BEGIN, RECOMPUTE_END, STEP_BEGIN, STEP_END, GRADIENT_READY,
             NODE_DONE, BACKWARD_DONE]
    begun = 0  # as recorded: every forward or recompute begins a new call number
    for _ in range(rng.randint(0, 120)):
        t += rng.choice((0, 0, 1, 5, 100))
        kind = rng.choice(kinds)
        if kind in (GRADIENT_READY, NODE_DONE):
            call = rng.randrange(nodes + 3)
        elif kind in (FORWARD_BEGIN, RECOMPUTE_BEGIN):
            call, begun = begun, begun + 1
        else:
            call = rng.randrange(calls)
        ts.append(t)
        codes.append(call << CALL_SHIFT | rng.randrange(5) << KIND_BITS | kind)
    return (ts, codes, ["A", "A.b", "A.c", "A.b.d", "A.e"], t + 10), dict(
        links=(link_node, link_code), raised_calls={rng.randrange(calls)}, raised_steps={rng.randrange(calls)},
        rank=3, base_ns=7, metadata={"x": 1})


@pytest.mark.parametrize("seed", range(40))
def test_random_event_streams_resolve_into_nesting_tracks(seed):
    """Resolve never fails, every track nests, every span ends at or after it begins."""
    args, kwargs = random_stream(seed)
    data = resolve(*args, **kwargs)
    spans = data.spans
    assert all(spans.end[i] >= spans.begin[i] for i in range(len(spans)))
    assert_nested_columns(spans)
    assert (data.rank, data.base_ns, data.metadata["x"]) == (3, 7, 1)


# ---------------------------------------------------------------- compiled resolve

from modtimeline.spans import resolve as resolve_module  # noqa: E402

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
    for name in ("track", "begin", "end", "name", "category", "call", "step", "flags", "flow", "lag"):
        assert list(getattr(compiled.spans, name)) == list(getattr(python.spans, name)), name
    assert compiled.counters == python.counters == []


def recorded(timeline):
    buffer = timeline.buffer
    return dict(
        timestamps=buffer.timestamps, codes=buffer.codes, module_names=timeline.recorder.module_names,
        close_ns=buffer.timestamps[-1] + 1000, links=(buffer.link_node, buffer.link_code),
        raised_calls=set(timeline.recorder.raised_calls), raised_steps=set(timeline._raised_steps),
    )


@needs_compiled
@pytest.mark.parametrize("raises", [False, True])
def test_compiled_resolve_matches_python_on_real_steps(monkeypatch, tmp_path, raises):
    import contextlib

    import torch

    from modtimeline import Timeline

    from .models import Tree, shapes_model
    from .real_models import gpt2

    model, run = shapes_model()
    tree = Tree()
    checkpointed, step = gpt2(checkpointing=True)
    timeline = Timeline(tmp_path / "t.json")
    timeline._flush = lambda *args, **kwargs: None  # keep the buffer to resolve it twice
    with pytest.raises(RuntimeError) if raises else contextlib.nullcontext():
        with timeline:
            for _ in range(3):
                with timeline.step():
                    run(model)
                    tree(torch.randint(0, 16, (4, 5))).sum().backward()
                    step().backward()
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
@pytest.mark.parametrize("seed", range(60))
def test_compiled_resolve_matches_python_on_random_events(monkeypatch, seed):
    """Every rule, every odd case: the compiled resolve gives Python's columns."""
    args, kwargs = random_stream(seed)
    assert_same(*both_resolves(monkeypatch, *args, **kwargs))
