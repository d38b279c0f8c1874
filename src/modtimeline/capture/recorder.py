"""``Recorder``: module calls reduced to events in an ``EventBuffer``, for ``Timeline``.

Three parts, each with one job:

* the **forward hooks** (global ``nn.Module`` pre/post hooks): one timestamp and one
  packed integer per forward boundary; at the end of a call, a *link* from the call to
  the autograd nodes its forward created (sequence numbers in the call's range): its
  output nodes *begin* its backward, its sinks (nodes none of whose edges stays among
  them) may *end* it;
* the **node marks**: a pre-hook (the node is about to run) and a post-hook (it has
  run) per linked autograd node, one event each however many calls share the node;
* the **module registry** (``registry.ModuleRegistry``): FQN and index of each module.

Which calls a node begins or ends is resolved once, at flush (``resolve``). Where
``modtimeline.native._hotpath`` is built, the forward hooks and the node marks are compiled
(C++ autograd hooks, no GIL, no RemovableHandle per node); they call back into
``RecorderCallbacks`` (this class's three public callback methods).
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
from typing import Any, Protocol

import torch

from .buffer import (
    BACKWARD_DONE,
    FORWARD_BEGIN,
    MODULE_MASK,
    FORWARD_END,
    GRADIENT_READY,
    NODE_DONE,
    pack_link,
    RECOMPUTE_BEGIN,
    RECOMPUTE_END,
    SUBGRAPH_BUDGET,
    EventBuffer,
    NativeEventBuffer,
)
from ..native.loader import compiled_part, warn_once_if_slow
from . import compile_guard
from ..errors import ModTimelineError
from .registry import ModuleRegistry, is_compiler_graph
from .tensors import autograd_node, grad_tensors

_graph_task_id = torch._C._current_graph_task_id
_queue_engine_callback = torch.autograd.Variable._execution_engine.queue_callback
_Tensor = torch.Tensor
_thread_id = threading.get_ident


def _peek_by_a_node() -> int:
    # (for a torch without _get_sequence_nr: a throwaway node takes the next number)
    node: Any = torch.empty(0, requires_grad=True).view(0).grad_fn
    return int(node._sequence_nr()) + 1


# The sequence number the next autograd node made on this thread gets.
_next_sequence_nr = getattr(torch._C._autograd, "_get_sequence_nr", _peek_by_a_node)

# The interface of Store, ForwardHooks and the dispatch functions (_hotpath.cpp HOTPATH_API).
HOTPATH_API = 4


def native_hotpath() -> Any | None:
    """The compiled hot path module, or None (not built, disabled by the environment, or
    built from another version: loader.compiled_part)."""
    return compiled_part("native._hotpath", HOTPATH_API)


def _compiled_autograd_enabled() -> bool:
    # Compiled autograd asks every node hook to describe itself, which only Python hooks
    # can. Looked up only if the user's code imported it (importing dynamo takes seconds).
    module = sys.modules.get("torch._dynamo.compiled_autograd")
    return bool(getattr(module, "compiled_autograd_enabled", False))


def new_buffer(capacity: int) -> EventBuffer | NativeEventBuffer:
    """The compiled event buffer when it is built (and compiled autograd is off), else the
    Python one."""
    hotpath = native_hotpath()
    if hotpath is None:
        warn_once_if_slow("native._hotpath")
        return EventBuffer(capacity)
    if _compiled_autograd_enabled():
        return EventBuffer(capacity)
    return NativeEventBuffer(hotpath.Store(capacity))


class RecorderCallbacks(Protocol):
    """What the forward hooks (compiled or Python) call back."""

    def learn(self, module: torch.nn.Module) -> int | None:
        """The module's index, given on first sight; None: not recorded."""

    def tensors(self, value: Any) -> list[torch.Tensor]:
        """The tensors in an output other than one tensor (tuples, dicts, dataclasses)."""

    def forward_raised(self, call: int) -> None:
        """The call's forward ended by raising."""


