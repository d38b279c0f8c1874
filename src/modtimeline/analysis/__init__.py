"""Trace analysis: read traces, summarise them, compare them, merge them. Never imports torch.

The package's interface is the command line (``modtimeline summary``, ``diff``, ``merge``);
its modules are not a documented Python API, so nothing is exported here.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__: list[str] = []

# Names this package once exported, still found (with a warning) until their callers
# import them from their modules. (``diff`` was the function; it is now the module.)
_MOVED = {"DiffConfig": "diff", "DiffReport": "diff", "Rule": "diff", "load_config": "diff",
          "Trace": "reader", "read_trace": "reader", "samples": "reader", "trace_files": "reader",
          "Summary": "summary", "summarize": "summary"}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"modtimeline.analysis.{name} is not exported any more: import it from "
                  f"modtimeline.analysis.{module}", DeprecationWarning, stacklevel=2)
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{module}"), name)
