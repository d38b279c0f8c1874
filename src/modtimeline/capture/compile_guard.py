"""Global module hooks that ``torch.compile`` neither sees nor compiles again for.

Dynamo traces ``nn.Module.__call__`` and, with it, every global forward hook. Traced,
our hooks would either break the graph (a compiled hook is a C function Dynamo cannot
trace) or fail (Dynamo tracing the module registry's dictionaries). So the hooks torch
calls are two functions of this module that first ask whether torch is compiling
(``is_dynamo_compiling()``, then the flag AOT and export tracing set): while Dynamo traces,
that is a constant True and they return at once, leaving nothing in the graph; when the
compiled code (or eager code) runs, it is False and they call the hooks of every recorder
and tracker now active.

Where the compiled hot path is built (and torch >= 2.12), torch calls two C functions
instead (``_hotpath.dispatch_pre``/``dispatch_post``), which ask the same and call the
same hooks without the two Python frames of a call each; inside a compiled function, where
Dynamo converts the Python ones' frames to nothing, they do nothing (they ask Dynamo's
frame callback, ``torch._C``). Dynamo cannot trace C: it is given Python stand-ins that do
nothing (``torch.compiler.substitute_in_graph``, one registry for every thread) as soon
as it is imported, before anything can be traced (``_DynamoWatch``: the first
``torch.compile`` may import it after our hooks went in); should it refuse them, the Python
functions take the C ones' place.

While the compiled dispatchers serve a recorder, ``nn.Module._call_impl`` is ours too
(``_module_call_impl``, below): what any global hook costs each module call in torch's
``_call_impl`` was more than the rest of our work, and the hot path's ``module_call``
skips it wherever the outcome is torch's own. Dynamo traces torch's ``_call_impl`` in its
place, and skips it as a frame of its own, as it skips torch's.

Dynamo also *guards* on torch's global hook dictionaries: their keys and the hooks in
them. A hook registered the usual way gets a new key each time (torch's handles count up
from 0), so every Timeline that starts (or every scheduled window) would make each
compiled model compile again at its next call, and after eight times run it eagerly.
Ours always sit under the same keys, as the same functions: a model compiled with them
in place runs the same graph in every Timeline, and one compiled without them the same
graph between Timelines.

A module compiled *in place* (``model.compile()``, ``block.compile()``) is another case:
``Module.__call__`` then calls ``module._compiled_call_impl``, ``torch.compile(module.
_call_impl)``, so the hook dispatch itself is inside the compiled frame and nothing is
left for the global hooks to see at run time. ``EagerBoundary`` gives such a module the
eager boundary a ``torch.compile(module)`` wrapper (``OptimizedModule``) has: it replaces
``_compiled_call_impl`` and runs the hooks installed here around the compiled call (one
forward span, flagged compiled, whose backward is the compiled backward). Modules get it
when compiled after modtimeline is imported (``nn.Module.compile`` is wrapped, once),
or when the registry names a model holding one compiled earlier (``shim``). Should Dynamo
run ``_call_impl`` eagerly after all (a skipped frame, ``torch._dynamo.config.disable``,
the recompile limit), the global hooks fire for the same call too: they skip a module
whose boundary is open on this thread, so a call is recorded once.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch.nn.modules import module as _torch_module
from torch.torch_version import TorchVersion

__all__ = ["install", "uninstall", "put_traced", "take_traced", "EagerBoundary", "shim", "compiled_in_place"]

_is_compiling = torch.compiler.is_compiling
# The hooks below run on every module call, so the check is split in two cheap halves:
# Dynamo folds is_dynamo_compiling() to True while it traces (it never reads the rest),
# and in eager code it is one call returning False; the flag is what is_compiling() reads
# outside Dynamo (AOT and export tracing set it), without its is_scripting() call.
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling
_compiler = torch.compiler

# Our keys in torch's global hook dictionaries. Negative: torch's own handles count up
# from 0, so no hook registered through torch's API ever takes one. Under 2**30 in size
# (as the other modules' keys): torch hashes each global hook's key about six times per
# module call, and such an int hashes without a loop.
_KEY = -0x6D_7401
_KEY_WITH_KWARGS = -0x6D_7402

PreHook = Callable[[torch.nn.Module, Any], Any]
PostHook = Callable[..., Any]

# (re-entrant: _dynamo_loaded takes it inside an import, which nothing holding it should
# start, but a re-entered lock must not hang a training run)
_lock = threading.RLock()
_owners: dict[int, tuple[PreHook, PostHook, bool]] = {}  # id(owner) -> (pre, post, post takes kwargs)
# What the two functions below call, rebuilt when an owner comes or goes (a tuple: the
# hot path iterates it without a lock).
_pre_hooks: tuple[PreHook, ...] = ()
_post_hooks: tuple[PostHook, ...] = ()
_post_hooks_with_kwargs: tuple[PostHook, ...] = ()


def _pre_forward(module: torch.nn.Module, args: Any) -> None:
    if _is_dynamo_compiling() or _compiler._is_compiling_flag or (_open_boundaries[0] and _boundary_is_open(module)):
        return None
    for hook in _pre_hooks:
        hook(module, args)
    return None


def _post_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
    if _is_dynamo_compiling() or _compiler._is_compiling_flag or (_open_boundaries[0] and _boundary_is_open(module)):
        return None
    for hook in _post_hooks:
        hook(module, args, output)
    return None


def _post_forward_with_kwargs(module: torch.nn.Module, args: Any, *rest: Any) -> None:
    # (kwargs, output); torch leaves kwargs out when it calls it for a forward that raised
    if _is_dynamo_compiling() or _compiler._is_compiling_flag or (_open_boundaries[0] and _boundary_is_open(module)):
        return None
    for hook in _post_hooks_with_kwargs:
        hook(module, args, *rest)
    return None


# ------------------------------------------------------------ in-place compiled modules
# How many EagerBoundary calls are open (all threads): the hooks above look further only
# when some are (one read on every module call otherwise). In a list: the compiled
# dispatchers read it too.
_open_boundaries = [0]
_thread = threading.local()  # .open: ids of the modules whose boundary is open on this thread


def _open_here() -> set[int]:
    opened: set[int] | None = getattr(_thread, "open", None)
    if opened is None:
        opened = _thread.open = set()
    return opened


def _boundary_is_open(module: torch.nn.Module) -> bool:
    opened: set[int] | None = getattr(_thread, "open", None)
    return opened is not None and id(module) in opened


class EagerBoundary:
    """``module._compiled_call_impl`` of a module compiled in place: the compiled call
    between the hooks installed here, as ``Module._call_impl`` runs them around
    ``forward`` (``post`` also when it raised, with no output, as torch's always-called
    hooks). With no hook installed, or traced by an outer compile: the compiled call alone."""

    __slots__ = ("module", "compiled", "__weakref__")

    def __init__(self, module: torch.nn.Module, compiled: Any) -> None:
        self.module = weakref.ref(module)
        self.compiled = compiled  # (torch.compile(module._call_impl): compiled_detail reads its backend)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # (is_compiling first: traced by an outer compile, nothing else is read, so Dynamo
        # guards on none of our state)
        if _is_compiling() or not _owners:
            return self.compiled(*args, **kwargs)
        module = self.module()
        if module is None:
            return self.compiled(*args, **kwargs)
        opened = _open_here()
        key = id(module)
        if key in opened:  # (re-entered: the outer call is the one recorded)
            return self.compiled(*args, **kwargs)
        pres, posts, posts_with_kwargs = _pre_hooks, _post_hooks, _post_hooks_with_kwargs
        for hook in pres:
            hook(module, args)
        opened.add(key)
        with _lock:
            _open_boundaries[0] += 1
        output = None
        try:
            output = self.compiled(*args, **kwargs)
        finally:
            opened.discard(key)
            with _lock:
                _open_boundaries[0] -= 1
            for post in posts:
                post(module, args, output)
            for post in posts_with_kwargs:
                if output is None:
                    post(module, args)
                else:
                    post(module, args, kwargs, output)
        return output


def compiled_in_place(module: torch.nn.Module) -> Any:
    """What ``module.compile()`` made (``torch.compile(module._call_impl)``), or None."""
    compiled = module.__dict__.get("_compiled_call_impl")
    return compiled.compiled if isinstance(compiled, EagerBoundary) else compiled


# The modules this process saw compiled in place (by ``Module.compile`` since import, or
# found so when named): a trace flags their calls as compiled regions without looking
# at every module it knows at every write.
_compiled_modules: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def shim(module: torch.nn.Module) -> bool:
    """Put the eager boundary on ``module`` if it is compiled in place; True if it is.
    (Dynamo caches by ``_call_impl``'s code, not by this attribute: a module that already
    ran compiled compiles nothing again.)"""
    compiled = module.__dict__.get("_compiled_call_impl")
    if compiled is None:
        return False
    if not isinstance(compiled, EagerBoundary):
        module._compiled_call_impl = EagerBoundary(module, compiled)
    _compiled_modules.add(module)
    return True


def modules_compiled_in_place() -> list[torch.nn.Module]:
    """The live modules seen compiled in place: by ``Module.compile`` since modtimeline
    was imported, or compiled before and met since (``shim``)."""
    return list(_compiled_modules)


_torch_compile_method = torch.nn.Module.compile


def _compile_in_place(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
    _torch_compile_method(self, *args, **kwargs)
    shim(self)


_compile_in_place.__doc__ = _torch_compile_method.__doc__
_compile_in_place.__wrapped__ = _torch_compile_method  # type: ignore[attr-defined]
if getattr(torch.nn.Module.compile, "__wrapped__", None) is None:  # (once per process)
    torch.nn.Module.compile = _compile_in_place  # type: ignore[method-assign]


def install(owner: object, pre: PreHook, post: PostHook, *, post_with_kwargs: bool = False) -> None:
    """Call ``pre(module, args)`` before and ``post(module, args, [kwargs,] output)`` after
    every module's forward (also when it raised: then ``output`` is None, and torch
    passes no kwargs even to a ``post_with_kwargs`` hook), outside compilation, until
    ``uninstall(owner)``."""
    with _lock:
        _owners[id(owner)] = (pre, post, post_with_kwargs)
        _rebuild()


def uninstall(owner: object) -> None:
    with _lock:
        if _owners.pop(id(owner), None) is not None:  # (a second uninstall has nothing to rebuild)
            _rebuild()


def _rebuild() -> None:
    global _pre_hooks, _post_hooks, _post_hooks_with_kwargs
    hooks = list(_owners.values())
    _pre_hooks = tuple(pre for pre, _, _ in hooks)
    _post_hooks = tuple(post for _, post, kwargs in hooks if not kwargs)
    _post_hooks_with_kwargs = tuple(post for _, post, kwargs in hooks if kwargs)
    pre: PreHook = _pre_forward
    post: PostHook = _post_forward
    dispatcher = _compiled_dispatcher()
    fast_calls = dispatcher is not None and bool(_pre_hooks) and bool(_post_hooks)
    if dispatcher is not None:
        dispatcher.configure_dispatch(_pre_hooks, _post_hooks, vars(_compiler), _open_boundaries, _boundary_is_open,
                                      _dynamo_callback)
        dispatcher.configure_module_call(
            fast_calls, _torch_call_impl, _torch_module._global_forward_pre_hooks,
            _torch_module._global_forward_hooks, _torch_module._global_backward_pre_hooks,
            _torch_module._global_backward_hooks, torch._C._get_tracing_state)
        pre, post = dispatcher.dispatch_pre, dispatcher.dispatch_post
    _place(_KEY, pre if _pre_hooks else None, post if _post_hooks else None, False)
    _place(_KEY_WITH_KWARGS, None, _post_forward_with_kwargs if _post_hooks_with_kwargs else None, True)
    _place_module_call(dispatcher if fast_calls else None)


# ------------------------------------------------------------------- module calls
# While our hooks are on and the compiled dispatchers serve them, nn.Module._call_impl is
# _module_call_impl: the hot path's module_call runs a module's forward between our hooks
# as torch's _call_impl would, without its slow path (what any global hook costs every
# module call: ~2 µs, more than the rest of our work), wherever the outcome is the same
# (our hooks are the only ones, the module has none of its own, nothing traces); anything
# else goes to torch's own _call_impl. Dynamo, which inlines _call_impl (a Python function
# here too), traces torch's own in module_call's place (_traced_module_call, given with the
# dispatchers' stand-ins). Put back when our hooks go, so that Dynamo's shortcuts see
# torch's own again; left alone if somebody else replaced torch's. (_call_impl, not
# __call__: setting a dunder on nn.Module updates a slot of each of its hundreds of
# subclasses, ~0.1 ms; this is one attribute.)
_torch_call_impl = torch.nn.Module._call_impl
_call_module: Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any]], Any] = (
    lambda module, args, kwargs: _torch_call_impl(module, *args, **kwargs))


def _module_call_impl(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    return _call_module(self, args, kwargs)


def _traced_module_call(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What Dynamo traces where ``_module_call_impl`` calls the compiled ``module_call``:
    torch's own ``Module._call_impl``."""
    return _torch_call_impl(module, *args, **kwargs)


