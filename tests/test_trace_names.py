"""A trace carries the names of the modules it recorded, not of every module the
process ever traced (issue 24, item 7)."""

import pytest
import torch
from torch import nn

from modtimeline import Timeline
from modtimeline.analysis.reader import read_trace

pytestmark = pytest.mark.twin


@pytest.mark.parametrize("suffix", [".pftrace", ".json"])
def test_a_small_trace_after_a_big_model_stays_small(tmp_path, suffix):
    small = nn.Linear(8, 8)

    def record_small(path):
        with Timeline(path):
            small(torch.randn(2, 8)).sum().backward()
        return path.stat().st_size

    before = record_small(tmp_path / f"before{suffix}")
    big = nn.Sequential(*[nn.Linear(1, 1) for _ in range(3000)])  # kept alive: its names stay known
    with Timeline(tmp_path / f"big{suffix}"):
        big(torch.randn(1, 1)).sum().backward()
    after = record_small(tmp_path / f"after{suffix}")
    # (the same spans; only the run id and the times differ)
    assert after <= before + 64, (before, after)
    trace = read_trace(tmp_path / f"after{suffix}")
    assert {span.name for span in trace.spans} == {"Linear"}
    assert len(big) == 3000


class _Swappable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).relu())


def _forward_names(path) -> set[str]:
    return {s.name for s in read_trace(path).spans if s.phase == "forward"}


def test_a_module_added_to_a_named_model_is_named_by_its_place(tmp_path):
    """A head swapped in after the model was named (fine-tuning, LoRA wrappers,
    resize_token_embeddings) was named as a root of its own, `Sequential.1`, for the rest
    of the process (found by a hostile-conditions trial)."""
    model = _Swappable()
    with Timeline(tmp_path / "a.json"):
        model(torch.randn(3, 4)).sum().backward()
    model.head = nn.Sequential(nn.Dropout(0.0), nn.Linear(8, 5))
    with Timeline(tmp_path / "b.json"):
        model(torch.randn(3, 4)).sum().backward()
    assert _forward_names(tmp_path / "b.json") == {"_Swappable", "_Swappable.body", "_Swappable.head",
                                                   "_Swappable.head.0", "_Swappable.head.1"}
    # a module called on its own, by user code, is still a root of its own
    alone = nn.Linear(2, 2)
    with Timeline(tmp_path / "c.json"):
        alone(torch.randn(1, 2)).sum().backward()
    assert _forward_names(tmp_path / "c.json") == {"Linear"}


def test_a_model_whose_call_began_before_recording_names_its_parts_under_it(tmp_path):
    class Starter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)
            self.timeline = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.timeline is not None:
                self.timeline.start()  # (recording starts inside this call)
            return self.b(self.a(x))

    model = Starter()
    model.timeline = Timeline(tmp_path / "t.json")
    model(torch.randn(2, 4)).sum().backward()
    model.timeline.stop()
    assert _forward_names(tmp_path / "t.json") == {"Starter.a", "Starter.b"}


class _Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


# One module no model holds, called by every block's code by this global name (as
# transformers' models call the `kernels` package's module made of apply_rotary_pos_emb).
shared_scale = _Scale()


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shared_scale(self.linear(x))


def test_a_global_module_a_model_calls_is_named_by_its_global_name(tmp_path):
    model = nn.Sequential(_Block(), _Block())
    with Timeline(tmp_path / "t.json"):
        model(torch.randn(2, 4)).sum().backward()
    forward = [s.name for s in read_trace(tmp_path / "t.json").spans if s.phase == "forward"]
    # (not "_Scale", and not under the first block that called it: both blocks call it)
    assert forward.count("shared_scale") == 2, forward
    assert set(forward) == {"Sequential", "Sequential.0", "Sequential.1", "Sequential.0.linear",
                            "Sequential.1.linear", "shared_scale"}


def test_a_module_called_by_user_code_keeps_its_class_name_when_a_global(tmp_path):
    global standalone
    standalone = nn.Linear(2, 2)
    try:
        with Timeline(tmp_path / "t.json"):
            standalone(torch.randn(1, 2)).sum().backward()
        assert _forward_names(tmp_path / "t.json") == {"Linear"}
    finally:
        del standalone


