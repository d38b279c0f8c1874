"""Device time on the host clock, without synchronising inside a traced step.

At span boundaries ``DeviceClock.record_event`` records a timing event on the stream the work
went to: for a forward, the current stream of the module's own device (from its
parameters; never simply "the current device", which is GPU 0 unless the user set it);
in backward, autograd's thread for that device. Nothing is waited for inside a step.

How a device time becomes a host time:

* **References, chained.** Each device keeps a chain of *reference* events: one at every
  step boundary (and one at least every ``REFERENCE_INTERVAL_NS`` between marks). A mark
  is timed against the newest reference before it (``cudaEventElapsedTime`` is float32
  milliseconds: a short interval keeps it exact to well under a µs), and each reference
  against the one before; positions are summed in float64 nanoseconds, so precision
  does not decay over an hour-long window as it would from one anchor.
* **Anchors, outside steps.** An anchor pins a chain position to a host time: the
  device is synchronised, the host clock read, an event recorded on the idle device,
  several times, and the reading with the smallest launch delay kept. A device is
  anchored at the first step boundary after it was first seen, and at every write; host
  times are interpolated linearly between anchors, which corrects clock drift.
* **Resolved as they complete.** At each step boundary the marks whose work has finished
  (a non-blocking query) are resolved and their events go back to a per-device pool;
  the pool is filled there too, outside the step, and has a bound: past it marks are
  dropped (counted), never queued without limit.
* **CUDA graphs.** While a stream is being captured nothing is marked (an event recorded
  into a graph cannot be timed); the marks skipped are counted.
* **Marks made in C++.** Where the compiled ``native._cuda_marks`` is built (a CUDA torch)
  the marks inside a step are made there, without Python or the GIL (``marks_type``): it
  records events this clock lends it against the reference this clock names, and calls
  ``_need`` when it has no fresh reference or no event left; each step boundary takes
  its marks back (``_drain``) before timing them here, exactly as marks made in Python.

The arithmetic lives in ``DeviceClock``; the device primitives in a ``DeviceBackend``:
``CudaBackend`` on real GPUs, ``fake.FakeBackend`` on the CPU. The fake keeps CUDA's rules
(an event belongs to the device it was first recorded on, elapsed times are float32
milliseconds between completed events, capture, synchronisations counted), so the CPU
tests drive exactly the code a GPU runs.
"""

from __future__ import annotations

import threading
import time
import types
import weakref
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..capture.buffer import BACKWARD_DONE, FORWARD_BEGIN, FORWARD_END, GRADIENT_READY, NODE_DONE, RECOMPUTE_BEGIN, RECOMPUTE_END

StreamKey = tuple[int, int]  # (device index, stream id)

REFERENCE_INTERVAL_NS = 500_000_000  # a new reference at least this often (host time) while marking
ANCHOR_READINGS = 5  # (host clock, event) pairs per anchor; the tightest one is kept
POOL_CHUNK = 256  # events created at once, outside steps
MAX_EVENTS_PER_DEVICE = 1 << 17  # the pool's bound: marks past it are dropped and counted
MEMORY_INTERVAL_NS = 1_000_000  # memory sampled at most once per ms (and at each step boundary)
MAX_STREAMS_KEPT = 256  # CudaBackend's stream objects, one per stream marks were recorded on

# The interface of native._cuda_marks.CudaMarks (_cuda_marks.cpp CUDA_MARKS_API).
CUDA_MARKS_API = 1

_FORWARD_KINDS = frozenset((FORWARD_BEGIN, FORWARD_END, RECOMPUTE_BEGIN, RECOMPUTE_END))
_MARKED_KINDS = _FORWARD_KINDS | {GRADIENT_READY, NODE_DONE, BACKWARD_DONE}


def _mask(kinds: frozenset[int] | set[int]) -> int:
    return sum(1 << kind for kind in kinds)


