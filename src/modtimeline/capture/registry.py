"""Which module is which: fully qualified names and the small integer index events carry.

A module is named once per process, from the first root module it was seen under
(``RootClass.child.path``), and keeps that name: walking a model's tree to name it
(~4 µs per module) happens once, not once per tracker or Timeline. Weak references
throughout: naming a model never keeps it alive.
"""

from __future__ import annotations

import re
import sys
import weakref
from types import FrameType

import torch

from ..errors import ModTimelineError
from . import compile_guard
from .buffer import MAX_MODULES

__all__ = ["ModuleRegistry", "fqn_of", "is_compiler_graph"]


class _Named:
    """What the process knows of one module: its FQN, its root, a weak reference to it."""

    __slots__ = ("ref", "fqn", "root", "is_compiled_wrapper")

    def __init__(self, module: torch.nn.Module, fqn: str, root: weakref.ref[torch.nn.Module] | None) -> None:
        key = id(module)
        self.ref: weakref.ref[torch.nn.Module] = weakref.ref(module, lambda ref: _forget(key, ref))
        self.fqn = fqn
        self.root = root if root is not None else self.ref
        # (a torch.compile wrapper: its call is the compiled region. A module compiled in
        # place is compile_guard's to know: _name_tree shims it before naming it.)
        self.is_compiled_wrapper = _class_name(module) in _NAMELESS_WRAPPERS


# Every module named so far, for the whole process, by id(). (Not a WeakKeyDictionary:
# its lookup makes a weak reference per call, ~1 µs, and a Timeline looks up every
# module of the model once more.)
_NAMED: dict[int, _Named] = {}


def _forget(key: int, ref: weakref.ref[torch.nn.Module]) -> None:
    """A named module died: drop its entry, unless its address was reused by a module
    named since (then the entry is the new module's)."""
    entry = _NAMED.get(key)
    if entry is not None and entry.ref is ref:
        del _NAMED[key]


def _named(module: torch.nn.Module) -> _Named | None:
    entry = _NAMED.get(id(module))
    return entry if entry is not None and entry.ref() is module else None


def named(module: torch.nn.Module) -> _Named:
    """What the process knows of ``module``, naming it (and the tree under it) on first
    sight. An unnamed module is named, in this order of preference: under the module whose
    code calls it and holds it (``_calling_parent``); by the global name a model's code
    calls it by (``_global_name``); else as a root, by the class of the model it stands
    for (a wrapper by the model it wraps)."""
    entry = _named(module)
    if entry is None:
        callers = _callers(sys._getframe(1))
        caller = _calling_parent(module, callers)
        if caller is not None:
            # Added to a model after it was named (a head swapped in, a LoRA wrapper), a
            # model whose call began before recording, or a module a model keeps out of
            # its children: named under the parent calling it.
            parent, child_name = caller
            parent_entry = named(parent)
            entry = _named(module)  # (naming an unnamed parent named its children too)
            if entry is None:
                _name_tree(module, f"{parent_entry.fqn}.{child_name}", parent_entry.root)
                entry = _NAMED[id(module)]
            return entry
        _name_tree(module, _global_name(module, callers) or _class_name(_unwrapped(module)), None)
        entry = _NAMED[id(module)]
    return entry


_PARENT_FRAMES_SEARCHED = 24
# The attributes every module has from nn.Module (its children, parameters, buffers,
# hooks): what torch keeps for it, never a module its code calls.
_TORCH_ATTRIBUTES = frozenset(vars(torch.nn.Module()))
_CONTAINER_ITEMS_SEARCHED = 64


# One frame above a module's first call: its code's globals, and its ``self`` if a module.
_Caller = tuple[dict[str, object], torch.nn.Module | None]


def _callers(frame: FrameType | None) -> list[_Caller]:
    """The frames from ``frame`` up (at most _PARENT_FRAMES_SEARCHED): where a module's
    first call came from, read once for both ways of naming it from there."""
    callers: list[_Caller] = []
    while frame is not None and len(callers) < _PARENT_FRAMES_SEARCHED:
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        callers.append((frame.f_globals, owner if isinstance(owner, torch.nn.Module) else None))
        frame = frame.f_back
    return callers


