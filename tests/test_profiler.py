"""Module spans inside a torch.profiler trace (``modtimeline merge --profiler``): a real
Llama (transformers, small config) recorded by both at once, merged, loaded in the real
Perfetto UI, and checked against the profiler's own ops; kernel attribution on synthetic
Kineto GPU traces (no GPU here)."""

from __future__ import annotations

import orjson
import pytest
import torch

from modtimeline import Timeline
from modtimeline.analysis.profiler import TID_BASE, Bracket, fit_clock
from modtimeline.analysis.reader import read_trace, samples
from modtimeline.cli import main

from .real_models import llama


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """(folder, Linear FQNs in call order of one forward): 3 steps of Llama under both."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("profiled")
    torch.manual_seed(0)
    model, step = llama()
    linear_calls: list[str] = []
    names = {module: name for name, module in model.named_modules()}
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: linear_calls.append(names[module]) if isinstance(module, torch.nn.Linear) else None)
    step().backward()  # (warm-up, and the order of Linear calls in one forward)
    hook.remove()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        with Timeline(folder / "t.json") as timeline:
            for _ in range(3):
                with timeline.step():
                    step().backward()
    profiler.export_chrome_trace(str(folder / "kineto.json"))
    assert main(["merge", "--profiler", str(folder / "kineto.json"), str(folder / "t.json"),
                 "-o", str(folder / "both.json")]) == 0
    return folder, linear_calls


def _spans(document, category):
    return sorted((e for e in document["traceEvents"] if e.get("ph") == "X" and e.get("cat") == category
                   and isinstance(e.get("tid"), int) and e["tid"] >= TID_BASE), key=lambda e: e["ts"])


def test_every_linear_op_lies_inside_its_modules_forward_span(profiled):
    folder, linear_calls = profiled
    document = orjson.loads((folder / "both.json").read_bytes())
    # The oracle: the profiler's k-th aten::linear op of a step is the k-th nn.Linear call of
    # that step's forward (every linear op of Llama comes from an nn.Linear module).
    ops = sorted((e for e in document["traceEvents"] if e.get("name") == "aten::linear" and e.get("ph") == "X"),
                 key=lambda e: e["ts"])
    linear_spans = [e for e in _spans(document, "forward")
                    if any(e["name"] == f"LlamaForCausalLM.{c}" for c in linear_calls)]
    assert len(ops) == len(linear_spans) == 3 * len(linear_calls) > 0, (len(ops), len(linear_spans))
    inside = sum(span["ts"] <= op["ts"] and op["ts"] + op["dur"] <= span["ts"] + span["dur"]
                 for op, span in zip(ops, linear_spans))
    assert inside / len(ops) >= 0.99, f"{inside} of {len(ops)}"
    assert [s["name"] for s in linear_spans[: len(linear_calls)]] == [f"LlamaForCausalLM.{c}" for c in linear_calls]


def test_linear_backward_ops_lie_inside_linear_backward_spans(profiled):
    folder, linear_calls = profiled
    document = orjson.loads((folder / "both.json").read_bytes())
    linears = {f"LlamaForCausalLM.{c}" for c in linear_calls}
    backward = [s for s in _spans(document, "backward") if s["name"] in linears]
    nodes = [e for e in document["traceEvents"] if e.get("ph") == "X" and isinstance(e.get("name"), str)
             and e["name"].startswith("autograd::engine::evaluate_function: ") and "MmBackward" in e["name"]]
    assert nodes and backward
    inside = sum(any(s["ts"] <= n["ts"] and n["ts"] + n["dur"] <= s["ts"] + s["dur"] for s in backward) for n in nodes)
    assert inside / len(nodes) >= 0.99, f"{inside} of {len(nodes)}"


def test_the_merged_file_loads_in_the_real_ui_without_losing_anything(profiled):
    pytest.importorskip("playwright")
    from .perfetto_ui import PerfettoUI

    folder, _ = profiled
    ui = PerfettoUI()
    try:
        trace = ui.load(folder / "both.json")
        try:
            assert trace.problems() == [] and trace.page_errors == []
            ours = orjson.loads((folder / "t.json").read_bytes())
            our_spans = sum(1 for e in ours["traceEvents"] if e.get("ph") == "X")
            threads = trace.query("select t.name as name, count(*) as n from slice s join thread_track tt "
                                  "on s.track_id = tt.id join thread t using (utid) where t.name like 'modtimeline %' "
                                  "group by 1 order by 1")
            assert sum(r["n"] for r in threads) == our_spans
            assert {r["name"] for r in threads} == {"modtimeline steps", "modtimeline forward", "modtimeline backward"}
        finally:
            trace.close()
    finally:
        ui.close()


def test_summary_reads_the_merged_file_like_the_trace(profiled, capsys):
    folder, _ = profiled
    for name in ("t.json", "both.json"):
        assert main(["summary", "--format", "json", str(folder / name)]) == 0
    first, second = (orjson.loads(chunk) for chunk in _json_documents(capsys.readouterr().out))
    assert [m["fqn"] for m in first["modules"]] == [m["fqn"] for m in second["modules"]]


def _json_documents(text: str) -> list[str]:
    starts = [i for i, line in enumerate(text.splitlines()) if line == "{"]
    lines = text.splitlines()
    return ["\n".join(lines[a:b]) for a, b in zip(starts, starts[1:] + [len(lines)])]


def test_clock_fit_takes_the_narrowest_bracket_and_follows_drift():
    # the profiler's clock runs 5 s ahead of ours and drifts 10 µs over the run; each
    # marker pair brackets the offset, some tightly (2 µs), some loosely (40 µs)
    brackets = []
    for n, t in enumerate(range(0, 1_000_000_000, 50_000_000)):
        true = 5_000_000_000 + (10_000 * t) // 1_000_000_000
        width = [2_000, 40_000, 9_000, 3_000][n % 4]
        brackets.append(Bracket(t, true - width // 3, true + width - width // 3))
    fit = fit_clock(brackets)
    assert fit.error_ns == 1_000
    for t in (0, 500_000_000, 950_000_000):
        true = 5_000_000_000 + (10_000 * t) // 1_000_000_000
        assert abs(fit.offset(t) - true) <= 1_500, (t, fit.offset(t) - true)


def _kineto(tmp_path, base_ns: int, launches: list[tuple[float, int]], kernels: list[tuple[float, float, int]]):
    """A Kineto-shaped GPU trace: cudaLaunchKernel events on the CPU, kernels on stream 7."""
    events = [{"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 100, "tid": 100, "ts": ts,
               "dur": 3.0, "args": {"correlation": c}} for ts, c in launches]
    events += [{"ph": "X", "cat": "kernel", "name": f"gemm_{c}", "pid": 0, "tid": 7, "ts": ts, "dur": dur,
                "args": {"correlation": c, "device": 0, "stream": 7}} for ts, dur, c in kernels]
    path = tmp_path / "kineto.json"
    path.write_bytes(orjson.dumps({"schemaVersion": 1, "baseTimeNanoseconds": base_ns, "traceEvents": events}))
    return path


def test_kernels_are_attributed_to_the_modules_that_launched_them(tmp_path, capsys):
    from modtimeline.format import FORWARD, FORWARD_TRACK, BACKWARD, BACKWARD_TRACK, SpanColumns, Track, TraceData
    from modtimeline.writers import write_trace

    # Our trace: Net (0-100 µs) > Net.a (10-40 µs), Net.b (50-90 µs) forward; Net backward 200-300 µs.
    # perf clock = profiler clock - 1 s (wall clock fallback: no markers in this synthetic trace).
    base_ns, wall = 5_000_000_000, 1_000_000_000_000
    spans = SpanColumns()
    for name, begin, end in ((0, 0, 100), (1, 10, 40), (2, 50, 90)):
        spans.append(FORWARD_TRACK, base_ns + begin * 1000, base_ns + end * 1000, name, FORWARD, name, 0)
    spans.append(BACKWARD_TRACK, base_ns + 200_000, base_ns + 300_000, 0, BACKWARD, 0, 0)
    write_trace(TraceData(0, base_ns, ["Net", "Net.a", "Net.b"],
                          [Track(FORWARD_TRACK, "forward"), Track(BACKWARD_TRACK, "backward")], spans,
                          metadata={"tool": "modtimeline", "base_wall_time_ns": wall, "steps": [0]}), tmp_path / "t.json")
    kineto_base = wall - 1_000_000  # the profiler's times are µs after its base
    # launches at 20 µs (in Net.a), 60 µs (Net.b), 250 µs (Net backward), 150 µs (no module)
    launches = [(1_000 + 20.0, 1), (1_000 + 60.0, 2), (1_000 + 250.0, 3), (1_000 + 150.0, 4)]
    kernels = [(1_000 + 30.0, 50.0, 1), (1_000 + 85.0, 70.0, 2), (1_000 + 260.0, 25.0, 3), (1_000 + 160.0, 5.0, 4)]
    path = _kineto(tmp_path, kineto_base, launches, kernels)
    assert main(["merge", "--profiler", str(path), str(tmp_path / "t.json"), "-o", str(tmp_path / "m.json")]) == 0
    assert "3 of 4 GPU kernels attributed" in capsys.readouterr().out
    per_key = samples(read_trace(tmp_path / "m.json"))
    gpu = {(name, phase): sum(s.inclusive_ns for s in by_step.values())
           for (name, phase, device), by_step in per_key.items() if device == "cuda"}
    # exact kernel time per module, parents include their children's kernels
    assert gpu == {("Net.a", "forward"): 50_000, ("Net.b", "forward"): 70_000, ("Net", "forward"): 120_000,
                   ("Net", "backward"): 25_000}


def test_a_gpu_timelines_event_spans_neither_take_kernels_nor_add_to_their_time(tmp_path, capsys):
    """A device="cuda" Timeline's trace has GPU tracks in device time, which on a GPU
    running behind the host lie over later launches: kernels go by host spans alone, and
    the merged file's GPU time is the kernels', not kernels plus event spans (found on an
    H200: a Llama's kernels were attributed twice, to the wrong modules)."""
    from modtimeline.format import FORWARD, FORWARD_TRACK, GPU_TRACK_BASE, SpanColumns, Track, TraceData
    from modtimeline.writers import write_trace

    base_ns, wall = 5_000_000_000, 1_000_000_000_000
    gpu_track = GPU_TRACK_BASE
    spans = SpanColumns()
    for name, begin, end in ((0, 0, 100), (1, 10, 40), (2, 50, 90)):
        spans.append(FORWARD_TRACK, base_ns + begin * 1000, base_ns + end * 1000, name, FORWARD, name, 0)
    # the GPU ran Net.a's work 50 µs late: its event span covers Net.b's launch (60 µs)
    for name, begin, end in ((0, 55, 160), (1, 55, 110), (2, 110, 160)):
        spans.append(gpu_track, base_ns + begin * 1000, base_ns + end * 1000, name, FORWARD, name, 0)
    write_trace(TraceData(0, base_ns, ["Net", "Net.a", "Net.b"],
                          [Track(FORWARD_TRACK, "forward"), Track(gpu_track, "cuda:0 stream 7")], spans,
                          metadata={"tool": "modtimeline", "base_wall_time_ns": wall, "steps": [0]}), tmp_path / "t.json")
    launches = [(1_000 + 20.0, 1), (1_000 + 60.0, 2)]
    kernels = [(1_000 + 60.0, 50.0, 1), (1_000 + 110.0, 50.0, 2)]
    path = _kineto(tmp_path, wall - 1_000_000, launches, kernels)
    assert main(["merge", "--profiler", str(path), str(tmp_path / "t.json"), "-o", str(tmp_path / "m.json")]) == 0
    assert "2 of 2 GPU kernels attributed" in capsys.readouterr().out
    per_key = samples(read_trace(tmp_path / "m.json"))
    gpu = {(name, phase): sum(s.inclusive_ns for s in by_step.values())
           for (name, phase, device), by_step in per_key.items() if device == "cuda"}
    assert gpu == {("Net.a", "forward"): 50_000, ("Net.b", "forward"): 50_000, ("Net", "forward"): 100_000}
    merged = orjson.loads((tmp_path / "m.json").read_bytes())
    names = {e["tid"]: e["args"]["name"] for e in merged["traceEvents"] if e.get("name") == "thread_name"}
    assert {names[e["tid"]] for e in merged["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "forward"} == \
        {"modtimeline forward", "cuda:0 stream 7", "cuda:0 stream 7 (kernels)"}  # the event spans are still shown


def test_event_spans_still_count_in_the_steps_the_profile_did_not_cover(tmp_path, capsys):
    """A profiler that records some steps only (its schedule): the steps it covered have
    kernel time, the others keep their event spans' (review of the fix above)."""
    from modtimeline.format import FORWARD, FORWARD_TRACK, GPU_TRACK_BASE, SpanColumns, Track, TraceData
    from modtimeline.writers import write_trace

    base_ns, wall = 5_000_000_000, 1_000_000_000_000
    spans = SpanColumns()
    for step, offset in ((0, 0), (1, 1_000)):  # step 1 a ms later, outside the profile
        spans.append(FORWARD_TRACK, base_ns + (offset + 10) * 1000, base_ns + (offset + 40) * 1000, 0, FORWARD, step, step)
        spans.append(GPU_TRACK_BASE, base_ns + (offset + 15) * 1000, base_ns + (offset + 95) * 1000, 0, FORWARD, step,
                     step)
    write_trace(TraceData(0, base_ns, ["Net"], [Track(FORWARD_TRACK, "forward"), Track(GPU_TRACK_BASE, "cuda:0 stream 7")],
                          spans, metadata={"tool": "modtimeline", "base_wall_time_ns": wall, "steps": [0, 1]}),
                tmp_path / "t.json")
    path = _kineto(tmp_path, wall - 1_000_000, [(1_000 + 20.0, 1)], [(1_000 + 30.0, 50.0, 1)])
    assert main(["merge", "--profiler", str(path), str(tmp_path / "t.json"), "-o", str(tmp_path / "m.json")]) == 0
    per_step = samples(read_trace(tmp_path / "m.json"))[("Net", "forward", "cuda")]
    assert {step: sample.inclusive_ns for step, sample in per_step.items()} == {0: 50_000, 1: 80_000}


def test_a_host_track_named_kernels_is_not_a_profilers_kernel_track(tmp_path):
    """inductor's detail on the CPU writes a host track "compiled forward (kernels)": it
    must not make the reader drop a file's GPU event spans (review of the fix above)."""
    from modtimeline.format import FORWARD, FORWARD_TRACK, GPU_TRACK_BASE, SpanColumns, Track, TraceData
    from modtimeline.writers import write_trace

    base_ns = 5_000_000_000
    spans = SpanColumns()
    spans.append(FORWARD_TRACK, base_ns, base_ns + 40_000, 0, FORWARD, 0, 0)
    spans.append(4000, base_ns + 1_000, base_ns + 30_000, 1, FORWARD, 1, 0)
    spans.append(GPU_TRACK_BASE, base_ns + 5_000, base_ns + 65_000, 0, FORWARD, 0, 0)
    write_trace(TraceData(0, base_ns, ["Net", "Net.fc"], [Track(FORWARD_TRACK, "forward"),
                                                          Track(4000, "compiled forward (kernels)"),
                                                          Track(GPU_TRACK_BASE, "cuda:0 stream 7")], spans,
                          metadata={"tool": "modtimeline", "steps": [0]}), tmp_path / "t.json")
    per_key = samples(read_trace(tmp_path / "t.json"))
    assert per_key[("Net", "forward", "cuda")][0].inclusive_ns == 60_000


def test_a_profiler_passed_to_the_timeline_exports_with_the_spans_in(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import shutil

    from modtimeline.analysis import profiler as profiler_merge

    real_merge = profiler_merge.merge_profiler

    def keep_raw_then_merge(path, trace, output, limits):  # (a trace exports once: keep the raw one)
        shutil.copy(path, tmp_path / "raw.json")
        return real_merge(path, trace, output, limits)

    monkeypatch.setattr(profiler_merge, "merge_profiler", keep_raw_then_merge)
    torch.manual_seed(0)
    model, step = llama()
    step().backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        with Timeline(tmp_path / "t.json", profiler=profiler) as timeline:
            for _ in range(2):
                with timeline.step():
                    step().backward()
    profiler.export_chrome_trace(str(tmp_path / "auto.json"))
    monkeypatch.undo()
    assert main(["merge", "--profiler", str(tmp_path / "raw.json"), str(tmp_path / "t.json"),
                 "-o", str(tmp_path / "explicit.json")]) == 0
    auto, explicit = (orjson.loads((tmp_path / name).read_bytes()) for name in ("auto.json", "explicit.json"))
    assert auto["traceEvents"] == explicit["traceEvents"]
    assert _spans(auto, "forward") and auto["metadata"]["tool"] == "modtimeline"


def test_export_before_the_trace_is_written_is_merged_when_it_is(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with Timeline(tmp_path / "t.json", profiler=profiler) as timeline:
        with profiler:
            with timeline.step():
                model(torch.randn(2, 4)).sum().backward()
        profiler.export_chrome_trace(str(tmp_path / "k.json"))  # before the Timeline writes
        assert not _spans(orjson.loads((tmp_path / "k.json").read_bytes()), "forward")
    assert _spans(orjson.loads((tmp_path / "k.json").read_bytes()), "forward")
