"""Which functions torch calls as our global hooks (compile_guard): the compiled
dispatchers, for which Dynamo is given Python stand-ins, where the hot path is built and
torch >= 2.12; else the Python ones. Whenever Dynamo is imported (before the Timeline, or
by the first torch.compile inside it) and on whatever thread it compiles: no graph break,
no recompile, the calls recorded. Each case runs in a fresh interpreter: the choice is made
once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.torch_version import TorchVersion

from modtimeline.capture.recorder import native_hotpath

from .trace_checks import load, spans

compiled_dispatch = pytest.mark.skipif(
    native_hotpath() is None or TorchVersion(torch.__version__) < "2.12",
    reason="the compiled dispatchers need the hot path built and torch >= 2.12")

# A Timeline over an eager step, then steps of the model compiled with fullgraph=True on
# the main thread and on a worker thread, then a later Timeline; prints what it saw.
SCENARIO = """
    import json, sys, threading, torch
    from torch import nn
    from torch.nn.modules import module as torch_module
    from modtimeline import Timeline
    from modtimeline.capture import compile_guard
    from modtimeline.native import _hotpath
    {before}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(3, 4)
    errors = []
    with Timeline({first!r}) as timeline:
        loaded_before = "torch._dynamo" in sys.modules
        with timeline.step():
            model(x).sum().backward()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        for _ in range(2):
            with timeline.step():
                compiled(x).sum().backward()
        def in_a_thread():
            try:
                torch.compile(nn.Sequential(nn.Linear(4, 4), nn.GELU()), backend="eager", fullgraph=True)(x).sum()
            except Exception as error:
                errors.append(repr(error)[:300])
        worker = threading.Thread(target=in_a_thread)
        worker.start()
        worker.join()
        hook = torch_module._global_forward_pre_hooks[compile_guard._KEY]
    with Timeline({second!r}) as timeline:  # a later Timeline: nothing compiled again
        with timeline.step():
            compiled(x).sum().backward()
    import torch._dynamo
    print(json.dumps({{
        "loaded_before": loaded_before,
        "hook": "compiled" if hook is _hotpath.dispatch_pre else "python" if hook is compile_guard._pre_forward else "?",
        "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "errors": errors,
    }}))
"""


def _run(tmp_path, before: str = "") -> dict:
    """The scenario in a fresh interpreter; what it printed."""
    code = textwrap.dedent(SCENARIO).format(before=before, first=str(tmp_path / "1.json"),
                                            second=str(tmp_path / "2.json"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_recorded(tmp_path) -> None:
    first = [(e["name"], e["cat"]) for e in spans(load(tmp_path / "1.json")) if not e["name"].startswith("step")]
    # the eager step: every module, forward and backward; the compiled steps: the model
    assert first.count(("Sequential.0", "forward")) == 1 and first.count(("Sequential.0", "backward")) == 1
    assert first.count(("Sequential", "forward")) == 3 and first.count(("Sequential", "backward")) == 3
    second = [(e["name"], e["cat"]) for e in spans(load(tmp_path / "2.json")) if not e["name"].startswith("step")]
    assert sorted(second) == [("Sequential", "backward"), ("Sequential", "forward")]


@compiled_dispatch
def test_dynamo_imported_inside_the_timeline_traces_the_stand_ins(tmp_path):
    result = _run(tmp_path)
    assert result["loaded_before"] is False
    assert result["hook"] == "compiled"
    assert result["graph_breaks"] == 0 and result["errors"] == []  # (fullgraph=True raises on one)
    assert result["graphs"] == 2  # the model once, for three steps and both Timelines; the thread's
    _assert_recorded(tmp_path)


@compiled_dispatch
def test_dynamo_imported_before_the_timeline_traces_the_stand_ins(tmp_path):
    result = _run(tmp_path, before="import torch._dynamo")
    assert result["loaded_before"] is True
    assert result["hook"] == "compiled"
    assert result["graph_breaks"] == 0 and result["errors"] == []
    assert result["graphs"] == 2
    _assert_recorded(tmp_path)


@compiled_dispatch
def test_a_dynamo_that_refuses_the_stand_ins_gets_the_python_functions(tmp_path):
    """Registering the stand-ins fails when Dynamo is imported (the watch's path): the
    Python functions take the compiled ones' place before anything is traced."""
    refuse = ("def refuse(*args, **kwargs):\n"
              "    raise RuntimeError('refused')\n"
              "torch.compiler.substitute_in_graph = refuse")
    result = _run(tmp_path, before=refuse)
    assert result["loaded_before"] is False
    assert result["hook"] == "python"
    assert result["graph_breaks"] == 0 and result["errors"] == []
    _assert_recorded(tmp_path)


def test_non_strict_export_inside_a_timeline_leaves_no_hook_in_its_graph_and_no_span(tmp_path):
    """torch.export(strict=False) runs the module's Python with our hooks live while it
    traces (it sets the compiling flag the dispatchers check): its graph holds only the
    model's ops, and the trace only the two real steps' spans."""
    from collections import Counter

    from modtimeline import Timeline

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    x = torch.randn(2, 4)
    with Timeline(tmp_path / "t.json") as timeline:
        with timeline.step():
            model(x).sum().backward()
        exported = torch.export.export(model, (x,), strict=False)
        with timeline.step():
            model(x).sum().backward()
    ops = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert ops == [torch.ops.aten.linear.default, torch.ops.aten.relu.default]
    counted = Counter((e["name"], e["cat"]) for e in spans(load(tmp_path / "t.json")) if e["cat"] != "step")
    assert counted == {(name, cat): 2 for name in ("Sequential", "Sequential.0", "Sequential.1")
                       for cat in ("forward", "backward")}
