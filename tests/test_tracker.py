"""ModuleTracker: the behaviour of torch's ModuleTracker and ModTracker, case by case."""

import gc
import weakref
from collections import Counter
from copy import copy

import pytest
import torch
from torch.distributed._tools.mod_tracker import ModTracker
from torch.utils.checkpoint import checkpoint

from modtimeline import ModuleTracker
from modtimeline.errors import ModTimelineError

from .models import RECOMPUTED, TREE_FORWARD_CALLS, Tree, train_step


def test_module_hierarchy_forward_and_backward():
    seen_fw, seen_bw = [], []

    class Foo(torch.nn.Module):
        def forward(self, x):
            x = x["a"].relu_()
            seen_fw.append((copy(tracker.parents), tracker.is_bw))
            x.register_hook(lambda grad: seen_bw.append((copy(tracker.parents), tracker.is_bw)))
            return {"a": torch.mm(x, x)}

    class Mod(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Foo()
            self.b = torch.nn.ModuleDict({"nest": Foo()})
            self.c = torch.nn.ModuleList([Foo()])

        def forward(self, x):
            x = self.c[0](x)
            return self.b["nest"](self.a(x))

    mod = Mod()
    with ModuleTracker() as tracker:
        for _ in range(2):
            mod({"a": torch.randn(10, 10, requires_grad=True).clone()})["a"].sum().backward()
            assert tracker.parents == {"Global"}
            assert not tracker.is_bw

    fw = [({"Global", "Mod", "Mod.c.0"}, False), ({"Global", "Mod", "Mod.a"}, False),
          ({"Global", "Mod", "Mod.b.nest"}, False)]
    bw = [({"Global", "Mod", "Mod.b.nest"}, True), ({"Global", "Mod", "Mod.a"}, True),
          ({"Global", "Mod", "Mod.c.0"}, True)]
    assert seen_fw == fw * 2
    assert seen_bw == bw * 2


def test_is_bw_and_parents_after_backward():
    mod = torch.nn.Linear(2, 2)
    with ModuleTracker() as tracker:
        mod(torch.rand(2, requires_grad=True)).sum().backward()
        assert not tracker.is_bw
        assert tracker.parents == {"Global"}


def _recording_hooks(tracker, log):
    def hook(mod, name):
        fqn = tracker.get_known_fqn(mod) if mod is not None else None
        log.append((name, fqn, fqn in tracker.parents, tracker.is_bw))

    tracker.register_user_hooks(
        lambda m, i: hook(m, "pre_fw"),
        lambda m, i, o: hook(m, "post_fw"),
        lambda m, g: hook(m, "pre_bw"),
        lambda m, g: hook(m, "post_bw"),
    )


class Bar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.foo = torch.nn.Linear(10, 10)

    def forward(self, x):
        return self.foo(x).relu_()


def test_user_hooks_order():
    log = []
    tracker = ModuleTracker()
    _recording_hooks(tracker, log)
    mod = Bar()
    with tracker:
        mod(torch.rand(10, 10, requires_grad=True)).sum().backward()
    assert log == [
        ("pre_fw", "Bar", True, False),
        ("pre_fw", "Bar.foo", True, False),
        ("post_fw", "Bar.foo", True, False),
        ("post_fw", "Bar", True, False),
        ("pre_bw", "Bar", True, True),
        ("pre_bw", "Bar.foo", True, True),
        ("post_bw", "Bar", True, True),
        ("post_bw", "Bar.foo", True, True),
    ]
    with pytest.raises(AssertionError):
        tracker.register_user_hooks(lambda m, i: None)


def test_model_deleted_before_backward():
    log = []
    tracker = ModuleTracker()
    _recording_hooks(tracker, log)
    mod = Bar()
    with tracker:
        loss = mod(torch.rand(10, 10, requires_grad=True)).sum()
        del mod
        gc.collect()
        loss.backward()
        assert tracker.parents == {"Global"}
    assert log[4:] == [("pre_bw", None, False, True)] * 2 + [("post_bw", None, False, True)] * 2


class Foo(torch.nn.Module):
    def __init__(self, n_layers=2, dim=8):
        super().__init__()
        self.linears = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(n_layers))

    def forward(self, x):
        for i, block in enumerate(self.linears):
            x = checkpoint(block, x, use_reentrant=False) if i >= 1 else block(x)
            x = torch.nn.functional.relu(x)
        return x


def test_activation_checkpoint_recompute_order():
    log = []
    tracker = ModuleTracker()
    _recording_hooks(tracker, log)
    model = Foo()
    with tracker:
        model(torch.randn(2, 8)).sum().backward()
    assert log == [
        ("pre_fw", "Foo", True, False),
        ("pre_fw", "Foo.linears.0", True, False),
        ("post_fw", "Foo.linears.0", True, False),
        ("pre_fw", "Foo.linears.1", True, False),
        ("post_fw", "Foo.linears.1", True, False),
        ("post_fw", "Foo", True, False),
        ("pre_bw", "Foo", True, True),
        ("pre_bw", "Foo.linears.1", True, True),
        ("pre_fw", "Foo.linears.1", True, True),
        ("post_fw", "Foo.linears.1", True, True),
        ("post_bw", "Foo.linears.1", True, True),
        ("pre_bw", "Foo.linears.0", True, True),
        ("post_bw", "Foo.linears.0", True, True),
        ("post_bw", "Foo", True, True),
    ]


