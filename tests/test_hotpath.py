"""The compiled hot path (modtimeline.native._hotpath) against the Python recorder it replaces.

Both must record the same events: same kinds, calls and modules in the same order, the
same node links; only the timestamps differ.
"""

import gc
import os
import time
import weakref

import pytest
import torch
from torch import nn

from modtimeline import Timeline
from modtimeline.spans import resolve as resolve_module
from modtimeline.writers import chrome
from modtimeline.capture.buffer import (
    BACKWARD_DONE,
    FORWARD_BEGIN,
    GRADIENT_READY,
    NODE_DONE,
    EventBuffer,
    NativeEventBuffer,
    unpack,
    unpack_link,
)
from modtimeline.capture.recorder import Recorder, native_hotpath

from .models import Tree, shapes_model

pytestmark = pytest.mark.twin

hotpath = native_hotpath()


@pytest.mark.skipif(os.environ.get("MODTIMELINE_PURE_PYTHON", "") not in ("", "0"), reason="compiled parts off")
def test_compiled_parts_are_built():
    # tools/setup.sh builds them; a silent fallback would hide a broken build.
    assert resolve_module._resolve_cpu is not None, "modtimeline.native._resolve_cpu is not built"
    assert chrome._chrome_rows is not None, "modtimeline.writers._chrome_rows is not built"
    assert hotpath is not None, "modtimeline.native._hotpath is not built (pip install --no-build-isolation -e .)"


needs_hotpath = pytest.mark.skipif(hotpath is None, reason="modtimeline.native._hotpath is not built")


def record(model_fn, native: bool, steps: int = 2):
    buffer = NativeEventBuffer(hotpath.Store(1 << 20)) if native else EventBuffer(1 << 20)
    recorder = Recorder(buffer)
    torch.manual_seed(0)
    model, run = model_fn()
    with recorder:
        for _ in range(steps):
            run(model)
            recorder.retire_marks()
    # Module indices are handed out by a registry a recorder continues from the one before
    # it (what a test before left alive holds indices too): compared by name.
    names = recorder.registry.names
    node_kinds = (GRADIENT_READY, NODE_DONE, BACKWARD_DONE)
    events = [(kind, module if kind in node_kinds else names[module], call)
              for kind, module, call in map(unpack, buffer.codes)]
    links = [(node, *_named_link(unpack_link(code), names)) for node, code in zip(buffer.link_node, buffer.link_code)]
    return events, links, buffer.nodes, set(recorder.raised_calls)


def _named_link(link, names):
    call, module, begins = link
    return call, names[module], begins


def tree_model():
    return Tree(), lambda m: m(torch.randint(0, 16, (4, 5))).sum().backward()


def raising_model():
    class Boom(nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    model = nn.Sequential(nn.Linear(4, 4), Boom())

    def run(m):
        with pytest.raises(ValueError):
            m(torch.randn(2, 4))

    return model, run


def deep_chain():
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(50)]), lambda m: m(torch.randn(2, 8)).sum().backward()


def beside_a_thread():
    """The recording thread trains its model while another thread trains a model of its
    own, concurrently: both twins record the owner's calls only, the same events."""
    import threading

    model = Tree()
    other = nn.Sequential(*[nn.Linear(16, 16) for _ in range(8)])

    def run(m):
        started = threading.Event()

        def train_other():
            started.set()
            for _ in range(20):
                other(torch.randn(4, 16)).sum().backward()

        worker = threading.Thread(target=train_other)
        worker.start()
        started.wait()
        m(torch.randint(0, 16, (4, 5))).sum().backward()
        worker.join()

    return model, run


def mapping_outputs():
    """Mapping outputs as transformers returns them (an OrderedDict subclass holding
    tensors, None, a number and a cache object), and ones the compiled path leaves to the
    Python walk: a dataclass, a nested dict, a tuple among the values."""
    import collections
    import dataclasses

    class Output(collections.OrderedDict):
        pass

    class Cache:  # holds tensors, but is no container the walk enters
        def __init__(self, tensor):
            self.tensor = tensor

    @dataclasses.dataclass
    class Pair:
        first: torch.Tensor
        second: torch.Tensor

    class Layer(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.shape = shape

        def forward(self, x):
            h = self.linear(x)
            if self.shape == "model output":
                return Output(logits=h * 2, hidden=h, loss=None, count=3, cache=Cache(h + 1))
            if self.shape == "dataclass value":
                return {"out": h, "pair": Pair(h * 3, h * 4)}
            if self.shape == "nested":
                return {"out": h, "inner": {"more": h * 5}, "both": (h * 6, h * 7)}
            return {"out": h}

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer(shape) for shape in ("model output", "dataclass value", "nested",
                                                                    "plain"))

        def forward(self, x):
            total = 0
            for layer in self.layers:
                out = layer(x)
                total = total + sum(v.sum() for v in out.values() if isinstance(v, torch.Tensor))
            return total

    return Model(), lambda m: m(torch.randn(3, 4)).backward()


