"""compiled_detail under inductor: module spans measured from the kernels that ran.

The attribution and the spans are tested on stand-in profiler events (CPU kernels, and the
GPU path: device kernels linked by correlation id, which has not run on a GPU); the whole
route on real inductor compiles (CPU) of a model of ours and a tiny random
``transformers`` LlamaForCausalLM, whole and per block (slow)."""

from __future__ import annotations

import importlib
from array import array

import pytest
import torch

from modtimeline.capture import inductor_detail
from modtimeline.capture.inductor_detail import GraphRecord, Provenance, add_detail_spans, graph_calls
from modtimeline.format import (BACKWARD, COMPILED, FORWARD, FUSED, PROFILER_CLOCK_MARK, PROFILER_CLOCK_MARK_AFTER,
                                SpanColumns, Track, TraceData)
from modtimeline.writers import write_trace

from .trace_checks import assert_nested, assert_nested_columns, load, spans

OFFSET = 5_000_000  # the stand-in profiler clock: ours + OFFSET


class Raw:
    """A stand-in for one of ``kineto_results.events()``."""

    def __init__(self, name: str, start: int, end: int, thread: int = 1, seq: int = -1, fwd_thread: int = 0,
                 corr: int = 0, device: bool = False, linked: int = 0, device_index: int = 0) -> None:
        self._name, self._start, self._end = name, start + OFFSET, end + OFFSET
        self._thread, self._seq, self._fwd, self._corr = thread, seq, fwd_thread, corr
        self._device, self._linked, self._index = device, linked, device_index

    def name(self) -> str: return self._name
    def start_ns(self) -> int: return self._start
    def end_ns(self) -> int: return self._end
    def duration_ns(self) -> int: return self._end - self._start
    def start_thread_id(self) -> int: return self._thread
    def sequence_nr(self) -> int: return self._seq
    def fwd_thread_id(self) -> int: return self._fwd
    def correlation_id(self) -> int: return self._corr
    def linked_correlation_id(self) -> int: return self._linked
    def device_index(self) -> int: return self._index

    def device_type(self):
        return torch.autograd.DeviceType.CUDA if self._device else torch.autograd.DeviceType.CPU


def clock_marks(at: int) -> list[Raw]:
    """The Timeline's two marks, read 1000 ns before / 30 ns after on our clock."""
    return [Raw(f"{PROFILER_CLOCK_MARK}{at}", at + 10, at + 20), Raw(f"{PROFILER_CLOCK_MARK_AFTER}{at + 30}", at + 35, at + 36)]


def provenance() -> Provenance:
    """One forward graph (0/0) of three call sites and its backward."""
    prov = Provenance()
    nodes = {"mm1": (("blocks", "0", "attn"), False), "gelu": (("blocks", "0", "mlp", "1"), False),
             "view": (("blocks", "0", "mlp", "0"), True), "add": (("blocks", "0", "mlp", "0"), False),
             "add2": (("blocks", "0", "attn"), False), "loss": (None, False)}
    handles = {"cpp_fused_gelu_view_0:1": ["gelu", "view"], "extern_kernels.mm:2": ["mm1"],
               "cpp_fused_add_1:3": ["add", "add2"], "cpp_fused_sum_2:4": ["loss"]}
    forward = GraphRecord("0/0", "forward", nodes, handles, 0, 4)
    backward = GraphRecord("0/0", "backward", nodes, {"triton_poi_fused_a_0:1": ["mm1"],
                                                      "extern_kernels.mm:2": ["gelu"]}, 0, 2)
    prov.records = {("0/0", "forward"): forward, ("0/0", "backward"): backward}
    prov._order = [forward, backward]
    return prov


def owner_trace() -> TraceData:
    """What resolve made: the compiled model's forward and backward spans."""
    columns = SpanColumns()
    columns.append(2, 10_000, 30_000, 0, FORWARD, 0, 0, COMPILED)
    columns.append(10, 40_000, 60_000, 0, BACKWARD, 0, 0, COMPILED)
    return TraceData(0, 0, ["Net"], [Track(2, "forward"), Track(10, "backward")], columns,
                     metadata={"tool": "modtimeline"})


