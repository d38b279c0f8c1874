"""Which functions torch calls as our global hooks (compile_guard): the compiled
dispatchers, which Dynamo is told to skip, where the hot path is built and torch >= 2.12;
else the Python ones. Dynamo loaded after the hooks went in (the first torch.compile of a
run) must still skip them: no graph break, no recompile, the calls recorded."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn.modules import module as torch_module
from torch.torch_version import TorchVersion

from modtimeline import Timeline
from modtimeline.capture import compile_guard
from modtimeline.capture.recorder import native_hotpath

hotpath = native_hotpath()
compiled_dispatch = pytest.mark.skipif(
    hotpath is None or TorchVersion(torch.__version__) < "2.12",
    reason="the compiled dispatchers need the hot path built and torch >= 2.12")


def _run(code: str, timeout: float = 300) -> str:
    """Run ``code`` in a fresh interpreter (Dynamo not loaded yet); its stdout."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@compiled_dispatch
def test_torch_calls_the_compiled_dispatchers_while_a_timeline_records(tmp_path):
    model = torch.nn.Linear(2, 2)
    with Timeline(tmp_path / "t.json"):
        model(torch.randn(1, 2))
        assert torch_module._global_forward_pre_hooks[compile_guard._KEY] is hotpath.dispatch_pre
        assert torch_module._global_forward_hooks[compile_guard._KEY] is hotpath.dispatch_post
    assert compile_guard._KEY not in torch_module._global_forward_pre_hooks


@compiled_dispatch
def test_dynamo_loaded_after_the_hooks_skips_them(tmp_path):
    out = _run(f"""
        import sys, json, torch
        from torch import nn
        from torch.nn.modules import module as torch_module
        from modtimeline import Timeline
        from modtimeline.native import _hotpath

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        x = torch.randn(3, 4)
        with Timeline({str(tmp_path / "1.json")!r}) as timeline:
            loaded_before = "torch._dynamo" in sys.modules
            with timeline.step():
                model(x).sum().backward()
            compiled = torch.compile(model, backend="eager", fullgraph=True)  # loads Dynamo
            for _ in range(2):
                with timeline.step():
                    compiled(x).sum().backward()
            hook = torch_module._global_forward_pre_hooks[-0x6D_7401]
        with Timeline({str(tmp_path / "2.json")!r}) as timeline:  # a later Timeline: no recompile
            with timeline.step():
                compiled(x).sum().backward()
        import torch._dynamo
        print(json.dumps({{
            "loaded_before": loaded_before,
            "hook_is_compiled": hook is _hotpath.dispatch_pre,
            "skipped": _hotpath.dispatch_pre in torch._dynamo.config.ignore_logging_functions,
            "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
            "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        }}))
        """)
    result = __import__("json").loads(out.strip().splitlines()[-1])
    assert result["loaded_before"] is False
    assert result["hook_is_compiled"] and result["skipped"]
    assert result["graph_breaks"] == 0
    assert result["graphs"] == 1  # compiled once, for all three steps and both Timelines


def test_a_dynamo_that_cannot_skip_them_gets_the_python_ones(tmp_path):
    """Dynamo loads, and has no ignore list (torch older than the one checked for): the
    Python functions replace the compiled ones before anything is traced."""
    out = _run(f"""
        import sys, types, torch
        from torch import nn
        from torch.nn.modules import module as torch_module
        from modtimeline import Timeline
        from modtimeline.capture import compile_guard

        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        with Timeline({str(tmp_path / "t.json")!r}) as timeline:
            with timeline.step():
                model(torch.randn(2, 4)).sum().backward()
            compile_guard._dynamo_loaded(types.ModuleType("a Dynamo config without the list"))
            print(torch_module._global_forward_pre_hooks[compile_guard._KEY] is compile_guard._pre_forward)
            print(torch_module._global_forward_hooks[compile_guard._KEY] is compile_guard._post_forward)
            with timeline.step():
                model(torch.randn(2, 4)).sum().backward()
        """)
    assert out.split() == ["True", "True"]
    from .trace_checks import load, spans

    names = [e["name"] for e in spans(load(tmp_path / "t.json"))]
    assert names.count("Sequential.0") == 4  # both steps, forward and backward