def call_nodes(outputs: list[Any], first: int, last: int) -> tuple[list[Any], list[Any]]:
    """(begin nodes, end nodes) of one call whose forward made the autograd nodes with
    sequence numbers in [first, last): its output nodes in that range, and the range's
    sinks, nodes none of whose edges stays in it (a node with a successor in the range
    runs before that successor). No end nodes when the walk passed SUBGRAPH_BUDGET."""
    seen: set[Any] = set()
    queue = []
    for node in outputs:
        if first <= node._sequence_nr() < last and node not in seen:
            seen.add(node)
            queue.append(node)
    begins = list(queue)
    sinks = []
    head = 0
    while head < len(queue):
        if len(queue) > SUBGRAPH_BUDGET:
            return begins, []
        node = queue[head]
        head += 1
        sink = True
        for next_node, _ in node.next_functions:
            if next_node is not None and first <= next_node._sequence_nr() < last:
                sink = False
                if next_node not in seen:
                    seen.add(next_node)
                    queue.append(next_node)
        if sink:
            sinks.append(node)
    return begins, sinks


# ------------------------------------------------------------------ Python twins


class _NodeMark:
    """A hook of one autograd node: records that it is about to run (a pre-hook) or has
    run (a post-hook)."""

    __slots__ = ("marks", "kind", "node_id", "generation")

    def __init__(self, marks: PythonNodeMarks, kind: int, node_id: int) -> None:
        self.marks = marks
        self.kind = kind
        self.node_id = node_id
        self.generation = marks.generation

    def __call__(self, *grads: Any) -> None:
        if self.generation == self.marks.generation:
            self.marks.node_event(self.kind, self.node_id)


class PythonNodeMarks:
    """Node marks through torch's Python node hooks (the compiled store's twin).

    Marks are never taken off their nodes (the store's are not either): a mark of an
    older generation records nothing, and a later link re-arms the node."""

    MAX_RUNNING_PASSES = 1024  # as the store's

    def __init__(self, buffer: EventBuffer) -> None:
        self.buffer = buffer
        buffer.node_event = self.node_event
        self.generation = 0
        # (graph task id, pass number) of each backward pass our marks fired in whose end
        # callback has not run: see the store's running_passes.
        self._running: dict[int, int] = {}
        self._passes = 0
        self._lock = threading.Lock()

    def link(self, node: Any, code: int, done: bool) -> None:
        buffer = self.buffer
        if len(buffer.codes) >= buffer.capacity:
            return  # the buffer is full: this call's backward goes unrecorded, as its events do
        metadata = node.metadata
        marks = metadata.get(self)  # [pre-hook mark, post-hook mark] of this generation
        if marks is None or marks[2] != self.generation:
            marks = metadata[self] = [None, None, self.generation, buffer.nodes]
            buffer.nodes += 1
        slot = 1 if done else 0
        if marks[slot] is None:
            mark = marks[slot] = _NodeMark(self, NODE_DONE if done else GRADIENT_READY, marks[3])
            if done:
                node.register_hook(mark)
            else:
                node.register_prehook(mark)
        buffer.link_node.append(marks[3])
        buffer.link_code.append(code)

    def node_event(self, kind: int, node_id: int) -> None:
        """A node event in the backward pass running now; the pass's first queues its
        BACKWARD_DONE."""
        task = _graph_task_id()
        running = self._running
        with self._lock:  # (node hooks of one pass may fire on several device threads)
            number = running.get(task)
            is_new = number is None
            if number is None:
                if len(running) >= self.MAX_RUNNING_PASSES:
                    running.pop(next(iter(running)), None)  # the oldest: a pass that raised, surely
                number = running[task] = self._passes & MODULE_MASK
                self._passes += 1
        if is_new and task != -1:
            generation = self.generation
            _queue_engine_callback(lambda: self._backward_done(generation, task))
        self.buffer.record(kind, node_id, number)

    def _backward_done(self, generation: int, task: int) -> None:
        if generation != self.generation:
            return
        with self._lock:
            number = self._running.pop(task, None)
        if number is not None:
            self.buffer.record(BACKWARD_DONE, 0, number)

    def serves(self, task: int) -> bool:
        return task in self._running

    def retire(self) -> None:
        """Every mark placed so far goes stale (the buffer was cleared, or recording stopped)."""
        self._running.clear()
        self.generation += 1


