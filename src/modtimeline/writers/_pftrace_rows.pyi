"""Stubs of the compiled .pftrace span packet encoder (_pftrace_rows.c)."""

from array import array
from collections.abc import Sequence

API: int

def encode_spans(begin: array[int], end: array[int], name: array[int], category: array[int], call: array[int], step: array[int], flags: array[int],
                 flow: array[int], lag: array[int], track_rows: Sequence[array[int]], sequences: Sequence[int],
                 states: Sequence[array[int]], base: int, flow_base: int, max_bytes: int) -> bytes: ...