def cpu_profile() -> list[Raw]:
    return [
        *clock_marks(1_000),
        Raw("Torch-Compiled Region: 0/0", 11_000, 29_000),
        Raw("CompiledFunction", 11_100, 28_000, seq=7),
        Raw("## Call CompiledFxGraph None ##", 11_200, 27_000),
        Raw("graph_0_cpp_fused_gelu_view_0", 11_300, 12_300),
        Raw("aten::mm", 12_400, 14_400),
        Raw("graph_0_cpp_fused_add_1", 14_500, 15_000),
        Raw("graph_0_cpp_fused_sum_2", 15_100, 15_200),
        Raw("CompiledFunctionBackward", 41_000, 59_000, thread=2, seq=7, fwd_thread=1),
        Raw("## Call CompiledFxGraph None ##", 41_100, 58_000, thread=2),
        Raw("triton_poi_fused_a_0", 41_200, 42_200, thread=2),
        Raw("aten::mm", 42_300, 45_300, thread=2),
        *clock_marks(61_000),
    ]


def test_kernels_become_nested_module_spans_inside_the_owner():
    data = owner_trace()
    add_detail_spans(data, [graph_calls(cpu_profile(), provenance())])
    assert data.metadata["compiled_detail"]["coverage"] == 1.0
    assert data.metadata["compiled_detail"]["graph_calls_placed"] == 2
    rows = {}
    for i in range(len(data.spans)):
        rows.setdefault((data.names[data.spans.name[i]], data.spans.category[i]), []).append(
            (data.spans.track[i], data.spans.begin[i], data.spans.end[i], data.spans.flags[i]))
    # the stand-in clock: profiler = ours + OFFSET, recovered from the marks
    assert rows[("Net.blocks.0.mlp.1", FORWARD)] == [(2, 11_300, 12_300, COMPILED)]  # (the view left out)
    assert rows[("Net.blocks.0.attn", FORWARD)] == [(2, 12_400, 14_400, COMPILED)]
    # fused across attn and mlp.0: their ancestor's, and said so
    blocks0 = rows[("Net.blocks.0", FORWARD)]
    assert blocks0 == [(2, 11_300, 15_000, COMPILED | FUSED)]
    assert data.metadata["compiled_detail"]["fused"] == {"Net.blocks.0": ["Net.blocks.0.attn", "Net.blocks.0.mlp.0"]}
    assert ("Net.blocks.0.mlp", FORWARD) in rows and ("Net.blocks", FORWARD) in rows
    # the loss (no module) is the owner's: no span of its own, but attributed
    assert data.metadata["compiled_detail"]["attributed_ns"] == data.metadata["compiled_detail"]["kernel_ns"]
    # backward: paired with its forward, on the owner's backward track
    assert rows[("Net.blocks.0.attn", BACKWARD)] == [(10, 41_200, 42_200, COMPILED)]
    assert rows[("Net.blocks.0.mlp.1", BACKWARD)] == [(10, 42_300, 45_300, COMPILED)]
    assert_nested_columns(data.spans)


@pytest.mark.parametrize("suffix", [".json", ".pftrace"])
def test_detail_spans_are_written_read_and_summarised(suffix, tmp_path):
    from modtimeline.analysis.reader import read_trace, samples
    from modtimeline.readers.decoding import DEFAULT_LIMITS
    from modtimeline.readers.load import load_trace

    data = owner_trace()
    data.metadata.update(base_wall_time_ns=0, run_id="x", clock="perf_counter_ns")
    add_detail_spans(data, [graph_calls(cpu_profile(), provenance())])
    path = tmp_path / f"t{suffix}"
    write_trace(data, path)
    back = load_trace(path, DEFAULT_LIMITS)
    flags = {(back.processes[0].names[n], c): f for n, c, f in
             zip(back.processes[0].spans.name, back.processes[0].spans.category, back.processes[0].spans.flags)}
    assert flags[("Net.blocks.0", FORWARD)] == COMPILED | FUSED
    assert flags[("Net.blocks.0.attn", FORWARD)] == COMPILED
    found = samples(read_trace(path))
    assert found[("Net.blocks.0.attn", "forward", "cpu")][0].inclusive_ns == 2_000
    # the owner's self time is what no submodule accounts for
    assert found[("Net", "forward", "cpu")][0].self_ns == 20_000 - (15_000 - 11_300)  # (Net.blocks)
    if suffix == ".json":
        trace = load(path)
        assert_nested(trace)
        assert any(e["args"].get("fused") for e in spans(trace))
    # merge, summary and diff read them as any other spans
    from modtimeline.cli import main

    merged = tmp_path / f"merged{suffix}"
    assert main(["merge", str(path), "-o", str(merged)]) == 0
    again = load_trace(merged, DEFAULT_LIMITS).processes[0]
    assert {(again.names[n], f) for n, f in zip(again.spans.name, again.spans.flags)} >= {
        ("Net.blocks.0", COMPILED | FUSED), ("Net.blocks.0.attn", COMPILED)}
    assert main(["summary", str(path), "--warmup", "0"]) == 0
    # (read and compared; one step a side is too few to judge: exit 3, not a pass)
    assert main(["diff", "--warmup", "0", str(path), str(merged)]) == 3


