"""Turn recorded events into spans that nest strictly on their tracks.

Input: the event buffer (host ns + packed codes), optionally device marks resolved by
``DeviceClock``. Output: ``TraceData``, plain columns that writers turn into files.
Nothing here imports torch.

A call's backward span, per backward pass, covers the autograd nodes its forward
created (its own and its children's; the recorder finds them by sequence number): it
begins when the first of its output nodes is about to run (GRADIENT_READY) and ends when
the last of its sink nodes (none of whose edges stays inside the call) has run
(NODE_DONE); every other node of the call runs before one of those. A call that created no node (``nn.Identity``, dropout
with p=0: it returns its input) has no backward span. A span whose end was never marked
(the walk of its nodes was cut short) closes at the best bound there is (the end of its
backward pass, or of its nearest bounded ancestor's span if earlier) and is flagged
``APPROXIMATE``.

Two rules make every track nest, which Perfetto requires:

* *Hull*: a module's backward span covers its children's backward spans. Hooks that
  fire "at the same moment" run in registration order, so a parent's end can be stamped
  a microsecond before its child's; the parent's span is widened to the child's.
  Approximate spans (below) never widen anything.
* *Lanes*: what still overlaps partially (backward of parallel branches, work of one
  module spread over two streams) moves to the next lane, a track of its own
  (``backward``, ``backward 2``, ...), instead of being dropped by the viewer.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from itertools import count, repeat
from operator import add, and_, itemgetter, mul, rshift
from typing import Any

from ..capture.buffer import (
    BACKWARD_DONE,
    CALL_SHIFT,
    FORWARD_BEGIN,
    FORWARD_END,
    GRADIENT_READY,
    KIND_BITS,
    KIND_MASK,
    LINK_BEGIN,
    LINK_SHIFT,
    MODULE_MASK,
    NODE_DONE,
    RECOMPUTE_BEGIN,
    RECOMPUTE_END,
    STEP_BEGIN,
    STEP_END,
)
from ..native.loader import compiled_part
from ..device.clock import DeviceMarks
from ..format import (
    APPROXIMATE,
    BACKWARD,
    COMPILED,
    BACKWARD_TRACK,
    FLOW_IN,
    FLOW_NONE,
    FLOW_OUT,
    FORWARD,
    FORWARD_TRACK,
    GPU_TRACK_BASE,
    GPU_TRACK_PREFIX,
    INCOMPLETE,
    NO_LAG,
    RECOMPUTE,
    STEP,
    STEPS_TRACK,
    Counter,
    SpanColumns,
    TraceData,
    Track,
    gpu_spread_track,
    gpu_stream_track,
)

# The arguments _resolve_cpu.spans() takes and the columns it returns (_resolve_cpu.cpp RESOLVE_API).
RESOLVE_API = 1

# Host-only resolve, compiled; without it, the Python below does it all (20x slower).
_resolve_cpu = compiled_part("native._resolve_cpu", RESOLVE_API)


# A span while being built:
# [begin, end, name, category, call, step, flags, begin_event, end_event, gpu_lag]
# and, for a backward span, its backward pass.
_B, _E, _NAME, _CAT, _CALL, _STEP, _FLAGS, _BEV, _EEV, _LAG, _PASS = range(11)


def resolve(
    timestamps: array,
    codes: array,
    module_names: list[str],
    close_ns: int,
    *,
    links: tuple[array, array] | None = None,
    rank: int = 0,
    base_ns: int = 0,
    marks: DeviceMarks | None = None,
    metadata: dict[str, Any] | None = None,
    raised_calls: set[int] | frozenset[int] = frozenset(),
    raised_steps: set[int] | frozenset[int] = frozenset(),
    compiled_modules: set[int] | frozenset[int] = frozenset(),
) -> TraceData:
    """Pair begin/end events into spans, close what is still open at ``close_ns``,
    flag those and the calls and steps that raised ``INCOMPLETE``, close backward spans
    by the rules in the module docstring, make every track nest, and add GPU spans from
    ``marks``."""
    names = list(module_names)
    link_node, link_code = links if links is not None else (array("q"), array("q"))
    if marks is None and _resolve_cpu is not None:
        # The same rules, compiled (a test checks both give the same columns).
        columns, track_rows, step_calls = _resolve_cpu.spans(
            timestamps, codes, link_node, link_code, close_ns, set(raised_calls), set(raised_steps), len(names))
        names.extend(f"step {number}" for number in step_calls)
        columns_out = SpanColumns(*(_array(code, data) for code, data in zip(_COLUMN_TYPES, columns)))
        _flag_compiled(columns_out, compiled_modules)
        return TraceData(rank, base_ns, _names_used(names, columns_out), [Track(tid, name) for tid, name in track_rows],
                         columns_out, [], dict(metadata or {}))
    steps: list[list[Any]] = []
    forward: list[list[Any]] = []
    backward: list[list[Any]] = []  # backward and recompute spans share the backward lanes
    open_fw: dict[int, list[Any]] = {}
    # Per backward pass (the number node events carry): the backward spans it opened, by
    # call; a call's backward begins once per pass.
    open_bw: dict[int, dict[int, list[Any]]] = {}
    last_seen: dict[int, int] = {}  # per pass: when its latest node event was stamped
    parent_of: dict[int, int] = {}
    fw_stack: list[int] = []
    rc_stack: list[int] = []
    open_step: list[Any] | None = None
    step = -1
    # Group the node links by node: a stable sort keeps each node's links in order.
    by_node = sorted(range(len(link_node)), key=link_node.__getitem__)
    sorted_nodes = list(map(link_node.__getitem__, by_node))
    sorted_links = list(map(link_code.__getitem__, by_node))

    kinds = map(and_, codes, repeat(KIND_MASK))
    calls = map(rshift, codes, repeat(CALL_SHIFT))
    for i, ts, code, kind, call in zip(count(), timestamps, codes, kinds, calls):
        if kind == FORWARD_BEGIN or kind == RECOMPUTE_BEGIN:
            module = (code >> KIND_BITS) & MODULE_MASK
            cat = FORWARD if kind == FORWARD_BEGIN else RECOMPUTE
            open_fw[call] = [ts, close_ns, module, cat, call, step, INCOMPLETE, i, -1, NO_LAG]
            # Recomputed calls nest among themselves as forward calls do (their backward
            # spans, from the nodes the recompute made, follow the same hull rule).
            stack = fw_stack if cat == FORWARD else rc_stack
            if stack:
                parent_of[call] = stack[-1]
            stack.append(call)
        elif kind == FORWARD_END or kind == RECOMPUTE_END:
            span = open_fw.pop(call, None)
            if span is None:
                continue
            span[_E] = ts
            span[_FLAGS] = INCOMPLETE if call in raised_calls else 0
            span[_EEV] = i
            stack = fw_stack if span[_CAT] == FORWARD else rc_stack
            if stack and stack[-1] == call:
                stack.pop()
            elif call in stack:
                stack.remove(call)
            (forward if span[_CAT] == FORWARD else backward).append(span)
        elif kind == GRADIENT_READY:
            # A node is about to run: the calls it begins open (once per backward pass).
            number = (code >> KIND_BITS) & MODULE_MASK
            last_seen[number] = ts
            pass_spans = open_bw.setdefault(number, {})
            for link in sorted_links[bisect_left(sorted_nodes, call):bisect_right(sorted_nodes, call)]:
                if link & LINK_BEGIN:
                    linked_call = link >> LINK_SHIFT
                    if linked_call not in pass_spans:
                        module = (link >> 1) & MODULE_MASK
                        pass_spans[linked_call] = [ts, -1, module, BACKWARD, linked_call, step, INCOMPLETE, i, -1,
                                                   NO_LAG, number]
        elif kind == NODE_DONE:
            # A node has run: the latest end so far of the pass's open calls it may end.
            number = (code >> KIND_BITS) & MODULE_MASK
            last_seen[number] = ts
            ending = open_bw.get(number)
            if ending:
                for link in sorted_links[bisect_left(sorted_nodes, call):bisect_right(sorted_nodes, call)]:
                    if not link & LINK_BEGIN:
                        span = ending.get(link >> LINK_SHIFT)
                        if span is not None:
                            span[_E], span[_EEV] = ts, i
        elif kind == BACKWARD_DONE:
            number = (code >> KIND_BITS) & MODULE_MASK
            _close_pass(open_bw.pop(number, {}), ts, i, backward)
            last_seen.pop(number, None)
        elif kind == STEP_BEGIN:
            step = call
            open_step = [ts, close_ns, -1, STEP, call, call, INCOMPLETE, i, -1, NO_LAG]
        elif kind == STEP_END:
            # A backward pass runs inside the step that started it (backward() returns when
            # it is done): one still open at the step's end raised.
            for number, pass_spans in open_bw.items():
                _close_unfinished(pass_spans, last_seen.get(number, ts), backward)
            open_bw.clear()
            last_seen.clear()
            if open_step is not None:
                open_step[_E] = ts
                open_step[_FLAGS] = INCOMPLETE if call in raised_steps else 0
                steps.append(open_step)
                open_step = None
            step = -1

    # What never ended (an exception, a backward that never finished) closes at close_ns.
    for span in open_fw.values():
        (forward if span[_CAT] == FORWARD else backward).append(span)
    for number, pass_spans in open_bw.items():
        _close_unfinished(pass_spans, last_seen.get(number, close_ns), backward)
    if open_step is not None:
        steps.append(open_step)

    for span in steps:
        span[_NAME] = len(names)
        names.append(f"step {span[_CALL]}")

    _hull_backward(backward, parent_of)
    _bound_approximate(backward, parent_of)
    _spans_from_children(backward, forward, parent_of)
    # Flow arrows join a call's forward span to its backward span.
    flow_calls = {s[_CALL] for s in backward if s[_CAT] == BACKWARD} & {s[_CALL] for s in forward}

    out = SpanColumns()
    tracks: list[Track] = []
    if steps:
        _emit_lanes(out, tracks, steps, STEPS_TRACK, "steps", set())
    _emit_lanes(out, tracks, forward, FORWARD_TRACK, "forward", flow_calls)
    _emit_lanes(out, tracks, backward, BACKWARD_TRACK, "backward", flow_calls)

    counters: list[Counter] = []
    if marks is not None and (len(marks.host_event) or len(marks.memory_time)):
        _add_gpu_spans(out, tracks, counters, forward + backward, marks, parent_of, timestamps)
    _flag_compiled(out, compiled_modules)
    return TraceData(rank, base_ns, _names_used(names, out), tracks, out, counters, dict(metadata or {}))


def _names_used(names: list[str], spans: SpanColumns) -> list[str]:
    """Only the names the spans use, the name column renumbered to match: the recorder
    knows every module the process traced (a trace of one Linear must not carry the
    names of a 20,000-module model traced before it)."""
    used = sorted(set(spans.name))
    if len(used) == len(names):
        return names
    renumbered = [0] * len(names)
    for new, old in enumerate(used):
        renumbered[old] = new
    spans.name = array("q", map(renumbered.__getitem__, spans.name))
    return [names[old] for old in used]


def _flag_compiled(spans: SpanColumns, compiled_modules: set[int] | frozenset[int]) -> None:
    """Flag the spans of torch.compile'd modules (names are module indices for module spans)."""
    if not compiled_modules:
        return
    flags, names, categories = spans.flags, spans.name, spans.category
    for row in range(len(spans)):
        if names[row] in compiled_modules and categories[row] != STEP:
            flags[row] |= COMPILED


