"""Compact, bounded event store: the recording hot path appends two integers per event.

Every event is a host timestamp (``perf_counter_ns``) and one packed integer::

    code = call << CALL_SHIFT | module << KIND_BITS | kind

so recording never allocates a Python object per event beyond the two array slots
(16 bytes), and names are only looked up when the buffer is resolved at flush.

``EventBuffer`` keeps the columns in Python arrays; ``NativeEventBuffer`` is the same
interface over the compiled store of ``modtimeline.native._hotpath`` (recorder.py picks one).
"""

from __future__ import annotations

import sys
import time
import warnings
from array import array
from collections.abc import Callable
from typing import Any

# Event kinds (the low KIND_BITS bits of a code). _layout.h holds the same numbers for the
# compiled parts, which export them as LAYOUT; a compiled part whose LAYOUT differs from
# the one below is refused (recorder.py, resolve.py).
FORWARD_BEGIN = 0
FORWARD_END = 1
# Node events and BACKWARD_DONE carry their backward pass's number in the "module" field
# (one pass per autograd graph task our marks fired in, numbered per buffer).
NODE_DONE = 2  # an autograd node has run; "call" holds the node's id
RECOMPUTE_BEGIN = 4
RECOMPUTE_END = 5
STEP_BEGIN = 6
STEP_END = 7
GRADIENT_READY = 8  # an autograd node's gradient is ready (it is about to run); "call": node id
BACKWARD_DONE = 9  # autograd finished a backward pass

KIND_BITS = 4
MODULE_BITS = 20
CALL_SHIFT = KIND_BITS + MODULE_BITS
KIND_MASK = (1 << KIND_BITS) - 1
MODULE_MASK = (1 << MODULE_BITS) - 1
MAX_MODULES = 1 << MODULE_BITS

# A node link (EventBuffer.link_node/link_code): which call, and whether the node *begins* the
# call's backward (one of its outputs' nodes: GRADIENT_READY) or may *end* it (a sink of the
# call's nodes, none of whose edges stays among them: NODE_DONE).
LINK_BEGIN = 1
LINK_SHIFT = MODULE_BITS + 1  # link = call << LINK_SHIFT | module << 1 | begins

# The nodes one call's walk visits at most to find where its autograd work ends; past it,
# the call's end is left unbounded (resolve flags the span approximate).
SUBGRAPH_BUDGET = 1 << 17

# Raised when what an event means changes without its layout changing (_layout.h too).
EVENT_SEMANTICS = 2

LAYOUT = {
    "EVENT_SEMANTICS": EVENT_SEMANTICS,
    "KIND_BITS": KIND_BITS, "MODULE_BITS": MODULE_BITS, "LINK_BEGIN": LINK_BEGIN, "LINK_SHIFT": LINK_SHIFT,
    "SUBGRAPH_BUDGET": SUBGRAPH_BUDGET,
    "FORWARD_BEGIN": FORWARD_BEGIN, "FORWARD_END": FORWARD_END, "NODE_DONE": NODE_DONE,
    "RECOMPUTE_BEGIN": RECOMPUTE_BEGIN,
    "RECOMPUTE_END": RECOMPUTE_END, "STEP_BEGIN": STEP_BEGIN, "STEP_END": STEP_END, "GRADIENT_READY": GRADIENT_READY,
    "BACKWARD_DONE": BACKWARD_DONE,
}

_BEGIN_KINDS = frozenset((FORWARD_BEGIN, RECOMPUTE_BEGIN, STEP_BEGIN, GRADIENT_READY))

DEFAULT_CAPACITY = 8_000_000  # events; 128 MB of buffer at most


class _OverflowReport:
    """What both buffers tell of events dropped at capacity (they hold ``dropped`` and
    ``capacity``)."""

    __slots__ = ()
    dropped: int
    capacity: int

    @property
    def overflowed(self) -> bool:
        return self.dropped > 0

    def warn_if_overflowed(self) -> None:
        if self.dropped:
            warnings.warn(
                f"modtimeline: the event buffer filled up ({self.capacity:,} events); "
                f"{self.dropped:,} events were dropped and their spans are missing. "
                "Trace fewer steps per window (schedule=Schedule(...)) or raise capacity=.",
                RuntimeWarning,
                stacklevel=3,
            )


