"""Backward passes as autograd runs them: one that runs in a later step than its forward,
one that raises, and the complete ones after it (issue 24, items 2-4).

Each test fails on the recorder that retired its node marks at every step's end and
queued one end-of-pass callback at a time (a pass that raised never ran it)."""

import pytest
import torch
from torch import nn

from modtimeline import Timeline

from .trace_checks import assert_nested, load, spans

pytestmark = pytest.mark.twin


class Boom(Exception):
    pass


def _fail(grad: torch.Tensor) -> torch.Tensor:
    raise Boom("a hook raised")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 1)
        self.fail_in_backward = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.a(x)
        if self.fail_in_backward:
            # Raises when Net.a's output gradient is ready: after Net.b's backward ran.
            hidden.register_hook(_fail)
        return self.b(torch.relu(hidden))


def backward_spans(trace: dict) -> list[dict]:
    return [e for e in spans(trace) if e["cat"] == "backward"]


def test_a_backward_in_a_later_step_than_its_forward_has_its_spans(tmp_path):
    model = Net()
    path = tmp_path / "late.json"
    pending = None
    with Timeline(path) as tl:
        for _ in range(3):
            with tl.step():
                if pending is not None:
                    pending.backward()
                pending = model(torch.randn(4, 8)).sum()
    trace = load(path)
    backward = backward_spans(trace)
    # The forwards of steps 0 and 1 had their backward in steps 1 and 2.
    for name in ("Net", "Net.a", "Net.b"):
        steps = sorted(e["args"]["step"] for e in backward if e["name"] == name)
        assert steps == [1, 2], (name, steps)
    assert not any(e["args"].get("incomplete") for e in backward)
    forward_calls = {e["args"]["call"]: e for e in spans(trace) if e["cat"] == "forward"}
    for span in backward:
        assert forward_calls[span["args"]["call"]]["args"]["step"] == span["args"]["step"] - 1
    assert_nested(trace)


def _raising_backward(model: Net) -> None:
    """A backward that raises in the middle, after Net.b's backward has run."""
    model.fail_in_backward = True
    loss = model(torch.randn(4, 8)).sum()
    model.fail_in_backward = False
    with pytest.raises(Boom):
        loss.backward()


def test_complete_backwards_after_one_that_raised_are_not_flagged_without_steps(tmp_path):
    model = Net()
    path = tmp_path / "raised.json"
    with Timeline(path):
        model(torch.randn(4, 8)).sum().backward()
        _raising_backward(model)
        for _ in range(2):
            model(torch.randn(4, 8)).sum().backward()
    backward = backward_spans(load(path))
    for name in ("Net", "Net.b"):
        ordered = sorted((e for e in backward if e["name"] == name), key=lambda e: e["ts"])
        assert [bool(e["args"].get("incomplete")) for e in ordered] == [False, True, False, False], name
    # Net.a's backward never began in the pass that raised.
    a_spans = [e for e in backward if e["name"] == "Net.a"]
    assert len(a_spans) == 3 and not any(e["args"].get("incomplete") for e in a_spans)


def test_the_module_spans_of_a_backward_that_raised_are_flagged_with_steps(tmp_path):
    model = Net()
    path = tmp_path / "raised_steps.json"
    with Timeline(path) as tl:
        with tl.step():
            _raising_backward(model)
        with tl.step():
            model(torch.randn(4, 8)).sum().backward()
    trace = load(path)
    backward = backward_spans(trace)
    in_step = {0: [], 1: []}
    for e in backward:
        in_step[e["args"]["step"]].append(e)
    # Step 0: Net.b's backward ran, then the pass raised: Net's and Net.b's spans are
    # flagged and end inside the step (the user caught the error: the step did not raise).
    step0 = next(e for e in spans(trace) if e["cat"] == "step" and e["args"]["step"] == 0)
    assert {e["name"] for e in in_step[0]} == {"Net", "Net.b"}
    for raised in in_step[0]:
        assert raised["args"].get("incomplete") is True, raised
        assert raised["ts"] + raised["dur"] <= step0["ts"] + step0["dur"] + 1e-3
    # Step 1 is complete.
    assert {e["name"] for e in in_step[1]} == {"Net", "Net.a", "Net.b"}
    assert not any(e["args"].get("incomplete") for e in in_step[1])
    assert_nested(trace)


