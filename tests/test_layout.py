"""One definition of every constant shared between Python and the compiled parts: the
C copy (native/_layout.h) equals Python's, read from the header itself (so a drift fails
here even where nothing is built), and every built part exports exactly those constants
through the one handshake (LAYOUT = shared constants + its API version)."""

import re
from pathlib import Path

import pytest

from modtimeline.capture.recorder import HOTPATH_API
from modtimeline.device.clock import CUDA_MARKS_API
from modtimeline.native import loader

HEADER = Path(loader.__file__).with_name("_layout.h")


def header_constants() -> dict[str, int]:
    """NAME = value pairs of the header's enums and #defines, evaluated in order."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    values: dict[str, int] = {"INT64_MIN": -(1 << 63)}
    for body in re.findall(r"enum\s*\{(.*?)\}", text, flags=re.S):
        for item in body.split(","):
            if "=" in item:
                name, expression = (part.strip() for part in item.split("=", 1))
                values[name] = int(eval(expression, {}, dict(values)))  # (only names defined above it)
    for name, expression in re.findall(r"#define\s+(\w+)\s+(\w+)\s*$", text, flags=re.M):
        if expression in values:
            values[name] = values[expression]
    values.pop("INT64_MIN")
    return values


def test_the_header_holds_exactly_pythons_shared_constants():
    from_header = header_constants()
    shared = loader.shared_constants()
    assert {k: v for k, v in from_header.items() if k in shared} == shared
    assert set(shared) <= set(from_header), "a shared constant has no C definition"
    # And the header exports each of them in LAYOUT (its table names every one).
    table = HEADER.read_text().split("constants[] = {", 1)[1].split("};", 1)[0]
    assert set(re.findall(r'\{"(\w+)"', table)) == set(shared)


def test_a_drifted_copy_is_refused(monkeypatch):
    real = loader.shared_constants()
    monkeypatch.setattr(loader, "shared_constants", lambda: {**real, "INCOMPLETE": 64})
    monkeypatch.setattr(loader, "why_not", {})
    assert loader.compiled_part("native._resolve_cpu", 1) is None
    assert "constants or arguments differ" in loader.why_not.get("native._resolve_cpu", "constants or arguments differ")


@pytest.mark.parametrize("part, api", [("native._hotpath", HOTPATH_API), ("native._resolve_cpu", 1), ("writers._chrome_rows", 3),
                                       ("writers._pftrace_rows", 3), ("native._cuda_marks", CUDA_MARKS_API)])
def test_each_built_part_exports_the_shared_constants(part, api):
    module = loader.compiled(part)
    if module is None:
        pytest.skip(f"{part} is not built or is turned off ({loader.why_not.get(part)})")
    assert module.LAYOUT == {**loader.shared_constants(), "API": api}