def test_gpu_kernels_are_timed_on_the_device_by_correlation():
    """The GPU path on stand-in events (never run on a GPU here): each device kernel is
    linked to its launch by correlation id, walked up to the graph call's child; the
    spans are the device's times, on a track of their own per device."""
    events = [
        *clock_marks(1_000),
        Raw("Torch-Compiled Region: 0/0", 11_000, 29_000),
        Raw("CompiledFunction", 11_100, 28_000, seq=7),
        Raw("## Call CompiledFxGraph None ##", 11_200, 27_000),
        Raw("graph_0_cpp_fused_gelu_view_0", 11_300, 12_300, corr=21),
        Raw("aten::mm", 12_400, 14_400),
        Raw("cudaLaunchKernel", 12_500, 12_600, corr=22),  # (inside aten::mm: cuBLAS)
        Raw("graph_0_cpp_fused_add_1", 14_500, 15_000, corr=23),
        Raw("gelu_kernel", 20_000, 20_500, device=True, linked=21),
        Raw("sm80_gemm", 20_600, 23_600, device=True, linked=22),
        Raw("sm80_gemm_splitk", 23_700, 24_000, device=True, linked=22),
        Raw("add_kernel", 24_100, 24_200, device=True, linked=23),
        *clock_marks(61_000),
    ]
    data = owner_trace()
    add_detail_spans(data, [graph_calls(events, provenance())])
    tracks = {t.tid: t.name for t in data.tracks}
    rows = {}
    for i in range(len(data.spans)):
        if data.spans.track[i] != 2 or data.spans.category[i] != FORWARD or data.spans.call[i] == 0:
            rows.setdefault(data.names[data.spans.name[i]], []).append(
                (tracks[data.spans.track[i]], data.spans.begin[i], data.spans.end[i]))
    assert rows["Net.blocks.0.mlp.1"] == [("cuda:0 compiled kernels", 20_000, 20_500)]
    assert rows["Net.blocks.0.attn"] == [("cuda:0 compiled kernels", 20_600, 24_000)]  # both of the mm's kernels
    assert rows["Net.blocks.0"] == [("cuda:0 compiled kernels", 20_000, 24_200)]
    assert data.metadata["compiled_detail"]["kernel_ns"] == 500 + 3000 + 300 + 100
    assert_nested_columns(data.spans)


def test_a_graph_without_provenance_is_counted_not_guessed():
    events = [*clock_marks(1_000), Raw("Torch-Compiled Region: 3/0", 11_000, 29_000),
              Raw("## Call CompiledFxGraph None ##", 11_200, 27_000), Raw("graph_1_cpp_fused_x_0", 11_300, 12_300)]
    data = owner_trace()
    add_detail_spans(data, [graph_calls(events, Provenance())])
    detail = data.metadata["compiled_detail"]
    assert detail["graph_calls_without_provenance"] == 1 and detail["coverage"] == 0.0
    assert len(data.spans) == 2