def _place_module_call(dispatcher: ModuleType | None) -> None:
    """``Module._call_impl`` is ``_module_call_impl`` (given the hot path) or torch's own (None)."""
    global _call_module
    current = torch.nn.Module.__dict__.get("_call_impl")
    if dispatcher is not None:
        _call_module = dispatcher.module_call
        if current is _torch_call_impl:
            torch.nn.Module._call_impl = _module_call_impl  # type: ignore[method-assign]
    elif current is _module_call_impl:
        torch.nn.Module._call_impl = _torch_call_impl  # type: ignore[method-assign]


# ------------------------------------------------------- the compiled dispatchers
# Which functions torch calls is decided once per process, when the first hooks go in (a
# MODTIMELINE_PURE_PYTHON set later changes the recorder, not this), and changes at most
# once after: Dynamo loads and will not take their stand-ins (nothing was traced yet).
_dispatcher: ModuleType | None = None  # the hot path module whose dispatchers torch calls
_dispatcher_decided = False
_dynamo_told = False  # Dynamo traces _traced_pre/_traced_post in place of the dispatchers
_DYNAMO = "torch._dynamo"
_dynamo_callback: Callable[[], Any] | None
try:  # Dynamo's frame callback on this thread (in torch._C: nothing of Dynamo is imported)
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _dynamo_callback
except ImportError:
    _dynamo_callback = None


