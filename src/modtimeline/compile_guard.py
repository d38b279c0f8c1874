"""Global module hooks that ``torch.compile`` does not see.

Dynamo traces ``nn.Module.__call__`` and, with it, every global forward hook. Traced,
our hooks either break the graph (a compiled hook is a C function Dynamo cannot trace)
or fail (Dynamo tracing the module registry's dictionaries). Wrapped here, a hook first
asks ``torch.compiler.is_compiling()``: while Dynamo traces, that is a constant True,
the hook returns at once and leaves nothing in the graph; when the compiled code (or
eager code) runs, it is False and the hook records as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["invisible_to_dynamo"]

_is_compiling = torch.compiler.is_compiling


def invisible_to_dynamo(hook: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(*args: Any) -> Any:
        if _is_compiling():
            return None
        return hook(*args)

    guarded.__name__ = getattr(hook, "__name__", "hook")
    return guarded
