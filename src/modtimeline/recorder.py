"""``Recorder``: the tracker's hooks, reduced to appending events to an ``EventBuffer``.

``Timeline`` needs no ``parents`` set and no user hooks, only *when* each call's
forward, backward and recompute began and ended. So the hot path here does the least
it can: one timestamp and one packed integer per forward boundary, and in backward one
event per autograd node whose gradient becomes ready, shared by every call boundary on
that node (a chain of modules shares its nodes: module i's input is module i-1's
output). Which calls a node begins or ends is kept as a small list of *links* per node
and turned into spans once, at flush, by ``resolve``.

Where ``modtimeline._hotpath`` is built (setup.py), the forward hooks and the node
marks are compiled (C++ autograd pre-hooks, no GIL, no RemovableHandle per node) and
write into a compiled store; the methods below then run only for the rare cases the
compiled hooks hand back (containers of tensors, leaves, several inputs, a raised
forward). Without it, or with ``MODTIMELINE_PURE_PYTHON=1``, the Python hooks here do
the same work: a test checks that both record the same events.
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
    NativeEventBuffer,
)
from ._native import compiled
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


def native_hotpath() -> Any | None:
    """The compiled hot path module, or None (not built, or disabled by the environment)."""
    return compiled("_hotpath")


def _compiled_autograd_enabled() -> bool:
    # Compiled autograd asks every node hook to describe itself, which only Python hooks
    # can. Looked up only if the user's code imported it (importing dynamo takes seconds).
    module = sys.modules.get("torch._dynamo.compiled_autograd")
    return bool(getattr(module, "compiled_autograd_enabled", False))


def new_buffer(capacity: int) -> EventBuffer | NativeEventBuffer:
    """The compiled event buffer when it is built (and compiled autograd is off), else the
    Python one."""
    hotpath = native_hotpath()
    if hotpath is None or _compiled_autograd_enabled():
        return EventBuffer(capacity)
    return NativeEventBuffer(hotpath.Store(capacity))


class Recorder(ModuleTracker):
    """Records every module call of the models that run while it is active."""

    def __init__(self, buffer: EventBuffer | NativeEventBuffer) -> None:
        super().__init__()
        self.buffer = buffer
        # Calls whose forward ended by raising (their forward hook ran with no output).
        self.raised_calls: set[int] = set()
        self._native_hooks = None
        if isinstance(buffer, NativeEventBuffer):
            store = buffer.store
            hotpath = sys.modules[type(store).__module__]  # the store's own extension module
            self._native_hooks = hotpath.ForwardHooks(store, self)
            # Instance attributes shadow the Python methods: ModuleTracker.__enter__
            # registers these as the global forward hooks.
            self._pre_forward = self._native_hooks.pre_forward  # type: ignore[method-assign]
            self._post_forward = self._native_hooks.post_forward  # type: ignore[method-assign]
            self._link = store.link  # type: ignore[method-assign]
            self._backward_event = store.backward_event  # type: ignore[method-assign]

    @property
    def native(self) -> bool:
        """Whether the compiled hot path records (else these Python hooks do)."""
        return self._native_hooks is not None

    def register_user_hooks(self, *args: Any, **kwargs: Any) -> None:
        raise ModTimelineError("Timeline's recorder takes no user hooks; use modtimeline.ModuleTracker for those")

    def __exit__(self, *exc_info: object) -> None:
        super().__exit__(*exc_info)
        if self._native_hooks is not None:
            self._native_hooks.reset()

    def remove_grad_hooks(self) -> None:
        super().remove_grad_hooks()
        if isinstance(self.buffer, NativeEventBuffer):
            self.buffer.store.remove_marks()

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
            tensor = args[0]
            if tensor.requires_grad and not self._link(tensor, call << LINK_SHIFT | index << 1):
                self._hook_leaf(BACKWARD_END, call, index, tensor)
        else:
            self._hook_inputs(call, index, args)

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
                self._forward_raised(call)
            return
        if not _grad_enabled():
            return
        if isinstance(output, _Tensor):  # the common case, inline
            if output.requires_grad and not self._link(output, call << LINK_SHIFT | index << 1 | LINK_BEGIN):
                self._hook_leaf(BACKWARD_BEGIN, call, index, output)
        else:
            self._hook_outputs(call, index, output)

    # ------------------------------------------ the rare cases (both hot paths)
    def _forward_raised(self, call: int) -> None:
        self.raised_calls.add(call)

    def _hook_inputs(self, call: int, index: int, args: Any) -> None:
        """Inputs other than one tensor: the backward ends once all their gradients are in."""
        inputs = _grad_tensors(args)
        if len(inputs) == 1:
            if not self._link(inputs[0], call << LINK_SHIFT | index << 1):
                self._hook_leaf(BACKWARD_END, call, index, inputs[0])
        elif inputs:
            self._keep(register_multi_grad_hook(inputs, partial(self._backward_event, BACKWARD_END, call, index)))
        # No input needs grad: the backward ends with the whole backward pass.

    def _hook_outputs(self, call: int, index: int, output: Any) -> None:
        """Outputs other than one tensor: each one's node begins the call's backward."""
        for tensor in _grad_tensors(output):
            if not self._link(tensor, call << LINK_SHIFT | index << 1 | LINK_BEGIN):
                self._hook_leaf(BACKWARD_BEGIN, call, index, tensor)

    def _hook_leaf(self, kind: int, call: int, index: int, tensor: torch.Tensor) -> None:
        """A leaf tensor has no autograd node; only a (one-shot) tensor hook tells."""
        self._keep(_OneShotHook(tensor, partial(self._backward_event, kind, call, index)).handle)

    # ----------------------------------------------------------------- backward
    def _link(self, tensor: torch.Tensor, link: int) -> bool:
        """Link the tensor's autograd node to a call boundary; False if it has none (a leaf)."""
        node = tensor.grad_fn
        if node is None:
            return False
        buffer = self.buffer
        if len(buffer.codes) >= buffer.capacity:
            return True  # the buffer is full: this call's backward goes unrecorded, as its events do
        buffer.link_node.append(self._node_hook(node).node_id)
        buffer.link_code.append(link)
        return True

    def _new_node_hook(self) -> _NodeMark:  # type: ignore[override]
        buffer = self.buffer
        assert isinstance(buffer, EventBuffer)
        mark = _NodeMark(self, buffer.nodes)
        buffer.nodes += 1
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
