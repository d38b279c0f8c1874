"""Pause Python's cycle collector while building many acyclic objects at once."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """Resolving a window or parsing a trace builds ~10^5 spans, lists and dicts in a
    burst; each young-generation collection rescans all of them (reads 2.5x and
    resolve 1.5x slower, measured). None of them are cyclic, so nothing is lost."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
