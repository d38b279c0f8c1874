"""``Recorder``: module calls reduced to events in an ``EventBuffer``, for ``Timeline``.

Three parts, each with one job:

* the **forward hooks** (global ``nn.Module`` pre/post hooks): one timestamp and one
  packed integer per forward boundary, and a *link* from each call to the autograd
  nodes of its inputs (the call's backward *ends* when their gradients are ready) and
  of its outputs (it *begins*);
* the **node marks**: one pre-hook per autograd node, which records that the node's
  gradient is ready (one event, however many call boundaries share the node: in a chain
  of modules, one module's output is the next one's input);
* the **module registry** (``registry.ModuleRegistry``): FQN and index of each module.

Which calls a node begins or ends is resolved once, at flush (``resolve``). Where
``modtimeline._hotpath`` is built, the forward hooks and the node marks are compiled
(C++ autograd pre-hooks, no GIL, no RemovableHandle per node); they call back into
``RecorderCallbacks`` (this class's four public callback methods) for the rare cases.
Without it, or with ``MODTIMELINE_PURE_PYTHON=1``, ``PythonForwardHooks`` and
``PythonNodeMarks`` do the same work: a test checks that both record the same events.

Threads: a Recorder records the forwards of the thread that owns it (``own_thread``;
the one that made it, by default), and the recompute forwards that run inside the
backward passes its own marks fired in (autograd runs those on its own threads). Other
threads' models are not recorded.
"""

from __future__ import annotations

import sys
import threading
import warnings
from typing import Any, Protocol

import torch
from torch.autograd.graph import get_gradient_edge
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from .buffer import (
    BACKWARD_DONE,
    FORWARD_BEGIN,
    FORWARD_END,
    GRADIENT_READY,
    LAYOUT,
    LINK_BEGIN,
    LINK_SHIFT,
    RECOMPUTE_BEGIN,
    RECOMPUTE_END,
    EventBuffer,
    NativeEventBuffer,
)
from ._native import compiled
from .errors import ModTimelineError
from .registry import ModuleRegistry
from .tensors import grad_tensors

_graph_task_id = torch._C._current_graph_task_id
_grad_enabled = torch.is_grad_enabled
_queue_engine_callback = torch.autograd.Variable._execution_engine.queue_callback
_Tensor = torch.Tensor
_thread_id = threading.get_ident

_layout_warned = False


def native_hotpath() -> Any | None:
    """The compiled hot path module, or None (not built, disabled by the environment, or
    built with another event layout)."""
    global _layout_warned
    hotpath = compiled("_hotpath")
    if hotpath is not None and getattr(hotpath, "LAYOUT", None) != LAYOUT:
        if not _layout_warned:
            _layout_warned = True
            warnings.warn("modtimeline: the compiled hot path was built from another version of modtimeline "
                          "(its event layout differs); recording on the slower Python path. Reinstall modtimeline "
                          "to rebuild it.", RuntimeWarning, stacklevel=2)
        return None
    return hotpath


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


def link_code(call: int, index: int, begins: bool) -> int:
    return call << LINK_SHIFT | index << 1 | (LINK_BEGIN if begins else 0)


class RecorderCallbacks(Protocol):
    """What the forward hooks (compiled or Python) call back for the rare cases."""

    def learn(self, module: torch.nn.Module) -> int:
        """The module's index, given on first sight."""

    def link_tensors(self, call: int, index: int, value: Any, begins: bool) -> int:
        """Link every tensor in ``value`` that carries gradient; returns how many."""

    def link_parameters(self, call: int, index: int, module: torch.nn.Module) -> None:
        """A call none of whose inputs carries gradient: its parameters' gradients end it."""

    def forward_raised(self, call: int) -> None:
        """The call's forward ended by raising."""


# ------------------------------------------------------------------ Python twins


class _NodeMark:
    """The pre-hook of one autograd node: records that its gradient is ready."""

    __slots__ = ("marks", "node_id", "generation")

    def __init__(self, marks: PythonNodeMarks, node_id: int) -> None:
        self.marks = marks
        self.node_id = node_id
        self.generation = marks.generation

    def __call__(self, grad_outputs: Any) -> None:
        if self.generation == self.marks.generation:
            self.marks.gradient_ready(self.node_id)


