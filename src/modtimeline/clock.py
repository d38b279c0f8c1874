"""Device time on the host clock, without synchronising inside the traced step.

At every span boundary ``DeviceClock.mark`` records a timing-enabled event on the
current stream (events come from a pool that is reused across windows). Nothing is
read back until ``resolve``, at flush, which maps every event onto the host clock::

    host_ns = anchor_host_ns + elapsed_ns(anchor, event)

with one anchor per device, recorded right after reading the host clock while the
device was idle. Every time of a window therefore shares one constant offset, the
anchor's launch latency on an idle device (a few µs), which leaves durations and
the order of spans exact. ``anchor`` re-anchors after each flush so clock drift (GPU clocks
drift 10-100 ppm against the host) stays bounded by one window.

The arithmetic, pooling and bookkeeping live in ``DeviceClock``; the few device
primitives live in a ``DeviceBackend``: ``CudaBackend`` for real GPUs and
``FakeBackend`` for CPU-only tests, which therefore drive exactly the same code.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass
from typing import Any, Protocol

StreamKey = tuple[int, int]  # (device index, stream id)


class DeviceBackend(Protocol):
    """The device primitives ``DeviceClock`` needs."""

    def new_event(self) -> Any: ...
    def current_stream(self) -> StreamKey: ...
    def current_device(self) -> int: ...
    def record(self, event: Any, stream: StreamKey) -> None: ...
    def record_anchor(self, event: Any, device: int, host_ns: int) -> None: ...
    def synchronize(self, device: int) -> None: ...
    def elapsed_ns(self, start: Any, end: Any) -> float: ...
    def memory_allocated(self, device: int) -> int: ...


@dataclass
class DeviceMarks:
    """Resolved device events: parallel columns, one row per marked host event."""

    host_event: array  # index of the host event in the buffer
    time_ns: array  # when the device reached it, on the host clock
    stream: array  # index into ``streams``
    streams: list[StreamKey]
    memory: array  # bytes allocated on the event's device (empty when not sampled)


class DeviceClock:
    """Marks host events on the device and resolves them onto the host clock at flush."""

    def __init__(self, backend: DeviceBackend, sample_memory: bool = False) -> None:
        self.backend = backend
        self.sample_memory = sample_memory
        self._pool: list[Any] = []
        self._events: list[Any] = []
        self._host_event = array("q")
        self._stream = array("q")
        self._memory = array("q")
        self._streams: list[StreamKey] = []
        self._stream_index: dict[StreamKey, int] = {}
        self._anchors: dict[int, tuple[int, Any]] = {}  # device -> (host ns, anchor event)
        self.events_created = 0

    def _take_event(self) -> Any:
        if self._pool:
            return self._pool.pop()
        self.events_created += 1
        return self.backend.new_event()

    def anchor(self, device: int) -> None:
        """Pin ``device``'s clock to the host clock: wait for it to go idle, read the
        host clock, and record an event that runs at once."""
        backend = self.backend
        backend.synchronize(device)
        event = self._take_event()
        host_ns = time.perf_counter_ns()
        backend.record_anchor(event, device, host_ns)
        old = self._anchors.get(device)
        if old is not None:
            self._pool.append(old[1])
        self._anchors[device] = (host_ns, event)

    def mark(self, host_event: int) -> None:
        """Record a device event for host event ``host_event`` on the current stream."""
        backend = self.backend
        stream = backend.current_stream()
        index = self._stream_index.get(stream)
        if index is None:
            index = self._stream_index[stream] = len(self._streams)
            self._streams.append(stream)
            if stream[0] not in self._anchors:
                # A device not anchored when the clock started (another GPU): anchoring
                # synchronises it, once, before any of its events.
                self.anchor(stream[0])
        event = self._take_event()
        backend.record(event, stream)
        self._events.append(event)
        self._host_event.append(host_event)
        self._stream.append(index)
        if self.sample_memory:
            self._memory.append(backend.memory_allocated(stream[0]))

    def resolve(self) -> DeviceMarks:
        """Map every marked event to host ns, hand all events back to the pool, re-anchor.

        Called at flush, outside the traced steps: it synchronises each device once.
        """
        backend = self.backend
        for device in self._anchors:
            backend.synchronize(device)
        times = array("q")
        for event, stream_index in zip(self._events, self._stream):
            device = self._streams[stream_index][0]
            anchor_host_ns, anchor_event = self._anchors[device]
            times.append(anchor_host_ns + round(backend.elapsed_ns(anchor_event, event)))
        marks = DeviceMarks(self._host_event, times, self._stream, list(self._streams), self._memory)
        self._pool.extend(self._events)
        self._events = []
        self._host_event = array("q")
        self._stream = array("q")
        self._memory = array("q")
        for device in list(self._anchors):
            self.anchor(device)
        return marks

    def pending(self) -> int:
        return len(self._events)


class CudaBackend:
    """``DeviceBackend`` over ``torch.cuda`` events."""

    def __init__(self) -> None:
        import torch

        self._cuda = torch.cuda

    def new_event(self) -> Any:
        return self._cuda.Event(enable_timing=True)

    def current_stream(self) -> StreamKey:
        stream = self._cuda.current_stream()
        return (stream.device.index or 0, stream.stream_id)

    def record(self, event: Any, stream: StreamKey) -> None:
        event.record()  # on the current stream, which current_stream() just named

    def record_anchor(self, event: Any, device: int, host_ns: int) -> None:
        event.record(self._cuda.current_stream(device))

    def current_device(self) -> int:
        return self._cuda.current_device()

    def synchronize(self, device: int) -> None:
        self._cuda.synchronize(device)

    def elapsed_ns(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) * 1e6

    def memory_allocated(self, device: int) -> int:
        return self._cuda.memory_allocated(device)


class FakeBackend:
    """A scripted device for CPU-only tests.

    The device clock runs at ``rate`` device-ns per host-ns (``1 + 50e-6`` is a GPU
    drifting 50 ppm) plus ``offset_ns``. Each recorded event completes at
    ``max(host now + lag_ns, previous completion on its stream) + work_ns(stream)``, so
    tests know exactly when the "GPU" ran each event.
    """

    def __init__(self, lag_ns: int = 20_000, rate: float = 1.0, offset_ns: int = 123_456_789) -> None:
        self.lag_ns = lag_ns
        self.rate = rate
        self.offset_ns = offset_ns
        self.stream: StreamKey = (0, 7)
        self.work_ns = 0
        self.synchronizations = 0
        self.allocated = 0
        self._stream_tail: dict[StreamKey, int] = {}
        self.recorded: list[tuple[StreamKey, int]] = []

    class Event:
        __slots__ = ("device_ns",)

        def __init__(self) -> None:
            self.device_ns: float | None = None

    def new_event(self) -> FakeBackend.Event:
        return FakeBackend.Event()

    def current_device(self) -> int:
        return self.stream[0]

    def current_stream(self) -> StreamKey:
        return self.stream

    def host_to_device(self, host_ns: int) -> float:
        return host_ns * self.rate + self.offset_ns

    def record(self, event: FakeBackend.Event, stream: StreamKey) -> None:
        now = time.perf_counter_ns()
        done = max(now + self.lag_ns, self._stream_tail.get(stream, 0)) + self.work_ns
        self._stream_tail[stream] = done
        event.device_ns = self.host_to_device(done)
        self.recorded.append((stream, done))

    def record_anchor(self, event: FakeBackend.Event, device: int, host_ns: int) -> None:
        # An ideal idle device: the anchor completes the moment the host clock was read.
        event.device_ns = self.host_to_device(host_ns)

    def synchronize(self, device: int) -> None:
        self.synchronizations += 1

    def elapsed_ns(self, start: FakeBackend.Event, end: FakeBackend.Event) -> float:
        assert start.device_ns is not None and end.device_ns is not None
        return end.device_ns - start.device_ns

    def memory_allocated(self, device: int) -> int:
        return self.allocated
