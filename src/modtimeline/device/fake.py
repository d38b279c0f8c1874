"""``FakeBackend``: a ``DeviceBackend`` for the CPU that keeps CUDA's rules, so the CPU
tests (and ``benchmarks/gpu.py --fake``) drive exactly the ``DeviceClock`` code a GPU
runs. Not used when recording on a real device."""

from __future__ import annotations

import struct
import time
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
    """

    def __init__(self, lag_ns: int = 20_000, rate: float = 1.0, offset_ns: int = 123_456_789) -> None:
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
