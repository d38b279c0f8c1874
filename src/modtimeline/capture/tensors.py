"""Find the tensors that carry gradient in a module's inputs or outputs.

Modules take and return tensors as positional and keyword arguments, nested in tuples,
lists, dicts, dataclasses and ``ModelOutput``-style mappings; a tracker that looks only
at a top-level positional tensor misses most of a transformer's calls
(``self_attn(hidden_states=...)``). The walk is bounded in depth and in the objects it
visits: an input that holds a huge or cyclic structure is cut short, never followed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["autograd_node", "grad_tensors"]

_Tensor = torch.Tensor
_is_batched = torch._C._functorch.is_batchedtensor
_unwrapped = torch._C._functorch.get_unwrapped
_MAX_DEPTH = 6
_MAX_VISITS = 4096


def autograd_node(tensor: torch.Tensor) -> Any:
    """The autograd node that made ``tensor``, or None. Under ``torch.vmap`` a module
    returns a batched wrapper with no ``grad_fn``: autograd recorded the work on the tensor
    it wraps (_hotpath.cpp's autograd_node is the compiled twin)."""
    while tensor.grad_fn is None:
        if not _is_batched(tensor):
            return None
        tensor = _unwrapped(tensor)
    return tensor.grad_fn


def grad_tensors(value: Any, batched: bool = False) -> list[torch.Tensor]:
    """Distinct tensors in ``value`` that require grad, in the order met; with
    ``batched``, torch.vmap's batched wrappers too (they say they do not, and may wrap one
    that does)."""
    wanted = _requires_grad_or_batched if batched else _requires_grad
    if isinstance(value, _Tensor):
        return [value] if wanted(value) else []
    found: list[torch.Tensor] = []
    try:
        _walk(value, found, 0, [0], wanted)
    except Exception:
        # A user's container that raises when read (a dataclass whose __getattr__ raises
        # KeyError for a field left unset, a mapping whose values() fails): training goes
        # on; the call links to the tensors found before it (none: its children's hull).
        pass
    return found


def _requires_grad(tensor: torch.Tensor) -> bool:
    return tensor.requires_grad


def _requires_grad_or_batched(tensor: torch.Tensor) -> bool:
    return tensor.requires_grad or _is_batched(tensor)


def _walk(value: Any, found: list[torch.Tensor], depth: int, visits: list[int],
          wanted: Callable[[torch.Tensor], bool]) -> None:
    visits[0] += 1
    if visits[0] > _MAX_VISITS:
        return
    if isinstance(value, _Tensor):
        if wanted(value) and not any(value is f for f in found):
            found.append(value)
        return
    if depth >= _MAX_DEPTH or value is None or isinstance(value, (str, bytes, int, float, bool)):
        return
    if isinstance(value, (tuple, list)):
        items: Any = value
    elif isinstance(value, Mapping):
        items = value.values()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [getattr(value, f.name, None) for f in dataclasses.fields(value)]
    else:
        return
    for item in items:
        _walk(item, found, depth + 1, visits, wanted)
