"""Timeline end to end, through written files."""

import dataclasses
import os
from collections import Counter

import pytest
import torch

from modtimeline import Timeline
from modtimeline.errors import DeviceError, TraceFileError

from .models import RECOMPUTED, TREE_FORWARD_CALLS, Tree, train_step
from .trace_checks import assert_nested, load, spans, thread_names

pytestmark = pytest.mark.twin  # the pure-Python pass runs these too


@pytest.fixture
def tree():
    model = Tree()
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def test_tree_trace_has_every_call(tmp_path, tree):
    model, optimizer = tree
    path = tmp_path / "out.json"
    with Timeline(path):
        train_step(model, optimizer)
    trace = load(path)
    events = spans(trace)
    by_cat = lambda cat: Counter(e["name"] for e in events if e["cat"] == cat)  # noqa: E731
    assert dict(by_cat("forward")) == TREE_FORWARD_CALLS
    assert dict(by_cat("backward")) == TREE_FORWARD_CALLS
    assert set(by_cat("recompute")) == RECOMPUTED
    names = thread_names(trace)
    assert {names[e["tid"]] for e in events if e["cat"] == "forward"} == {"forward"}
    assert {names[e["tid"]] for e in events if e["cat"] in ("backward", "recompute")} == {"backward"}
    assert_nested(trace)
    # recompute spans sit inside the backward span of the checkpointed block
    ckpt_bw = next(e for e in events if e["name"] == "Tree.ckpt" and e["cat"] == "backward")
    for e in events:
        if e["cat"] == "recompute":
            assert ckpt_bw["ts"] <= e["ts"] and e["ts"] + e["dur"] <= ckpt_bw["ts"] + ckpt_bw["dur"] + 1e-3
    # one flow from each forward call to its backward, joined by call index
    outs = {e["args"]["call"] for e in events if e.get("flow_out")}
    ins = {e["args"]["call"] for e in events if e.get("flow_in")}
    assert outs == ins and len(outs) == sum(TREE_FORWARD_CALLS.values())
    meta = trace["metadata"]
    assert meta["rank"] == 0 and meta["base_wall_time_ns"] > 1.6e18 and meta["events_dropped"] == 0
    process = [e for e in trace["traceEvents"] if e.get("name") == "process_name"]
    assert process == [{"ph": "M", "pid": 0, "tid": 0, "name": "process_name", "args": {"name": "rank 0"}}]


def test_spans_nest_in_time_order(tmp_path, tree):
    model, optimizer = tree
    path = tmp_path / "out.json"
    with Timeline(path):
        train_step(model, optimizer)
    events = spans(load(path))
    fw = {e["args"]["call"]: e for e in events if e["cat"] == "forward"}
    bw = {e["args"]["call"]: e for e in events if e["cat"] == "backward"}
    for call, span in fw.items():
        assert bw[call]["ts"] >= span["ts"] + span["dur"], "a backward began before its forward ended"
    root = next(e for e in events if e["name"] == "Tree" and e["cat"] == "forward")
    for e in fw.values():
        assert root["ts"] <= e["ts"] and e["ts"] + e["dur"] <= root["ts"] + root["dur"]


def test_steps_are_marked(tmp_path, tree):
    model, optimizer = tree
    path = tmp_path / "out.json"
    with Timeline(path) as timeline:
        for i in range(3):
            with timeline.step() as number:
                assert number == i
                train_step(model, optimizer)
    trace = load(path)
    events = spans(trace)
    steps = [e for e in events if e["cat"] == "step"]
    assert [e["name"] for e in steps] == ["step 0", "step 1", "step 2"]
    assert thread_names(trace)[steps[0]["tid"]] == "steps"
    assert Counter(e["args"]["step"] for e in events if e["cat"] == "forward") == {
        i: sum(TREE_FORWARD_CALLS.values()) for i in range(3)
    }
    assert trace["metadata"]["steps"] == [0, 1, 2]


def test_exception_mid_step_still_writes_a_valid_trace(tmp_path, tree):
    model, optimizer = tree

    class Boom(RuntimeError):
        pass

    def explode(x):
        raise Boom("bad batch")

    model.layers[1].forward = explode
    path = tmp_path / "out.json"
    with pytest.raises(Boom) as info:
        with Timeline(path) as timeline:
            with timeline.step():
                train_step(model, optimizer)
    assert str(info.value) == "bad batch"
    trace = load(path)
    events = spans(trace)
    incomplete = {e["name"] for e in events if e["args"].get("incomplete")}
    assert incomplete == {"Tree", "Tree.layers.1", "step 0"}
    assert {e["name"] for e in events if e["cat"] == "forward"} == {"Tree", "Tree.embed", "Tree.layers.0", "Tree.layers.1"}
    assert "Boom: bad batch" in trace["metadata"]["exception"]
    assert_nested(trace)