def test_the_users_post_grad_pass_is_chained_and_given_back():
    import torch._inductor.config as config

    def users(graph):
        pass

    saved = config.post_grad_custom_post_pass
    try:
        for value in (None, users, [users]):
            config.post_grad_custom_post_pass = value
            prov = Provenance()
            assert prov.install() and prov.install()  # (a second user: counted)
            chained = config.post_grad_custom_post_pass
            if isinstance(chained, list):  # torch >= 2.12 or so: a list, run in order
                assert chained[-1] == prov._post_pass and chained[:-1] == ([] if value is None else [users])
            else:  # torch 2.11: one callable
                assert chained.modtimeline_pass == prov._post_pass
            assert config.trace.provenance_tracking_level >= 1 and config.cpp.enable_kernel_profile
            prov.uninstall()
            assert config.post_grad_custom_post_pass is chained
            prov.uninstall()
            assert config.post_grad_custom_post_pass == value
    finally:
        config.post_grad_custom_post_pass = saved


def _inductor_settings():
    import torch._inductor.config as config

    return (config.trace.provenance_tracking_level, config.cpp.enable_kernel_profile,
            config.post_grad_custom_post_pass)


def test_undo_gives_back_exactly_what_start_set():
    """``InductorDetail.undo()``: what ``start()`` set goes back, once, whatever comes
    after (a second undo, stop); nested details count; a setting the user changed
    meanwhile stays theirs. For a Timeline whose ``start()`` fails after the detail's."""
    import torch._inductor.config as config

    from modtimeline.capture.inductor_detail import InductorDetail

    before = _inductor_settings()
    assert not inductor_detail.PROVENANCE.installed
    detail = InductorDetail()
    detail.undo()  # (before start: nothing to undo)
    assert _inductor_settings() == before
    detail.start()
    assert config.trace.provenance_tracking_level >= 1 and config.cpp.enable_kernel_profile
    assert _inductor_settings() != before
    detail.undo()
    assert _inductor_settings() == before and not inductor_detail.PROVENANCE.installed
    detail.undo()
    detail.stop()
    assert _inductor_settings() == before

    first, second = InductorDetail(), InductorDetail()
    first.start()
    second.start()
    first.undo()
    first.undo()  # (counted once: the second still holds it)
    assert inductor_detail.PROVENANCE.installed and config.cpp.enable_kernel_profile
    second.undo()
    assert _inductor_settings() == before

    def users(graph):
        pass

    try:
        detail = InductorDetail()
        detail.start()
        config.trace.provenance_tracking_level = 2  # the user's, set while the detail held it
        config.post_grad_custom_post_pass = users
        detail.undo()
        assert config.trace.provenance_tracking_level == 2 and config.post_grad_custom_post_pass is users
        assert config.cpp.enable_kernel_profile == before[1]
    finally:
        config.trace.provenance_tracking_level, config.cpp.enable_kernel_profile, \
            config.post_grad_custom_post_pass = before


def test_undo_stops_a_running_profiler_unread(monkeypatch):
    from modtimeline.capture.inductor_detail import InductorDetail

    before = _inductor_settings()
    monkeypatch.setattr(inductor_detail.PROVENANCE, "records", {("0/0", "forward"): provenance().records[
        ("0/0", "forward")]})
    detail = InductorDetail()
    detail.start()
    detail.recording()
    assert torch.autograd.profiler._is_profiler_enabled
    detail.undo()
    assert not torch.autograd.profiler._is_profiler_enabled
    assert _inductor_settings() == before and detail._profiles == []
    detail.stop()


def test_a_failed_install_leaves_nothing_set(monkeypatch):
    from modtimeline.capture.inductor_detail import InductorDetail

    before = _inductor_settings()
    real = inductor_detail._set

    def failing(config, name, value):
        if name == "post_grad_custom_post_pass":
            raise RuntimeError("no")
        real(config, name, value)

    monkeypatch.setattr(inductor_detail, "_set", failing)
    detail = InductorDetail()
    with pytest.warns(RuntimeWarning, match="could not set inductor's config"):
        detail.start()
    assert _inductor_settings() == before and not inductor_detail.PROVENANCE.installed
    detail.undo()
    assert _inductor_settings() == before


