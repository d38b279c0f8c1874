"""``Recorder``: the tracker's hooks, reduced to appending events to an ``EventBuffer``.

``Timeline`` needs no ``parents`` set and no user hooks, only *when* each call's
forward, backward and recompute began and ended. So the hot path here does the least
it can: one timestamp and one packed integer per forward boundary, and in backward one
event per autograd node whose gradient becomes ready, shared by every call boundary on
that node (a chain of modules shares its nodes: module i's input is module i-1's
output). Which calls a node begins or ends is kept as a small list of *links* per node
and turned into spans once, at flush, by ``resolve``.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any

import torch
from torch.autograd.graph import register_multi_grad_hook

from .buffer import (
    BACKWARD_BEGIN,
    BACKWARD_DONE,
    BACKWARD_END,
    FORWARD_BEGIN,
    FORWARD_END,
    GRADIENT_READY,
    LINK_BEGIN,
    LINK_SHIFT,
    RECOMPUTE_BEGIN,
    RECOMPUTE_END,
    EventBuffer,
)
from .errors import ModTimelineError
from .tracker import (
    ModuleTracker,
    _grad_enabled,
    _grad_tensors,
    _graph_task_id,
    _OneShotHook,
    _queue_engine_callback,
    _Tensor,
)


class _NodeMark:
    """The pre-hook of one autograd node: records that its gradient is ready."""

    __slots__ = ("recorder", "node_id", "generation")

    def __init__(self, recorder: Recorder, node_id: int) -> None:
        self.recorder = recorder
        self.node_id = node_id
        self.generation = recorder._generation

    def __call__(self, grad_outputs: Any) -> None:
        self.recorder._backward_event(GRADIENT_READY, self.node_id, 0)


class Recorder(ModuleTracker):
    """Records every module call of the models that run while it is active."""

    def __init__(self, buffer: EventBuffer) -> None:
        super().__init__()
        self.buffer = buffer
        # Calls whose forward ended by raising (their forward hook ran with no output).
        self.raised_calls: set[int] = set()

    def register_user_hooks(self, *args: Any, **kwargs: Any) -> None:
        raise ModTimelineError("Timeline's recorder takes no user hooks; use modtimeline.ModuleTracker for those")

    # ------------------------------------------------------------------ forward
    def _pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        index = self._index_of(module)
        call = self._next_call
        self._next_call = call + 1
        if _graph_task_id() != -1:
            # Forward inside backward: activation-checkpoint recompute.
            self.buffer.record(RECOMPUTE_BEGIN, call, index)
            self._fw_stack.append((call, index, True))  # type: ignore[arg-type]
            return
        self.buffer.record(FORWARD_BEGIN, call, index)
        self._fw_stack.append((call, index, False))  # type: ignore[arg-type]
        if not _grad_enabled():
            return
        if len(args) == 1 and isinstance(args[0], _Tensor):  # the common case, inline
            inputs = [args[0]] if args[0].requires_grad else []
        else:
            inputs = _grad_tensors(args)
        if len(inputs) == 1:
            node = inputs[0].grad_fn
            if node is not None:
                self._link(node, call << LINK_SHIFT | index << 1)
            else:  # a leaf has no node; only a tensor hook tells
                self._keep(_OneShotHook(inputs[0], partial(self._backward_event, BACKWARD_END, call, index)).handle)
        elif inputs:
            # Several inputs: the backward ends once all their gradients are in.
            self._keep(register_multi_grad_hook(inputs, partial(self._backward_event, BACKWARD_END, call, index)))
        # No input needs grad: the backward ends with the whole backward pass.

    def _post_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        stack = self._fw_stack
        if not stack:
            return
        call, index, recompute = stack.pop()
        if self._refs[index]() is not module:
            stack.append((call, index, recompute))
            return
        if recompute:
            # (Non-reentrant checkpointing stops recompute early by raising: not a failure.)
            self.buffer.record(RECOMPUTE_END, call, index)
            return
        self.buffer.record(FORWARD_END, call, index)
        if output is None:
            if sys.exc_info()[1] is not None:  # the forward raised: torch calls us with no output
                self.raised_calls.add(call)
            return
        if not _grad_enabled():
            return
        if isinstance(output, _Tensor):  # the common case, inline
            outputs = [output] if output.requires_grad else []
        else:
            outputs = _grad_tensors(output)
        for tensor in outputs:
            node = tensor.grad_fn
            if node is not None:
                self._link(node, call << LINK_SHIFT | index << 1 | LINK_BEGIN)
            else:  # a leaf returned as output (e.g. a parameter)
                self._keep(_OneShotHook(tensor, partial(self._backward_event, BACKWARD_BEGIN, call, index)).handle)

    # ----------------------------------------------------------------- backward
    def _link(self, node: Any, link: int) -> None:
        buffer = self.buffer
        if len(buffer.codes) >= buffer.capacity:
            return  # the buffer is full: this call's backward goes unrecorded, as its events do
        buffer.link_node.append(self._node_hook(node).node_id)
        buffer.link_code.append(link)

    def _new_node_hook(self) -> _NodeMark:  # type: ignore[override]
        mark = _NodeMark(self, self.buffer.nodes)
        self.buffer.nodes += 1
        return mark

    def _backward_event(self, kind: int, call: int, index: int, *grads: Any) -> None:
        self.buffer.record(kind, call, index)
        if not self._backward_callback_queued:
            self._queue_backward_done()

    def _queue_backward_done(self) -> None:
        self._backward_callback_queued = True
        _queue_engine_callback(self._backward_done)

    def _backward_done(self) -> None:
        self.buffer.record(BACKWARD_DONE, 0, 0)
        self._backward_callback_queued = False

    def forget_nodes(self) -> None:
        """The buffer was cleared: node ids start again, so no old mark may be reused."""
        self._generation += 1
