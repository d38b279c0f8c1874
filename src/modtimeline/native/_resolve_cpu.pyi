"""Stubs of the compiled host-only resolve (_resolve_cpu.cpp)."""

from array import array

LAYOUT: dict[str, int]

def spans(timestamps: array, codes: array, link_node: array, link_code: array, close_ns: int,
          raised_calls: set[int], raised_steps: set[int],
          first_step_name: int) -> tuple[tuple[bytes, ...], list[tuple[int, str]], list[int]]: ...