def walks_in_part():
    """A parent that reaches its child's output nodes in part (one output dropped; its nodes
    hold sinks of their own), reaches the child's inside another way (a tensor the child
    kept), calls the child twice and calls a child that returns its input."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.c = nn.Linear(4, 4)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            self.kept = h * 3
            return self.b(h), self.c(x).exp()

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.two = Two()
            self.lin = nn.Linear(4, 4)
            self.same = nn.Identity()

        def forward(self, x):
            first, _dropped = self.two(x)
            y = self.lin(first) + self.two.kept
            z, w = self.two(y)
            return self.same(z + w) * 2

    return nn.Sequential(Parent(), Parent()), lambda m: m(torch.randn(3, 4)).sum().backward()


@needs_hotpath
@pytest.mark.parametrize("model_fn", [tree_model, shapes_model, raising_model, deep_chain, beside_a_thread,
                                      mapping_outputs, walks_in_part])
def test_native_records_what_python_records(model_fn):
    python = record(model_fn, native=False)
    native = record(model_fn, native=True)
    assert native == python
    events, links, nodes, _ = native
    assert events and (links or model_fn is raising_model)


def _real_model(name, **options):
    def model_fn():
        from . import real_models

        model, step = getattr(real_models, name)(**options)
        return model, lambda m: step().backward()

    return model_fn


@needs_hotpath
@pytest.mark.parametrize("model_fn", [_real_model("llama"), _real_model("gpt2"), _real_model("bert"),
                                      _real_model("t5"), _real_model("mixtral"), _real_model("vit"),
                                      _real_model("moe"), _real_model("gpt2", checkpointing=True)],
                         ids=["llama", "gpt2", "bert", "t5", "mixtral", "vit", "moe", "gpt2-checkpointing"])
def test_native_links_what_python_links_on_real_models(model_fn):
    """The compiled walk of each call's autograd nodes against the Python twin's on real
    models: the same events, node links and node numbering."""
    pytest.importorskip("transformers")
    assert record(model_fn, native=True) == record(model_fn, native=False)


@needs_hotpath
def test_raised_forward_is_flagged_by_both():
    assert record(raising_model, native=True)[3] == record(raising_model, native=False)[3] != set()


@needs_hotpath
def test_store_clock_is_perf_counter_ns():
    for _ in range(100):
        before = time.perf_counter_ns()
        now = hotpath.Store.now()
        after = time.perf_counter_ns()
        assert before <= now <= after


@needs_hotpath
def test_store_capacity_rules_match_the_python_buffer():
    native, python = NativeEventBuffer(hotpath.Store(3)), EventBuffer(3)
    for buffer in (native, python):
        for kind in (FORWARD_BEGIN, FORWARD_BEGIN, FORWARD_BEGIN, FORWARD_BEGIN, 1, BACKWARD_DONE):
            buffer.record(kind, 7, 2)
    assert list(native.codes) == list(python.codes)
    assert native.dropped == python.dropped == 1
    with pytest.raises(ValueError, match="at least 1"):
        hotpath.Store(0)


@needs_hotpath
def test_retired_marks_on_a_retained_graph_record_nothing():
    buffer = NativeEventBuffer(hotpath.Store(1000))
    recorder = Recorder(buffer)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with recorder:
        loss = model(torch.randn(2, 4)).sum()
        loss.backward(retain_graph=True)
        marked = {unpack(c)[2] for c in buffer.codes if unpack(c)[0] in (GRADIENT_READY, NODE_DONE)}
        assert len(marked) == buffer.nodes > 0
        recorder.retire_marks()
        before = len(buffer)
        loss.backward()  # the same graph, its marks retired
        kinds = [unpack(c)[0] for c in buffer.codes][before:]
        assert GRADIENT_READY not in kinds and NODE_DONE not in kinds


@needs_hotpath
def test_cleared_store_ignores_old_marks():
    buffer = NativeEventBuffer(hotpath.Store(1000))
    recorder = Recorder(buffer)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with recorder:
        loss = model(torch.randn(2, 4)).sum()
        buffer.clear()  # a new window: the graph's marks belong to the old one
        loss.backward()
    assert GRADIENT_READY not in [unpack(c)[0] for c in buffer.codes]


@needs_hotpath
def test_native_timeline_keeps_nothing_alive(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    timeline = Timeline(tmp_path / "t.json")
    assert timeline.recorder.native
    with timeline:
        model(torch.randn(2, 4)).sum().backward()
    recorder = weakref.ref(timeline.recorder)
    model_ref = weakref.ref(model)
    del timeline, model
    gc.collect()
    assert recorder() is None and model_ref() is None


@needs_hotpath
def test_many_modules_and_reused_addresses_keep_their_names(tmp_path):
    """The compiled hooks' table of modules grows well past its first size, and a module
    made where a dead one lived (CPython hands the memory out again) is learned as itself,
    not as the dead one."""
    from .trace_checks import load, spans

    class Kept(nn.Sequential):
        pass

    class Passing(nn.ModuleDict):
        def forward(self, x):
            for layer in self.values():
                x = layer(x)
            return x

    kept = Kept(*[nn.Linear(2, 2) for _ in range(300)])
    x = torch.randn(1, 2)
    dead: set[int] = set()
    reused = 0
    with Timeline(tmp_path / "t.json") as timeline:
        for step in range(3):
            with timeline.step():
                kept(x).sum().backward()
                passing = Passing({f"s{step}_{i}": nn.Linear(2, 2) for i in range(50)})
                passing(x).sum().backward()
                addresses = {id(layer) for layer in passing.values()}
                reused += len(addresses & dead)
                dead |= addresses
                del passing
                gc.collect()
    if not reused:
        pytest.skip("no dead module's address was handed out again in this run")
    trace = load(tmp_path / "t.json")
    steps = sorted((e for e in spans(trace) if e["name"].startswith("step ")), key=lambda e: e["ts"])
    assert len(steps) == 3
    for number, step in enumerate(steps):
        inside = [e["name"] for e in spans(trace) if step["ts"] <= e["ts"] < step["ts"] + step["dur"]
                  and not e["name"].startswith("step ")]
        expected = ["Kept"] + [f"Kept.{i}" for i in range(300)]
        expected += ["Passing"] + [f"Passing.s{number}_{i}" for i in range(50)]
        assert sorted(set(inside)) == sorted(expected)
        assert len(inside) == 2 * len(expected)  # a forward and a backward span each


@needs_hotpath
def test_pure_python_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("MODTIMELINE_PURE_PYTHON", "1")
    assert not Timeline(tmp_path / "t.json").recorder.native
    monkeypatch.setenv("MODTIMELINE_PURE_PYTHON", "0")
    assert Timeline(tmp_path / "t.json").recorder.native


@needs_hotpath
def test_compiled_autograd_gets_the_python_path(monkeypatch, tmp_path):
    import sys
    import types

    flag = types.SimpleNamespace(compiled_autograd_enabled=True)
    monkeypatch.setitem(sys.modules, "torch._dynamo.compiled_autograd", flag)
    assert not Timeline(tmp_path / "t.json").recorder.native
    flag.compiled_autograd_enabled = False
    assert Timeline(tmp_path / "t.json").recorder.native


def test_sequence_number_fallback_agrees_with_torchs():
    # Older torch has no _get_sequence_nr: a throwaway node must give the same answer.
    from modtimeline.capture.recorder import _next_sequence_nr, _peek_by_a_node

    assert _peek_by_a_node() == _next_sequence_nr()


def _paused_and_begun(native: bool) -> list[tuple[int, str, int]]:
    """Forward events of: a call; a call while paused; a call after resume(); a call begun
    by begin_call that torch then hooks too (once); one begun that torch does not hook."""
    buffer = NativeEventBuffer(hotpath.Store(1 << 16)) if native else EventBuffer(1 << 16)
    recorder = Recorder(buffer)
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    x = torch.randn(1, 2)
    with torch.no_grad(), recorder:
        model(x)
        recorder.pause()
        model(x)
        recorder.resume()
        model(x)
        recorder.record_call_begin(model, (x,))
        model(x)  # (its pre-hook runs: the call was begun already)
        recorder.record_call_begin(model, (x,))
        model.forward(x)  # (no hook of the model runs; its children's are theirs)
    names = recorder.registry.names
    return [(kind, names[module], call) for kind, module, call in map(unpack, buffer.codes)]


@needs_hotpath
def test_pause_resume_and_begin_call_agree_with_the_python_twin():
    native = _paused_and_begun(native=True)
    assert native == _paused_and_begun(native=False)
    begins = [name for kind, name, _ in native if kind == FORWARD_BEGIN]
    assert begins == ["Sequential", "Sequential.0", "Sequential.1"] * 4


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_hotpath), False])
def test_a_call_begun_on_another_thread_leaves_the_owners_next_call_of_it_recorded(native):
    import threading

    buffer = NativeEventBuffer(hotpath.Store(1 << 16)) if native else EventBuffer(1 << 16)
    recorder = Recorder(buffer)
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    x = torch.randn(1, 2)
    with torch.no_grad(), recorder:
        helper = threading.Thread(target=recorder.record_call_begin, args=(model, (x,)))
        helper.start()
        helper.join()
        model(x)
    names = recorder.registry.names
    begins = [names[module] for kind, module, _ in map(unpack, buffer.codes) if kind == FORWARD_BEGIN]
    assert begins == ["Sequential", "Sequential.0", "Sequential.1"]