# SpanColumns' fields in order, as the compiled resolve returns them.
_COLUMN_TYPES = "qqqqbqqbbq"  # track, begin, end, name, category, call, step, flags, flow, lag


def _array(typecode: str, data: bytes) -> array:
    column = array(typecode)
    column.frombytes(data)
    return column


def _close_pass(pass_spans: dict[int, list[Any]], done_ns: int, done_event: int, backward: list[list[Any]]) -> None:
    """A backward pass is over: close every span it opened."""
    for span in pass_spans.values():
        if span[_E] < 0:
            # Nothing marked its end: the pass's end bounds it.
            span[_E], span[_EEV], span[_FLAGS] = done_ns, done_event, APPROXIMATE
        else:
            span[_FLAGS] = 0
        backward.append(span)


def _close_unfinished(pass_spans: dict[int, list[Any]], bound_ns: int, backward: list[list[Any]]) -> None:
    """A backward pass that never finished (it raised): its spans end at the last node of
    theirs that ran, else at the pass's last node event (``bound_ns``), flagged incomplete."""
    for span in pass_spans.values():
        if span[_E] < 0:
            span[_E] = max(bound_ns, span[_B])
        span[_FLAGS] = INCOMPLETE
        backward.append(span)


def _spans_from_children(backward: list[list[Any]], forward: list[list[Any]], parent_of: dict[int, int]) -> None:
    """A call whose outputs carry none of the nodes its forward made (it returns None and
    keeps its result on ``self``; it computes a gradient penalty inside its forward) has
    no node to begin its backward in that pass, though its children's nodes ran: there its
    span is the hull of its descendants' spans of the pass, flagged approximate (its own
    nodes, outside its children, are not seen; incomplete if one of theirs is). Made after the hull rule: it widens nothing."""
    module_of = {s[_CALL]: s[_NAME] for s in forward}
    module_of.update((s[_CALL], s[_NAME]) for s in backward if s[_CAT] == RECOMPUTE)
    real = {(s[_PASS], s[_CALL]) for s in backward if s[_CAT] == BACKWARD}
    made: dict[tuple[int, int], list[Any]] = {}
    for span in list(backward):
        if span[_CAT] != BACKWARD:
            continue
        number = span[_PASS]
        ancestor = parent_of.get(span[_CALL])
        while ancestor is not None and (number, ancestor) not in real and ancestor in module_of:
            hull = made.get((number, ancestor))
            if hull is None:
                hull = made[(number, ancestor)] = [span[_B], span[_E], module_of[ancestor], BACKWARD, ancestor,
                                                   span[_STEP], APPROXIMATE | (span[_FLAGS] & INCOMPLETE),
                                                   span[_BEV], span[_EEV], NO_LAG, number]
                backward.append(hull)
            else:
                hull[_FLAGS] |= span[_FLAGS] & INCOMPLETE
                if span[_B] < hull[_B]:
                    hull[_B], hull[_BEV] = span[_B], span[_BEV]
                if span[_E] > hull[_E]:
                    hull[_E], hull[_EEV] = span[_E], span[_EEV]
            ancestor = parent_of.get(ancestor)


