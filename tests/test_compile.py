"""torch.compile with a Timeline active: nothing breaks, nothing changes in the graphs.

Each case runs the same compiled training step with and without an active Timeline and
compares Dynamo's graph-break counter and the gradients; with the Timeline, the trace
names the compiled module by the FQN the user knows (never ``_orig_mod``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modtimeline import ModuleTracker, Timeline
from modtimeline.capture import compiled_detail

from .trace_checks import assert_nested, load, spans

# compiled_detail's leaves under eager/aot_eager need leaf functions with multi-grad hooks
# (torch >= 2.12); without them the detail says so and shows the region as one span.
needs_leaves = pytest.mark.skipif(not compiled_detail.leaves_available(),
                                  reason="this torch's leaf functions take no multi-grad hook")

pytestmark = [pytest.mark.twin, pytest.mark.slow]

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


@needs_leaves
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_detail_spans_every_submodule_call(backend, tmp_path):
    """compiled_detail=True: forward and backward spans for every submodule call inside
    a compiled MLP, nested in the compiled call's spans, named by FQN, flagged compiled;
    the graph-break count and the gradients unchanged."""
    breaks, grads, _ = compiled_step("mlp", backend, True, "whole", _nothing)
    path = tmp_path / "t.json"
    traced_breaks, traced_grads, _ = compiled_step("mlp", backend, True, "whole",
                                                   lambda: Timeline(path, compiled_detail=True))
    assert traced_breaks == breaks == 0
    for a, b in zip(grads, traced_grads):
        torch.testing.assert_close(a, b)
    trace = load(path)
    assert_nested(trace)
    found = [e for e in spans(trace) if e["cat"] in ("forward", "backward")]
    children = ("MLP.fc1", "MLP.act", "MLP.fc2", "MLP.out")
    for name in ("MLP", *children):
        for cat in ("forward", "backward"):
            calls = [e for e in found if e["name"] == name and e["cat"] == cat]
            assert len(calls) == 2, (name, cat, len(calls))  # one per step
            assert all(e["args"].get("compiled") for e in calls)
    for step in (0, 1):
        def span(name: str, cat: str) -> dict:
            return next(e for e in found if e["name"] == name and e["cat"] == cat and e["args"]["step"] == step)

        for cat in ("forward", "backward"):
            outer = span("MLP", cat)
            for name in children:
                inner = span(name, cat)
                assert outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + 1e-3
        forward_order = sorted(children, key=lambda name: span(name, "forward")["ts"])
        assert forward_order == list(children)  # the order the compiled code ran them in
        backward_order = sorted(children, key=lambda name: span(name, "backward")["ts"])
        assert backward_order == list(reversed(children))
        # Bounded where the gradients were seen; the first layer's inputs need none, so
        # its end is its parent's, flagged.
        assert all(not span(name, "backward")["args"].get("approximate") for name in children[1:])
        assert span("MLP.fc1", "backward")["args"].get("approximate")


def test_compiled_detail_without_leaf_gradient_hooks_says_so_and_compiles_as_before(tmp_path, monkeypatch):
    """torch 2.11's leaf functions take no multi-grad hook: making the leaves raised an
    AttributeError inside the user's forward (found on the GPU machine). Now a warning,
    the region as one span, the compile and gradients unchanged."""
    breaks, grads, _ = compiled_step("mlp", "aot_eager", True, "whole", _nothing)
    monkeypatch.setattr(compiled_detail, "leaves_available", lambda: False)
    path = tmp_path / "t.json"
    with pytest.warns(RuntimeWarning, match="leaf functions with gradient hooks"):
        traced_breaks, traced_grads, _ = compiled_step("mlp", "aot_eager", True, "whole",
                                                       lambda: Timeline(path, compiled_detail=True))
    assert traced_breaks == breaks == 0
    for a, b in zip(grads, traced_grads):
        torch.testing.assert_close(a, b)
    found = {(e["name"], e["cat"]) for e in spans(load(path)) if e["cat"] in ("forward", "backward")}
    assert found == {("MLP", "forward"), ("MLP", "backward")}


@needs_leaves
def test_compiled_detail_inside_per_block_compile(tmp_path):
    """Every child compiled on its own (aot_eager): each block's submodules get spans,
    under the block's FQN; the model around them runs and is recorded eagerly."""
    path = tmp_path / "t.json"
    compiled_step("transformer", "aot_eager", True, "per-block", lambda: Timeline(path, compiled_detail=True))
    trace = load(path)
    assert_nested(trace)
    names = {(e["name"], e["cat"]) for e in spans(trace)}
    for block in ("Transformer.blocks.0", "Transformer.blocks.1"):
        for child in ("norm", "attn", "mlp", "mlp.0", "mlp.1", "mlp.2"):
            assert (f"{block}.{child}", "forward") in names
            assert (f"{block}.{child}", "backward") in names
    assert ("Transformer.head", "backward") in names


