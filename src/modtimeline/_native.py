"""The optional compiled parts (setup.py), each with a pure-Python twin that does the
same work: ``_hotpath`` (recording) and ``writers._chrome_rows`` (JSON rows). ``MODTIMELINE_PURE_PYTHON=1`` turns them all off."""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def compiled(name: str) -> ModuleType | None:
    """``modtimeline.<name>`` if it is built and allowed, else None."""
    if os.environ.get("MODTIMELINE_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        return importlib.import_module(f"modtimeline.{name}")
    except ImportError:  # not built (no compiler), or built for another torch
        return None