def _pass_of(span: list[Any]) -> int:
    """A backward span's pass (-1 for a span made without one)."""
    return span[_PASS] if len(span) > _PASS else -1


def _by_pass_and_call(spans: list[list[Any]]) -> dict[tuple[int, int], list[Any]]:
    """The backward spans by (pass, call): a call has one per pass its nodes ran in, and
    the rules below relate spans of one pass only."""
    return {(_pass_of(s), s[_CALL]): s for s in spans if s[_CAT] == BACKWARD}


def _bounded_parent(key: tuple[int, int], by_key: dict[tuple[int, int], list[Any]],
                    parent_of: dict[int, int]) -> list[Any] | None:
    """The nearest ancestor call's backward span of the same pass whose end is bounded."""
    number, call = key
    parent_call = parent_of.get(call)
    while parent_call is not None:
        parent = by_key.get((number, parent_call))
        if parent is not None and not parent[_FLAGS] & APPROXIMATE:
            return parent
        parent_call = parent_of.get(parent_call)
    return None


def _bound_approximate(spans: list[list[Any]], parent_of: dict[int, int]) -> None:
    """An approximate span ends no later than its nearest bounded ancestor (its work is
    part of that ancestor's), and never before it began."""
    by_key = _by_pass_and_call(spans)
    for key, span in by_key.items():
        if span[_FLAGS] & APPROXIMATE:
            parent = _bounded_parent(key, by_key, parent_of)
            if parent is not None and parent[_B] <= span[_B] and parent[_E] < span[_E]:
                span[_E] = max(parent[_E], span[_B])


