"""Spans for the modules inside torch.compile'd regions (``Timeline(compiled_detail=True)``).

Dynamo inlines a compiled module's submodules into one graph, so their calls never reach
a hook at run time. With this on, the forward hooks that Dynamo traces put two opaque
calls into the graph at each submodule's boundaries: ``torch._dynamo.decorators.
leaf_function``s, which Dynamo and AOT autograd do not trace and which run eagerly, in
order, when the compiled code runs. So:

* a submodule's forward span runs from its *enter* leaf (its inputs) to its *exit* leaf
  (its outputs), as the compiled code reaches them;
* its backward span begins when the gradients of its outputs are ready (the exit leaf's
  multi-grad hook) and ends when those of its inputs are (the enter leaf's), inside the
  compiled backward. These are node marks of no autograd node (``synthetic_node``): the
  resolve turns them into spans as it does every other mark.

Each submodule's output goes on as a view of itself (no copy): the gradient of the
tensor the exit leaf saw is then computed inside the compiled backward even where it is
the region's own output, so that hook fires too. What it cannot see: the end of a
backward span whose inputs need no gradient (a first layer: it ends at its nearest
bounded ancestor's end, flagged ``approximate``), and, for outputs other than a tensor or
a plain tuple of them, the begin of one whose outputs are the region's (left out). The
leaves are made, per submodule, when the compiled wrapper (``OptimizedModule``) is called
eagerly, before Dynamo traces it: a model compiled in place (``model.compile()``) has no
such call and gets no detail. Each leaf runs eagerly through autograd with its own
multi-grad hook, about 0.7 ms a submodule call on the machine measured
(``benchmarks/compiled_detail.py``): a diagnostic for a few steps. Leaf functions do not
compile under inductor (torch 2.13): the detail stays out of inductor regions.
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from . import compile_guard
from .buffer import FORWARD_BEGIN, FORWARD_END, GRADIENT_READY, NODE_DONE, EventBuffer, NativeEventBuffer, pack_link
from .registry import ModuleRegistry

__all__ = ["CompiledDetail", "SUPPORTED_BACKENDS"]

# The detail that records now (the Timeline whose hooks are on), or None. The leaves
# live as long as their modules and outlast any one Timeline, so they look it up.
_active: CompiledDetail | None = None
# Boundaries by id(module); Dynamo traces the lookup (a constant per module).
_BOUNDARIES: dict[int, _Boundary] = {}
_prepared: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # wrappers prepared (or told of) once
# The backends whose graphs take the leaves (inductor fails on them in torch 2.13).
SUPPORTED_BACKENDS = ("eager", "aot_eager")
# The key of the detail's hooks in torch's global hook dictionaries (see compile_guard).
_HOOK_KEY = -0x6D_7410
# Call numbers of detail spans: far above the hooks' own, which count from 0.
_FIRST_CALL = 1 << 36
# Marks waiting for their backward, per boundary: a few calls' worth (a module called
# several times per step); older ones, whose hook never fired, are dropped.
_PENDING = 64


class _Boundary:
    """One submodule's two leaves and what waits on them."""

    def __init__(self, module: torch.nn.Module) -> None:
        key = id(module)
        # Dropped from _BOUNDARIES when the module dies: a new module at its address must
        # not find this one's leaves (they would go into its graph unasked).
        self.ref = weakref.ref(module, lambda ref: _forget(key, ref))
        self.open: deque[tuple[int, int, int]] = deque(maxlen=_PENDING)  # (generation, call, index)
        self.pending_begin: deque[tuple[int, int]] = deque(maxlen=_PENDING)  # (generation, node)
        self.pending_end: deque[tuple[int, int]] = deque(maxlen=_PENDING)
        self.enter, self.exit = _leaves(self)


def _forget(key: int, ref: weakref.ref[torch.nn.Module]) -> None:
    boundary = _BOUNDARIES.get(key)
    if boundary is not None and boundary.ref is ref:
        del _BOUNDARIES[key]


