"""Stubs of the compiled Chrome JSON row formatter (_chrome_rows.c)."""

from array import array
API: int

def format_spans(track: array, name: array, category: array, begin: array, end: array, step: array, call: array,
                 flags: array, flow: array, lag: array, base: int, flow_base: int, pid: int, names_json: list[bytes],
                 categories: list[bytes]) -> bytes: ...