class NativeMarks(Protocol):
    """Marks made outside Python (``_cuda_marks.CudaMarks``; ``fake.FakeMarks`` on the CPU),
    made as ``marks_type(need, module_device, marked_kinds, forward_kinds,
    reference_interval_ns)`` (kinds as bit masks)."""

    def mark(self, index: int, kind: int, module: int, call: int = 0) -> None:
        """Mark stored event ``index`` (buffer.on_recorded's arguments; ``call`` unused)."""
    def give(self, device: int, events: list[Any]) -> None: ...
    def set_reference(self, device: int, reference: int, host_ns: int) -> None: ...
    def outstanding(self, device: int) -> tuple[int, int]:
        """(events in the pool, marks not drained yet) of ``device``."""
    def drain(self) -> tuple[list[Any], bytes, bytes, bytes, bytes, int, int, str]: ...
    def forget_modules(self) -> None: ...


class DeviceBackend(Protocol):
    """The device primitives ``DeviceClock`` needs."""

    def new_event(self, device: int) -> Any:
        """A timing event that belongs to ``device`` (made outside steps)."""

    def record(self, event: Any, device: int) -> StreamKey:
        """Record ``event`` on ``device``'s current stream (of this thread); its key."""

    def thread_device(self) -> int:
        """The calling thread's current device (autograd's threads each have theirs)."""

    def capturing(self) -> bool:
        """Is the calling thread's current stream being captured into a CUDA graph?"""

    def query(self, event: Any) -> bool:
        """Has the event's work completed? (Never waits.)"""

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds from ``start`` to ``end``, both completed (float32, as CUDA's)."""

    def synchronize(self, device: int) -> None: ...
    def memory_allocated(self, device: int) -> int: ...

    def tensor_device(self, tensor: Any) -> int | None:
        """The GPU ``tensor`` lives on; None for a tensor on the host."""

    # Makes the marks inside steps outside Python (``NativeMarks``), or None: Python does.
    marks_type: Callable[..., NativeMarks] | None


@dataclass
class DeviceMarks:
    """Resolved device events: parallel columns, one row per marked host event."""

    host_event: array  # index of the host event in the buffer
    time_ns: array  # when the device reached it, on the host clock
    stream: array  # index into ``streams``
    streams: list[StreamKey]
    # allocated bytes, sampled on the host (the allocator's bookkeeping is host-side):
    memory_time: array = field(default_factory=lambda: array("q"))  # host ns
    memory_device: array = field(default_factory=lambda: array("q"))
    memory_bytes: array = field(default_factory=lambda: array("q"))
    skipped_in_capture: int = 0  # marks not made while a CUDA graph was being captured
    dropped: int = 0  # marks not made because the pool was at its bound (or failed: error)
    error: str = ""  # the first failure of a mark made in C++ ("" if none)


class _Reference:
    __slots__ = ("event", "position", "users", "ident")

    def __init__(self, event: Any, ident: int) -> None:
        self.event = event
        self.ident = ident  # (how marks made in C++ name it)
        self.position: float | None = None  # device ns after the chain's first reference
        self.users = 0  # marks waiting to be timed against it


class _Device:
    """One device's events: pool, reference chain, marks waiting for their work, anchors."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.pool: list[Any] = []
        self.created = 0
        self.used_since_refill = 0
        self.references: deque[_Reference] = deque()  # unreleased, oldest first
        self.current: _Reference | None = None  # the newest reference (marks are timed against it)
        self.tail: _Reference | None = None  # the newest resolved reference
        self.current_host_ns = 0
        self.waiting: dict[StreamKey, deque[tuple[Any, int, _Reference]]] = {}  # per stream: (event, host event, ref)
        self.pending = 0
        self.anchors: list[tuple[float, int]] = []  # (chain position, host ns), by position
        self.needs_anchor = True
        # resolved marks of the window, in chain positions until resolve() maps them
        self.host_event = array("q")
        self.position = array("d")
        self.stream: list[StreamKey] = []


class DeviceClock:
    """Marks host events on the device and maps them onto the host clock."""

    def __init__(self, backend: DeviceBackend, sample_memory: bool = False,
                 module_device: Callable[[int], int | None] | None = None,
                 max_events_per_device: int = MAX_EVENTS_PER_DEVICE,
                 marks_type: Callable[..., NativeMarks] | None = None) -> None:
        self.backend = backend
        self.sample_memory = sample_memory
        self.module_device = module_device or (lambda index: None)
        self.max_events_per_device = max_events_per_device
        self._devices: dict[int, _Device] = {}
        self._module_devices: dict[int, int | None] = {}
        self._forward_device: int | None = None  # of the last module whose device is known
        self._memory_time = array("q")
        self._memory_device = array("q")
        self._memory_bytes = array("q")
        self._last_memory_ns = 0
        self.skipped_in_capture = 0
        self.dropped = 0
        self.synchronizations = 0  # ours: all at anchors and resolve, outside steps
        # Marks come from the main thread and autograd's device threads at once.
        self._lock = threading.Lock()
        self._references: dict[int, _Reference] = {}  # unreleased, by ident
        self._next_reference = 0
        self._marks_error = ""
        # Marks made outside Python, or None: record_event then makes them. (They are given
        # this clock's callbacks weakly: the compiled ones are not garbage-collected, and a
        # bound method would keep the clock and the Timeline alive with them.)
        self.marks: NativeMarks | None = None
        if marks_type is not None:
            self.marks = marks_type(_weakly(self._need), _weakly(self.module_device), _mask(_MARKED_KINDS),
                                    _mask(_FORWARD_KINDS), REFERENCE_INTERVAL_NS)

    # ------------------------------------------------------------------ hot path
    def record_event(self, host_event: int, kind: int, module: int, call: int = 0) -> None:
        """Record a device event for host event ``host_event`` (buffer.on_recorded)."""
        if kind not in _MARKED_KINDS:
            return
        with self._lock:
            self._record_event(host_event, kind, module)

    def _record_event(self, host_event: int, kind: int, module: int) -> None:
        backend = self.backend
        if backend.capturing():
            self.skipped_in_capture += 1
            return
        if kind in _FORWARD_KINDS:
            device = self._device_of_module(module)
        else:
            device = backend.thread_device()
        state = self._state(device)
        if state.pending >= self.max_events_per_device:
            self.dropped += 1
            return
        now = time.perf_counter_ns()
        if state.current is None or now - state.current_host_ns > REFERENCE_INTERVAL_NS:
            self._add_reference(state, now)
        event = self._take(state)
        reference = state.current
        assert reference is not None
        stream = backend.record(event, device)
        queue = state.waiting.get(stream)
        if queue is None:
            queue = state.waiting[stream] = deque()
        queue.append((event, host_event, reference))
        reference.users += 1
        state.pending += 1
        if self.sample_memory and now - self._last_memory_ns >= MEMORY_INTERVAL_NS:
            self._last_memory_ns = now
            self._sample_memory(now, device)

    def _state(self, device: int) -> _Device:
        state = self._devices.get(device)
        if state is None:
            state = self._devices[device] = _Device(device)
        return state

    def _need(self, device: int) -> bool:
        """``marks``' call inside a step: a fresh reference on ``device`` and events to
        lend; False when none can be lent (the bound: its marks are then dropped and
        counted, without asking again until the next boundary)."""
        assert self.marks is not None
        with self._lock:
            state = self._state(device)
            now = time.perf_counter_ns()
            if state.current is None or now - state.current_host_ns > REFERENCE_INTERVAL_NS:
                self._add_reference(state, now)
            pooled, undrained = self.marks.outstanding(device)
            lend = min(POOL_CHUNK // 4, self.max_events_per_device - state.pending - undrained) if pooled == 0 else 0
            if lend > 0:
                self.marks.give(device, self._lend(state, lend))
            return pooled > 0 or lend > 0

    def _drain(self) -> None:
        """Take back the marks ``marks`` made since the last boundary, into the queues
        record_event fills (the caller holds the lock)."""
        if self.marks is None:
            return
        events, host_events, devices, streams, references, skipped, dropped, error = self.marks.drain()
        self.skipped_in_capture += skipped
        self.dropped += dropped
        if error and not self._marks_error:  # (said at the write; its first line: torch's adds a C++ stack)
            self._marks_error = error.splitlines()[0]
        columns = [array("q") for _ in range(4)]
        for column, data in zip(columns, (host_events, devices, streams, references)):
            column.frombytes(data)
        for event, host_event, device, stream, ident in zip(events, *columns):
            state = self._devices[device]
            state.used_since_refill += 1  # (the next boundary lends as many as this step used)
            reference = self._references.get(ident)
            if reference is None:  # (made against a reference released meanwhile: another thread's boundary)
                state.pool.append(event)
                self.dropped += 1
                continue
            queue = state.waiting.get((device, stream))
            if queue is None:
                queue = state.waiting[(device, stream)] = deque()
            queue.append((event, host_event, reference))
            reference.users += 1
            state.pending += 1

    def _device_of_module(self, module: int) -> int:
        cache = self._module_devices
        if module in cache:
            device = cache[module]
        else:
            device = cache[module] = self.module_device(module)
        if device is None:  # no parameters of its own on a GPU (an activation): its caller's
            device = self._forward_device
            if device is None:
                device = self._forward_device = self.backend.thread_device()
            return device
        self._forward_device = device
        return device

    def _lend(self, state: _Device, count: int) -> list[Any]:
        """``count`` events for ``marks`` (counted as used when they come back as marks)."""
        lent = [state.pool.pop() for _ in range(min(count, len(state.pool)))]
        state.created += count - len(lent)
        lent += [self.backend.new_event(state.index) for _ in range(count - len(lent))]
        return lent

    def _take(self, state: _Device) -> Any:
        state.used_since_refill += 1
        if state.pool:
            return state.pool.pop()
        state.created += 1  # (only before the first refill of a device: see begin_step)
        return self.backend.new_event(state.index)

    def _add_reference(self, state: _Device, now: int) -> None:
        reference = _Reference(self._take(state), self._next_reference)
        self._next_reference += 1
        self._references[reference.ident] = reference
        self.backend.record(reference.event, state.index)
        if state.current is None and state.tail is None:
            reference.position = 0.0  # the chain's origin
            state.tail = reference
        state.references.append(reference)
        state.current = reference
        state.current_host_ns = now
        if self.marks is not None:
            self.marks.set_reference(state.index, reference.ident, now)

    def _sample_memory(self, host_ns: int, device: int) -> None:
        self._memory_time.append(host_ns)
        self._memory_device.append(device)
        self._memory_bytes.append(self.backend.memory_allocated(device))

    # ------------------------------------------------------------- step boundaries
    def begin_step(self) -> None:
        """Between steps: resolve what has completed, anchor devices seen for the first
        time, refill pools, start a new reference on every device in use."""
        if self.backend.capturing():
            return
        with self._lock:
            self._drain()
            now = time.perf_counter_ns()
            for state in self._devices.values():
                self._harvest(state)
                if state.needs_anchor:
                    self._anchor(state)
                self._refill(state)
                self._add_reference(state, now)
                if self.sample_memory:
                    self._sample_memory(now, state.index)

    def _refill(self, state: _Device) -> None:
        wanted = min(max(state.used_since_refill, POOL_CHUNK), self.max_events_per_device - state.pending)
        if self.marks is not None:
            # The marks of a step are made in C++: lend it the events; this pool keeps what the
            # boundaries' own records need (a reference, an anchor's readings).
            pooled, _ = self.marks.outstanding(state.index)  # (none undrained: the boundary drained them)
            lend = wanted - pooled
            if lend > 0:
                self.marks.give(state.index, self._lend(state, lend))
            wanted = min(wanted, 2 * ANCHOR_READINGS)
        backend = self.backend
        while len(state.pool) < wanted and state.created < self.max_events_per_device + 2 * ANCHOR_READINGS:
            state.pool.append(backend.new_event(state.index))
            state.created += 1
        state.used_since_refill = 0

    def _harvest(self, state: _Device) -> None:
        """Time every reference and mark whose work has completed (never waits)."""
        backend = self.backend
        references = state.references
        tail = state.tail
        assert tail is not None
        for reference in references:
            if reference.position is not None:
                continue
            if not backend.query(reference.event):
                break
            assert tail.position is not None
            reference.position = tail.position + backend.elapsed_ms(tail.event, reference.event) * 1e6
            tail = reference
        state.tail = tail
        for stream, queue in state.waiting.items():
            # Work on one stream completes in order: once its newest mark is done, so is
            # every mark before it (one query a stream, not one a mark, at most boundaries).
            all_done = bool(queue) and backend.query(queue[-1][0])
            while queue:
                event, host_event, reference = queue[0]
                if reference.position is None or not (all_done or backend.query(event)):
                    break
                queue.popleft()
                state.host_event.append(host_event)
                state.position.append(reference.position + backend.elapsed_ms(reference.event, event) * 1e6)
                state.stream.append(stream)
                state.pool.append(event)
                state.pending -= 1
                reference.users -= 1
        # References no mark waits on, older than the tail, go back to the pool.
        while references and references[0] is not tail and references[0] is not state.current \
                and references[0].users == 0 and references[0].position is not None:
            released = references.popleft()
            del self._references[released.ident]
            state.pool.append(released.event)

    def _anchor(self, state: _Device) -> None:
        """Pin the chain to the host clock (synchronises the device: outside steps only)."""
        backend = self.backend
        backend.synchronize(state.index)
        self.synchronizations += 1
        self._harvest(state)  # everything recorded so far has completed
        readings = []
        for _ in range(ANCHOR_READINGS):
            event = self._take(state)
            host_ns = time.perf_counter_ns()
            backend.record(event, state.index)
            readings.append((host_ns, event))
        backend.synchronize(state.index)
        self.synchronizations += 1
        tail = state.tail
        assert tail is not None and tail.position is not None
        best: tuple[float, int] | None = None
        for host_ns, event in readings:
            position = tail.position + backend.elapsed_ms(tail.event, event) * 1e6
            # The event ran a launch delay after host_ns; the smallest delay is the
            # smallest position - host_ns.
            if best is None or position - host_ns < best[0] - best[1]:
                best = (position, host_ns)
            state.pool.append(event)
        assert best is not None
        state.anchors.append(best)
        state.needs_anchor = False

    # ------------------------------------------------------------------- windows
    def resolve(self) -> DeviceMarks:
        """Every mark of the window on the host clock; outside steps (it synchronises).
        The anchor taken here also starts the next window."""
        with self._lock:
            self._drain()
            return self._resolve()

    def _resolve(self) -> DeviceMarks:
        host_event = array("q")
        time_ns = array("q")
        stream_index = array("q")
        streams: list[StreamKey] = []
        index_of: dict[StreamKey, int] = {}
        for state in self._devices.values():
            self._anchor(state)  # synchronises: everything marked has completed
            to_host = _host_mapping(state.anchors)
            for event, position, stream in zip(state.host_event, state.position, state.stream):
                index = index_of.get(stream)
                if index is None:
                    index = index_of[stream] = len(streams)
                    streams.append(stream)
                host_event.append(event)
                time_ns.append(to_host(position))
                stream_index.append(index)
            self._start_window(state)
        marks = DeviceMarks(host_event, time_ns, stream_index, streams, self._memory_time, self._memory_device,
                            self._memory_bytes, self.skipped_in_capture, self.dropped, self._marks_error)
        self._reset_counts()
        if self.marks is not None:
            self.marks.forget_modules()  # (a model may have moved)
        return marks

    def discard(self) -> None:
        """Forget the window's marks without synchronising (warm-up steps): their events
        go back to the pools, the reference chains go on."""
        with self._lock:
            self._drain()
            self._discard()

    def _discard(self) -> None:
        for state in self._devices.values():
            for queue in state.waiting.values():
                for event, _, reference in queue:
                    reference.users -= 1
                    state.pool.append(event)
                queue.clear()
            state.pending = 0
            self._harvest(state)
            state.host_event = array("q")
            state.position = array("d")
            state.stream = []
        self._reset_counts()

    def _start_window(self, state: _Device) -> None:
        state.host_event = array("q")
        state.position = array("d")
        state.stream = []
        state.anchors = state.anchors[-1:]  # this window's end anchors the next one
        self._module_devices.clear()  # (a model may have moved)

    def _reset_counts(self) -> None:
        self._marks_error = ""
        self._memory_time = array("q")
        self._memory_device = array("q")
        self._memory_bytes = array("q")
        self.skipped_in_capture = 0
        self.dropped = 0

    def pending(self) -> int:
        return sum(state.pending for state in self._devices.values())

    def events_created(self) -> int:
        return sum(state.created for state in self._devices.values())


def _weakly(callback: Callable[..., Any]) -> Callable[..., Any]:
    """``callback``, a bound method, without holding its object: once that is gone, a
    call does nothing and returns None. (Anything else is returned as it is.)"""
    if not isinstance(callback, types.MethodType):
        return callback
    method = weakref.WeakMethod(callback)

    def call(*args: Any) -> Any:
        bound = method()
        return None if bound is None else bound(*args)

    return call


def _host_mapping(anchors: list[tuple[float, int]]) -> Callable[[float], int]:
    """Chain position -> host ns: linear between consecutive anchors (the device clock's
    drift against the host's), the nearest segment's line beyond them."""
    if len(anchors) == 1:
        position0, host0 = anchors[0]
        return lambda position: host0 + round(position - position0)
    (p0, h0), (p1, h1) = anchors[0], anchors[-1]
    scale = (h1 - h0) / (p1 - p0) if p1 != p0 else 1.0
    return lambda position: h0 + round((position - p0) * scale)


class CudaBackend:
    """``DeviceBackend`` over ``torch.cuda`` events."""

    def __init__(self) -> None:
        import torch

        self._cuda = torch.cuda
        # A mark's two calls, without torch.cuda's wrappers (measured on an H200:
        # current_stream 1.5 µs, of which the (id, device, type) it is made of 0.12 µs).
        # (A CPU build has neither: CudaBackend runs there only on a stand-in torch.cuda.)
        self._current_stream: Callable[[int], tuple[int, int, int]] = getattr(
            torch._C, "_cuda_getCurrentStream", lambda device: (0, device, 1))
        self._record: Callable[[Any, Any], None] = getattr(getattr(torch._C, "_CudaEventBase", None), "record", None) \
            or (lambda event, stream: event.record(stream))
        self._streams: dict[tuple[int, int, int], Any] = {}  # (id, device, type) -> torch.cuda.Stream
        # The marks inside steps in C++ where the compiled part is built (a CUDA torch).
        from ..native.loader import compiled_part

        part = compiled_part("native._cuda_marks", CUDA_MARKS_API) if torch.version.cuda else None
        self.marks_type: Callable[..., NativeMarks] | None = part.CudaMarks if part is not None else None

    def new_event(self, device: int) -> Any:
        cuda = self._cuda
        event = cuda.Event(enable_timing=True)
        # CUDA events are made on their first record, on that stream's device: make it
        # now (outside steps) and bind it to the device it will serve.
        event.record(cuda.current_stream(device))
        return event

    def record(self, event: Any, device: int) -> StreamKey:
        key = self._current_stream(device)
        stream = self._streams.get(key)
        if stream is None:  # (a stream object is its three numbers: one per stream is kept)
            if len(self._streams) >= MAX_STREAMS_KEPT:  # (external streams' ids are pointers: no bound)
                self._streams.clear()
            stream = self._streams[key] = self._cuda.Stream(stream_id=key[0], device_index=key[1], device_type=key[2])
        self._record(event, stream)
        return (device, key[0])

    def thread_device(self) -> int:
        return self._cuda.current_device()

    def capturing(self) -> bool:
        return self._cuda.is_current_stream_capturing()

    def query(self, event: Any) -> bool:
        return bool(event.query())

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end))

    def synchronize(self, device: int) -> None:
        self._cuda.synchronize(device)

    def memory_allocated(self, device: int) -> int:
        return int(self._cuda.memory_allocated(device))

    def tensor_device(self, tensor: Any) -> int | None:
        device = tensor.device
        return (device.index or 0) if device.type == "cuda" else None