def test_transformers_llama_names_its_shared_rotary_module_by_what_it_calls(tmp_path):
    """transformers (5.x) decorates apply_rotary_pos_emb with the `kernels` package's
    use_kernel_forward_from_hub, which makes it a module of class `Func` no model holds:
    its calls read `Func` at the top of the names until named by the global."""
    pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    if not isinstance(modeling_llama.apply_rotary_pos_emb, nn.Module):
        pytest.skip("this transformers calls apply_rotary_pos_emb as a plain function")
    from .real_models import llama

    model, step = llama()
    with Timeline(tmp_path / "t.json"):
        step().backward()
    names = [s.name for s in read_trace(tmp_path / "t.json").spans if s.phase == "forward"]
    assert "Func" not in names
    assert names.count("apply_rotary_pos_emb") == 4  # (one call per attention layer)
    # which calls, on each layer, the module that layer keeps for it (in `_kernel_funcs`)
    private = sorted(name for name in names if "._kernel_funcs." in name)
    assert [name.split("._kernel_funcs.")[0] for name in private] == [
        f"LlamaForCausalLM.model.layers.{i}.self_attn" for i in range(4)]


class _Student(nn.Module):
    """Keeps a teacher out of its children (its parameters out of the optimiser's), and
    helpers in a dict."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        object.__setattr__(self, "teacher", teacher)
        self.helpers = {"scale": _Scale()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(x)
        return (self.helpers["scale"](self.body(x)) - target).pow(2).sum()


def test_modules_a_model_holds_outside_its_children_are_named_under_it(tmp_path):
    model = _Student(nn.Sequential(nn.Linear(4, 4)))
    with Timeline(tmp_path / "t.json"):
        model(torch.randn(2, 4)).backward()
    assert _forward_names(tmp_path / "t.json") == {"_Student", "_Student.body", "_Student.teacher",
                                                   "_Student.teacher.0", "_Student.helpers.scale"}


def test_a_part_that_refers_back_to_its_model_leaves_the_model_its_own_name(tmp_path):
    """A model whose call began before recording, whose part keeps a reference back to it
    outside its children: the model was named under its own part (`Part.owner`), found by
    a review."""

    class Part(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    class Starter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = Part()
            object.__setattr__(self.a, "owner", self)
            self.timeline = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.timeline is not None:
                self.timeline.start()
            return self.a(x)

    model = Starter()
    model.timeline = Timeline(tmp_path / "t.json")
    model(torch.randn(2, 4)).sum().backward()
    model.timeline.stop()
    assert _forward_names(tmp_path / "t.json") == {"Starter.a", "Starter.a.lin"}


class _Unprintable:
    def __format__(self, spec: str) -> str:
        raise RuntimeError("a key with no name")


def test_keys_that_are_no_names_leave_the_module_its_class_name(tmp_path):
    """Only str and int keys name a module held in a dict: a key that cannot be printed
    raised inside the forward hook, and a dtype or module key gave its repr as the name."""

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.by_key = {_Unprintable(): _Scale(), torch.float32: nn.ReLU(), "tanh": nn.Tanh()}
            vars(self)[1] = "an attribute that is no name"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for part in self.by_key.values():
                x = part(x)
            return x

    model = Holder()
    with Timeline(tmp_path / "t.json"):
        model(torch.randn(2, 2, requires_grad=True)).sum().backward()
    assert _forward_names(tmp_path / "t.json") == {"Holder", "_Scale", "ReLU", "Holder.by_key.tanh"}


def test_a_notebooks_output_cache_does_not_name_a_module(tmp_path):
    """IPython keeps the last outputs shown as globals `_`, `__`, `_<n>`: a module shown
    by a cell would have been named `_` (found by a review; the namespace simulated)."""
    # (`_` is made at the first output a notebook shows, before the names of later cells)
    namespace: dict[str, object] = {"__name__": "__main__", "nn": nn, "torch": torch, "_": 1, "_1": 1}
    exec("act = nn.GELU()", namespace)
    namespace.update({"_": namespace["act"], "_2": namespace["act"]})  # (what IPython's displayhook does)
    exec("class Net(nn.Module):\n"
         "    def __init__(self):\n"
         "        super().__init__()\n"
         "        self.fc = nn.Linear(4, 4)\n"
         "    def forward(self, x):\n"
         "        return act(self.fc(x))\n", namespace)
    model = namespace["Net"]()  # type: ignore[operator]
    with Timeline(tmp_path / "t.json"):
        model(torch.randn(2, 4)).sum().backward()
    assert _forward_names(tmp_path / "t.json") == {"Net", "Net.fc", "act"}
