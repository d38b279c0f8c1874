"""Which module is running: forward, backward and activation-checkpoint recompute.

``ModuleTracker`` is a drop-in for torch's ``torch.utils.module_tracker.ModuleTracker``
and ``torch.distributed._tools.mod_tracker.ModTracker``: the same ``parents``,
``is_bw``, ``get_known_fqn`` and ``register_user_hooks``, with the same hook order.
``recorder.Recorder`` builds on it to time module calls for ``Timeline``; the
tracker itself knows nothing of clocks or files.

Example::

    with ModuleTracker() as tracker:
        def probe(grad):
            print(tracker.parents, tracker.is_bw)
        model(x).sum().backward()

Why it is cheaper than torch's trackers: torch registers a ``register_multi_grad_hook``
(~4 µs, closures and dicts) on the inputs and on the outputs of every call. Here each
autograd node gets at most one pre-hook (~0.9 µs), shared by every call boundary on
that node and kept in the node's own ``metadata`` (so it lives and dies with the
graph). In a chain, one module's output is the next one's input: the same node, one
hook, one firing, which runs the *ends* before the *begins*, so sibling backward spans
never overlap. Multi-input calls keep torch's "all gradients" semantics through
``register_multi_grad_hook``. Inputs and outputs are scanned by ``tensors.grad_tensors``
(tuples, lists, dicts, dataclasses), names come from ``registry.ModuleRegistry`` (as for
the Recorder), and nothing is formatted per call. Unlike torch's trackers, a call made
with keyword arguments ends when their gradients are ready (torch's end with the whole
backward); like them, it sees every thread's modules.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.autograd.graph import register_multi_grad_hook

from . import compile_guard
from .compile_safe_hooks import compile_safe_hooks
from ..errors import ModTimelineError
from .registry import ModuleRegistry
from .tensors import grad_tensors

__all__ = ["ModuleTracker"]

_graph_task_id = torch._C._current_graph_task_id
_grad_enabled = torch.is_grad_enabled
_queue_engine_callback = torch.autograd.Variable._execution_engine.queue_callback
_Tensor = torch.Tensor

class _GradientReady:
    """What to do when the gradient reaching one autograd node is ready.

    ``ends``: calls whose input this node produced (their backward is over);
    ``begins``: calls whose output this node produced (their backward starts).
    One instance per node and tracker generation, registered as the node's pre-hook.
    """

    __slots__ = ("tracker", "generation", "ends", "begins")

    def __init__(self, tracker: ModuleTracker) -> None:
        self.tracker = tracker
        self.generation = tracker._generation
        self.ends: list[tuple[int, int]] = []
        self.begins: list[tuple[int, int, bool]] = []

    def __call__(self, grad_outputs: Any) -> None:
        tracker = self.tracker
        for call, index in self.ends:
            tracker._post_backward(call, index, grad_outputs)
        for call, index, any_mode in self.begins:
            if any_mode:
                tracker._pre_backward_any(call, index, grad_outputs)
            else:
                tracker._pre_backward(call, index, grad_outputs)


def _handle_alive(handle: Any) -> bool:
    """Whether a hook handle's tensor or autograd node still exists."""
    inner = getattr(handle, "handles", None)  # register_multi_grad_hook's handle
    if inner is not None:
        return any(_handle_alive(h) for h in inner)
    ref = getattr(handle, "hooks_dict_ref", None)
    return ref is None or ref() is not None


class _OneShotHook:
    """A hook on a leaf tensor that removes itself once it has fired.

    A leaf (an input that requires grad, a parameter returned as output) can outlive
    the step: a plain hook would stay on it and fire again, for this old call, in every
    later backward."""

    __slots__ = ("function", "handle")

    def __init__(self, tensor: torch.Tensor, function: Callable[..., None]) -> None:
        self.function = function
        self.handle = tensor.register_hook(self)

    def __call__(self, grad: Any) -> None:
        self.handle.remove()
        self.function(grad)


class _PendingPostBackward:
    """A call whose inputs need no grad: its backward ends when the whole backward does."""

    __slots__ = ("call", "module", "live")

    def __init__(self, call: int, module: int) -> None:
        self.call = call
        self.module = module
        self.live = True