def test_a_detail_dropped_while_started_gives_the_config_back():
    import gc

    from modtimeline.capture.inductor_detail import InductorDetail

    before = _inductor_settings()
    detail = InductorDetail()
    detail.start()
    assert _inductor_settings() != before
    del detail
    gc.collect()
    assert _inductor_settings() == before and not inductor_detail.PROVENANCE.installed


def test_a_timeline_whose_start_fails_gives_the_config_back(monkeypatch, tmp_path):
    """A Timeline whose ``start()`` raises after its detail's ``start()`` ran: inductor's
    config goes back when the Timeline is dropped (the detail's finalizer)."""
    import gc

    from modtimeline import Timeline

    before = _inductor_settings()

    def broken(self):
        raise RuntimeError("a later step of start() failed")

    monkeypatch.setattr(Timeline, "_start_window", broken)
    timeline = Timeline(tmp_path / "t.json", compiled_detail=True)
    with pytest.raises(RuntimeError, match="later step"):
        timeline.start()
    monkeypatch.undo()
    del timeline
    gc.collect()
    assert _inductor_settings() == before and not inductor_detail.PROVENANCE.installed


def test_a_failed_timeline_start_gives_the_config_back_at_once(monkeypatch, tmp_path):
    from modtimeline import Timeline

    before = _inductor_settings()

    def broken(self):
        raise RuntimeError("a later step of start() failed")

    monkeypatch.setattr(Timeline, "_start_window", broken)
    timeline = Timeline(tmp_path / "t.json", compiled_detail=True)
    try:
        with pytest.raises(RuntimeError, match="later step"):
            timeline.start()
        assert _inductor_settings() == before and not inductor_detail.PROVENANCE.installed
    finally:
        timeline._kernels.undo()


# ------------------------------------------------------------------ real inductor compiles
STEPS = 4  # (step 0 compiles, is not profiled and is left out as warm-up; steps 1-3 are compared)