def _leaves(boundary: _Boundary) -> tuple[Any, Any]:
    """(enter, exit): the leaves at the boundary's inputs and outputs."""

    def entered() -> None:
        if _active is not None:
            _active.entered(boundary)

    def inputs_done() -> None:
        if _active is not None:
            _active.node_event(boundary.pending_end, NODE_DONE)

    def exited() -> None:
        if _active is not None:
            _active.exited(boundary)

    def outputs_ready() -> None:
        if _active is not None:
            _active.node_event(boundary.pending_begin, GRADIENT_READY)

    return _leaf(entered, inputs_done), _leaf(exited, outputs_ready)


@functools.cache
def leaves_available() -> bool:
    """Whether this torch's leaf functions take a multi-grad hook (torch 2.11's do not:
    making a boundary there would raise inside the user's forward)."""
    try:
        from torch._dynamo.decorators import leaf_function
    except ImportError:
        return False
    return hasattr(leaf_function(lambda *tensors: None), "register_multi_grad_hook")


def _leaf(run: Callable[[], None], on_gradients: Callable[[], None]) -> Any:
    """A leaf function of any tensors: ``run`` when the compiled code reaches it,
    ``on_gradients`` once the gradients of its inputs that need one are computed."""
    from torch._dynamo.decorators import leaf_function

    def call(*tensors: torch.Tensor) -> None:
        run()

    def fake(*tensors: torch.Tensor) -> None:  # (what it returns, for the compiler: nothing)
        return None

    def hook(*gradients: torch.Tensor) -> None:
        on_gradients()

    leaf: Any = leaf_function(call)
    leaf.register_fake(fake)
    leaf.register_multi_grad_hook(hook)
    return leaf


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a hook's args or output, one level deep (as Dynamo traces it)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [item for item in value if isinstance(item, torch.Tensor)]
    if isinstance(value, dict):
        return [item for item in value.values() if isinstance(item, torch.Tensor)]
    return []


def _backend_name(wrapper: torch.nn.Module) -> str | None:
    """The name of the backend a ``torch.compile`` wrapper compiles with (torch keeps it
    a few wrappers deep), or None."""
    backend = getattr(getattr(wrapper, "dynamo_ctx", None), "callback", None)
    for _ in range(4):
        if backend is None:
            return None
        name = getattr(backend, "compiler_name", None) or getattr(backend, "__name__", None)
        if isinstance(name, str) and not name.startswith("_"):
            return name
        backend = getattr(backend, "_torchdynamo_orig_backend", None)
    return None


def _prepare(wrapper: torch.nn.Module) -> None:
    """Make the leaves of every submodule of a compiled wrapper (not of its root, whose
    call is the wrapper's own span), before Dynamo traces it; only for the backends the
    leaves compile under (else the user's compile would fail: never)."""
    root = getattr(wrapper, "_orig_mod", None)
    if not isinstance(root, torch.nn.Module) or wrapper in _prepared:
        return
    _prepared.add(wrapper)
    backend = _backend_name(wrapper)
    if backend in SUPPORTED_BACKENDS and not leaves_available():
        warnings.warn(f"modtimeline: compiled_detail needs torch's leaf functions with gradient hooks (torch >= 2.12) "
                      f"for regions compiled with {backend}; with torch {torch.__version__} this region shows as one "
                      "span", RuntimeWarning, stacklevel=4)
        return
    if backend not in SUPPORTED_BACKENDS:
        for module in root.modules():  # (leaves made for another compile of them: not here)
            boundary = _BOUNDARIES.get(id(module))
            if boundary is not None and boundary.ref() is module:
                del _BOUNDARIES[id(module)]
        if backend == "inductor":
            return  # (measured from its kernels instead: inductor_detail.py)
        warnings.warn(f"modtimeline: compiled_detail shows the modules inside regions compiled with "
                      f"{', '.join(SUPPORTED_BACKENDS)}; this one compiles with {backend or 'an unknown backend'} "
                      "and shows as one span (leaf functions do not compile under inductor in torch 2.13)",
                      RuntimeWarning, stacklevel=4)
        return
    for module in root.modules():
        if module is root:
            continue
        boundary = _BOUNDARIES.get(id(module))
        if boundary is None or boundary.ref() is not module:
            _BOUNDARIES[id(module)] = _Boundary(module)


