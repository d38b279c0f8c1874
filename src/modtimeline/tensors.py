"""Find the tensors that carry gradient in a module's inputs or outputs.

Modules take and return tensors as positional and keyword arguments, nested in tuples,
lists, dicts, dataclasses and ``ModelOutput``-style mappings; a tracker that looks only
at a top-level positional tensor misses most of a transformer's calls
(``self_attn(hidden_states=...)``). The walk is bounded in depth and in the objects it
visits: an input that holds a huge or cyclic structure is cut short, never followed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["grad_tensors"]

_Tensor = torch.Tensor
_MAX_DEPTH = 6
_MAX_VISITS = 4096


def grad_tensors(value: Any) -> list[torch.Tensor]:
    """Distinct tensors in ``value`` that require grad, in the order met."""
    if isinstance(value, _Tensor):
        return [value] if value.requires_grad else []
    found: list[torch.Tensor] = []
    _walk(value, found, 0, [0])
    return found


def _walk(value: Any, found: list[torch.Tensor], depth: int, visits: list[int]) -> None:
    visits[0] += 1
    if visits[0] > _MAX_VISITS:
        return
    if isinstance(value, _Tensor):
        if value.requires_grad and not any(value is f for f in found):
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
        _walk(item, found, depth + 1, visits)
