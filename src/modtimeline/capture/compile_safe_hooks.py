"""Module-boundary hooks that ``torch.compile`` keeps: ``ModuleTracker.compile_safe_hooks``.

The same hooks as upstream PyTorch's ``ModTracker.compile_safe_hooks``, with its
signature and order::

    forward:   pre_fw(fqn, inputs) -> module.forward -> post_fw(fqn, inputs, outputs)
    backward:  pre_bw(fqn, grad_outputs) -> module's backward -> post_bw(fqn, grad_inputs)

Each chosen submodule gets a forward pre-hook and a forward hook (module hooks, which
Dynamo inlines into the graph it captures). While Dynamo traces, they route the module's
tensors through one ``torch._dynamo.decorators.leaf_function``: an opaque call in the
graph, which Dynamo and AOT autograd do not trace and which runs eagerly, in order, when
the compiled code runs. So ``fullgraph=True`` compiles, and the hooks run at run time
with real tensors. Outside compiled code the same function runs directly, with no leaf
(tensor subclasses such as DTensor work there).

What Dynamo would get wrong, and what this does about it (upstream's leaves close over
their hooks, and upstream adds nothing else):
- Dynamo compiles one graph per module *class* and guards neither on module hooks nor on
  module instances, so a second model of the class (or each block of a per-block
  compiled model) would run the first one's leaves, with its FQNs. Here the leaf takes,
  besides the tensors, a small tensor the module carries while it is hooked: its number,
  read at run time. One graph serves every instance, and each calls its own hooks.
- Code compiled *before* the hooks were added would run on without them: Dynamo does
  not see new module hooks, and guards on nothing of ours in code compiled with no
  context open. Entering a context drops such compiled code of the files defining the
  hooked model's classes (their forwards and the resume functions Dynamo made of them),
  which Dynamo then compiles again, once, with the hooks. While a context is open, a
  global hook that adds nothing to graphs sits under a fixed key in torch's global hook
  dictionaries (see compile_guard.py): it reads whether each module is hooked, so that
  code compiled then is guarded on it, and a hooked and an unhooked model of one class
  never run each other's graph.

The backward hooks ride on an identity ``autograd.Function`` applied at run time (inside
the leaf, so the compiler never sees it): its backward runs when the gradients of those
tensors are computed. On the outputs that is the module's backward beginning
(``pre_bw``); on the inputs, its end (``post_bw``). A tensor that needs no gradient has
no backward: a first layer fed plain data gets no ``post_bw``, and entries for tensors of
a boundary that need none are ``None``.

Other differences from upstream, each stated in the README:
- hooks run only while their context is open (a compiled graph that still holds the
  leaves calls nothing after it closed);
- the inputs ``post_fw`` receives are kept per thread and per nested call (upstream keeps
  one slot per module);
- contexts may nest on one model: each one's hooks run, once per call.
- torch 2.13's inductor cannot compile a leaf function (upstream: "not yet supported"):
  compile with ``eager`` or ``aot_eager`` under these hooks.

Not right yet, as upstream's: torch 2.13's leaf function keeps one call's autograd state
per place in a graph, so a graph run several times before its backward (the blocks of a
per-block compiled model) gives all those calls' backward hooks to its last call. The
gradients are unchanged (they pass an identity); a strict xfail test marks it.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.hooks import RemovableHandle

from . import compile_guard
from ..errors import ModTimelineError

__all__ = ["compile_safe_hooks", "ForwardHook", "PostForwardHook", "GradientHook", "ModuleFilter"]

# (fqn, tensors): the module's input tensors, for pre_fw.
ForwardHook = Callable[[str, tuple[torch.Tensor, ...]], None]
# (fqn, inputs, outputs), for post_fw.
PostForwardHook = Callable[[str, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]], None]
# (fqn, gradients), for pre_bw and post_bw; None for a tensor that needed no gradient.
GradientHook = Callable[[str, tuple[torch.Tensor | None, ...]], None]
ModuleFilter = Callable[[str, torch.nn.Module], bool]

INPUTS, OUTPUTS = 0, 1  # the two sides of a module

# Calls of one module that wait for their post_fw, per thread: a module nested in
# itself (or whose forward raised: its entry is never taken) is bounded by this.
_MAX_OPEN_CALLS = 64
# The attribute a hooked module carries: its number, a 0-d int64 tensor (not a buffer:
# nothing in its state_dict). Dynamo lifts it into the graph as an input.
_NUMBER_ATTR = "_modtimeline_hook_number"
# The key of the no-op global hooks, in torch's global hook dictionaries, while any
# context is open (see compile_guard).
_GUARD_KEY = -0x6D_7420

_numbers = itertools.count()  # never reused: a number always means one module
_lock = threading.Lock()
# While contexts are open: the gates of each (module number, side), several when contexts
# nest on one module; the module hook that feeds each (one, however many contexts).
_GATES: dict[tuple[int, int], list[_Gate]] = {}
_HANDLES: dict[tuple[int, int], RemovableHandle] = {}
_open_contexts = 0
_leaf: Any = None  # the one leaf function (made eagerly, on first entry: never while Dynamo traces)


class _Identity(torch.autograd.Function):
    """Passes tensors on unchanged; its backward gives the gradients to the gates whose
    forward applied it, then passes them on. One autograd node per side and call."""

    @staticmethod
    def forward(ctx: Any, gates: tuple[_Gate, ...], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.gates = gates
        # (a tensor that needed no gradient goes on needing none, as it came in)
        ctx.mark_non_differentiable(*(tensor for tensor in tensors if not tensor.requires_grad))
        ctx.set_materialize_grads(False)  # (no gradient stays None, for the hooks and after)
        return tensors

    @staticmethod
    def backward(ctx: Any, *gradients: torch.Tensor | None) -> tuple[Any, ...]:
        for gate in ctx.gates:
            gate.backward(gradients)
        return (None, *gradients)


class _Gate:
    """One side of one module in one context: what runs there, forward and backward."""

    def __init__(self, fqn: str, is_open: list[bool], on_forward: Callable[[tuple[torch.Tensor, ...]], None],
                 on_backward: GradientHook | None) -> None:
        self.fqn = fqn
        self._open = is_open  # one cell shared by the context's gates: [True] while it is open
        self._on_forward = on_forward
        self._on_backward = on_backward
        self.has_backward = on_backward is not None

    def forward(self, tensors: tuple[torch.Tensor, ...]) -> None:
        if self._open[0]:
            self._on_forward(tensors)

    def backward(self, gradients: tuple[torch.Tensor | None, ...]) -> None:
        if self._open[0] and self._on_backward is not None:
            self._on_backward(self.fqn, gradients)


def _run(number: int, side: int, tensors: tuple[torch.Tensor, ...], in_leaf: bool) -> tuple[torch.Tensor, ...]:
    """What a side does, at run time: its gates' forward hooks, then the identity."""
    gates = tuple(_GATES.get((number, side), ()))
    for gate in gates:
        gate.forward(tensors)
    with_backward = tuple(gate for gate in gates if gate.has_backward)
    # Inside the leaf the identity goes on whenever a tensor needs a gradient, hook or
    # not: under torch.compile the leaf's outputs carry the gradient only through an
    # autograd node made at run time (without one the gradient stops at the leaf). In
    # eager code it is needed only by a backward hook.
    if (in_leaf or with_backward) and torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors):
        passed = _Identity.apply(with_backward, *tensors)
        return passed if isinstance(passed, tuple) else (passed,)
    return tensors


