"""The optional compiled parts (setup.py), each with a pure-Python twin that does the
same work: ``_hotpath`` (recording), ``_resolve_cpu`` (host-only resolve),
``writers._chrome_rows`` (JSON rows) and ``writers._pftrace_rows`` (.pftrace packets).
``MODTIMELINE_PURE_PYTHON=1`` turns them all off.

A part that is missing or fails to import (built for another torch: an ABI break) is
a silent slowdown unless someone says so: ``why_not`` keeps the reason, ``modtimeline
info`` prints it, and a Timeline warns once when its hot path is not compiled.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

PARTS = ("_hotpath", "_resolve_cpu", "writers._chrome_rows", "writers._pftrace_rows")
BUILD_COMMAND = "pip install --no-build-isolation --force-reinstall --no-deps modtimeline"

# Why a part is not in use: part -> reason.
why_not: dict[str, str] = {}
_warned = False


def pure_python() -> bool:
    return os.environ.get("MODTIMELINE_PURE_PYTHON", "") not in ("", "0")


def compiled(name: str) -> ModuleType | None:
    """``modtimeline.<name>`` if it is built and allowed, else None (reason in why_not)."""
    if pure_python():
        why_not[name] = "turned off by MODTIMELINE_PURE_PYTHON"
        return None
    try:
        module = importlib.import_module(f"modtimeline.{name}")
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name == f"modtimeline.{name}":
            why_not[name] = "not built (the install had no C++ compiler, or could not see torch)"
        else:  # built, but for another torch or Python (an ABI break)
            why_not[name] = f"fails to import: {error}"
        return None
    why_not.pop(name, None)
    return module


def warn_once_if_slow(name: str) -> None:
    """Warn (once per process) that ``name`` runs on its slower Python twin, and why."""
    global _warned
    if _warned or pure_python() or name not in why_not:
        return
    _warned = True
    warnings.warn(f"modtimeline: the compiled {name} is not in use ({why_not[name]}); recording runs on the "
                  f"pure-Python path, about 2x the cost per module call. `modtimeline info` says more; rebuild "
                  f"for the installed torch with: {BUILD_COMMAND}", RuntimeWarning, stacklevel=3)