class _Frame:
    __slots__ = ("call", "index", "recompute", "first_node")

    def __init__(self, call: int, index: int, recompute: bool, first_node: int = 0) -> None:
        self.call = call
        self.index = index
        self.recompute = recompute
        self.first_node = first_node  # the sequence number the call's first autograd node gets


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
        self.paused = False
        self._begun: Any = None  # the module begin_call() began a call of (see the C twin)

    def own_thread(self) -> None:
        self._owner = _thread_id()

    def begin_call(self, module: torch.nn.Module, args: Any) -> None:
        self.pre_forward(module, args)
        if not self.paused and _thread_id() == self._owner:  # (only the owner's calls honour it)
            self._begun = module

    def pause(self) -> None:
        self.paused = True
        self.reset()

    def resume(self) -> None:
        self.paused = False

    def _index_of(self, module: torch.nn.Module) -> int | None:
        """The module's index (the registry's lookup is the hot path), None if ignored."""
        index = self._registry.lookup(module)
        if index is None:
            index = self._callbacks.learn(module)
        return index

    def reset(self) -> None:
        self._begun = None
        self._stack.clear()
        self._other_stacks.clear()

    def pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        if self.paused:
            return
        task = _graph_task_id()
        own_thread = _thread_id() == self._owner
        # Another thread's forward is not ours, unless it is recompute inside our backward.
        if not own_thread and (task == -1 or not self._marks.serves(task)):
            return
        if own_thread and self._begun is not None:
            begun, self._begun = self._begun, None
            if begun is module:
                return  # (begin_call began this call)
        index = self._index_of(module)
        if index is None:
            return
        call = self.next_call
        self.next_call = call + 1
        recompute = task != -1  # forward inside backward: activation-checkpoint recompute
        self._buffer.record(RECOMPUTE_BEGIN if recompute else FORWARD_BEGIN, call, index)
        stack = self._stack if own_thread else self._other_stacks.setdefault(_thread_id(), [])
        stack.append(_Frame(call, index, recompute, _next_sequence_nr()))

    def post_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.paused:
            return  # (pause() dropped every open forward)
        thread = _thread_id()
        if thread == self._owner:
            self._begun = None
        stack = self._stack if thread == self._owner else self._other_stacks.get(thread)
        if not stack or not self._registry.is_module(stack[-1].index, module):
            # The forward began before the hooks were on, or a pre-hook of ours never ran
            # for this module (another pre-hook raised, or another thread's forward that
            # is not ours): close nobody else's span.
            return
        frame = stack.pop()
        if not stack and thread != self._owner:
            del self._other_stacks[thread]
        if frame.recompute:
            # (Non-reentrant checkpointing stops recompute early by raising: not a failure.)
            self._buffer.record(RECOMPUTE_END, frame.call, frame.index)
            self._link_output(output, frame)
            return
        self._buffer.record(FORWARD_END, frame.call, frame.index)
        if output is None:
            if sys.exc_info()[1] is not None:  # the forward raised: torch calls us with no output
                self._callbacks.forward_raised(frame.call)
            return
        self._link_output(output, frame)

    def _link_output(self, output: Any, frame: _Frame) -> None:
        """Link the backward of the call that returned ``output`` (a recomputed call's too:
        a reentrant checkpoint runs the backward of what it recomputed right after)."""
        last = _next_sequence_nr()
        if output is None or last == frame.first_node:
            return  # no autograd node was made: no backward
        tensors = [output] if isinstance(output, _Tensor) else self._callbacks.tensors(output)
        outputs = [node for node in map(autograd_node, tensors) if node is not None]
        begins, ends = call_nodes(outputs, frame.first_node, last)
        for node in begins:
            self._marks.link(node, pack_link(frame.call, frame.index, True), False)
        for node in ends:
            self._marks.link(node, pack_link(frame.call, frame.index, False), True)


