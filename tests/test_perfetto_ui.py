"""The demo trace in the real Perfetto UI: no import errors, the expected spans, names,
nesting and flows, read from the UI's own trace processor."""

import pytest

from modtimeline.demo import run_demo

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