def _traced_pre(module: torch.nn.Module, args: Any) -> None:
    """What Dynamo traces where torch calls ``dispatch_pre``: nothing."""
    return None


def _traced_post(module: torch.nn.Module, args: Any, output: Any) -> None:
    """What Dynamo traces where torch calls ``dispatch_post``: nothing."""
    return None


def _compiled_dispatcher() -> ModuleType | None:
    """The hot path module whose ``dispatch_pre``/``dispatch_post`` torch calls as our
    hooks, or None: our Python functions (the hot path is not built, this torch is older
    than the one they are tested with, or Dynamo would not take their stand-ins). The
    caller holds ``_lock``."""
    global _dispatcher, _dispatcher_decided
    if not _dispatcher_decided:
        _dispatcher_decided = True
        from .recorder import native_hotpath  # (recorder imports this module)

        hotpath = native_hotpath()
        if hotpath is not None and _dynamo_callback is not None and TorchVersion(torch.__version__) >= "2.12":
            _dispatcher = hotpath
            if _DYNAMO not in sys.modules:
                sys.meta_path.insert(0, _DynamoWatch())
    # (here too: a Dynamo the watch missed is told at the next install; if it will not take
    # the stand-ins, the caller places our Python functions)
    if _dispatcher is not None and not _dynamo_told and _DYNAMO in sys.modules and not _tell_dynamo(_dispatcher):
        _dispatcher = None
    return _dispatcher