def _hook_log(tracker_cls, model_factory, steps=2):
    torch.manual_seed(0)
    model = model_factory()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    log = []
    tracker = tracker_cls()
    _recording_hooks(tracker, log)
    with tracker:
        for _ in range(steps):
            train_step(model, optimizer)
            assert tracker.parents == {"Global"}
    return log


@pytest.mark.filterwarnings("ignore:The module hierarchy tracking maybe be messed up")  # torch's, on re-entry
def test_same_hooks_as_torch_modtracker_on_tree():
    """Differential test: the same forward sequence as torch's ModTracker and the same
    backward hooks (where several fire at one moment, ours close before they open)."""
    ours = _hook_log(ModuleTracker, Tree)
    theirs = _hook_log(ModTracker, Tree)
    fw = lambda log: [e for e in log if e[0].endswith("fw")]  # noqa: E731
    assert fw(ours) == fw(theirs)
    assert Counter(ours) == Counter(theirs)


def test_tree_calls_counted_per_module():
    log = _hook_log(ModuleTracker, Tree, steps=1)
    pre_fw = Counter(fqn for name, fqn, _, in_bw in log if name == "pre_fw" and not in_bw)
    assert dict(pre_fw) == TREE_FORWARD_CALLS
    recomputed = {fqn for name, fqn, _, in_bw in log if name == "pre_fw" and in_bw}
    assert recomputed == RECOMPUTED
    # every forward call that fed the loss gets exactly one backward begin and end
    pre_bw = Counter(fqn for name, fqn, *_ in log if name == "pre_bw")
    post_bw = Counter(fqn for name, fqn, *_ in log if name == "post_bw")
    assert pre_bw == post_bw == Counter(TREE_FORWARD_CALLS)


def test_reentrant_module_keeps_hierarchy():
    from .models import Recursive

    seen = []
    tracker = ModuleTracker()
    tracker.register_user_hooks(post_fw_hook=lambda m, i, o: seen.append(copy(tracker.parents)))
    model = Recursive()
    with tracker:
        model(torch.randn(2, 8, requires_grad=True)).sum().backward()
        assert tracker.parents == {"Global"}
    # the innermost call still sees its callers; the last post_fw is the outermost
    assert seen[0] == {"Global", "Recursive", "Recursive.lin"}
    assert seen[-1] == {"Global", "Recursive"}


def test_nothing_survives_exit():
    model = Tree()
    ref = weakref.ref(model)
    tracker = ModuleTracker()
    with tracker:
        out = model(torch.randint(0, 16, (2, 3)))
    # hooks on the graph are gone: backward after exit calls none of ours
    calls = []
    tracker.register_user_hooks(pre_bw_hook=lambda m, g: calls.append(m))
    out.sum().backward()
    assert calls == []
    del model, out
    gc.collect()
    assert ref() is None, "the tracker kept the model alive"
    assert tracker.get_known_fqn(torch.nn.Linear(1, 1)) is None


def test_enter_twice_is_an_error():
    tracker = ModuleTracker()
    with tracker:
        with pytest.raises(ModTimelineError):
            tracker.__enter__()


def test_no_grad_forward_registers_no_backward_hooks():
    tracker = ModuleTracker()
    with tracker, torch.no_grad():
        Tree()(torch.randint(0, 16, (2, 3)))
        assert tracker._handles == [] and tracker._pending_post_bw == []


def test_long_run_does_not_pile_up_hook_handles():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    tracker = ModuleTracker()
    with tracker:
        for _ in range(6000):
            model(torch.randn(2, 4, requires_grad=True)).sum().backward()
        # 2-3 handles a step (12,000+ in all); those of dead tensors and nodes are dropped
        assert len(tracker._handles) < 2 * 4096


def test_hooks_on_a_reused_leaf_input_fire_once():
    model = torch.nn.Linear(4, 1)
    x = torch.randn(2, 4, requires_grad=True)  # the same leaf, every step
    post_bw = []
    tracker = ModuleTracker()
    tracker.register_user_hooks(post_bw_hook=lambda m, g: post_bw.append(m))
    with tracker:
        for _ in range(5):
            model(x).sum().backward()
    assert len(post_bw) == 5  # one per step, not 1 + 2 + ... + 5
    assert not x._backward_hooks


def test_keyword_argument_inputs_end_the_backward_of_their_call():
    # torch's trackers see positional inputs only; here a call made with keywords ends
    # when its input's gradient is ready, not with the whole backward pass.
    class Inner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, *, hidden: torch.Tensor) -> torch.Tensor:
            return self.fc(hidden)

    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = torch.nn.Linear(4, 4)
            self.inner = Inner()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(hidden=self.first(x))

    events = []
    tracker = ModuleTracker()
    tracker.register_user_hooks(pre_bw_hook=lambda m, g: events.append(("pre", tracker.get_known_fqn(m))),
                                post_bw_hook=lambda m, g: events.append(("post", tracker.get_known_fqn(m))))
    model = Outer()
    with tracker:
        model(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert events.index(("post", "Outer.inner")) < events.index(("pre", "Outer.first"))