class ModuleTracker:
    """Tracks the ``nn.Module`` hierarchy during forward, backward and recompute.

    ``parents`` is the set of FQNs currently running (always holding ``"Global"``);
    during backward it holds the modules whose backward is running. ``is_bw`` is true
    exactly while autograd runs a backward. FQNs are ``RootClass.child.path``.
    """

    parents: set[str]

    def __init__(self) -> None:
        self.parents = {"Global"}
        self._active_count: dict[str, int] = {}
        self.registry = ModuleRegistry()
        self._names = self.registry.names  # FQN by module index
        self._next_call = 0
        self._fw_stack: list[tuple[int, int, _PendingPostBackward | None]] = []
        self._pending_post_bw: list[_PendingPostBackward] = []
        self._any_mode_task: dict[int, int] = {}  # call -> graph task whose pre_bw fired
        self._backward_callback_queued = False
        self._handles: list[Any] = []
        self._prune_at = 4096  # prune dead handles when this many are held (doubles)
        self._generation = 0  # bumped when hooks are removed: older node records are stale
        self._entered = False
        self._user_pre_fw_hook: Callable[..., Any] | None = None
        self._user_post_fw_hook: Callable[..., Any] | None = None
        self._user_pre_bw_hook: Callable[..., Any] | None = None
        self._user_post_bw_hook: Callable[..., Any] | None = None

    # ----------------------------------------------------------------- public API
    @property
    def is_bw(self) -> bool:
        """True while autograd runs a backward pass."""
        return _graph_task_id() != -1

    def get_known_fqn(self, mod: torch.nn.Module) -> str | None:
        """The FQN of ``mod`` if the tracker has seen it (or its root), else ``None``."""
        return self.registry.known_fqn(mod)

    @property
    def module_names(self) -> list[str]:
        """FQN of every module seen, by module index (the index events carry)."""
        return self._names

    def register_user_hooks(
        self,
        pre_fw_hook: Callable[[torch.nn.Module, Any], None] | None = None,
        post_fw_hook: Callable[[torch.nn.Module, Any, Any], None] | None = None,
        pre_bw_hook: Callable[[torch.nn.Module | None, Any], None] | None = None,
        post_bw_hook: Callable[[torch.nn.Module | None, Any], None] | None = None,
    ) -> None:
        """Hooks called around each module's forward and backward (as ``ModTracker``).

        Backward hooks receive ``None`` for a module deleted before ``backward()``.
        Registering a hook where one is already set raises ``AssertionError``.
        """

        def check(new: Any, current: Any, label: str) -> Any:
            if new is not None and current is not None:
                raise AssertionError(
                    f"Only one {label} can be registered at a time; "
                    "call clear_user_hooks() before registering a new one"
                )
            return new if new is not None else current

        self._user_pre_fw_hook = check(pre_fw_hook, self._user_pre_fw_hook, "pre_fw_hook")
        self._user_post_fw_hook = check(post_fw_hook, self._user_post_fw_hook, "post_fw_hook")
        self._user_pre_bw_hook = check(pre_bw_hook, self._user_pre_bw_hook, "pre_bw_hook")
        self._user_post_bw_hook = check(post_bw_hook, self._user_post_bw_hook, "post_bw_hook")

    # Hooks at submodule boundaries that work under torch.compile (upstream ModTracker's
    # static context manager; see compile_safe_hooks.py). Needs no tracker instance.
    compile_safe_hooks = staticmethod(compile_safe_hooks)

    def clear_user_hooks(self) -> None:
        self._user_pre_fw_hook = None
        self._user_post_fw_hook = None
        self._user_pre_bw_hook = None
        self._user_post_bw_hook = None

    def __enter__(self) -> ModuleTracker:
        if self._entered:
            raise ModTimelineError("this ModuleTracker is already active; it cannot be entered twice")
        self._entered = True
        compile_guard.install(self, self._pre_forward, self._post_forward, post_with_kwargs=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        compile_guard.uninstall(self)
        self.remove_grad_hooks()
        self._fw_stack.clear()
        self._any_mode_task.clear()
        self._active_count.clear()
        self.parents = {"Global"}
        self._entered = False

    def _keep(self, handle: Any) -> None:
        """Hold a hook handle until exit; drop those whose tensor or node has died, so a
        long run never piles them up (amortised: whenever the count doubles)."""
        handles = self._handles
        handles.append(handle)
        if len(handles) >= self._prune_at:
            self._handles = [h for h in handles if _handle_alive(h)]
            self._prune_at = max(4096, 2 * len(self._handles))

    def remove_grad_hooks(self) -> None:
        """Remove every autograd hook registered so far (their backward has run or never will).

        ``Timeline`` calls this between steps so hook handles never pile up over a long run.
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending_post_bw = []
        self._generation += 1

    # ------------------------------------------------------------- module names
    def _node_hook(self, node: Any) -> Any:
        """This tracker's one pre-hook on autograd ``node``, registered on first use; kept
        in the node's ``metadata``, so it lives and dies with the graph."""
        metadata = node.metadata
        hook = metadata.get(self)
        if hook is None or hook.generation != self._generation:
            hook = metadata[self] = self._new_node_hook()
            self._keep(node.register_prehook(hook))
        return hook

    def _new_node_hook(self) -> _GradientReady:
        return _GradientReady(self)

    # -------------------------------------------------------------- forward hooks
    def _pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        index = self.registry.index_of(module)
        call = self._next_call
        self._next_call = call + 1
        in_backward = _graph_task_id() != -1
        self._enter_name(self._names[index])
        if self._user_pre_fw_hook is not None:
            self._user_pre_fw_hook(module, args)
        pending = None
        if not in_backward and _grad_enabled():
            inputs = grad_tensors(args)
            if not inputs:
                # Nothing to hook: its backward ends when the whole backward ends.
                pending = _PendingPostBackward(call, index)
                self._pending_post_bw.append(pending)
            elif len(inputs) == 1:
                node = inputs[0].grad_fn
                if node is not None:
                    self._node_hook(node).ends.append((call, index))
                else:  # a leaf: it has no node, only a tensor hook tells
                    self._keep(_OneShotHook(inputs[0], partial(self._post_backward, call, index)).handle)
            else:
                # Several inputs: wait for all their gradients, as ModTracker does.
                self._keep(register_multi_grad_hook(inputs, partial(self._post_backward, call, index)))
        self._fw_stack.append((call, index, pending))

    def _post_forward(self, module: torch.nn.Module, args: Any, *rest: Any) -> None:
        # (module, args, kwargs, output); torch leaves kwargs out when the forward raised.
        kwargs = rest[0] if len(rest) == 2 else None
        output = rest[-1]
        stack = self._fw_stack
        if not stack:
            return  # the module's forward began before the tracker was entered
        call, index, pending = stack.pop()
        if not self.registry.is_module(index, module):
            # A pre-hook of ours never ran for this module (e.g. another pre-hook raised);
            # put the entry back rather than closing somebody else's span.
            stack.append((call, index, pending))
            return
        in_backward = _graph_task_id() != -1
        if self._user_post_fw_hook is not None:
            self._user_post_fw_hook(module, args, output)
        self._leave_name(self._names[index])
        if in_backward or not _grad_enabled():
            return
        outputs = grad_tensors(output) if output is not None else []
        if not outputs:
            if pending is not None:
                pending.live = False  # no backward will run through this call
            return
        if pending is not None and kwargs:
            # Torch's trackers see positional inputs only: a call made with keyword
            # arguments (`self_attn(hidden_states=...)`) would end with the whole backward.
            inputs = grad_tensors(kwargs)
            if inputs:
                pending.live = False
                if len(inputs) == 1 and inputs[0].grad_fn is not None:
                    self._node_hook(inputs[0].grad_fn).ends.append((call, index))
                else:
                    self._keep(register_multi_grad_hook(inputs, partial(self._post_backward, call, index)))
        any_mode = len(outputs) > 1
        for tensor in outputs:
            node = tensor.grad_fn
            if node is not None:
                self._node_hook(node).begins.append((call, index, any_mode))
            else:  # a leaf returned as output (e.g. a parameter)
                method = self._pre_backward_any if any_mode else self._pre_backward
                self._keep(_OneShotHook(tensor, partial(method, call, index)).handle)

    # ------------------------------------------------------------- backward hooks
    def _pre_backward_any(self, call: int, index: int, *grads: Any) -> None:
        """Like ``_pre_backward``, once per backward however many outputs get gradients."""
        task = _graph_task_id()
        if self._any_mode_task.get(call) == task:
            return
        self._any_mode_task[call] = task
        self._pre_backward(call, index, *grads)

    def _pre_backward(self, call: int, index: int, *grads: Any) -> None:
        if not self._entered:
            return
        if not self._backward_callback_queued:
            self._backward_callback_queued = True
            _queue_engine_callback(self._backward_finished)
        self._enter_name(self._names[index])
        if self._user_pre_bw_hook is not None:
            self._user_pre_bw_hook(self.registry.module(index), grads)

    def _post_backward(self, call: int, index: int, *grads: Any) -> None:
        if not self._entered:
            return
        if self._user_post_bw_hook is not None:
            self._user_post_bw_hook(self.registry.module(index), grads)
        self._leave_name(self._names[index])

    def _backward_finished(self) -> None:
        """Engine callback at the end of a backward: close what no gradient hook closed."""
        pending, self._pending_post_bw = self._pending_post_bw, []
        for entry in reversed(pending):
            if entry.live:
                self._post_backward(entry.call, entry.module)
        self._any_mode_task.clear()
        self._active_count.clear()
        self.parents = {"Global"}
        self._backward_callback_queued = False

    # ------------------------------------------------------------------ parents
    def _enter_name(self, name: str) -> None:
        count = self._active_count.get(name, 0)
        if count == 0:
            self.parents.add(name)
        self._active_count[name] = count + 1

    def _leave_name(self, name: str) -> None:
        count = self._active_count.get(name, 0)
        if count <= 1:
            self._active_count.pop(name, None)
            self.parents.discard(name)
        else:
            self._active_count[name] = count - 1