def _tell_dynamo(hotpath: ModuleType) -> bool:
    """Have Dynamo trace the Python no-ops above wherever torch calls the compiled
    dispatchers (``torch.compiler.substitute_in_graph``: one registry for the process, every
    thread), so no graph holds them or breaks at them; False: it will not."""
    global _dynamo_told
    try:
        torch.compiler.substitute_in_graph(hotpath.dispatch_pre, skip_signature_check=True)(_traced_pre)
        torch.compiler.substitute_in_graph(hotpath.dispatch_post, skip_signature_check=True)(_traced_post)
        torch.compiler.substitute_in_graph(hotpath.module_call, skip_signature_check=True)(_traced_module_call)
        # Run as a frame of its own (torch.compile(module) calls the module's __call__ with
        # Dynamo on), _module_call_impl is skipped as torch's _call_impl is (torch.nn is
        # inlined only when called from traced code): the first frame Dynamo compiles is
        # the forward, with or without our hooks on, so a model compiled before a Timeline
        # is not compiled again in it. Inlined, it is traced as before.
        from torch._dynamo.eval_frame import skip_code

        skip_code(_module_call_impl.__code__)
    except Exception:  # (an older or newer Dynamo; registered twice: a reloaded extension)
        return False
    _dynamo_told = True
    return True