def _train(model_name: str, how: str, detail: bool, path=None, user_pass=None):
    """Compile (inductor, CPU) and train STEPS steps, inside a compiled_detail Timeline
    or none; (dynamo stats, graph breaks, gradients)."""
    import torch._dynamo
    import torch._inductor.config as config
    from torch._dynamo.utils import counters

    from modtimeline import Timeline

    from .test_inductor_models import TinyNet, tiny_llama

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (a loaded machine stalls OpenMP's barriers, not one thread)
    if model_name == "tiny":
        model = TinyNet(hidden=(128, 4096))  # (block 1's MLP is the heavy one)
        blocks = model.blocks
        batch = torch.randint(0, 64, (2, 16))
    else:
        model = tiny_llama()
        blocks = model.model.layers
        batch = torch.randint(0, 128, (2, 16))
    saved = config.post_grad_custom_post_pass
    config.post_grad_custom_post_pass = user_pass
    try:
        run = model
        if how == "whole":
            run = torch.compile(model)
        else:
            for block in blocks:
                block.compile()  # (in place: item 1's boundary gives each block its span)

        def loss():
            out = run(batch)
            return (out.logits if hasattr(out, "logits") else out).float().pow(2).mean()

        if detail:
            with Timeline(path, compiled_detail=True) as timeline:
                for _ in range(STEPS):
                    with timeline.step():
                        loss().backward()
        else:
            for _ in range(STEPS):
                loss().backward()
    finally:
        config.post_grad_custom_post_pass = saved
        torch.set_num_threads(threads)
    stats = {k: v for k, v in counters["stats"].items() if k in ("unique_graphs", "calls_captured")}
    return stats, sum(counters["graph_break"].values()), [p.grad.clone() for p in model.parameters()]


CASES = [("tiny", "whole"), ("tiny", "blocks"), ("llama", "whole"), ("llama", "blocks")]


@pytest.mark.slow
@pytest.mark.parametrize("model_name, how", CASES)
def test_inductor_regions_show_every_layer_measured_from_kernels(model_name, how, tmp_path):
    from modtimeline.analysis.reader import read_trace, samples

    ran: list[int] = []

    def users(graph):  # the user's own post-grad pass: still runs, once per graph
        ran.append(1)

    # torch 2.13 takes a list of post-grad passes, 2.11 one callable: the user's, as they would
    lists = hasattr(importlib.import_module("torch._inductor.custom_graph_pass"), "get_custom_graph_passes")
    user_pass = [users] if lists else users
    stats, breaks, grads = _train(model_name, how, False, user_pass=user_pass)
    untraced_passes, ran[:] = len(ran), []
    path = tmp_path / "t.json"
    traced_stats, traced_breaks, traced_grads = _train(model_name, how, True, path, user_pass=user_pass)
    assert (traced_stats, traced_breaks) == (stats, breaks)
    assert len(ran) == untraced_passes > 0
    for a, b in zip(grads, traced_grads):
        torch.testing.assert_close(a, b)

    trace = load(path)
    assert_nested(trace)
    detail = trace["metadata"]["compiled_detail"]
    assert detail["coverage"] >= 0.9, detail
    assert detail["graph_calls"] == detail["graph_calls_placed"] > 0
    recorded = [e for e in spans(trace) if e["cat"] in ("forward", "backward") and e["args"]["step"] >= 1]
    have = {(e["name"], e["cat"]) for e in recorded if e["args"].get("compiled")}
    if model_name == "tiny":
        layers, parts = [f"TinyNet.blocks.{i}" for i in range(2)], ("attn", "mlp")
    else:
        layers, parts = [f"LlamaForCausalLM.model.layers.{i}" for i in range(2)], ("self_attn", "mlp")
    for layer in layers:
        for name in (layer, *(f"{layer}.{part}" for part in parts)):
            for cat in ("forward", "backward"):
                assert (name, cat) in have, (name, cat, sorted(have))

    found = samples(read_trace(path), warmup=1)  # (summary's own numbers)

    def kernel_ns(name: str, phase: str) -> int:
        """The least of its recorded steps (one step stalled by a loaded machine says nothing)."""
        return min((s.inclusive_ns for s in found.get((name, phase, "cpu"), {}).values()), default=0)

    if model_name == "llama":  # identical layers: the same submodules measured, in both phases (times: structure, not a loaded machine's clock)
        for part in parts:
            shapes = []
            for layer in layers:
                prefix = f"{layer}.{part}"
                shapes.append({(e["name"][len(layer):], e["cat"]) for e in recorded
                               if e["name"] == prefix or e["name"].startswith(prefix + ".")})
            assert shapes[0] == shapes[1] and shapes[0], (part, shapes)
        for part in parts:
            for phase in ("forward", "backward"):
                assert all(kernel_ns(f"{layer}.{part}", phase) > 0 for layer in layers)
    else:  # block 1's MLP is 16x wider: the heaviest of its siblings, in both phases
        for phase in ("forward", "backward"):
            children = {n: kernel_ns(n, phase) for n, _, _ in found if n.startswith("TinyNet.blocks.1.")
                        and n.count(".") == 3}
            assert max(children, key=children.__getitem__) == "TinyNet.blocks.1.mlp", (phase, children)
            assert kernel_ns("TinyNet.blocks.1.mlp", phase) > kernel_ns("TinyNet.blocks.0.mlp", phase)


@pytest.mark.slow
def test_the_users_profiler_gives_the_detail_when_it_stops(tmp_path):
    """``Timeline(profiler=prof)``: no profiler of the Timeline's own; the trace written at
    the Timeline's exit gets the detail when ``prof`` stops (written again)."""
    import torch._dynamo

    from modtimeline import Timeline

    from .test_inductor_models import TinyNet

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.compile(TinyNet())
    batch = torch.randint(0, 64, (2, 16))
    path = tmp_path / "t.json"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with Timeline(path, profiler=prof, compiled_detail=True) as timeline:
            for _ in range(STEPS):
                with timeline.step():
                    model(batch).sum().backward()
        assert "pending" in load(path)["metadata"]["compiled_detail"]
    trace = load(path)
    detail = trace["metadata"]["compiled_detail"]
    assert detail["coverage"] >= 0.9 and detail["graph_calls"] == detail["graph_calls_placed"] > 0, detail
    names = {(e["name"], e["cat"]) for e in spans(trace)}
    assert ("TinyNet.blocks.1.mlp", "forward") in names and ("TinyNet.blocks.1.mlp", "backward") in names
    assert_nested(trace)
