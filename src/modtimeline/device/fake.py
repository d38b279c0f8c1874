"""``FakeBackend``: a ``DeviceBackend`` for the CPU that keeps CUDA's rules, so the CPU
tests (and ``benchmarks/gpu.py --fake``) drive exactly the ``DeviceClock`` code a GPU
runs; ``FakeMarks``: the twin of the compiled ``_cuda_marks.CudaMarks`` over it. Not used
when recording on a real device."""

from __future__ import annotations

import functools
import struct
import threading
import time
import traceback
from array import array
from collections.abc import Callable
from typing import Any

from .clock import StreamKey

def _float32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


class FakeBackend:
    """A device for CPU tests that keeps CUDA's rules.

    * An event belongs to the device it was made for; recording it on another device's
      stream raises, as c10's CUDAEvent does.
    * ``elapsed_ms`` needs both events completed (else "device not ready") and returns
      float32 milliseconds, as ``cudaEventElapsedTime``; an event recorded during a
      capture cannot be timed or queried ("invalid argument").
    * Time: the device clock runs at ``rate`` device-ns per host-ns plus ``offset_ns``.
      An event recorded on a stream completes at ``max(host now + lag_ns, that stream's
      previous completion) + work_ns`` (``lag_ns``: the launch latency, which anchors have
      too: every mapped time is ``lag_ns`` early, a constant). ``synchronize`` counts
      itself and waits (on the host) until the device's last event completed.
    * ``device`` is the calling thread's current device, ``streams[device]`` its current
      stream id; ``capture`` turns capture mode on; ``place(module, device)`` puts a
      module's (CPU) parameters "on" a device.
    * ``now`` is the host clock it reads and ``wait(until_ns)`` how it waits for the
      device; tests that move time by hand replace both (and ``time.perf_counter_ns``).
    * ``native_marks=True``: the marks inside steps are made by ``FakeMarks`` (as where
      the compiled ``_cuda_marks`` is built), not by ``DeviceClock.record_event``.
    """

    def __init__(self, lag_ns: int = 20_000, rate: float = 1.0, offset_ns: int = 123_456_789,
                 native_marks: bool = False) -> None:
        self.marks_type: Callable[..., FakeMarks] | None = functools.partial(FakeMarks, self) if native_marks else None
        self.lag_ns = lag_ns
        self.rate = rate
        self.offset_ns = offset_ns
        self.device = 0
        self.streams: dict[int, int] = {}  # device -> current stream id (default 7)
        self.work_ns = 0
        self.capture = False
        self.synchronizations = 0
        self.synchronized_devices: list[int] = []
        self.events_created = 0
        self.allocated = 0
        self.now: Callable[[], int] = lambda: time.perf_counter_ns()
        self.wait: Callable[[int], None] = _sleep_until
        self._placed: dict[int, int] = {}  # id(tensor) -> device
        self._tail: dict[StreamKey, int] = {}
        self.recorded: list[tuple[StreamKey, int]] = []  # (stream, host ns it completes)

    class Event:
        __slots__ = ("device", "done_ns", "captured")

        def __init__(self, device: int) -> None:
            self.device = device
            self.done_ns: int | None = None
            self.captured = False

    @property
    def stream(self) -> StreamKey:
        return (self.device, self.streams.get(self.device, 7))

    @stream.setter
    def stream(self, key: StreamKey) -> None:
        self.device = key[0]
        self.streams[key[0]] = key[1]

    def new_event(self, device: int) -> FakeBackend.Event:
        self.events_created += 1
        return FakeBackend.Event(device)

    def thread_device(self) -> int:
        return self.device

    def capturing(self) -> bool:
        return self.capture

    def record(self, event: FakeBackend.Event, device: int) -> StreamKey:
        if event.device != device:
            raise RuntimeError(f"Event device {event.device} does not match recording stream's device {device}.")
        key = (device, self.streams.get(device, 7))
        if self.capture:
            event.captured = True
            return key
        event.captured = False
        done = max(self.now() + self.lag_ns, self._tail.get(key, 0)) + self.work_ns
        self._tail[key] = done
        event.done_ns = done
        self.recorded.append((key, done))
        return key

    def _completed(self, event: FakeBackend.Event) -> bool:
        if event.captured:
            raise RuntimeError("CUDA error: invalid argument (an event recorded during stream capture)")
        if event.done_ns is None:
            raise RuntimeError("CUDA error: invalid resource handle (an event never recorded)")
        return event.done_ns <= self.now()

    def query(self, event: FakeBackend.Event) -> bool:
        return self._completed(event)

    def elapsed_ms(self, start: FakeBackend.Event, end: FakeBackend.Event) -> float:
        if not (self._completed(start) and self._completed(end)):
            raise RuntimeError("CUDA error: device not ready")
        assert start.done_ns is not None and end.done_ns is not None
        return _float32((end.done_ns - start.done_ns) * self.rate / 1e6)

    def synchronize(self, device: int) -> None:
        self.synchronizations += 1
        self.synchronized_devices.append(device)
        # Wait for the device: on the host that is until its last event completed.
        last = max((done for (d, _), done in self._tail.items() if d == device), default=0)
        if self.now() < last:
            self.wait(last)

    def memory_allocated(self, device: int) -> int:
        return self.allocated

    def place(self, module: Any, device: int) -> None:
        for tensor in list(module.parameters()) + list(module.buffers()):
            self._placed[id(tensor)] = device

    def tensor_device(self, tensor: Any) -> int | None:
        return self._placed.get(id(tensor))


