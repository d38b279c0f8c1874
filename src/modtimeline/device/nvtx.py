"""NVTX ranges per module call, for Nsight Systems (``Timeline(..., nvtx=True)``).

Opened and closed as the recording happens (Nsight takes the time of each call), from
the same events the trace is made of (``buffer.on_recorded``):

* forward and recompute: a range from the call's begin event to its end event;
* backward: a range opened when the first of the call's output nodes gets its gradient
  and closed when the last of its sink nodes has run (the same nodes ``resolve`` bounds
  the backward span with; it learns them from the node links the forward recorded). A
  call whose sinks were not all seen to run is closed when its backward pass ends.

Backward runs on autograd's threads, so ranges are start/end ranges
(``nvtxRangeStartA``/``nvtxRangeEnd``: they may begin and end on different threads),
never push/pop. Ranges are named ``FQN`` (forward), ``FQN backward``, ``FQN recompute``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from ..capture.buffer import (BACKWARD_DONE, FORWARD_BEGIN, FORWARD_END, GRADIENT_READY, NODE_DONE, RECOMPUTE_BEGIN,
                              RECOMPUTE_END, unpack_link)


class NvtxApi(Protocol):
    def range_start(self, message: str) -> int: ...
    def range_end(self, range_id: int) -> None: ...


class Links(Protocol):
    def links(self, start: int) -> tuple[Any, Any]: ...


class NvtxRanges:
    """buffer.on_recorded's NVTX side: one range per module call and phase."""

    def __init__(self, api: NvtxApi, names: list[str], links: Links) -> None:
        self.api = api
        self.names = names  # FQN by module index (the recorder's, growing)
        self._links = links
        self._lock = threading.Lock()  # marks come from autograd's threads too
        self.reset()

    def reset(self) -> None:
        """A new window: the buffer's calls, nodes and links start again."""
        self._forward: dict[int, int] = {}  # call -> open range
        self._backward: dict[int, int] = {}
        self._links_read = 0
        self._begins: dict[int, list[tuple[int, int]]] = {}  # node -> (call, module) whose backward it begins
        self._ends: dict[int, list[int]] = {}  # node -> calls it may end (a sink of theirs)
        self._sinks_left: dict[int, int] = {}  # call -> its sinks not yet run
        self._module_of: dict[int, int] = {}

    def on_event(self, index: int, kind: int, module: int, call: int) -> None:
        with self._lock:
            if kind == FORWARD_BEGIN:
                self._forward[call] = self.api.range_start(self.names[module])
            elif kind == RECOMPUTE_BEGIN:
                self._forward[call] = self.api.range_start(f"{self.names[module]} recompute")
            elif kind in (FORWARD_END, RECOMPUTE_END):
                range_id = self._forward.pop(call, None)
                if range_id is not None:
                    self.api.range_end(range_id)
            elif kind == GRADIENT_READY:
                self._read_links()
                for begun, begun_module in self._begins.get(call, ()):
                    if begun not in self._backward:
                        self._backward[begun] = self.api.range_start(f"{self.names[begun_module]} backward")
            elif kind == NODE_DONE:
                self._read_links()
                for ended in self._ends.get(call, ()):
                    left = self._sinks_left.get(ended, 0) - 1
                    self._sinks_left[ended] = left
                    if left == 0:
                        range_id = self._backward.pop(ended, None)
                        if range_id is not None:
                            self.api.range_end(range_id)
            elif kind == BACKWARD_DONE:
                for range_id in self._backward.values():
                    self.api.range_end(range_id)
                self._backward.clear()

    def _read_links(self) -> None:
        """The node links recorded since the last look (forwards add them)."""
        nodes, codes = self._links.links(self._links_read)
        self._links_read += len(nodes)
        for node, code in zip(nodes, codes):
            call, module, begins = unpack_link(code)
            if begins:
                self._begins.setdefault(node, []).append((call, module))
            else:
                self._ends.setdefault(node, []).append(call)
                self._sinks_left[call] = self._sinks_left.get(call, 0) + 1

    def close(self) -> None:
        """End every range still open (the Timeline is closing)."""
        with self._lock:
            for range_id in list(self._forward.values()) + list(self._backward.values()):
                self.api.range_end(range_id)
            self._forward.clear()
            self._backward.clear()


def torch_nvtx() -> NvtxApi:
    """torch.cuda.nvtx, checked to work (a CPU build of torch has only a stub)."""
    import torch

    from ..errors import DeviceError

    api = torch.cuda.nvtx
    try:
        api.range_end(api.range_start("modtimeline: NVTX check"))
    except (AttributeError, RuntimeError) as error:
        raise DeviceError(f"nvtx=True needs NVTX, which this torch build does not have ({error})") from None
    return api


def chained(*callbacks: Callable[[int, int, int, int], None] | None) -> Callable[[int, int, int, int], None] | None:
    """One on_recorded callback that calls each given one."""
    present = [c for c in callbacks if c is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def both(index: int, kind: int, module: int, call: int) -> None:
        for callback in present:
            callback(index, kind, module, call)

    return both