def _hull_backward(spans: list[list[Any]], parent_of: dict[int, int]) -> None:
    """Widen each backward span to cover the backward spans of its module's children in
    the same pass (approximate children excepted: a guess never moves a bounded span)."""
    by_key = _by_pass_and_call(spans)
    parent_get = parent_of.get
    # Children were called after parents: latest call first.
    for number, call in sorted(by_key, key=lambda key: (key[1], key[0]), reverse=True):
        child = by_key[number, call]
        if child[_FLAGS] & APPROXIMATE:
            continue
        parent_call = parent_get(call)
        while parent_call is not None and (number, parent_call) not in by_key:
            parent_call = parent_get(parent_call)
        if parent_call is None:
            continue
        parent = by_key[number, parent_call]
        if child[_B] < parent[_B]:
            parent[_B] = child[_B]
        if child[_E] > parent[_E]:
            parent[_E] = child[_E]


def assign_lanes(spans: list[list[Any]]) -> list[int]:
    """Sort ``spans`` into nesting order and give each a lane such that the spans of one
    lane nest strictly; lane 0 takes all it can. Returns the lanes, aligned with ``spans``."""
    # Three stable sorts with C-level keys: begin ascending, end descending, then (for
    # identical intervals) the outer call, which has the lower call number, first.
    spans.sort(key=itemgetter(_CALL))
    spans.sort(key=itemgetter(_E), reverse=True)
    spans.sort(key=itemgetter(_B))
    first: list[int] = []  # lane 0's stack of open ends; nearly every span lands here
    others: list[list[int]] = []
    lane_of: list[int] = []
    add_lane = lane_of.append
    for span in spans:
        begin, end = span[_B], span[_E]
        while first and first[-1] <= begin:
            first.pop()
        if not first or end <= first[-1]:
            first.append(end)
            add_lane(0)
            continue
        for number, stack in enumerate(others, start=1):
            while stack and stack[-1] <= begin:
                stack.pop()
            if not stack or end <= stack[-1]:
                stack.append(end)
                add_lane(number)
                break
        else:
            others.append([end])
            add_lane(len(others))
    return lane_of