def _sleep_until(until_ns: int) -> None:
    while time.perf_counter_ns() < until_ns:
        time.sleep(max(until_ns - time.perf_counter_ns(), 0) / 1e9)


class FakeMarks:
    """``_cuda_marks.CudaMarks`` (``clock.NativeMarks``) in Python over a ``FakeBackend``:
    the same rules (a mark needs a fresh reference and a lent event, else it calls
    ``need`` once, and after a ``need`` that could lend nothing, or raised, drops at once
    until ``give``, ``set_reference`` or ``drain``; captured marks are skipped; a forward's
    device is its module's, else the last forward's; nothing raises into the caller: a
    failed record is dropped, its error drained, a callback's error printed), so the CPU
    tests drive DeviceClock's side of the compiled marks."""

    def __init__(self, backend: FakeBackend, need: Callable[[int], bool | None],
                 module_device: Callable[[int], int | None], marked_kinds: int, forward_kinds: int,
                 reference_interval_ns: int) -> None:
        self._backend = backend
        self._need = need
        self._module_device = module_device
        self._marked = marked_kinds
        self._forward = forward_kinds
        self._interval = reference_interval_ns
        self._lock = threading.Lock()
        self._pool: dict[int, list[Any]] = {}
        self._reference: dict[int, tuple[int, int]] = {}  # device -> (reference, host ns)
        self._undrained: dict[int, int] = {}
        self._exhausted: set[int] = set()
        self._made: list[tuple[Any, int, int, int, int]] = []  # (event, host event, device, stream, reference)
        self._module_devices: dict[int, int | None] = {}
        self._forward_device: int | None = None
        self._skipped = 0
        self._dropped = 0
        self._error = ""
        self.calls = 0  # marks asked for and calls of need (the tests count them)
        self.needs = 0

    def mark(self, index: int, kind: int, module: int, call: int = 0) -> None:
        if not (self._marked >> kind) & 1:
            return
        self.calls += 1
        device = self._device_of_forward(module) if (self._forward >> kind) & 1 else self._backend.thread_device()
        if self._backend.capturing():
            self._skipped += 1
            return
        now = time.perf_counter_ns()
        for attempt in (0, 1):
            with self._lock:
                pool = self._pool.setdefault(device, [])
                reference, since = self._reference.get(device, (-1, 0))
                if reference >= 0 and now - since <= self._interval and pool:
                    try:
                        _, stream = self._backend.record(pool[-1], device)
                    except Exception as error:  # (as c10::Error in C++: the event stays in the pool)
                        self._error = self._error or str(error)
                        self._dropped += 1
                        return
                    self._made.append((pool.pop(), index, device, stream, reference))
                    self._undrained[device] = self._undrained.get(device, 0) + 1
                    return
                if attempt or device in self._exhausted:
                    self._dropped += 1
                    return
            self.needs += 1
            if not _called(self._need, device):
                with self._lock:
                    self._exhausted.add(device)

    def _device_of_forward(self, module: int) -> int:
        if module not in self._module_devices:
            self._module_devices[module] = _called(self._module_device, module)
        device = self._module_devices[module]
        if device is None:
            if self._forward_device is None:
                self._forward_device = self._backend.thread_device()
            return self._forward_device
        self._forward_device = device
        return device

    def give(self, device: int, events: list[Any]) -> None:
        with self._lock:
            self._pool.setdefault(device, []).extend(events)
            self._exhausted.discard(device)

    def set_reference(self, device: int, reference: int, host_ns: int) -> None:
        with self._lock:
            self._reference[device] = (reference, host_ns)
            self._exhausted.discard(device)

    def outstanding(self, device: int) -> tuple[int, int]:
        with self._lock:
            return len(self._pool.get(device, ())), self._undrained.get(device, 0)

    def drain(self) -> tuple[list[Any], bytes, bytes, bytes, bytes, int, int, str]:
        with self._lock:
            made, self._made = self._made, []
            skipped, dropped, self._skipped, self._dropped = self._skipped, self._dropped, 0, 0
            error, self._error = self._error, ""
            self._undrained.clear()
            self._exhausted.clear()  # (the drained events go back to DeviceClock: it may lend again)
        columns = [array("q", (row[i] for row in made)).tobytes() for i in range(1, 5)]
        return [row[0] for row in made], columns[0], columns[1], columns[2], columns[3], skipped, dropped, error

    def forget_modules(self) -> None:
        with self._lock:
            self._module_devices.clear()
            self._forward_device = None


def _called(callback: Callable[[int], Any], value: int) -> Any:
    """``callback(value)``; an error gives None, never raises into the step (the compiled
    marks report it as unraisable; here it is printed to stderr)."""
    try:
        return callback(value)
    except Exception:
        traceback.print_exc()
        return None
