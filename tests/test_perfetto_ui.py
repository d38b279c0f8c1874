"""The demo trace in the real Perfetto UI: no import errors, the expected spans, names,
nesting and flows, read from the UI's own trace processor."""

import pytest

from modtimeline.cli.demo import run_demo

from .perfetto_ui import PerfettoUI

pytestmark = pytest.mark.browser

# demo model: GPT > embed, blocks.N > (norm1, attn, norm2, mlp > 0, 1, 2), norm, head
DEMO_STEPS = 2
MODULES_PER_STEP = 1 + 1 + 4 * 8 + 2


@pytest.fixture(scope="module")
def ui():
    viewer = PerfettoUI()
    yield viewer
    viewer.close()


@pytest.fixture(scope="module")
def demo_trace(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo") / "demo.json", steps=DEMO_STEPS)


def test_demo_trace_loads_without_errors(ui, demo_trace):
    trace = ui.load(demo_trace)
    try:
        assert trace.problems() == []
        assert trace.page_errors == []
        threads = {row["name"] for row in trace.query("select name from thread where name is not null")}
        assert {"steps", "forward", "backward"} <= threads
        # (Perfetto keeps a nameless placeholder for pid 0 beside ours)
        process = trace.query("select name, pid from process where name is not null")
        assert process == [{"name": "rank 0", "pid": 0}]

        counts = trace.query(
            "select s.category as cat, t.name as track, count(*) as n from slice s "
            "join thread_track tt on s.track_id = tt.id join thread t using (utid) group by 1, 2 order by 1, 2"
        )
        assert counts == [
            {"cat": "backward", "track": "backward", "n": MODULES_PER_STEP * DEMO_STEPS},
            {"cat": "forward", "track": "forward", "n": MODULES_PER_STEP * DEMO_STEPS},
            {"cat": "recompute", "track": "backward", "n": 8 * DEMO_STEPS},
            {"cat": "step", "track": "steps", "n": DEMO_STEPS},
        ]
        # FQNs, and nesting: each block's children sit one level below it, on both tracks
        nested = trace.query(
            "select s.category as cat, p.name as parent, count(*) as n from slice s join slice p on s.parent_id = p.id "
            "where s.name = 'GPT.blocks.1.attn' group by 1, 2 order by 1"
        )
        assert nested == [
            {"cat": "backward", "parent": "GPT.blocks.1", "n": DEMO_STEPS},
            {"cat": "forward", "parent": "GPT.blocks.1", "n": DEMO_STEPS},
        ]
        roots = trace.query("select distinct name from slice where depth = 0 and category in ('forward', 'backward')")
        assert roots == [{"name": "GPT"}]
        recompute_parents = trace.query(
            "select distinct p.name as parent, p.category as cat from slice s join slice p on s.parent_id = p.id "
            "where s.category = 'recompute' and s.name = 'GPT.blocks.3'"
        )
        assert recompute_parents and all(r["cat"] == "backward" and r["parent"].startswith("GPT.blocks.3") for r in recompute_parents)
        # a flow from every forward call to its backward
        flows = trace.query(
            "select count(*) as n, sum(a.name = b.name) as same, sum(a.category = 'forward' and b.category = 'backward') as fw_to_bw "
            "from flow f join slice a on f.slice_out = a.id join slice b on f.slice_in = b.id"
        )
        assert flows == [{"n": MODULES_PER_STEP * DEMO_STEPS, "same": MODULES_PER_STEP * DEMO_STEPS,
                          "fw_to_bw": MODULES_PER_STEP * DEMO_STEPS}]
        args = trace.query(
            "select extract_arg(arg_set_id, 'args.call') as call, extract_arg(arg_set_id, 'args.step') as step "
            "from slice where name = 'GPT' and category = 'forward' order by ts"
        )
        assert [r["step"] for r in args] == list(range(DEMO_STEPS))
        assert all(isinstance(r["call"], int) for r in args)
    finally:
        trace.close()


# A slice's track by name, in both formats: JSON spans lie on thread tracks (named by
# their thread), .pftrace spans on named tracks under their rank's group.
ON_TRACKS = ("from slice s join track tr on s.track_id = tr.id left join thread_track tt on tt.id = tr.id "
             "left join thread t using (utid)")
TRACK = "coalesce(t.name, tr.name)"
SLICES = (f"select {TRACK} as track, s.name, s.category as cat, s.ts, s.dur, s.depth {ON_TRACKS} "
          "order by 1, s.ts, s.depth, s.name")


@pytest.fixture(scope="module")
def one_trace_three_formats(tmp_path_factory):
    import torch

    from modtimeline import Timeline
    from modtimeline.cli.demo import GPT
    from modtimeline.writers import write_trace

    folder = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    model = GPT()
    tokens = torch.randint(0, 256, (4, 17))
    timeline = Timeline(folder / "unused.json")
    with timeline:
        for _ in range(2):
            with timeline.step():
                model(tokens[:, :-1]).sum().backward()
    data = timeline.trace_data()
    paths = [folder / name for name in ("t.json", "t.json.gz", "t.pftrace")]
    for path in paths:
        write_trace(data, path)
    return paths


def test_json_gzip_and_pftrace_show_identical_spans(ui, one_trace_three_formats):
    results = {}
    for path in one_trace_three_formats:
        trace = ui.load(path)
        try:
            assert trace.problems() == [] and trace.page_errors == [], path.name
            results[path.name] = (trace.query(SLICES), trace.query("select count(*) as n from flow"))
        finally:
            trace.close()
    json_slices, json_flows = results["t.json"]
    assert len(json_slices) > 100 and json_flows[0]["n"] > 0
    assert results["t.json.gz"] == results["t.json"]
    assert results["t.pftrace"] == results["t.json"]


def test_gpu_tracks_load_and_nest(ui, tmp_path):
    import torch

    from modtimeline import Timeline
    from modtimeline.device.fake import FakeBackend

    from .models import Tree, train_step

    model = Tree()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for suffix in (".json", ".pftrace"):
        path = tmp_path / f"gpu{suffix}"
        with Timeline(path, device="cuda", device_backend=FakeBackend(lag_ns=40_000), memory=True) as timeline:
            with timeline.step():
                train_step(model, optimizer)
        trace = ui.load(path)
        try:
            assert trace.problems() == [] and trace.page_errors == []
            per_track = trace.query(
                f"select {TRACK} as track, count(*) as n {ON_TRACKS} group by 1 order by 1")
            counts = {row["track"]: row["n"] for row in per_track}
            assert counts["cuda:0 stream 7"] == counts["forward"] + counts["backward"]
            # one GPU span above each CPU span: same names, both phases
            names = trace.query(f"select distinct s.category as cat {ON_TRACKS} where {TRACK} = 'cuda:0 stream 7' "
                                "order by 1")
            assert [r["cat"] for r in names] == ["backward", "forward", "recompute"]
            # the CUDA memory counter track
            assert trace.query("select count(*) as n from counter")[0]["n"] > 0
        finally:
            trace.close()


def test_llama_trace_loads_and_backward_is_no_deeper_than_forward(ui, tmp_path):
    pytest.importorskip("transformers")
    import torch

    from modtimeline import Timeline

    from .real_models import llama

    torch.manual_seed(0)
    model, step = llama()
    path = tmp_path / "llama.json"
    with Timeline(path) as timeline:
        for _ in range(2):
            with timeline.step():
                step().backward()
    trace = ui.load(path)
    try:
        assert trace.problems() == [] and trace.page_errors == []
        depth = {row["track"]: row["depth"] for row in trace.query(
            f"select {TRACK} as track, max(s.depth) as depth {ON_TRACKS} group by 1")}
        # Before backward spans were bounded by their own work, Llama's backward track was
        # 12 deep (layers nested inside the next layer's self_attn).
        assert "backward (2)" not in depth
        assert depth["backward"] <= depth["forward"], depth
        layers = trace.query("select distinct p.name as parent from slice s join slice p on s.parent_id = p.id "
                             "where s.category = 'backward' and s.name = 'LlamaForCausalLM.model.layers.2'")
        assert layers == [{"parent": "LlamaForCausalLM.model"}]
    finally:
        trace.close()


def test_compiled_models_traces_load_without_errors(ui, tmp_path):
    """torch.compile'd modules (whole model and per block, aot_eager) in both formats: no
    import errors, the compiled calls by the user's names, flagged compiled."""
    import torch

    from modtimeline import Timeline

    from .test_compile import MODELS

    torch._dynamo.reset()
    torch.manual_seed(0)
    whole_cls, whole_shape = MODELS["mlp"]
    blocks_cls, blocks_shape = MODELS["transformer"]
    whole = torch.compile(whole_cls(), backend="aot_eager", fullgraph=True)
    per_block = blocks_cls()
    for i, block in enumerate(per_block.blocks):
        per_block.blocks[i] = torch.compile(block, backend="aot_eager")
    inputs = (torch.randn(*whole_shape), torch.randn(*blocks_shape))
    for path in (tmp_path / "compiled.json", tmp_path / "compiled.pftrace"):
        with Timeline(path) as timeline:
            for _ in range(2):
                with timeline.step():
                    whole(inputs[0]).sum().backward()
                    per_block(inputs[1]).sum().backward()
        trace = ui.load(path)
        try:
            assert trace.problems() == [] and trace.page_errors == []
            rows = trace.query("select name, category as cat, count(*) as n, "
                               "sum(coalesce(extract_arg(arg_set_id, 'args.compiled'), extract_arg(arg_set_id, 'debug.compiled'))) "
                               "as compiled from slice "
                               "where category in ('forward', 'backward') group by 1, 2 order by 1, 2")
            found = {(r["name"], r["cat"]): (r["n"], r["compiled"]) for r in rows}
            assert found[("MLP", "forward")] == (2, 2) and found[("MLP", "backward")] == (2, 2)
            for block in ("Transformer.blocks.0", "Transformer.blocks.1"):
                assert found[(block, "forward")] == (2, 2) and found[(block, "backward")] == (2, 2)
            assert found[("Transformer", "forward")] == (2, None) and found[("Transformer.head", "forward")][0] == 2
            assert not any("_orig_mod" in name or "GraphModule" in name or "lambda" in name for name, _ in found)
        finally:
            trace.close()


def test_inductor_trace_with_detail_loads_and_nests(ui, tmp_path):
    """An inductor-compiled model with compiled_detail (spans measured from its kernels,
    some flagged fused) in both formats: no import errors, and every submodule span sits
    inside the compiled model's span (parent chain in the UI's own slice table)."""
    import torch

    from modtimeline import Timeline

    from .test_inductor_models import TinyNet

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.compile(TinyNet())
    batch = torch.randint(0, 64, (2, 16))
    for path in (tmp_path / "inductor.json", tmp_path / "inductor.pftrace"):
        with Timeline(path, compiled_detail=True) as timeline:
            for _ in range(2):
                with timeline.step():
                    model(batch).sum().backward()
        trace = ui.load(path)
        try:
            assert trace.problems() == [] and trace.page_errors == []
            rows = trace.query(
                "select s.name as name, s.category as cat, s.depth as depth, p.name as parent, "
                "coalesce(extract_arg(s.arg_set_id, 'args.fused'), extract_arg(s.arg_set_id, 'debug.fused')) as fused "
                "from slice s left join slice p on s.parent_id = p.id where s.category in ('forward', 'backward')")
            inside = [r for r in rows if r["name"].startswith("TinyNet.")]
            for cat in ("forward", "backward"):
                for name in ("TinyNet.blocks.0.attn", "TinyNet.blocks.1.mlp"):
                    assert any(r["name"] == name and r["cat"] == cat for r in inside), (name, cat)
            # nested: each one's parent is its own FQN's parent or an ancestor; the top ones sit in TinyNet
            for r in inside:
                assert r["parent"] is not None and (r["name"].startswith(r["parent"] + ".")), r
            assert any(r["fused"] for r in inside)
        finally:
            trace.close()


def test_modtimeline_open_serves_the_trace_to_the_offline_ui(ui, tmp_path):
    import subprocess
    import sys

    trace_path = run_demo(tmp_path / "demo.json", steps=1)
    command = subprocess.Popen([sys.executable, "-m", "modtimeline", "open", str(trace_path), "--ui", "offline",
                                "--no-browser", "--wait", "120"], stdout=subprocess.PIPE, text=True)
    try:
        assert command.stdout is not None
        url = next(line.strip() for line in command.stdout if line.startswith("http://127.0.0.1:"))
        trace = ui.load_url(url)
        try:
            assert trace.problems() == [] and trace.page_errors == []
            assert trace.query("select count(*) as n from slice where name = 'GPT'")[0]["n"] == 2  # fw + bw
        finally:
            trace.close()
        assert command.wait(timeout=60) == 0  # it stops serving by itself once the UI has the trace
        assert "stopped serving" in command.stdout.read()
    finally:
        command.kill()


def test_merged_ranks_load_as_one_job_in_both_formats(ui, tmp_path):
    """Two gloo ranks (one with its clock 200 ms ahead), merged: every span and flow of
    both rank files, one process per rank, no import errors, .json and .pftrace alike."""
    from modtimeline.cli import main

    from .test_distributed import _shifted_clock_ddp, spawn
    from .trace_checks import load, spans

    spawn(_shifted_clock_ddp, 2, tmp_path)
    ranks = [load(tmp_path / f"job-{rank}.json") for rank in (0, 1)]
    span_count = sum(len(spans(r)) for r in ranks)
    flow_count = sum(1 for r in ranks for e in spans(r) if e.get("flow_out"))
    results = {}
    for out in ("job.json", "job.pftrace"):
        assert main(["merge", str(tmp_path / "job-0.json"), str(tmp_path / "job-1.json"), "-o", str(tmp_path / out)]) == 0
        trace = ui.load(tmp_path / out)
        try:
            assert trace.problems() == [] and trace.page_errors == [], out
            assert trace.query("select count(*) as n from slice")[0]["n"] == span_count
            assert trace.query("select count(*) as n from flow")[0]["n"] == flow_count
            if out.endswith(".json"):
                groups = trace.query("select pid, name from process where name is not null order by pid")
                assert [(p["pid"], p["name"].split(" · ")[0]) for p in groups] == [(0, "rank 0"), (1, "rank 1")]
            else:  # one group of named tracks per rank ("rank 0 · host" > "forward"), no process 0
                groups = trace.query("select g.name as rank, c.name as track from track c join track g "
                                     "on c.parent_id = g.id where c.name = 'forward' order by 1")
                assert [g["rank"].split(" · ")[0] for g in groups] == ["rank 0", "rank 1"]
                assert trace.query("select count(*) as n from process where name like 'rank%'")[0]["n"] == 0
            results[out] = trace.query(SLICES)
        finally:
            trace.close()
    assert results["job.pftrace"] == results["job.json"]
