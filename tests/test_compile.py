"""torch.compile with a Timeline active: nothing breaks, nothing changes in the graphs.

Each case runs the same compiled training step with and without an active Timeline and
compares Dynamo's graph-break counter and the gradients; with the Timeline, the trace
names the compiled module by the FQN the user knows (never ``_orig_mod``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modtimeline import ModuleTracker, Timeline

from .trace_checks import assert_nested, load, spans

dynamo = pytest.importorskip("torch._dynamo")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(x)


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


MODELS = {"mlp": (MLP, (4, 16)), "transformer": (Transformer, (2, 8, 16))}


def compiled_step(model_name: str, backend: str, fullgraph: bool, how: str, context) -> tuple[int, list, nn.Module]:
    """Build, compile (how: whole model, in place, per block), run two steps in
    ``context``; returns (graph breaks, gradients, model)."""
    torch.manual_seed(0)
    cls, shape = MODELS[model_name]
    model = cls()
    x = torch.randn(*shape)
    dynamo.reset()
    dynamo.utils.counters.clear()
    with context() as recorder:
        if how == "whole":
            run = torch.compile(model, backend=backend, fullgraph=fullgraph)
        elif how == "in-place":
            model.compile(backend=backend, fullgraph=fullgraph)
            run = model
        else:  # per block: every child compiled on its own
            for name, child in list(model.named_children()):
                if isinstance(child, nn.ModuleList):
                    for i, block in enumerate(child):
                        child[i] = torch.compile(block, backend=backend, fullgraph=fullgraph)
                else:
                    setattr(model, name, torch.compile(child, backend=backend, fullgraph=fullgraph))
            run = model
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            step = recorder.step() if isinstance(recorder, Timeline) else _nothing()
            with step:
                run(x).sum().backward()
    breaks = sum(dynamo.utils.counters["graph_break"].values())
    return breaks, [p.grad.clone() for p in model.parameters()], model


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


CASES = [(m, b, f, h) for m in MODELS for b in ("eager", "aot_eager", "inductor") for f in (True, False)
         for h in ("whole", "in-place", "per-block")]


@pytest.mark.parametrize("model_name, backend, fullgraph, how", CASES)
def test_compile_is_unchanged_by_an_active_timeline(model_name, backend, fullgraph, how, tmp_path):
    breaks, grads, _ = compiled_step(model_name, backend, fullgraph, how, _nothing)
    path = tmp_path / "t.json"
    traced_breaks, traced_grads, model = compiled_step(model_name, backend, fullgraph, how, lambda: Timeline(path))
    assert traced_breaks == breaks
    for a, b in zip(grads, traced_grads):
        torch.testing.assert_close(a, b)
    trace = load(path)
    assert_nested(trace)
    names = {e["name"] for e in spans(trace) if e["cat"] != "step"}
    root = type(model).__name__
    assert not any("_orig_mod" in n or "<lambda>" in n or "GraphModule" in n for n in names), names
    if how == "whole":
        assert root in names  # the compiled call, by the user's name
        kinds = {e["cat"] for e in spans(trace) if e["name"] == root}
        assert kinds == {"forward", "backward"}
        assert all(e["args"].get("compiled") for e in spans(trace) if e["name"] == root)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_before_the_timeline(backend, tmp_path):
    torch.manual_seed(0)
    dynamo.reset()
    dynamo.utils.counters.clear()
    model = MLP()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 16)
    compiled(x).sum().backward()  # compiled before the Timeline exists
    with Timeline(tmp_path / "t.json"):
        compiled(x).sum().backward()
    assert not dynamo.utils.counters["graph_break"]
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1  # not compiled again under the Timeline
    names = {e["name"] for e in spans(load(tmp_path / "t.json"))}
    assert names == {"MLP"}


def test_module_tracker_is_invisible_to_dynamo_too():
    model = MLP()
    dynamo.reset()
    dynamo.utils.counters.clear()
    with ModuleTracker():
        torch.compile(model, backend="aot_eager", fullgraph=True)(torch.randn(4, 16)).sum().backward()
    assert not dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize("switched_on", ["inside", "before"])
def test_compiled_autograd_never_breaks_the_backward(switched_on, tmp_path):
    """Compiled autograd asks every node hook to describe itself; the compiled marks cannot
    (torch's default raised out of the user's backward). Now: the backward runs, gradients
    are unchanged, forward spans are complete, its graphs are not spans, and the file says
    what is missing (compiled marks) or flags what could not be bounded (Python marks)."""
    import warnings

    from torch._dynamo import compiled_autograd

    def run(traced: bool) -> list:
        torch.manual_seed(0)
        dynamo.reset()
        model = MLP()
        x = torch.randn(4, 16)
        timeline = Timeline(tmp_path / "t.json") if traced else _nothing()
        enable = compiled_autograd._enable(torch.compile(backend="aot_eager"))
        outer, inner = (timeline, enable) if switched_on == "inside" else (enable, timeline)
        with outer, inner:
            for _ in range(2):
                model(x).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    expected = run(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(True)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b)
    trace = load(tmp_path / "t.json")
    forward = [e for e in spans(trace) if e["cat"] == "forward"]
    assert sorted({e["name"] for e in forward}) == ["MLP", "MLP.act", "MLP.fc1", "MLP.fc2", "MLP.out"]
    assert len(forward) == 10
    assert all(e["cat"] in ("forward", "backward") for e in spans(trace))  # no graph as a span
    backward = [e for e in spans(trace) if e["cat"] == "backward"]
    if "backward_not_recorded" in trace["metadata"]:
        assert not backward
        assert any("compiled autograd" in str(w.message) for w in caught)
    else:
        assert all(e["args"].get("incomplete") or e["args"].get("approximate") for e in backward)
