"""Stubs of the compiled Chrome JSON row formatter (_chrome_rows.c)."""

from array import array
API: int

def format_spans(track: array[int], name: array[int], category: array[int], begin: array[int], end: array[int], step: array[int], call: array[int],
                 flags: array[int], flow: array[int], lag: array[int], base: int, flow_base: int, pid: int, names_json: list[bytes],
                 categories: list[bytes]) -> bytes: ...