# The flow a span carries when its call has both a forward and a backward span.
_FLOW_BY_CATEGORY = (FLOW_OUT, FLOW_IN, FLOW_NONE, FLOW_NONE)  # forward, backward, recompute, step


def _emit_lanes(out: SpanColumns, tracks: list[Track], spans: list[list[Any]], first_tid: int,
                label: str, flow_calls: set[int]) -> None:
    """Append spans lane by lane in nesting order, one track per lane (``label``,
    ``label (2)``, ...). Columns are filled with C-level maps, not per span."""
    lanes = assign_lanes(spans)
    for lane in sorted(set(lanes)):
        tracks.append(Track(first_tid + lane, label if lane == 0 else f"{label} ({lane + 1})"))
    order = sorted(range(len(spans)), key=lanes.__getitem__)  # stable: nesting order kept
    ordered = list(map(spans.__getitem__, order))
    calls = list(map(itemgetter(_CALL), ordered))
    categories = list(map(itemgetter(_CAT), ordered))
    out.track.extend(map(add, map(lanes.__getitem__, order), repeat(first_tid)))
    out.begin.extend(map(itemgetter(_B), ordered))
    out.end.extend(map(itemgetter(_E), ordered))
    out.name.extend(map(itemgetter(_NAME), ordered))
    out.category.extend(categories)
    out.call.extend(calls)
    out.step.extend(map(itemgetter(_STEP), ordered))
    out.flags.extend(map(itemgetter(_FLAGS), ordered))
    out.flow.extend(map(mul, map(_FLOW_BY_CATEGORY.__getitem__, categories), map(flow_calls.__contains__, calls)))
    out.lag.extend(map(itemgetter(_LAG), ordered))


def _add_gpu_spans(out: SpanColumns, tracks: list[Track], counters: list[Counter],
                   cpu_spans: list[list[Any]], marks: DeviceMarks, parent_of: dict[int, int],
                   timestamps: array) -> None:
    """A GPU span per CPU span whose begin and end were both marked on the device."""
    time_of: dict[int, int] = {}
    stream_of: dict[int, int] = {}
    for event, ns, stream in zip(marks.host_event, marks.time_ns, marks.stream):
        time_of[event] = ns
        stream_of[event] = stream

    # 16 tids per GPU track leave room for its lanes.
    per_track: dict[int, list[list[Any]]] = {}
    track_name: dict[int, str] = {}
    spread_tid: dict[int, int] = {}
    for s in cpu_spans:
        b_ev, e_ev = s[_BEV], s[_EEV]
        if e_ev < 0 or b_ev not in time_of or e_ev not in time_of:
            continue
        b_stream, e_stream = stream_of[b_ev], stream_of[e_ev]
        device, stream_id = marks.streams[b_stream]
        if b_stream == e_stream:
            tid = GPU_TRACK_BASE + 16 * b_stream
            track_name[tid] = gpu_stream_track(device, stream_id)
        else:
            # Began on one stream and ended on another: it cannot nest on either.
            tid = spread_tid.setdefault(device, GPU_TRACK_BASE + 16 * (len(marks.streams) + len(spread_tid)))
            track_name[tid] = gpu_spread_track(device)
        begin = time_of[b_ev]
        gpu = [begin, max(time_of[e_ev], begin), s[_NAME], s[_CAT], s[_CALL], s[_STEP], 0, b_ev, e_ev,
               begin - timestamps[b_ev], _pass_of(s)]
        per_track.setdefault(tid, []).append(gpu)

    for tid in sorted(per_track):
        spans = per_track[tid]
        _hull_backward(spans, parent_of)
        _emit_lanes(out, tracks, spans, tid, track_name[tid], set())

    if len(marks.memory_time):
        by_device: dict[int, tuple[array, array]] = {}
        for ns, device, value in zip(marks.memory_time, marks.memory_device, marks.memory_bytes):
            times, values = by_device.setdefault(device, (array("q"), array("q")))
            times.append(ns)
            values.append(value)
        for n, (device, (times, values)) in enumerate(sorted(by_device.items())):
            counters.append(Counter(f"{GPU_TRACK_PREFIX}:{device} memory allocated (bytes)", GPU_TRACK_BASE - 10 + n, times, values))
