"""The optional compiled parts (setup.py), each with a pure-Python twin that does the
same work: ``native._hotpath`` (recording), ``native._resolve_cpu`` (host-only resolve),
``writers._chrome_rows`` (JSON rows), ``writers._pftrace_rows`` (.pftrace packets) and,
against a CUDA torch only, ``native._cuda_marks`` (GPU marks inside steps).
``MODTIMELINE_PURE_PYTHON=1`` turns them all off.

A part that is missing or fails to import (built for another torch: an ABI break) is
a silent slowdown unless someone says so: ``why_not`` keeps the reason, ``modtimeline
info`` prints it, and a Timeline warns once when its hot path is not compiled.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import warnings
from importlib import metadata
from pathlib import Path
from types import ModuleType

PARTS = ("native._hotpath", "native._resolve_cpu", "writers._chrome_rows", "writers._pftrace_rows")
CUDA_PARTS = ("native._cuda_marks",)  # (built and asked for only where torch is a CUDA build)
BUILD_COMMAND = "modtimeline build"

# Why a part is not in use: part -> reason.
why_not: dict[str, str] = {}
# Parts loaded from `modtimeline build`'s cache rather than the install: part -> file.
from_cache: dict[str, Path] = {}
_warned = False


def cache_dir() -> Path:
    """Where ``modtimeline build`` puts the compiled parts: one folder per modtimeline,
    torch and Python version (``MODTIMELINE_CACHE``, else ``$XDG_CACHE_HOME`` or
    ``~/.cache``, + ``/modtimeline``)."""
    from .. import __version__

    root = os.environ.get("MODTIMELINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "modtimeline")
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "none"
    return Path(root) / f"{__version__}-torch{torch_version}-{sys.implementation.cache_tag}"


def _from_cache(name: str) -> ModuleType | None:
    """``modtimeline.<name>`` as ``modtimeline build`` compiled it, if it did."""
    folder = cache_dir().joinpath(*name.split(".")[:-1])
    found = sorted(folder.glob(f"{name.rsplit('.', 1)[-1]}.*.so")) if folder.is_dir() else []
    if not found:
        return None
    spec = importlib.util.spec_from_file_location(f"modtimeline.{name}", found[0])
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # ImportError: built for something else
    sys.modules[f"modtimeline.{name}"] = module
    from_cache[name] = found[0]
    return module


def pure_python() -> bool:
    return os.environ.get("MODTIMELINE_PURE_PYTHON", "") not in ("", "0")


# Every constant shared with the compiled parts, by the name _layout.h gives it: the event
# layout (capture/buffer.py) and format.py's span categories, flags, flows, track ids.
_FORMAT_CONSTANTS = ("INCOMPLETE", "APPROXIMATE", "COMPILED", "FUSED", "FLOW_NONE", "FLOW_OUT", "FLOW_IN", "STEPS_TRACK",
                     "FORWARD_TRACK", "BACKWARD_TRACK", "FORWARD", "BACKWARD", "RECOMPUTE", "STEP", "NO_LAG")


@functools.cache
def shared_constants() -> dict[str, int]:
    """The constants every compiled part must have been built with (_layout.h, their one
    C copy, exports them as LAYOUT through shared_layout())."""
    from .. import format
    from ..capture.buffer import LAYOUT

    return {**LAYOUT, **{name: int(getattr(format, name)) for name in _FORMAT_CONSTANTS}}


def compiled_part(name: str, api: int) -> ModuleType | None:
    """``compiled(name)``, refused unless it was built with ``shared_constants()`` and
    takes the arguments the Python side passes (its API version): the one handshake of
    every compiled part. The reason of a refusal is in ``why_not``."""
    module = compiled(name)
    if module is None:
        return None
    expected = shared_constants()
    accepted = _accepted.get((name, api))
    if accepted is not None and accepted[0] is module and accepted[1] is expected:  # (checked before)
        return module
    if getattr(module, "LAYOUT", None) != {**expected, "API": api}:
        why_not[name] = "built from another version of modtimeline (its constants or arguments differ)"
        return None
    _accepted[(name, api)] = (module, expected)
    return module


# The handshakes that passed, by (name, API): the module and the constants' dict it was
# checked against (a Timeline made per step asks at every step).
_accepted: dict[tuple[str, int], tuple[ModuleType, dict[str, int]]] = {}


def compiled(name: str) -> ModuleType | None:
    """``modtimeline.<name>`` if it is built and allowed, else None (reason in why_not)."""
    if pure_python():
        why_not[name] = "turned off by MODTIMELINE_PURE_PYTHON"
        return None
    # (Imported already, as every time after the first: importlib's own lookup costs tens of
    # µs right after a training step, and a Timeline made per step asks each step.)
    module = sys.modules.get(f"modtimeline.{name}")
    try:
        if module is None:
            module = importlib.import_module(f"modtimeline.{name}")
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name == f"modtimeline.{name}":
            why_not[name] = (f"not built (the install had no C++ compiler, or could not see torch): "
                             f"`{BUILD_COMMAND}` builds it")
        else:  # built, but for another torch or Python (an ABI break)
            why_not[name] = f"fails to import: {error}"
        try:
            cached = _from_cache(name)
        except ImportError as cache_error:
            why_not[name] += f"; the one `modtimeline build` made fails to import too: {cache_error}"
            return None
        if cached is None:
            return None
        module = cached
    why_not.pop(name, None)
    return module


def warn_once_if_slow(name: str) -> None:
    """Warn (once per process) that ``name`` runs on its slower Python twin, and why."""
    global _warned
    if _warned or pure_python() or name not in why_not:
        return
    _warned = True
    warnings.warn(f"modtimeline: the compiled {name} is not in use ({why_not[name]}); recording runs on the "
                  f"pure-Python path, about 2x the cost per module call. `modtimeline info` says more; build it "
                  f"for the installed torch (about a minute, once) with: {BUILD_COMMAND}", RuntimeWarning, stacklevel=3)