def test_unwritable_path_fails_before_training(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(TraceFileError, match="is a file, not a folder"):
        Timeline(tmp_path / "afile" / "sub" / "out.json")
    (tmp_path / "adir.json").mkdir()
    with pytest.raises(TraceFileError, match="is a directory"):
        Timeline(tmp_path / "adir.json")
    with pytest.raises(TraceFileError, match="format"):
        Timeline(tmp_path)


def test_the_rank_in_a_path_can_be_formatted(tmp_path):
    assert Timeline(tmp_path / "t{rank:02d}.json").path == tmp_path / "t00.json"  # (one process: rank 0)
    with pytest.raises(TraceFileError, match="cannot put the rank into"):
        Timeline(tmp_path / "t{rank:q}.json")


def test_missing_folders_are_made(tmp_path, tree):
    model, optimizer = tree
    path = tmp_path / "traces" / "deep" / "run.json"
    with Timeline(path):
        train_step(model, optimizer)
    assert load(path)["metadata"]["steps"] == []
    # Removed between the check and the write (a cleanup job): made again at the write.
    timeline = Timeline(tmp_path / "gone" / "run.json")
    os.rmdir(tmp_path / "gone")
    with timeline:
        train_step(model, optimizer)
    assert timeline.written == [tmp_path / "gone" / "run.json"] and (tmp_path / "gone" / "run.json").exists()


@pytest.mark.parametrize("name", ["run.pftrce", "run.json.gzip", "run.txt", "run"])
def test_a_mistyped_ending_is_refused(tmp_path, name):
    with pytest.raises(TraceFileError, match=r"\.json, \.json\.gz.*\.pftrace") as raised:
        Timeline(tmp_path / "traces" / name)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "traces").exists()  # nothing made for a refused name


def test_an_explicit_format_takes_any_ending(tmp_path, tree):
    model, optimizer = tree
    path = tmp_path / "run.txt"
    with Timeline(path, format="json"):
        train_step(model, optimizer)
    assert spans(load(path))