# --------------------------------------------------------------------- Recorder

# The registry of the recorder that ended last (module names and weak references only).
_last_registry: ModuleRegistry | None = None


class Recorder:
    """Records the module calls of the thread that owns it while it is entered.

    Implements ``RecorderCallbacks`` for its forward hooks (compiled or Python)."""

    def __init__(self, buffer: EventBuffer | NativeEventBuffer) -> None:
        self.buffer = buffer
        # The module indices of the recorder that ended last: a model traced by one
        # Timeline after another is not learned again (~1 µs a module, in Python).
        self.registry = _last_registry.continued() if _last_registry is not None else ModuleRegistry()
        # Calls whose forward ended by raising (their forward hook ran with no output).
        self.raised_calls: set[int] = set()
        self._hooked = False
        self._store: Any = None
        self._marks: PythonNodeMarks | None = None
        self._forward: Any
        if isinstance(buffer, NativeEventBuffer):
            self._store = buffer.store
            hotpath = sys.modules[type(self._store).__module__]  # the store's own extension module
            self._forward = hotpath.ForwardHooks(self._store, self)
            adopt = getattr(self._forward, "adopt", None)  # (absent from a hot path built before it)
            if adopt is not None:
                adopt(self.registry.refs)
            else:
                self.registry = ModuleRegistry()
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
        if self._hooked:
            raise ModTimelineError("this Recorder is already active")
        if self.can_pause:
            # (Here, not as the hooks come out: a stop from another thread must not make
            # hooks the owner thread still holds record again.)
            self._forward.resume()
        compile_guard.install(self, self._forward.pre_forward, self._forward.post_forward)
        self._hooked = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _last_registry
        compile_guard.uninstall(self)
        self._hooked = False
        self._forward.reset()
        self.retire_marks()
        _last_registry = self.registry

    @property
    def can_pause(self) -> bool:
        """Whether ``pause()`` can be had (a compiled hot path built before it cannot)."""
        return hasattr(self._forward, "pause") and hasattr(self._forward, "begin_call")

    def pause(self) -> None:
        """Record nothing until ``resume()``, the hooks left in torch: what ``__exit__``
        does to the recording (open forwards forgotten, node marks stale), without taking
        the hooks out of torch and putting them back at the next step, which costs more
        than the paused hooks' calls between two steps."""
        self.retire_marks()
        self._forward.pause()

    def resume(self) -> None:
        self._forward.resume()

    def retire_marks(self) -> None:
        """Every node mark placed so far goes stale: the buffer was cleared (node ids start
        again) or recording stopped. Not at a step's end: a backward may run in a later
        step than its forward."""
        if self._store is not None:
            self._store.retire_marks()
        elif self._marks is not None:
            self._marks.retire()

    def record_call_begin(self, module: torch.nn.Module, args: Any) -> None:
        """The start of a module call whose forward pre-hooks torch took before this
        recorder was on (a step that begins at that very call). Or a step begun by a
        global pre-hook ahead of ours while ours was paused: ours then still runs for that
        call, and leaves it be."""
        begin_call = getattr(self._forward, "begin_call", None)  # (absent from a hot path built before it)
        (begin_call or self._forward.pre_forward)(module, args)

    # ------------------------------------------------------- RecorderCallbacks
    def learn(self, module: torch.nn.Module) -> int | None:
        if is_compiler_graph(module):
            return None
        return self.registry.learn(module)

    def tensors(self, value: Any) -> list[torch.Tensor]:
        return grad_tensors(value, batched=True)

    def forward_raised(self, call: int) -> None:
        self.raised_calls.add(call)