def _make_leaf() -> Any:
    try:
        from torch._dynamo.decorators import leaf_function
    except ImportError:
        raise ModTimelineError(
            f"compile_safe_hooks needs torch._dynamo.decorators.leaf_function, which torch "
            f"{torch.__version__} lacks; use ModuleTracker.register_user_hooks for eager code") from None

    def boundary(number: torch.Tensor, side: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _run(int(number), side, tensors, in_leaf=True)

    def fake(number: torch.Tensor, side: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tensors  # (what the compiler sees: the same tensors)

    leaf: Any = leaf_function(boundary)
    leaf.register_fake(fake)
    return leaf


def _through(side: int, module: torch.nn.Module, value: Any) -> Any:
    """``value`` with its tensors passed through the module's side (through the leaf
    while Dynamo traces); unchanged when it holds no tensor."""
    number = getattr(module, _NUMBER_ATTR, None)
    if number is None:  # (a hook that outlived its context: it is being removed)
        return value
    flat, spec = tree_flatten(value)
    where = [i for i, item in enumerate(flat) if isinstance(item, torch.Tensor)]
    if not where:
        return value
    tensors = tuple(flat[i] for i in where)
    if torch.compiler.is_compiling():
        passed = _leaf(number, side, *tensors)
    else:
        passed = _run(int(number), side, tensors, in_leaf=False)
    for i, tensor in zip(where, passed):
        flat[i] = tensor
    return tree_unflatten(flat, spec)


def _pre_forward(module: torch.nn.Module, args: Any, kwargs: Any) -> Any:
    return _through(INPUTS, module, (args, kwargs))


def _post_forward(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
    return _through(OUTPUTS, module, output)


def _mark_hooked(module: torch.nn.Module, args: Any, *rest: Any) -> None:
    """The global hooks' one job, while Dynamo traces a module call with a context open:
    to read whether the module is hooked now, so that the graph is guarded on it (Dynamo
    guards on module hooks only through what it reads). A graph traced for an unhooked
    instance is then not run for a hooked one of the same class, nor the reverse."""
    # (Both ways return None: the test itself is what Dynamo guards on; a bare read
    # that nothing depends on would leave no guard.)
    if getattr(module, _NUMBER_ATTR, None) is None:
        return None
    return None


class _InputsKept:
    """The inputs of a module's calls whose post_fw has not run yet, per thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def push(self, tensors: tuple[torch.Tensor, ...]) -> None:
        stack: list[tuple[torch.Tensor, ...]] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        if len(stack) >= _MAX_OPEN_CALLS:
            del stack[0]
        stack.append(tensors)

    def pop(self) -> tuple[torch.Tensor, ...]:
        stack: list[tuple[torch.Tensor, ...]] | None = getattr(self._local, "stack", None)
        return stack.pop() if stack else ()


def _compiled_outside(entry: Any) -> bool:
    """Whether a Dynamo cache entry was compiled with no context open: its code then
    names nothing of this file (code compiled with one open loads the hooked modules'
    numbers, or this module for the global hooks)."""
    names = getattr(getattr(entry, "code", None), "co_names", ())
    return not any(name == _NUMBER_ATTR or __name__.replace(".", "_dot_") in name for name in names)


def _recompile_what_was_compiled_outside(modules: list[torch.nn.Module]) -> None:
    """Drop Dynamo's compiled code, compiled with no context open, of the files that
    define these modules' classes (their forwards, and the resume functions Dynamo makes
    of them at graph breaks): Dynamo does not guard on module hooks, so it would run that
    code on without them. It compiles again, once, at its next call. Torch's private
    parts this needs are looked up first: a torch without them drops nothing."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
        from torch._dynamo import convert_frame, external_utils
        from torch._dynamo.eval_frame import remove_from_cache

        compile_lock, seen_codes = convert_frame.compile_lock, convert_frame.input_codes.seen
    except (ImportError, AttributeError):
        return
    # (a torch.nn class compiled on its own is compiled through a wrapper of that file)
    files = {external_utils.__file__}
    for cls in dict.fromkeys(type(module) for module in modules):
        code = getattr(getattr(cls, "forward", None), "__code__", None)
        if code is not None:
            files.add(code.co_filename)
    with compile_lock:
        for weak_code in list(seen_codes):
            code = weak_code()
            if code is None or code.co_filename not in files:
                continue
            if any(_compiled_outside(entry) for entry in _debug_get_cache_entry_list(code)):
                remove_from_cache(code)


def _check_callable(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"compile_safe_hooks: {name} must be a function or None, not {type(value).__name__}")


@contextmanager
def compile_safe_hooks(
    model: torch.nn.Module,
    pre_fw_hook: ForwardHook | None = None,
    post_fw_hook: PostForwardHook | None = None,
    pre_bw_hook: GradientHook | None = None,
    post_bw_hook: GradientHook | None = None,
    module_filter: ModuleFilter | None = None,
) -> Iterator[list[RemovableHandle]]:
    """Hooks at the boundaries of ``model``'s submodules that work under
    ``torch.compile(..., backend="aot_eager" or "eager", fullgraph=True)`` with no graph
    break, and in eager code. Yields the module hook handles; the hooks end on exit.

    - ``pre_fw_hook(fqn, input_tensors)``: before each submodule's forward (the tensors
      of its positional and keyword arguments);
    - ``post_fw_hook(fqn, input_tensors, output_tensors)``: after it;
    - ``pre_bw_hook(fqn, grad_outputs)``: when its outputs' gradients are ready (its
      backward begins);
    - ``post_bw_hook(fqn, grad_inputs)``: when its inputs' gradients are (it ends).
      Gradient tuples hold ``None`` for tensors that needed none.

    FQNs are ``model.named_modules()``'s (``"layers.0.attn"``). The root module is
    skipped: ``torch.compile(model)`` calls it outside the compiled region. With
    ``module_filter(fqn, module)``, only the submodules it returns True for are hooked.
    The tensors are the modules' own; hooks are for looking, not for changing them.
    """
    global _leaf, _open_contexts
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compile_safe_hooks: model must be a torch.nn.Module, not {type(model).__name__}")
    for name, value in (("pre_fw_hook", pre_fw_hook), ("post_fw_hook", post_fw_hook), ("pre_bw_hook", pre_bw_hook),
                        ("post_bw_hook", post_bw_hook), ("module_filter", module_filter)):
        _check_callable(name, value)
    chosen = [(fqn, module) for fqn, module in model.named_modules()
              if fqn and (module_filter is None or module_filter(fqn, module))]
    if _leaf is None:
        _leaf = _make_leaf()
    is_open = [True]
    placed: list[tuple[torch.nn.Module, tuple[int, int], _Gate]] = []
    with _lock:
        for fqn, module in chosen:
            placed.extend(_place(fqn, module, is_open, pre_fw_hook, post_fw_hook, pre_bw_hook, post_bw_hook))
        _open_contexts += 1
        if _open_contexts == 1:
            compile_guard.put_traced(_GUARD_KEY, _mark_hooked, _mark_hooked)
    try:
        _recompile_what_was_compiled_outside([model] + [module for _, module in chosen])
        yield [_HANDLES[key] for _, key, _ in placed]
    finally:
        is_open[0] = False
        with _lock:
            for module, key, gate in placed:
                _take(module, key, gate)
            _open_contexts -= 1
            if _open_contexts == 0:
                compile_guard.take_traced(_GUARD_KEY)


def _place(fqn: str, module: torch.nn.Module, is_open: list[bool], pre_fw_hook: ForwardHook | None,
           post_fw_hook: PostForwardHook | None, pre_bw_hook: GradientHook | None,
           post_bw_hook: GradientHook | None) -> list[tuple[torch.nn.Module, tuple[int, int], _Gate]]:
    """This context's gates on the module's sides that its hooks need (and the module's
    number and the hook of each side, if no other context placed them)."""
    inputs = _InputsKept() if post_fw_hook is not None else None

    def entered(tensors: tuple[torch.Tensor, ...]) -> None:
        if inputs is not None:
            inputs.push(tensors)
        if pre_fw_hook is not None:
            pre_fw_hook(fqn, tensors)

    def exited(tensors: tuple[torch.Tensor, ...]) -> None:
        if post_fw_hook is not None and inputs is not None:
            post_fw_hook(fqn, inputs.pop(), tensors)

    sides = []
    if pre_fw_hook is not None or post_bw_hook is not None or inputs is not None:
        sides.append((INPUTS, _Gate(fqn, is_open, entered, post_bw_hook)))
    if post_fw_hook is not None or pre_bw_hook is not None:
        sides.append((OUTPUTS, _Gate(fqn, is_open, exited, pre_bw_hook)))
    number = module.__dict__.get(_NUMBER_ATTR)
    if number is None:
        number = module.__dict__[_NUMBER_ATTR] = torch.tensor(next(_numbers), dtype=torch.int64)
    placed = []
    for side, gate in sides:
        key = (int(number), side)
        if key not in _HANDLES:
            if side == INPUTS:
                _HANDLES[key] = module.register_forward_pre_hook(_pre_forward, with_kwargs=True)
            else:
                _HANDLES[key] = module.register_forward_hook(_post_forward, with_kwargs=True)
        _GATES.setdefault(key, []).append(gate)
        placed.append((module, key, gate))
    return placed


def _take(module: torch.nn.Module, key: tuple[int, int], gate: _Gate) -> None:
    """Undo one ``_place``: the module hook and number go with the side's last gate."""
    gates = _GATES[key]
    gates.remove(gate)
    if gates:
        return
    del _GATES[key]
    _HANDLES.pop(key).remove()
    if (key[0], 1 - key[1]) not in _GATES:
        module.__dict__.pop(_NUMBER_ATTR, None)