def _calling_parent(module: torch.nn.Module, callers: list[_Caller]) -> tuple[torch.nn.Module, str] | None:
    """(parent, the name it holds ``module`` by) of a module whose code is calling
    ``module`` (a caller whose ``self`` holds it), if any; a wrapper (DDP,
    torch.compile's) is not one: it names its model itself. Looked for once per module,
    on first sight."""
    searched: set[int] = set()  # (a module's call has three frames of its own: searched once)
    for _, owner in callers:
        if owner is not None and owner is not module and id(owner) not in searched:
            searched.add(id(owner))
            # (copies taken in one C call: another thread may change a dict while it is searched)
            name = next((name for name, child in tuple(owner._modules.items()) if child is module), None)
            if name is not None:
                return None if _class_name(owner) in _WRAPPER_CHILDREN else (owner, name)
            # (an owner named already: one being named would be named under its own part
            # when that part keeps a reference back to it)
            name = _attribute_holding(owner, module) if _named(owner) is not None else None
            if name is not None:
                return owner, name
    return None


def _attribute_holding(owner: torch.nn.Module, module: torch.nn.Module) -> str | None:
    """The name ``owner`` holds ``module`` by outside its children, if it does: a plain
    attribute (``attr``, set past ``nn.Module.__setattr__`` to keep a teacher model's
    parameters out), or an item of a dict, list or tuple attribute (``attr.key``: the
    `kernels` package, a dependency of transformers, gives each attention layer its own
    module for apply_rotary_pos_emb in ``_kernel_funcs``). Only keys that read as names
    (str, int) make one: not a dtype's, a module's or an object's repr."""
    for attribute, value in tuple(vars(owner).items()):
        if attribute in _TORCH_ATTRIBUTES or type(attribute) is not str:
            continue
        if value is module:
            return attribute
        kind = type(value)
        if kind is dict and len(value) <= _CONTAINER_ITEMS_SEARCHED:
            key = next((key for key, item in tuple(value.items()) if item is module), None)
            if type(key) is str or type(key) is int:
                return f"{attribute}.{key}"
        elif (kind is list or kind is tuple) and len(value) <= _CONTAINER_ITEMS_SEARCHED:
            index = next((index for index, item in enumerate(tuple(value)) if item is module), None)
            if index is not None:
                return f"{attribute}.{index}"
    return None


# Globals that name no module a user wrote: IPython's output cache (`_`, `__`, `___`,
# `_12`), which holds whatever a notebook cell showed last.
_NOT_A_NAME = re.compile(r"_+|_\d+")
# Packages whose globals hold no singleton of a model's code (searching torch's module.py,
# the frame that calls every module, would cost more than the rest of the search).
_PACKAGES_SKIPPED = ("torch.", "modtimeline.")


def _global_name(module: torch.nn.Module, callers: list[_Caller]) -> str | None:
    """The global name a model's code calls ``module`` by, if a model's code calls it and
    no model holds it: a module-level singleton, such as the one the `kernels` package
    (a dependency of transformers) makes of a function: transformers' Llama calls the
    ``Func`` module ``apply_rotary_pos_emb`` from each attention layer. Named by its class,
    all such modules would read ``Func``. (Not under the first of its callers, as a module
    held by several is named: a global is held by none.) Looked for once per module, on
    first sight, in the globals of the code between the call and the nearest module's."""
    found: str | None = None
    searched: set[int] = set()
    for namespace, owner in callers:
        if found is None and id(namespace) not in searched:
            searched.add(id(namespace))
            if not str(namespace.get("__name__", "")).startswith(_PACKAGES_SKIPPED):
                found = next((name for name, value in tuple(namespace.items())
                              if value is module and type(name) is str and not _NOT_A_NAME.fullmatch(name)), None)
        if owner is not None and owner is not module:
            return found  # (the code of the model calling it, or a helper it called, names it)
    return None


def fqn_of(module: torch.nn.Module) -> tuple[str, weakref.ref[torch.nn.Module]]:
    """(FQN, root) of ``module``, naming it on first sight (see ``named``)."""
    entry = named(module)
    return entry.fqn, entry.root