def _pre_forward(module: torch.nn.Module, args: Any) -> Any:
    if torch.compiler.is_compiling():
        boundary = _BOUNDARIES.get(id(module))
        if boundary is not None:
            # The module gets views of its inputs, and the leaf sees those: a view is never
            # a leaf tensor (a graph input is one while AOT autograd traces, and a hook on
            # it fails the compile), and its gradient is computed once the module's is.
            viewed = _viewed(args)
            boundary.enter(*_tensors(viewed))
            return viewed
    elif type(module).__name__ == "OptimizedModule":
        _prepare(module)
    return None


def _post_forward(module: torch.nn.Module, args: Any, output: Any) -> Any:
    if torch.compiler.is_compiling():
        boundary = _BOUNDARIES.get(id(module))
        if boundary is not None:
            boundary.exit(*_tensors(output))
            # The module's output goes on as a view of itself: a view costs no copy, and
            # the gradient of the tensor the leaf saw is then computed inside the compiled
            # backward, where the leaf's hook fires, even when the output is the region's.
            return _viewed(output)
    return None


def _viewed(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.view_as(output)
    if isinstance(output, tuple) and not hasattr(output, "_fields"):  # (a named tuple stays as it is)
        return tuple(item.view_as(item) if isinstance(item, torch.Tensor) else item for item in output)
    return None  # (lists, dicts, dataclasses: unchanged)


class CompiledDetail:
    """The detail spans of one recorder: its buffer and registry, its global hooks."""

    def __init__(self, buffer: EventBuffer | NativeEventBuffer, registry: ModuleRegistry) -> None:
        self._buffer = buffer
        self._registry = registry
        self._calls = itertools.count(_FIRST_CALL)
        self._generation = 0  # bumped when the buffer is cleared: marks of an older generation record nothing

    def __enter__(self) -> CompiledDetail:
        global _active
        # (Dynamo traces these two: a fixed key, as compile_guard says why.)
        compile_guard.put_traced(_HOOK_KEY, _pre_forward, _post_forward)
        _active = self
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _active
        if _active is self:
            _active = None
            compile_guard.take_traced(_HOOK_KEY)

    def retire(self) -> None:
        """The buffer was cleared: a new generation (marks placed so far point nowhere)."""
        self._generation += 1

    # ---------------------------------------------- called by the leaves, at run time
    def entered(self, boundary: _Boundary) -> None:
        module = boundary.ref()
        if module is None:
            return
        index = self._registry.index_of(module)
        self._registry.compiled.add(index)  # (its spans say they ran compiled)
        call = next(self._calls)
        self._buffer.record(FORWARD_BEGIN, call, index)
        boundary.open.append((self._generation, call, index))
        node = self._buffer.synthetic_node(pack_link(call, index, False))
        if node >= 0:
            boundary.pending_end.append((self._generation, node))

    def exited(self, boundary: _Boundary) -> None:
        if not boundary.open:
            return
        generation, call, index = boundary.open.pop()
        if generation != self._generation:
            return
        self._buffer.record(FORWARD_END, call, index)
        node = self._buffer.synthetic_node(pack_link(call, index, True))
        if node >= 0:
            boundary.pending_begin.append((generation, node))

    def node_event(self, pending: deque[tuple[int, int]], kind: int) -> None:
        """A leaf's gradients are ready: the latest mark waiting there fires (a module
        called twice has its later call's backward first)."""
        while pending:
            generation, node = pending.pop()
            if generation == self._generation:
                self._buffer.node_event(kind, node)  # in the backward pass running now
                return