def test_compiled_detail_measures_inductor_regions_from_their_kernels(tmp_path):
    """Leaf functions do not compile under inductor (torch 2.13): there the detail is
    measured from the kernels (provenance + torch.profiler, tests/test_inductor_detail.py)
    once the graphs exist; the compile and the gradients are unharmed, no warning."""
    import warnings

    _, grads, _ = compiled_step("mlp", "inductor", True, "whole", _nothing)
    path = tmp_path / "t.json"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*compiled_detail.*", category=RuntimeWarning)
        _, traced_grads, _ = compiled_step("mlp", "inductor", True, "whole",
                                           lambda: Timeline(path, compiled_detail=True))
    for a, b in zip(grads, traced_grads):
        torch.testing.assert_close(a, b)
    found = [e for e in spans(load(path)) if e["cat"] in ("forward", "backward")]
    assert {"MLP", "MLP.fc1", "MLP.fc2", "MLP.out"} <= {e["name"] for e in found}
    assert all(e["args"].get("compiled") for e in found)
    assert_nested(load(path))


@needs_leaves
@pytest.mark.parametrize("detail", [False, True])
def test_timeline_after_timeline_compiles_nothing_again(detail, tmp_path):
    """Dynamo guards on torch's global hook dictionaries. Hooks registered anew for each
    Timeline (new keys) made a model compiled inside one Timeline compile again in every
    later one, and run eagerly after eight: ours sit under fixed keys."""
    dynamo.reset()
    dynamo.utils.counters.clear()
    model = torch.compile(MLP(), backend="aot_eager")
    x = torch.randn(4, 16)
    for k in range(12):
        with Timeline(tmp_path / f"{k}.json", compiled_detail=detail):
            model(x).sum().backward()
        if not detail:  # (a graph compiled with no hooks at all is reused under the detail's: README)
            model(x).sum().backward()  # between Timelines: no hooks at all
        with ModuleTracker():
            model(x).sum().backward()
    assert dynamo.utils.counters["stats"]["unique_graphs"] <= 3  # with ours, without, with the tracker's
    last = [e for e in spans(load(tmp_path / "11.json")) if e["cat"] == "forward"]
    expected = {"MLP", "MLP.fc1", "MLP.act", "MLP.fc2", "MLP.out"} if detail else {"MLP"}
    assert {e["name"] for e in last} == expected
    assert all(e["args"].get("compiled") for e in last)  # still compiled, never eager


@needs_leaves
def test_compiled_detail_keeps_no_leaves_for_dead_modules_or_inductor(tmp_path):
    """Leaves belong to live modules only (a new module at a dead one's address must not
    get them into its graph), and a model compiled for the detail under aot_eager and then
    again under inductor compiles without them."""
    import gc

    from modtimeline.capture import compiled_detail

    dynamo.reset()
    model = MLP()
    x = torch.randn(4, 16)
    with Timeline(tmp_path / "a.json", compiled_detail=True):
        torch.compile(model, backend="aot_eager")(x).sum().backward()
    assert {id(m) for m in model.modules()} - {id(model)} <= set(compiled_detail._BOUNDARIES)
    with Timeline(tmp_path / "b.json", compiled_detail=True):
        torch.compile(model)(x).sum().backward()  # would fail inductor's compile with the leaves in
    assert not {id(m) for m in model.modules()} & set(compiled_detail._BOUNDARIES)
    other = MLP()
    with Timeline(tmp_path / "c.json", compiled_detail=True):
        torch.compile(other, backend="aot_eager")(x).sum().backward()
    # (compared by the ids of other's modules: boundaries an earlier test left may go at
    # the same collection)
    others = {id(m) for m in other.modules()} & set(compiled_detail._BOUNDARIES)
    assert len(others) == 4
    del other
    gc.collect()
    assert not others & set(compiled_detail._BOUNDARIES)


# ------------------------------------------------- model.compile(): compiled in place (issue 28)
def _run_in_place(how: str, context, backend: str = "inductor", eager_fallback: bool = False, steps: int = 2):
    """Train a Transformer compiled in place (``how``: "root" or "blocks") for ``steps``
    steps inside ``context()``; (Dynamo stats, graph breaks, gradients)."""
    torch.manual_seed(0)
    dynamo.reset()
    dynamo.utils.counters.clear()
    model = Transformer()
    if how == "root":
        model.compile(backend=backend)
    else:
        for block in model.blocks:
            block.compile(backend=backend)
    x = torch.randn(2, 8, 16)
    with context() as timeline:
        for _ in range(steps):
            with (timeline.step() if isinstance(timeline, Timeline) else _nothing()):
                if eager_fallback:
                    dynamo.config.disable = True
                try:
                    model(x).sum().backward()
                finally:
                    dynamo.config.disable = False
    stats = {k: v for k, v in dynamo.utils.counters["stats"].items() if k in ("unique_graphs", "calls_captured")}
    return stats, sum(dynamo.utils.counters["graph_break"].values()), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("how", ["root", "blocks"])