def _dynamo_loaded() -> None:
    """Dynamo has just been imported: tell it, or put our Python functions in."""
    with _lock:
        if _dispatcher is None or _dynamo_told:
            return
        told = False
        try:
            told = _tell_dynamo(_dispatcher)
        finally:
            if not told:
                _fall_back_to_python()


class _DynamoWatch(importlib.abc.MetaPathFinder):
    """Calls ``_dynamo_loaded`` as soon as ``torch._dynamo`` has been imported (nothing can
    be traced before): finds the package as the other finders do, then has it loaded
    through ``_ThenLoader``. A loader it cannot wrap: our Python functions at once."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _DYNAMO:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenLoader(spec.loader, self)
                else:
                    _fall_back_to_python()
                return spec
        return None


def _fall_back_to_python() -> None:
    """Our Python functions in the compiled ones' place, from now on (Dynamo has traced
    nothing with them yet)."""
    global _dispatcher
    with _lock:
        if _dispatcher is not None and not _dynamo_told:
            _dispatcher = None
            _rebuild()


class _ThenLoader(importlib.abc.Loader):
    """Runs the module with the loader found for it (and gives the module that loader
    back), then calls ``_dynamo_loaded``, whose failure never fails the user's import. An
    import that fails puts the watch back."""

    def __init__(self, loader: Any, watch: _DynamoWatch) -> None:
        self.loader = loader
        self.watch = watch

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # type: ignore[union-attr]
        try:
            self.loader.exec_module(module)
        except BaseException:
            sys.meta_path.insert(0, self.watch)
            raise
        try:
            _dynamo_loaded()
        except Exception:
            _fall_back_to_python()

    def __getattr__(self, name: str) -> Any:  # (get_source, is_package, ...: the loader's own)
        return getattr(self.loader, name)


def _place(key: int, pre: PreHook | None, post: PostHook | None, with_kwargs: bool) -> None:
    """Put (or, given None, take away) hooks under ``key`` in torch's dictionaries."""
    pres, posts = _torch_module._global_forward_pre_hooks, _torch_module._global_forward_hooks
    if pre is None:
        pres.pop(key, None)
    elif pres.get(key) is not pre:
        pres[key] = pre
    if post is None:
        posts.pop(key, None)
        _torch_module._global_forward_hooks_always_called.pop(key, None)
        _torch_module._global_forward_hooks_with_kwargs.pop(key, None)
    elif posts.get(key) is not post:
        posts[key] = post
        _torch_module._global_forward_hooks_always_called[key] = True
        if with_kwargs:
            _torch_module._global_forward_hooks_with_kwargs[key] = True


def put_traced(key: int, pre: PreHook, post: PostHook) -> None:
    """Hooks that Dynamo *should* trace (compiled_detail.py), under a fixed key of their
    own, for the same reason as above. ``post`` takes (module, args, output)."""
    with _lock:
        _place(key, pre, post, False)


def take_traced(key: int) -> None:
    with _lock:
        _place(key, None, None, False)
