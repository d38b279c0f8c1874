"""Stubs of the compiled Chrome JSON row formatter (_chrome_rows.c)."""

from array import array
from collections.abc import Callable

API: int

def format_spans(track: array, name: array, category: array, begin: array, end: array, step: array, call: array,
                 flags: array, flow: array, lag: array, base: int, flow_base: int,
                 make_head: Callable[[int, int, int], bytes]) -> bytes: ...