class PythonNodeMarks:
    """Node marks through torch's Python ``register_prehook`` (the compiled store's twin)."""

    def __init__(self, buffer: EventBuffer) -> None:
        self.buffer = buffer
        self.generation = 0
        self._handles: list[Any] = []
        # Gradient accumulators of leaves linked this step: a leaf holds its accumulator
        # only weakly, and one made for a link before any op used the leaf would die.
        self._accumulators: list[Any] = []
        self._tasks: set[int] = set()
        self._done_queued = False

    def link(self, tensor: torch.Tensor, code: int) -> bool:
        node = tensor.grad_fn
        if node is None:
            if not tensor.requires_grad:
                return False
            node = get_gradient_edge(tensor).node
            self._accumulators.append(node)
        buffer = self.buffer
        if len(buffer.codes) >= buffer.capacity:
            return True  # the buffer is full: this call's backward goes unrecorded, as its events do
        metadata = node.metadata
        mark = metadata.get(self)
        if mark is None or mark.generation != self.generation:
            mark = metadata[self] = _NodeMark(self, buffer.nodes)
            buffer.nodes += 1
            self._handles.append(node.register_prehook(mark))
        buffer.link_node.append(mark.node_id)
        buffer.link_code.append(code)
        return True

    def gradient_ready(self, node_id: int) -> None:
        self.buffer.record(GRADIENT_READY, node_id, 0)
        task = _graph_task_id()
        if task != -1:
            self._tasks.add(task)
        if not self._done_queued:
            self._done_queued = True
            generation = self.generation
            _queue_engine_callback(lambda: self._backward_done(generation))

    def _backward_done(self, generation: int) -> None:
        if generation != self.generation:
            return
        self._done_queued = False
        self.buffer.record(BACKWARD_DONE, 0, 0)

    def serves(self, task: int) -> bool:
        return task in self._tasks

    def retire(self) -> None:
        """The step is over: take the marks off (under the GIL nothing iterates them now)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._accumulators = []
        self._tasks.clear()
        self._done_queued = False
        self.generation += 1


class _Frame:
    __slots__ = ("call", "index", "recompute", "inputs_linked")

    def __init__(self, call: int, index: int, recompute: bool) -> None:
        self.call = call
        self.index = index
        self.recompute = recompute
        self.inputs_linked = False


class PythonForwardHooks:
    """The global forward pre/post hooks in Python (``_hotpath.ForwardHooks``'s twin)."""

    def __init__(self, buffer: EventBuffer, marks: PythonNodeMarks, callbacks: Recorder) -> None:
        self._buffer = buffer
        self._marks = marks
        self._callbacks = callbacks
        self._registry = callbacks.registry
        self.next_call = 0
        self._owner = _thread_id()
        self._stack: list[_Frame] = []
        self._other_stacks: dict[int, list[_Frame]] = {}

    def own_thread(self) -> None:
        self._owner = _thread_id()

    def reset(self) -> None:
        self._stack.clear()
        self._other_stacks.clear()

    def pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        task = _graph_task_id()
        if _thread_id() != self._owner:
            # Another thread's forward is not ours, unless it is recompute inside our backward.
            if task == -1 or not self._marks.serves(task):
                return
            index = self._registry.index_of(module)
            call = self.next_call
            self.next_call = call + 1
            self._buffer.record(RECOMPUTE_BEGIN, call, index)
            self._other_stacks.setdefault(_thread_id(), []).append(_Frame(call, index, True))
            return
        index = self._registry.index_of(module)
        call = self.next_call
        self.next_call = call + 1
        if task != -1:
            # Forward inside backward: activation-checkpoint recompute.
            self._buffer.record(RECOMPUTE_BEGIN, call, index)
            self._stack.append(_Frame(call, index, True))
            return
        self._buffer.record(FORWARD_BEGIN, call, index)
        frame = _Frame(call, index, False)
        self._stack.append(frame)
        if _grad_enabled():
            frame.inputs_linked = self._link(args, call, index, False) > 0

    def post_forward(self, module: torch.nn.Module, args: Any, *rest: Any) -> None:
        # (module, args, kwargs, output); torch leaves kwargs out when the forward raised.
        kwargs = rest[0] if len(rest) == 2 else None
        output = rest[-1]
        if _thread_id() != self._owner:
            stack = self._other_stacks.get(_thread_id())
            if not stack or not self._registry.is_module(stack[-1].index, module):
                return
            frame = stack.pop()
            if not stack:
                del self._other_stacks[_thread_id()]
            self._buffer.record(RECOMPUTE_END, frame.call, frame.index)
            return
        stack = self._stack
        if not stack or not self._registry.is_module(stack[-1].index, module):
            # The forward began before the hooks were on, or a pre-hook of ours never ran
            # for this module (another pre-hook raised): close nobody else's span.
            return
        frame = stack.pop()
        if frame.recompute:
            # (Non-reentrant checkpointing stops recompute early by raising: not a failure.)
            self._buffer.record(RECOMPUTE_END, frame.call, frame.index)
            return
        self._buffer.record(FORWARD_END, frame.call, frame.index)
        if output is None:
            if sys.exc_info()[1] is not None:  # the forward raised: torch calls us with no output
                self._callbacks.forward_raised(frame.call)
            return
        if not _grad_enabled():
            return
        if self._link(output, frame.call, frame.index, True) == 0:
            return  # no backward will run through this call
        inputs_linked = frame.inputs_linked
        if kwargs:
            # Keyword arguments: global pre-hooks never see them, the post-hook does.
            inputs_linked = self._link(kwargs, frame.call, frame.index, False) > 0 or inputs_linked
        if not inputs_linked:
            self._callbacks.link_parameters(frame.call, frame.index, module)

    def _link(self, value: Any, call: int, index: int, begins: bool) -> int:
        if isinstance(value, _Tensor):
            return int(value.requires_grad and self._marks.link(value, link_code(call, index, begins)))
        return self._callbacks.link_tensors(call, index, value, begins)


# --------------------------------------------------------------------- Recorder


class Recorder:
    """Records the module calls of the thread that owns it while it is entered.

    Implements ``RecorderCallbacks`` for its forward hooks (compiled or Python)."""

    def __init__(self, buffer: EventBuffer | NativeEventBuffer) -> None:
        self.buffer = buffer
        self.registry = ModuleRegistry()
        # Calls whose forward ended by raising (their forward hook ran with no output).
        self.raised_calls: set[int] = set()
        self._global_handles: list[Any] = []
        self._store: Any = None
        self._marks: PythonNodeMarks | None = None
        self._forward: Any
        if isinstance(buffer, NativeEventBuffer):
            self._store = buffer.store
            hotpath = sys.modules[type(self._store).__module__]  # the store's own extension module
            self._forward = hotpath.ForwardHooks(self._store, self)
        else:
            self._marks = PythonNodeMarks(buffer)
            self._forward = PythonForwardHooks(buffer, self._marks, self)

    @property
    def native(self) -> bool:
        """Whether the compiled hot path records (else the Python twins do)."""
        return self._store is not None

    @property
    def module_names(self) -> list[str]:
        """FQN of every module seen, by module index (the index events carry)."""
        return self.registry.names

    def own_thread(self) -> None:
        """Record the calling thread's forwards from now on."""
        self._forward.own_thread()

    def __enter__(self) -> Recorder:
        if self._global_handles:
            raise ModTimelineError("this Recorder is already active")
        self._global_handles = [
            register_module_forward_pre_hook(self._forward.pre_forward),
            register_module_forward_hook(self._forward.post_forward, with_kwargs=True, always_call=True),
        ]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._global_handles:
            handle.remove()
        self._global_handles = []
        self._forward.reset()
        self.end_step()

    def end_step(self) -> None:
        """The step's backward has run: every node mark placed so far goes stale."""
        if self._store is not None:
            self._store.retire_marks()
        elif self._marks is not None:
            self._marks.retire()

    def forget_nodes(self) -> None:
        """The buffer was cleared: node ids start again, so no old mark may be reused."""
        self.end_step()

    # ------------------------------------------------------- RecorderCallbacks
    def learn(self, module: torch.nn.Module) -> int:
        return self.registry.learn(module)

    def link_tensors(self, call: int, index: int, value: Any, begins: bool) -> int:
        code = link_code(call, index, begins)
        link = self._store.link if self._store is not None else self._marks.link  # type: ignore[union-attr]
        return sum(1 for tensor in grad_tensors(value) if link(tensor, code))

    def link_parameters(self, call: int, index: int, module: torch.nn.Module) -> None:
        code = link_code(call, index, False)
        link = self._store.link if self._store is not None else self._marks.link  # type: ignore[union-attr]
        for parameter in module.parameters():
            if parameter.requires_grad:
                link(parameter, code)

    def forward_raised(self, call: int) -> None:
        self.raised_calls.add(call)
