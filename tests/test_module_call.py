"""``nn.Module._call_impl`` while a Timeline records (compile_guard's module calls): the
compiled ``module_call`` runs a module's forward between our hooks without torch's hook
machinery wherever the outcome is torch's own, and hands every other call to torch.

Against torch's own path (forced by one more global hook, as any other tracer's): the same
events, node links and flags, on our models and on real ones; and what torch's path does
that the fast one must not change: hooks of the module's own, other global hooks, a
forward that raises, jit tracing, another library's ``_call_impl``.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.torch_version import TorchVersion

from modtimeline import Timeline
from modtimeline.capture import compile_guard
from modtimeline.capture.buffer import NativeEventBuffer
from modtimeline.capture.recorder import Recorder, native_hotpath

from .test_hotpath import (_real_model, mapping_outputs, raising_model, record, tree_model,
                           walks_in_part)
from .models import shapes_model

hotpath = native_hotpath()
# (as tests/test_dispatch.py: where the compiled dispatchers serve, module calls are ours)
pytestmark = pytest.mark.skipif(hotpath is None or TorchVersion(torch.__version__) < "2.12",
                                reason="module calls go through torch where the compiled dispatchers do not serve")


def _with_another_global_hook(model_fn):
    """The model's steps run with one more global forward pre-hook (a no-op): every call
    takes torch's own path."""

    def with_hook():
        model, run = model_fn()

        def run_through_torch(m):
            handle = torch_module.register_module_forward_pre_hook(lambda module, args: None)
            try:
                run(m)
            finally:
                handle.remove()

        return model, run_through_torch

    return with_hook


def _native(model_fn):
    return record(model_fn, native=True)


@pytest.mark.parametrize("model_fn", [tree_model, shapes_model, raising_model, walks_in_part, mapping_outputs,
                                      _real_model("llama"), _real_model("t5"),
                                      _real_model("gpt2", checkpointing=True)],
                         ids=["tree", "shapes", "raising", "walks-in-part", "mapping-outputs", "llama", "t5",
                              "gpt2-checkpointing"])
def test_the_fast_path_records_what_torchs_path_records(model_fn):
    if model_fn.__name__ == "model_fn":  # (the real models)
        pytest.importorskip("transformers")
    fast = _native(model_fn)
    through_torch = _native(_with_another_global_hook(model_fn))
    assert fast == through_torch
    events, links, _, raised = fast
    assert events and (links or raised)


def test_call_impl_is_ours_only_while_recording():
    torchs = torch.nn.Module._call_impl
    recorder = Recorder(NativeEventBuffer(hotpath.Store(1 << 16)))
    with recorder:
        assert torch.nn.Module._call_impl is compile_guard._module_call_impl
        with Recorder(NativeEventBuffer(hotpath.Store(1 << 16))):  # (a second recorder: still ours)
            assert torch.nn.Module._call_impl is compile_guard._module_call_impl
        assert torch.nn.Module._call_impl is compile_guard._module_call_impl
    assert torch.nn.Module._call_impl is torchs


def test_another_librarys_call_impl_is_left_alone(tmp_path):
    torchs = torch.nn.Module._call_impl
    seen = []

    def theirs(self, *args, **kwargs):
        seen.append(type(self).__name__)
        return torchs(self, *args, **kwargs)

    torch.nn.Module._call_impl = theirs
    try:
        model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        with Timeline(tmp_path / "t.json"):
            assert torch.nn.Module._call_impl is theirs
            model(torch.randn(1, 2)).sum().backward()
        assert torch.nn.Module._call_impl is theirs
    finally:
        torch.nn.Module._call_impl = torchs
    assert seen == ["Sequential", "Linear", "ReLU"]
    names = {e["name"] for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"] if e.get("ph") == "X"}
    assert {"Sequential", "Sequential.0", "Sequential.1"} <= names


def test_hooks_of_the_module_and_other_global_hooks_run_as_torch_runs_them(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    model[0].register_forward_pre_hook(lambda module, args: (args[0] * 0,))  # replaces the input
    model[1].register_forward_hook(lambda module, args, output: output + 5)  # replaces the output
    calls = []
    x = torch.randn(2, 3)
    expected = model(x)
    with Timeline(tmp_path / "t.json"):
        handle = torch_module.register_module_forward_hook(lambda module, args, output: calls.append(module))
        try:
            got = model(x)
        finally:
            handle.remove()
        again = model(x)  # (the fast path again for the module without hooks of its own)
    assert torch.equal(got, expected) and torch.equal(again, expected)
    assert calls == [model[0], model[1], model]
    names = [e["name"] for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"] if e.get("ph") == "X"]
    assert sorted(names) == sorted(["Sequential", "Sequential.0", "Sequential.1"] * 2)


def test_a_raising_forward_raises_the_users_error_and_is_flagged(tmp_path):
    class Boom(nn.Module):
        def forward(self, x):
            raise KeyError("the user's own")

    model = nn.Sequential(nn.Linear(2, 2), Boom())
    with Timeline(tmp_path / "t.json"):
        with pytest.raises(KeyError, match="the user's own") as raised:
            model(torch.randn(1, 2))
    assert raised.traceback[-1].name == "forward"  # (the user's frame, not ours, last)
    spans = [e for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"] if e.get("ph") == "X"]
    boom = [e for e in spans if e["name"] == "Sequential.1"]
    assert len(boom) == 1 and boom[0]["args"].get("incomplete") is True


def test_kwargs_reach_forward(tmp_path):
    class Scale(nn.Module):
        def forward(self, x, *, factor=1.0):
            return x * factor

    with Timeline(tmp_path / "t.json"):
        assert torch.equal(Scale()(torch.ones(2), factor=3.0), torch.full((2,), 3.0))


def test_jit_trace_inside_a_timeline_takes_torchs_path(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with Timeline(tmp_path / "t.json"):
        traced = torch.jit.trace(model, torch.randn(1, 2))
    x = torch.randn(3, 2)
    assert torch.equal(traced(x), model(x))