# Wrappers whose child holds the user's model under a name the user never wrote: the
# model keeps the names the user knows (`Net.blocks.0.fc1`, not
# `DistributedDataParallel.module.blocks.0.fc1`), so a trace of a wrapped run lines up
# with one of the plain model. The wrapper's own call (DDP and FSDP do work of their
# own there) is named `<model's name> (<wrapper class>)`.
_WRAPPER_CHILDREN = {
    "OptimizedModule": "_orig_mod",  # torch.compile
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "FullyShardedDataParallel": "_fsdp_wrapped_module",  # FSDP1
    "CheckpointWrapper": "_checkpoint_wrapped_module",
    "OffloadWrapper": "_checkpoint_wrapped_module",
}
# torch.compile's wrapper runs no code of its own a hook can see (the model's call is
# inlined into the compiled graph): it simply takes the model's name.
_NAMELESS_WRAPPERS = {"OptimizedModule"}


def _class_name(module: torch.nn.Module) -> str:
    """The class name a user wrote: FSDP2's ``fully_shard`` swaps a module's class for a
    generated subclass ``FSDP<Class>``; the name is the class it was made from."""
    cls = type(module)
    name = cls.__name__
    if name.startswith("FSDP") and any(base.__name__ == name[4:] for base in cls.__bases__):
        return name[4:]
    return name


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    child = _WRAPPER_CHILDREN.get(_class_name(module))
    inner = getattr(module, child, None) if child else None
    return _unwrapped(inner) if isinstance(inner, torch.nn.Module) else module


# Where torch.compile's graphs are called from (the frames above a graph's call).
_COMPILER_PACKAGES = ("torch._dynamo.", "torch._functorch.", "torch._inductor.")
_FRAMES_SEARCHED = 64
_COMPILED_AUTOGRAD_GRAPH = re.compile(r"CompiledAutograd\d+")
_GRAPH_WRAPPER = "GmWrapper"  # torch._dynamo.utils's module around a graph it flattened the inputs of


def is_compiler_graph(module: torch.nn.Module) -> bool:
    """A graph torch.compile made and runs: aot_eager's forward and backward graphs,
    compiled autograd's backward graph (``CompiledAutograd0``, itself run compiled),
    Dynamo's graphs (named after the compiled function, ``<lambda>``), and Dynamo's
    ``GmWrapper`` around a graph of nested inputs (torch 2.11 runs compiled autograd's
    graph in one). That is an
    ``fx.GraphModule`` that belongs to no model and is called from torch's compiler; its
    work is the compiled module's (recorded under the user's name) or the backward's. A
    user's own fx-traced model is called from the user's code: recorded as any model.
    (The compiled hot path asks once per module and keeps the answer.)"""
    if type(module).__name__ == _GRAPH_WRAPPER and type(module).__module__ == "torch._dynamo.utils":
        return True  # (torch <= 2.11 wraps a graph of nested inputs, compiled autograd's, in one)
    fx = sys.modules.get("torch.fx")
    graph = _unwrapped(module)  # (compiled autograd runs its graph torch.compile'd)
    if fx is None or not isinstance(graph, fx.GraphModule):
        return False
    entry = _named(module)
    if entry is not None and entry.root is not entry.ref:
        return False  # a part of a model (named under its root)
    if _COMPILED_AUTOGRAD_GRAPH.fullmatch(type(graph).__name__):
        return True  # (called by autograd's engine: no compiler frame above it)
    frame: FrameType | None = sys._getframe(1)
    for _ in range(_FRAMES_SEARCHED):
        if frame is None:
            break
        if str(frame.f_globals.get("__name__", "")).startswith(_COMPILER_PACKAGES):
            return True
        frame = frame.f_back
    return False


def known_fqn(module: torch.nn.Module) -> tuple[str, weakref.ref[torch.nn.Module]] | None:
    """(FQN, root) if ``module`` was named already, else None (names nothing)."""
    entry = _named(module)
    return None if entry is None else (entry.fqn, entry.root)


