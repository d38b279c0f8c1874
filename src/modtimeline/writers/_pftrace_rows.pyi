"""Stubs of the compiled .pftrace span packet encoder (_pftrace_rows.c)."""

from array import array
from collections.abc import Sequence

API: int

def encode_spans(begin: array, end: array, name: array, category: array, call: array, step: array, flags: array,
                 flow: array, lag: array, track_rows: Sequence[array], sequences: Sequence[int],
                 states: Sequence[array], base: int, flow_base: int, max_bytes: int) -> bytes: ...