class KeepsResult(nn.Module):
    """Returns None and keeps its result on ``self`` (issue 24, item 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.result: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> None:
        self.result = torch.tanh(self.inner(x))


class UsesKept(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.keeper = KeepsResult()
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.keeper(x)
        return self.head(self.keeper.result)


def test_a_module_that_returns_none_has_the_hull_of_its_childrens_backward(tmp_path):
    model = UsesKept()
    path = tmp_path / "kept.json"
    with Timeline(path):
        model(torch.randn(4, 8)).sum().backward()
    trace = load(path)
    backward = {e["name"]: e for e in backward_spans(trace)}
    assert set(backward) == {"UsesKept", "UsesKept.keeper", "UsesKept.keeper.inner", "UsesKept.head"}
    keeper, inner = backward["UsesKept.keeper"], backward["UsesKept.keeper.inner"]
    # Its own node (tanh) is not seen: the span is its child's, flagged approximate.
    assert keeper["args"].get("approximate") is True
    assert (keeper["ts"], keeper["dur"]) == (inner["ts"], inner["dur"])
    assert not inner["args"].get("approximate")
    assert_nested(trace)


class Penalised(nn.Module):
    """Computes a gradient penalty inside its forward: a backward inside a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.requires_grad_()
        out = self.body(x)
        (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return out.sum() + grad.pow(2).sum()


def test_a_backward_inside_a_forward_gives_the_calling_module_a_span(tmp_path):
    model = Penalised()
    path = tmp_path / "penalty.json"
    with Timeline(path):
        model(torch.randn(4, 8)).backward()
    trace = load(path)
    forward = next(e for e in spans(trace) if e["cat"] == "forward" and e["name"] == "Penalised")
    inside = [e for e in backward_spans(trace) if e["name"] == "Penalised"
              and forward["ts"] <= e["ts"] and e["ts"] + e["dur"] <= forward["ts"] + forward["dur"] + 1e-3]
    (inner,) = inside
    assert inner["args"].get("approximate") is True
    # The outer backward's span is Penalised's own (not flagged).
    after = [e for e in backward_spans(trace) if e["name"] == "Penalised" and e["ts"] > forward["ts"] + forward["dur"]]
    assert len(after) == 1 and not after[0]["args"].get("approximate")
    assert_nested(trace)


def test_vmap_gives_backward_spans(tmp_path):
    model = Net()
    path = tmp_path / "vmap.json"
    with Timeline(path):
        torch.vmap(model)(torch.randn(4, 8)).sum().backward()
    trace = load(path)
    assert {e["name"] for e in backward_spans(trace)} == {"Net", "Net.a", "Net.b"}
    assert not any(e["args"].get("incomplete") or e["args"].get("approximate") for e in backward_spans(trace))
    assert_nested(trace)


class KeepsFeature(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 1)
        self.feature: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.feature = self.a(x)
        return self.b(torch.relu(self.feature))


def test_a_second_pass_over_part_of_a_graph_never_widens_the_first_passes_spans(tmp_path):
    """Each pass's spans are related among themselves only: Net.a's span of a later pass
    (a backward from the feature kept on self) must not widen Net's span of the first."""
    import time

    model = KeepsFeature()
    path = tmp_path / "two_passes.json"
    with Timeline(path):
        loss = model(torch.randn(4, 8)).sum()
        loss.backward(retain_graph=True)
        time.sleep(0.05)
        model.feature.sum().backward()
    backward = backward_spans(load(path))
    first_a, second_a = sorted((e for e in backward if e["name"] == "KeepsFeature.a"), key=lambda e: e["ts"])
    net = min((e for e in backward if e["name"] == "KeepsFeature"), key=lambda e: e["ts"])
    assert net["ts"] + net["dur"] <= second_a["ts"], (net, second_a)  # the sleep lies between
    assert net["ts"] <= first_a["ts"] and first_a["ts"] + first_a["dur"] <= net["ts"] + net["dur"] + 1e-3
    assert_nested(load(path))