def test_read_only_folder_fails_at_construction(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(TraceFileError):
            Timeline(locked / "out.json")
    finally:
        os.chmod(locked, 0o700)


def test_failed_write_leaves_existing_file_untouched(tmp_path, tree, monkeypatch):
    model, optimizer = tree
    path = tmp_path / "out.json"
    path.write_text("previous trace")

    def broken_writer(data, stream):
        stream.write(b'{"traceEvents":[')
        raise OSError("disk full")

    monkeypatch.setattr("modtimeline.writers.chrome.write_chrome_json", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        with Timeline(path, strict=True):
            train_step(model, optimizer)
    assert path.read_text() == "previous trace"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_cuda_requested_without_cuda_is_clear(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        Timeline(tmp_path / "out.json", device="cuda")
    with pytest.raises(DeviceError, match="device must be one of"):
        Timeline(tmp_path / "out.json", device="tpu")


def test_buffer_overflow_is_bounded_and_reported(tmp_path, tree):
    model, optimizer = tree
    path = tmp_path / "out.json"
    with pytest.warns(RuntimeWarning, match="buffer filled up"):
        with Timeline(path, capacity=20) as timeline:
            for _ in range(3):
                with timeline.step():
                    train_step(model, optimizer)
    trace = load(path)
    assert trace["metadata"]["events_dropped"] > 0
    assert len(timeline.buffer) <= 20 + 4096
    assert_nested(trace)


def test_timeline_cannot_be_nested(tmp_path):
    from modtimeline.errors import ModTimelineError

    timeline = Timeline(tmp_path / "a.json")
    with timeline:
        with pytest.raises(ModTimelineError):
            timeline.__enter__()
        with timeline.step():
            with pytest.raises(ModTimelineError):
                with timeline.step():
                    pass


def test_reused_leaf_input_gives_one_backward_span_per_step(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    x = torch.randn(2, 4, requires_grad=True)
    path = tmp_path / "leaf.json"
    with Timeline(path) as timeline:
        for _ in range(3):
            with timeline.step():
                model(x).sum().backward()
    events = spans(load(path))
    backward = Counter((e["name"], e["args"]["step"]) for e in events if e["cat"] == "backward")
    assert backward == {(name, step): 1 for name in ("Sequential", "Sequential.0", "Sequential.1") for step in range(3)}
    assert not x._backward_hooks
    assert_nested(load(path))


def test_retain_graph_second_backward_gets_its_own_spans(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    path = tmp_path / "retain.json"
    with Timeline(path) as timeline:
        with timeline.step():
            loss = model(torch.randn(2, 4)).sum()
            loss.backward(retain_graph=True)
            loss.backward()
    trace = load(path)
    backward = Counter(e["name"] for e in spans(trace) if e["cat"] == "backward")
    assert backward == {"Sequential": 2, "Sequential.0": 2, "Sequential.1": 2}
    assert len([e for e in spans(trace) if e.get("flow_in")]) == 6
    assert_nested(trace)


def test_temporary_file_skips_a_leftover_and_respects_umask(tmp_path, monkeypatch):
    import itertools

    from modtimeline.writers import atomic

    monkeypatch.setattr(atomic, "_temporary_names", itertools.count(5))
    leftover = tmp_path / f".out.json.{os.getpid()}.5.tmp"  # a crashed run's, same pid and number
    leftover.write_bytes(b"old")
    old_umask = os.umask(0o027)
    try:
        with atomic.atomic_output(tmp_path / "out.json") as stream:
            stream.write(b"{}")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "out.json").read_bytes() == b"{}"
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o640
    assert leftover.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [leftover.name, "out.json"]


@dataclasses.dataclass
class _OutputWithExtras:
    """A model output whose unset field is looked up in a dict: reading it raises KeyError."""

    logits: torch.Tensor
    aux: torch.Tensor = dataclasses.field(init=False)  # set only sometimes
    extras: dict = dataclasses.field(default_factory=dict)

    def __getattr__(self, name: str):
        return self.extras[name]


def test_an_output_that_raises_when_read_never_stops_training(tmp_path):
    """(Found by a hostile trial: the recorder read the dataclass's fields in its hook, and
    the KeyError came out of model(x).)"""

    class Heads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x):
            return _OutputWithExtras(self.lin(x))

    model, x = Heads(), torch.randn(3, 4)
    with Timeline(tmp_path / "t.json"):
        for _ in range(2):
            model(x).logits.sum().backward()
    events = spans(load(tmp_path / "t.json"))
    assert {(e["name"], e["cat"]) for e in events} >= {("Heads", "forward"), ("Heads.lin", "forward"),
                                                         ("Heads.lin", "backward")}
    assert_nested(load(tmp_path / "t.json"))


def test_a_timeline_after_another_learns_no_module_again(tmp_path, monkeypatch):
    """A Timeline per step (a common pattern) takes over the module indices of the one
    before it: no module is learned twice, and each trace still names every span right."""
    from modtimeline.capture.recorder import Recorder

    learned: list[str] = []
    learn = Recorder.learn

    def counting(self, module):
        learned.append(type(module).__name__)
        return learn(self, module)

    monkeypatch.setattr(Recorder, "learn", counting)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    other = torch.nn.Sequential(torch.nn.Linear(4, 2))
    names = []
    for k, traced in enumerate((model, model, other, model)):
        with Timeline(tmp_path / f"{k}.json"):
            traced(torch.randn(2, 4)).sum().backward()
        names.append(sorted({s["name"] for s in spans(load(tmp_path / f"{k}.json"))}))
    assert learned == ["Sequential", "Linear", "ReLU", "Linear", "Sequential", "Linear"]  # each once
    assert names[0] == names[1] == names[3] == ["Sequential", "Sequential.0", "Sequential.1", "Sequential.2"]
    assert names[2] == ["Sequential", "Sequential.0"]


def test_module_indices_start_afresh_once_most_modules_died(tmp_path):
    """The indices taken over never pile up: models come and go (a sweep in one process),
    and a dead module's address reused by a new module is that new module."""
    import gc

    sizes = []
    for k in range(5):
        model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(20)])
        with Timeline(tmp_path / f"{k}.json") as timeline:
            model(torch.randn(2, 4)).sum().backward()
        sizes.append(len(timeline.recorder.module_names))
        assert sorted({s["name"] for s in spans(load(tmp_path / f"{k}.json"))}) == sorted(
            ["Sequential"] + [f"Sequential.{i}" for i in range(20)])
        del model, timeline
        gc.collect()
    assert max(sizes) <= 2 * 21, sizes


def test_each_run_has_its_own_id_and_a_forked_child_draws_its_own(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    ids = []
    for name in ("a", "b"):
        with Timeline(tmp_path / f"{name}.json"):
            pass
        ids.append(load(tmp_path / f"{name}.json")["metadata"]["run_id"])
    assert ids[0] != ids[1]
    assert all(len(run_id) == 32 and int(run_id, 16) >= 0 for run_id in ids)  # (a uuid's 32 hex digits)
    if not hasattr(os, "fork"):
        return
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child: the next id it makes, to the parent
        try:
            with Timeline(tmp_path / "child.json", handle_signals=False, device="cpu"):
                pass
            os.write(writer, load(tmp_path / "child.json")["metadata"]["run_id"].encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        child_id = pipe.read()
    os.waitpid(child, 0)
    with Timeline(tmp_path / "parent.json"):
        pass
    parent_id = load(tmp_path / "parent.json")["metadata"]["run_id"]
    assert len(child_id) == 32 and child_id[:16] != parent_id[:16]


def test_torchrun_names_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    with Timeline(tmp_path / "t.json"):
        pass
    assert load(tmp_path / "t.json")["metadata"]["run_id"] == "job-7"