def test_compiled_in_place_records_its_calls(how, tmp_path):
    """``model.compile()`` (and ``block.compile()``): the compiled call is one forward and
    one backward span under the module's own FQN, flagged compiled, with the graphs, the
    graph breaks and the gradients of the untraced run."""
    stats, breaks, grads = _run_in_place(how, _nothing)
    path = tmp_path / "t.json"
    traced_stats, traced_breaks, traced_grads = _run_in_place(how, lambda: Timeline(path))
    assert (traced_stats, traced_breaks) == (stats, breaks)
    for a, b in zip(grads, traced_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    trace = load(path)
    assert_nested(trace)
    module_spans = [e for e in spans(trace) if e["cat"] != "step"]
    compiled = ["Transformer"] if how == "root" else ["Transformer.blocks.0", "Transformer.blocks.1"]
    for name in compiled:
        for cat in ("forward", "backward"):
            found = [e for e in module_spans if e["name"] == name and e["cat"] == cat]
            assert len(found) == 2, (name, cat, found)  # once per step
            assert all(e["args"].get("compiled") for e in found)
    if how == "blocks":  # the eager parts around them as usual
        assert {"Transformer", "Transformer.head"} <= {e["name"] for e in module_spans}
        inside = {e["name"] for e in module_spans} - {"Transformer", "Transformer.head", *compiled}
        assert not inside, inside  # (no detail asked: nothing of the compiled blocks' insides)


def test_compiled_in_place_runs_eagerly_once(tmp_path):
    """Dynamo disabled at call time: the in-place compiled module runs ``_call_impl``
    eagerly, whose global hooks fire as well as the boundary's: still one span per call."""
    path = tmp_path / "t.json"
    _run_in_place("root", lambda: Timeline(path), eager_fallback=True)
    found = [e for e in spans(load(path)) if e["name"] == "Transformer" and e["cat"] == "forward"]
    assert len(found) == 2
    assert_nested(load(path))


def test_no_module_span_is_said_once(tmp_path):
    """A Timeline whose window holds no module span says so (warning and metadata)."""
    path = tmp_path / "t.json"
    with pytest.warns(RuntimeWarning, match="no module span"):
        with Timeline(path) as timeline:
            with timeline.step():
                torch.randn(3).sum()
    assert "no_module_spans" in load(path)["metadata"]


def test_compiled_in_place_after_it_was_learnt_is_flagged(tmp_path):
    """A model traced eagerly, then compiled in place (``model.compile()``): the next
    Timeline flags its calls as compiled; the eager trace before stays unflagged."""
    dynamo.reset()
    model = MLP()
    x = torch.randn(4, 16)
    with Timeline(tmp_path / "eager.json"):
        model(x).sum().backward()
    model.compile(backend="aot_eager")
    with Timeline(tmp_path / "compiled.json"):
        model(x).sum().backward()
    eager = [e for e in spans(load(tmp_path / "eager.json")) if e["name"] == "MLP"]
    compiled = [e for e in spans(load(tmp_path / "compiled.json")) if e["name"] == "MLP"]
    assert sorted(e["cat"] for e in compiled) == ["backward", "forward"]
    assert all(e["args"].get("compiled") for e in compiled)
    assert eager and not any(e["args"].get("compiled") for e in eager)


def test_compiled_in_place_compiles_nothing_again_across_timelines(tmp_path):
    """The boundary reads nothing Dynamo guards on: a model compiled in place inside one
    Timeline runs the same graph in every later one, and between them."""
    dynamo.reset()
    dynamo.utils.counters.clear()
    model = MLP()
    model.compile(backend="aot_eager")
    x = torch.randn(4, 16)
    for k in range(6):
        with Timeline(tmp_path / f"{k}.json"):
            model(x).sum().backward()
        model(x).sum().backward()  # between Timelines: no hooks at all
    assert dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # with ours, without
    last = [e for e in spans(load(tmp_path / "5.json")) if e["cat"] in ("forward", "backward")]
    assert sorted((e["name"], e["cat"]) for e in last) == [("MLP", "backward"), ("MLP", "forward")]
    assert all(e["args"].get("compiled") for e in last)