class EventBuffer(_OverflowReport):
    """Struct-of-arrays event store with a capacity.

    When ``capacity`` events are stored, new *begin* events are dropped (their spans are
    simply missing) while *end* events still land for a bounded headroom, so spans that
    were open when the buffer filled up still close. ``overflowed`` records that it
    happened; ``warn_if_overflowed`` tells the user once, at flush.
    """

    __slots__ = ("timestamps", "codes", "link_node", "link_code", "nodes", "capacity", "_hard_limit", "dropped",
                 "_clock", "on_recorded", "node_event")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be at least 1 event, got {capacity}")
        self.timestamps = array("q")
        self.codes = array("q")
        # Node links (see recorder.py): which calls begin or end their backward when an
        # autograd node's gradient is ready. Two flat columns, 16 bytes a link.
        self.link_node = array("q")
        self.link_code = array("q")
        self.nodes = 0  # autograd nodes given an id so far
        self.capacity = capacity
        self._hard_limit = capacity + max(4096, capacity // 16)
        self.dropped = 0
        self._clock = time.perf_counter_ns
        # Called with (index, kind, module, call) of each stored event (device clocks mark
        # it on the GPU, NVTX opens and closes ranges); node events: module = pass, call = node id.
        self.on_recorded: Callable[[int, int, int, int], None] | None = None
        # node_event(kind, node): a node event in the backward pass running now. The node
        # marks that know the passes set it (recorder.PythonNodeMarks); the compiled
        # store's own does the same.
        self.node_event: Callable[[int, int], None] = self._no_passes

    def _no_passes(self, kind: int, node: int) -> None:
        raise RuntimeError("this EventBuffer has no node marks to tell its backward passes")

    def columns(self) -> tuple[array, array, array, array]:
        """(timestamps, codes, link_node, link_code)."""
        return self.timestamps, self.codes, self.link_node, self.link_code

    def record(self, kind: int, call: int, module: int) -> None:
        """Store one event stamped now. The hot path: keep it tiny."""
        codes = self.codes
        n = len(codes)
        if n >= self.capacity and (n >= self._hard_limit or kind in _BEGIN_KINDS):
            self.dropped += 1
            return
        self.timestamps.append(self._clock())
        codes.append(call << CALL_SHIFT | module << KIND_BITS | kind)
        if self.on_recorded is not None:
            self.on_recorded(n, kind, module, call)

    def __len__(self) -> int:
        return len(self.codes)

    def synthetic_node(self, link: int) -> int:
        """A node id of no autograd node, linked to ``link``, for marks placed from
        Python (compiled_detail.py); -1 when the buffer is full."""
        if len(self.codes) >= self.capacity:
            return -1
        node = self.nodes
        self.nodes += 1
        self.link_node.append(node)
        self.link_code.append(link)
        return node

    def bytes_used(self) -> int:
        """Bytes held by the events and node links (allocated slots, not just used ones)."""
        return sum(sys.getsizeof(column) for column in (self.timestamps, self.codes, self.link_node, self.link_code))

    def links(self, start: int) -> tuple[array, array]:
        """(link_node, link_code) from link ``start`` on."""
        return self.link_node[start:], self.link_code[start:]

    def clear(self) -> None:
        self.timestamps = array("q")
        self.codes = array("q")
        self.link_node = array("q")
        self.link_code = array("q")
        self.nodes = 0
        self.dropped = 0


def _copied_column(position: int) -> property:
    return property(lambda self: self.columns()[position])


def _store_count(name: str) -> property:
    return property(lambda self: int(getattr(self.store, name)))


class NativeEventBuffer(_OverflowReport):
    """``EventBuffer``'s interface over a compiled ``_hotpath.Store`` (same layout and
    capacity rules), whose events the compiled hooks append without Python. The columns
    are copied out as arrays when read, which happens once per flush."""

    __slots__ = ("store", "record", "node_event")

    def __init__(self, store: Any) -> None:
        self.store = store
        self.record = store.record  # (kind, call, module), bound once: no wrapper per call
        self.node_event = store.node_event  # (kind, node): in the backward pass running now

    def columns(self) -> tuple[array, array, array, array]:
        """(timestamps, codes, link_node, link_code), copied out in one go."""
        arrays = (array("q"), array("q"), array("q"), array("q"))
        for column, data in zip(arrays, self.store.columns()):
            column.frombytes(data)
        return arrays

    timestamps = _copied_column(0)
    codes = _copied_column(1)
    link_node = _copied_column(2)
    link_code = _copied_column(3)
    nodes = _store_count("nodes")
    capacity = _store_count("capacity")
    dropped = _store_count("dropped")

    @property
    def on_recorded(self) -> Callable[[int, int, int, int], None] | None:
        return self.store.on_recorded

    @on_recorded.setter
    def on_recorded(self, callback: Callable[[int, int, int, int], None] | None) -> None:
        self.store.on_recorded = callback

    @property
    def device_marker(self) -> Any:
        """Compiled device marks (``_cuda_marks.CudaMarks``) told of each stored event
        before ``on_recorded``, from C++ to C++; or None."""
        return self.store.device_marker

    @device_marker.setter
    def device_marker(self, marks: Any) -> None:
        self.store.device_marker = marks

    def __len__(self) -> int:
        return len(self.store)

    def synthetic_node(self, link: int) -> int:
        return int(self.store.synthetic_node(link))

    def links(self, start: int) -> tuple[array, array]:
        """(link_node, link_code) from link ``start`` on, copied out."""
        node, code = array("q"), array("q")
        data = self.store.links(start)
        node.frombytes(data[0])
        code.frombytes(data[1])
        return node, code

    def bytes_used(self) -> int:
        return int(self.store.bytes_used())

    def clear(self) -> None:
        self.store.clear()


def unpack(code: int) -> tuple[int, int, int]:
    """(kind, module, call) of a packed event code (for node events: kind, pass, node)."""
    return code & KIND_MASK, (code >> KIND_BITS) & MODULE_MASK, code >> CALL_SHIFT


def pack_link(call: int, module: int, begins: bool) -> int:
    """A node link's code: ``call`` (of module ``module``) begins its backward at the node
    (``begins``), or may end it there."""
    return call << LINK_SHIFT | module << 1 | (LINK_BEGIN if begins else 0)


def unpack_link(code: int) -> tuple[int, int, bool]:
    """(call, module, begins) of a node link's code."""
    return code >> LINK_SHIFT, (code >> 1) & MODULE_MASK, bool(code & LINK_BEGIN)