def _name_tree(module: torch.nn.Module, name: str, root: weakref.ref[torch.nn.Module] | None) -> None:
    """Name ``module`` and the unnamed modules under it; ``root``: None for the root.
    Wrappers are known by the class the user wrote (FSDP2 makes ``FSDPCheckpointWrapper``
    of ``fully_shard(checkpoint_wrapper(block))``)."""
    compile_guard.shim(module)  # (compiled in place before modtimeline was imported: its boundary now)
    wrapper = _class_name(module)
    wrapped = _WRAPPER_CHILDREN.get(wrapper)
    if wrapped is not None and isinstance(getattr(module, wrapped, None), torch.nn.Module):
        fqn = name if wrapper in _NAMELESS_WRAPPERS else f"{name} ({wrapper})"
    else:
        wrapped = None
        fqn = name
    entry = _NAMED[id(module)] = _Named(module, fqn, root)
    for child_name, child in module.named_children():
        if _named(child) is None:
            _name_tree(child, name if child_name == wrapped else f"{name}.{child_name}", entry.root)


class ModuleRegistry:
    """The modules one tracker or recorder has seen, by index (the index events carry).

    ``index_of`` is on every forward hook's path: one dict lookup and one weak-reference
    check (an address can be reused by a new module once the old one died)."""

    __slots__ = ("names", "_refs", "_index_by_id", "roots", "compiled")

    def __init__(self) -> None:
        self.names: list[str] = []  # FQN by index
        self._refs: list[weakref.ref[torch.nn.Module]] = []
        self._index_by_id: dict[int, int] = {}
        self.roots: set[int] = set()  # ids of the root modules seen
        self.compiled: set[int] = set()  # indices of torch.compile wrappers (OptimizedModule)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def refs(self) -> list[weakref.ref[torch.nn.Module]]:
        """A weak reference to each module, by index."""
        return self._refs

    def continued(self) -> ModuleRegistry:
        """A new registry that knows this one's modules by the same indices, for the next
        recorder (a Timeline made per step would otherwise learn every module again); an
        empty one once most of them died, so the indices never pile up over models."""
        successor = ModuleRegistry()
        dead = list(map(weakref.ref.__call__, self._refs)).count(None)  # (no Python frame per module)
        if dead * 2 <= len(self._refs):
            successor.names = self.names.copy()
            successor._refs = self._refs.copy()
            successor._index_by_id = self._index_by_id.copy()
            successor.roots = self.roots.copy()
            successor.compiled = self.compiled.copy()
        return successor

    def lookup(self, module: torch.nn.Module) -> int | None:
        """The index of ``module`` if it has one, else None."""
        index = self._index_by_id.get(id(module))
        if index is not None and self._refs[index]() is module:
            return index
        return None

    def index_of(self, module: torch.nn.Module) -> int:
        """The index of ``module``, learning it on first sight."""
        index = self._index_by_id.get(id(module))
        if index is None or self._refs[index]() is not module:
            index = self.learn(module)
        return index

    def learn(self, module: torch.nn.Module) -> int:
        index = self.lookup(module)
        if index is not None:
            return index
        if len(self.names) >= MAX_MODULES:
            raise ModTimelineError(f"more than {MAX_MODULES:,} distinct modules; modtimeline cannot track them")
        entry = named(module)
        if entry.root is entry.ref:  # (a root's entry holds one reference as both)
            self.roots.add(id(module))
        index = len(self.names)
        if entry.is_compiled_wrapper:
            self.compiled.add(index)
        self.names.append(entry.fqn)
        self._refs.append(entry.ref)
        self._index_by_id[id(module)] = index
        return index

    def compiled_indices(self) -> set[int]:
        """The indices of the modules whose calls are compiled regions: torch.compile
        wrappers, and modules compiled in place (also those compiled after they were
        learnt, by ``Module.compile``). Per write: the modules compiled, not all known."""
        found = set(self.compiled)
        for module in compile_guard.modules_compiled_in_place():
            index = self._index_by_id.get(id(module))
            if index is not None and self._refs[index]() is module:
                found.add(index)
        return found

    def module(self, index: int) -> torch.nn.Module | None:
        """The module at ``index``, or None once it has been deleted."""
        return self._refs[index]()

    def is_module(self, index: int, module: torch.nn.Module) -> bool:
        return self._refs[index]() is module

    def known_fqn(self, module: torch.nn.Module) -> str | None:
        """The FQN of ``module`` if it, or the root it was named under, was seen here."""
        index = self.lookup(module)
        if index is not None:
            return self.names[index]
        entry = known_fqn(module)
        if entry is not None:
            root = entry[1]()
            if root is not None and id(root) in self.roots and self.lookup(root) is not None:
                return entry[0]
        return None
