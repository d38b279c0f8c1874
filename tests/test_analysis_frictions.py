"""Analysis frictions (issue 23, item 4): a trace without steps, --depth by call nesting,
the straggler view's columns, noise and wrapper self time, `open` of a file that is not
a trace, and a torch.profiler trace given to `summary`. Real files end to end; every
assertion is about structure, never timing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import torch
from torch import nn

from modtimeline import Timeline
from modtimeline.cli import main
from modtimeline.format import BACKWARD, BACKWARD_TRACK, FORWARD, FORWARD_TRACK, STEP, STEPS_TRACK, SpanColumns, TraceData, Track
from modtimeline.writers import write_trace


def _summary_json(capsys, *args: object) -> dict:
    code = main(["summary", "--format", "json", *map(str, args)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return orjson.loads(out.out)


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("modtimeline: error: "), captured.err
    return captured.err


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


# ------------------------------------------------------------ 1. no steps marked
def test_summary_of_a_trace_without_steps_is_one_step_with_a_full_table(tmp_path, capsys):
    model = _mlp()
    path = tmp_path / "plain.json"
    with Timeline(path):  # no timeline.step()
        for _ in range(3):
            model(torch.randn(4, 8)).sum().backward()

    summary = _summary_json(capsys, path)
    assert summary["steps"] == 1 and summary["steps_marked"] is False
    rows = {m["fqn"]: m for m in summary["modules"]}
    assert set(rows) == {"Sequential", "Sequential.0", "Sequential.1", "Sequential.2"}
    assert rows["Sequential"]["calls"] == 3  # the whole trace is the one step
    assert all(m["total_us"]["forward"] > 0 and m["total_us"]["backward"] > 0 for m in rows.values())

    assert main(["summary", str(path)]) == 0
    text = capsys.readouterr().out
    assert "without steps marked" in text and "timeline.step()" in text
    assert "  Sequential.2" in text
    # (warm-up leaves out marked steps only: --warmup 5 still shows the one step)
    assert _summary_json(capsys, path, "--warmup", "5")["modules"]


def test_warmup_leaves_out_the_first_marked_step_not_the_calls_outside_steps(tmp_path, capsys):
    model = _mlp()
    path = tmp_path / "mixed.json"
    with Timeline(path) as timeline:
        model(torch.randn(4, 8)).sum().backward()  # outside any step (a check before training)
        for _ in range(3):
            with timeline.step():
                model(torch.randn(4, 8)).sum().backward()
    assert _summary_json(capsys, path)["steps"] == 2  # steps 1 and 2; step 0 is the warm-up
    everything = _summary_json(capsys, path, "--warmup", "0")
    assert everything["steps"] == 3  # the calls outside steps are no step of their own
    root = next(m for m in everything["modules"] if m["fqn"] == "Sequential")
    assert root["calls"] == 1


def test_diff_of_traces_without_steps_says_to_mark_them(tmp_path, capsys):
    model = _mlp()
    path = tmp_path / "plain.json"
    with Timeline(path):
        model(torch.randn(4, 8)).sum().backward()
    assert main(["diff", "--json", str(path), str(path)]) == 3  # one step a side: nothing can be judged
    report = orjson.loads(capsys.readouterr().out)
    assert any("timeline.step()" in warning for warning in report["warnings"])
    assert report["cannot_judge"]


# ------------------------------------------------------ 2. --depth by call nesting
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).relu()


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])  # never called itself, as in Llama

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Decoder()
        self.lm_head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(x))


def test_depth_counts_called_modules_not_dots(tmp_path, capsys):
    model = CausalLM()
    path = tmp_path / "lm.json"
    with Timeline(path) as timeline:
        for _ in range(2):
            with timeline.step():
                model(torch.randn(2, 8)).sum().backward()

    depths = {m["fqn"]: m["depth"] for m in _summary_json(capsys, path, "--warmup", "0")["modules"]}
    assert depths == {"CausalLM": 0, "CausalLM.model": 1, "CausalLM.model.layers.0": 2, "CausalLM.model.layers.1": 2,
                      "CausalLM.model.layers.0.mlp": 3, "CausalLM.model.layers.1.mlp": 3, "CausalLM.lm_head": 1}
    shown = [m["fqn"] for m in _summary_json(capsys, path, "--depth", "2")["modules"]]
    assert shown == ["CausalLM", "CausalLM.model", "CausalLM.model.layers.0", "CausalLM.model.layers.1",
                     "CausalLM.lm_head"]
    # the table indents as --depth counts: two levels for a decoder layer
    assert main(["summary", "--depth", "2", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("    CausalLM.model.layers.0 ") for line in lines)
    assert any(line.startswith("  CausalLM.lm_head ") for line in lines)


def test_call_depths_of_wrappers_and_deep_names():
    from modtimeline.analysis.summary import call_depths

    names = ["Net (DistributedDataParallel)", "Net", "Net.blocks.0 (CheckpointWrapper)", "Net.blocks.0",
             "Net.blocks.0.fc", "Other.x.y"]
    # a wrapper's own call sits at the level of the module it wraps: levels as without it
    assert call_depths(names) == {"Net (DistributedDataParallel)": 0, "Net": 0, "Net.blocks.0 (CheckpointWrapper)": 1,
                                  "Net.blocks.0": 1, "Net.blocks.0.fc": 2, "Other.x.y": 0}
    deep = ["m" + ".m" * n for n in range(3000)]  # a file may hold anything: no recursion limit
    assert call_depths(deep)[deep[-1]] == 2999


# ------------------------------------------------------------------- 3. --by-rank
def _write_rank(path: Path, rank: int, per_step_us: list[dict[str, float]], world: int = 3) -> Path:
    """A rank file, through the real writer: per step, a root ``Model`` whose children run
    one after another for the given µs, forward then backward."""
    children = list(per_step_us[0])
    names = ["Model", *children] + [f"step {s}" for s in range(len(per_step_us))]
    columns = SpanColumns()
    t = 0
    call = 0
    for step, durations in enumerate(per_step_us):
        step_start = t
        for category, track in ((FORWARD, FORWARD_TRACK), (BACKWARD, BACKWARD_TRACK)):
            start = t
            rows = []
            for index, name in enumerate(children):
                length = int(durations[name] * 1000)
                rows.append((t, t + length, index + 1))
                t += length
            columns.append(track, start, t, 0, category, call, step)
            for begin, end, name_index in rows:
                columns.append(track, begin, end, name_index, category, call + name_index, step)
        columns.append(STEPS_TRACK, step_start, t, len(children) + 1 + step, STEP, step, step)
        call += len(names)
    metadata = {"tool": "modtimeline", "steps": list(range(len(per_step_us))), "run_id": "job", "rank": rank,
                "world_size": world, "hostname": "node", "clock_sync": {"reference_rank": 0, "samples": [[0, 0, 100]]}}
    data = TraceData(rank, 0, names, [Track(STEPS_TRACK, "steps"), Track(FORWARD_TRACK, "forward"),
                                      Track(BACKWARD_TRACK, "backward")], columns, metadata=metadata)
    write_trace(data, path)
    return path


def _noisy_steps(seed: int, steps: int = 12, slow: float = 1.0) -> list[dict[str, float]]:
    """Per step, µs of eight modules with a few % of jitter (deterministic); ``slow``
    multiplies ``Model.straggler`` in every step."""
    import random

    rng = random.Random(seed)
    return [{f"Model.m{i}": (40 + 30 * i) * rng.uniform(0.93, 1.07) for i in range(8)}
            | {"Model.straggler": 300 * slow * rng.uniform(0.93, 1.07)} for _ in range(steps)]


def _by_rank(capsys, *args: object) -> dict:
    code = main(["summary", "--by-rank", "--format", "json", *map(str, args)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return orjson.loads(out.out)


def test_by_rank_noise_and_a_spike_are_not_uneven_a_straggling_module_is(tmp_path, capsys):
    steps = [_noisy_steps(seed=0), _noisy_steps(seed=1), _noisy_steps(seed=2, slow=1.5)]
    steps[1][5]["Model.m0"] *= 40  # one scheduling spike in one step (40 µs -> 1.6 ms)
    files = [_write_rank(tmp_path / f"t.rank{rank}.json", rank, per_step) for rank, per_step in enumerate(steps)]
    view = _by_rank(capsys, *files)
    uneven = {(m["fqn"], m["phase"]) for m in view["modules"] if m["uneven"]}
    assert uneven == {("Model.straggler", "forward"), ("Model.straggler", "backward")}
    assert view["uneven_threshold"] == 0.25 and view["uneven_floor_us"] == 20
    straggler = next(m for m in view["modules"] if m["fqn"] == "Model.straggler")
    assert straggler["slowest_rank"] == 2 and 1.3 < straggler["spread"] < 1.7
    spiked = next(m for m in view["modules"] if m["fqn"] == "Model.m0" and m["phase"] == "forward")
    assert spiked["spread"] < 1.2  # the median step of each rank: one spike does not move it
    # the options change the rule: at 1 % and no floor, jitter is "uneven" too
    loose = _by_rank(capsys, "--uneven-threshold", "0.01", "--uneven-floor-us", "0", *files)
    assert len([m for m in loose["modules"] if m["uneven"]]) > 2


def test_by_rank_tables_name_every_column_and_the_rule(tmp_path, capsys):
    files = [_write_rank(tmp_path / f"t.rank{r}.json", r, _noisy_steps(seed=r, slow=2.0 if r else 1.0))
             for r in (0, 1)]
    assert main(["summary", "--by-rank", *map(str, files)]) == 0
    text = capsys.readouterr().out.splitlines()
    tables = [(header, rule) for header, rule in zip(text, text[1:]) if rule.startswith("─")]
    assert len(tables) == 2
    for header, rule in tables:  # a name over every ruled column
        assert len(re.split(r"\s{2,}", header.strip())) == len(rule.split()), (header, rule)
    assert any(line.rstrip().endswith("uneven") and line.startswith("module") for line in text)
    assert any(line.rstrip().endswith("slow") and line.startswith("rank") for line in text)
    assert any("--uneven-threshold" in line for line in text)
    assert main(["summary", "--by-rank", "--format", "markdown", *map(str, files)]) == 0
    markdown = capsys.readouterr().out
    headers = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| :")
               and ("module" in line or "rank |" in line)]
    assert headers and all("|  |" not in line and "| |" not in line for line in headers), headers


def _wrapper_rank_file(path: Path, rank: int) -> Path:
    """A DDP rank file as the recorder writes one: the wrapper's call (call 0) around
    ``Net`` (call 1); their backward spans cover the same time (DDP adds no autograd
    work of its own), and the wrapper's comes first in the file."""
    names = ["Net (DistributedDataParallel)", "Net", "Net.fc", "step 0", "step 1"]
    columns = SpanColumns()
    for step in range(2):
        t = step * 10_000_000
        columns.append(STEPS_TRACK, t, t + 9_000_000, 3 + step, STEP, step, step)
        columns.append(FORWARD_TRACK, t, t + 3_000_000, 0, FORWARD, step * 3, step)
        columns.append(FORWARD_TRACK, t + 1_000_000, t + 2_500_000, 1, FORWARD, step * 3 + 1, step)
        columns.append(FORWARD_TRACK, t + 1_500_000, t + 2_000_000, 2, FORWARD, step * 3 + 2, step)
        columns.append(BACKWARD_TRACK, t + 4_000_000, t + 8_000_000, 0, BACKWARD, step * 3, step)
        columns.append(BACKWARD_TRACK, t + 4_000_000, t + 8_000_000, 1, BACKWARD, step * 3 + 1, step)
        columns.append(BACKWARD_TRACK, t + 5_000_000, t + 6_000_000, 2, BACKWARD, step * 3 + 2, step)
    metadata = {"tool": "modtimeline", "steps": [0, 1], "run_id": "job", "rank": rank, "world_size": 2,
                "hostname": "node", "clock_sync": {"reference_rank": 0, "samples": [[0, 0, 100]]}}
    data = TraceData(rank, 0, names, [Track(STEPS_TRACK, "steps"), Track(FORWARD_TRACK, "forward"),
                                      Track(BACKWARD_TRACK, "backward")], columns, metadata=metadata)
    write_trace(data, path)
    return path


def _backward_self_us(capsys, path: Path) -> dict[str, float]:
    summary = _summary_json(capsys, path, "--warmup", "0", "--pool-runs")
    return {m["fqn"]: m["self_us"]["backward"] for m in summary["modules"]}


@pytest.mark.parametrize("merged_suffix", [".json", ".pftrace"])
def test_a_wrappers_backward_self_time_goes_to_the_wrapped_module_in_rank_and_merged_files(tmp_path, capsys,
                                                                                          merged_suffix):
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    files = [_wrapper_rank_file(ranks / f"t.rank{r}.json", r) for r in (0, 1)]
    pftrace_rank = _wrapper_rank_file(tmp_path / "t.rank0.pftrace", 0)
    merged = tmp_path / f"job{merged_suffix}"
    assert main(["merge", str(ranks), "-o", str(merged)]) == 0
    capsys.readouterr()
    expected = {"Net (DistributedDataParallel)": 0.0, "Net": 3000.0, "Net.fc": 1000.0}
    for source in (files[0], pftrace_rank, merged):
        assert _backward_self_us(capsys, source) == pytest.approx(expected), source




def _ddp_rank(rank: int, world: int, folder: str) -> None:
    model = nn.parallel.DistributedDataParallel(_mlp())
    with Timeline(os.path.join(folder, "job.json")) as timeline:
        for _ in range(3):
            with timeline.step():
                model(torch.randn(4, 8)).sum().backward()


@pytest.mark.slow
def test_real_ddp_wrapper_self_time_is_the_same_in_rank_and_merged_files(tmp_path, capsys):
    from .test_distributed import spawn  # (gloo ranks, file rendezvous, a timeout)

    spawn(_ddp_rank, 2, tmp_path)
    for suffix in (".json", ".pftrace"):
        assert main(["merge", str(tmp_path / "job.rank0.json"), str(tmp_path / "job.rank1.json"),
                     "-o", str(tmp_path / f"merged{suffix}")]) == 0
    capsys.readouterr()
    for source in ("job.rank0.json", "merged.json", "merged.pftrace"):
        rows = _backward_self_us(capsys, tmp_path / source)
        assert rows["Sequential (DistributedDataParallel)"] == 0.0 and rows["Sequential"] > 0, (source, rows)


# ---------------------------------------------------------- 4. open: not a trace
def _real_trace(path: Path) -> Path:
    model = _mlp()
    with Timeline(path) as timeline:
        with timeline.step():
            model(torch.randn(4, 8)).sum().backward()
    return path


NOT_TRACES = {
    "empty": lambda good: b"",
    "blank": lambda good: b"  \n",
    "text": lambda good: b"hello world\n",
    "json, not a trace": lambda good: b'{"a": 1}',
    "truncated json": lambda good: good.read_bytes()[: good.stat().st_size // 2],
    "bad gzip": lambda good: b"\x1f\x8b\x08\x00garbage",
}


@pytest.mark.parametrize("case", sorted(NOT_TRACES))
def test_open_refuses_a_file_that_is_not_a_trace_in_one_line(tmp_path, capsys, case):
    good = _real_trace(tmp_path / "good.json")
    bad = tmp_path / ("bad.json.gz" if case == "bad gzip" else "bad.json")
    bad.write_bytes(NOT_TRACES[case](good))
    started = time.monotonic()
    err = _one_line_error(capsys, ["open", str(bad), "--no-browser", "--port", "0", "--wait", "30"])
    assert str(bad) in err and "trace" in err
    assert time.monotonic() - started < 20  # refused, not served until --wait ran out


def test_open_refuses_a_truncated_pftrace_and_a_directory(tmp_path, capsys):
    good = _real_trace(tmp_path / "good.pftrace")
    bad = tmp_path / "bad.pftrace"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "not a trace" in _one_line_error(capsys, ["open", str(bad), "--no-browser", "--port", "0", "--wait", "30"])
    assert "directory" in _one_line_error(capsys, ["open", str(tmp_path), "--no-browser", "--port", "0"])


def test_open_checks_pass_every_trace_the_ui_opens(tmp_path, monkeypatch):
    import gzip

    from modtimeline.cli import viewer

    traces = [_real_trace(tmp_path / "t.json"), _real_trace(tmp_path / "t.pftrace"), _profiler_trace(tmp_path)]
    packed = tmp_path / "t.json.gz"
    packed.write_bytes(gzip.compress(traces[0].read_bytes()))
    for path in [*traces, packed]:
        viewer.check_trace(path)
    # A trace too big to parse whole is checked at its ends: whole passes, cut is refused.
    monkeypatch.setattr(viewer, "CHECK_WHOLE_BYTES", 1000)
    assert traces[0].stat().st_size > 2000
    viewer.check_trace(traces[0])
    viewer.check_trace(packed)
    cut = tmp_path / "cut.json"
    cut.write_bytes(traces[0].read_bytes()[:-100])
    with pytest.raises(Exception, match="truncated"):
        viewer.check_trace(cut)


def test_open_of_an_empty_file_from_a_real_process_has_no_traceback(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "modtimeline", "open", str(empty), "--no-browser", "--port", "0",
                             "--wait", "30"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == f"modtimeline: error: {empty}: empty file, not a trace\n"
    assert result.stdout == ""


# ------------------------------------------------ 5. a torch.profiler trace given
def _profiler_trace(folder: Path) -> Path:
    from torch.profiler import ProfilerActivity, profile

    model = _mlp()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        model(torch.randn(4, 8)).sum().backward()
    path = folder / "kineto.json"
    profiler.export_chrome_trace(str(path))
    return path


def test_a_profiler_trace_points_at_merge_profiler(tmp_path, capsys):
    kineto = _profiler_trace(tmp_path)
    for argv in (["summary", str(kineto)], ["diff", str(kineto), str(kineto)],
                 ["merge", str(kineto), "-o", str(tmp_path / "out.json")]):
        err = _one_line_error(capsys, argv)
        assert "torch.profiler trace" in err and f"modtimeline merge --profiler {kineto} TRACE" in err, err
    # and what it points at works: the merged file summarises
    trace = _real_trace(tmp_path / "t.json")
    assert main(["merge", "--profiler", str(kineto), str(trace), "-o", str(tmp_path / "merged.json")]) == 0
    capsys.readouterr()
    assert _summary_json(capsys, tmp_path / "merged.json", "--warmup", "0")["modules"]


# ------------------------------------------ checkpointing: whose backward pays the recompute
class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blk = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 32))
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return self.head(checkpoint(self.blk, x, use_reentrant=False))


def test_a_checkpointed_regions_recompute_is_not_charged_to_the_layer_that_set_it_off(tmp_path):
    """The recompute of `blk` runs inside the backward span of `blk.4` (its last layer
    needs a saved tensor first): summary charged all of it to that Linear's backward, and
    diff called its siblings its "children". Counted from the trace's own spans: the
    layer's backward is its span less the recompute inside it; `blk` and the root keep it."""
    from modtimeline.analysis.reader import read_trace, samples

    torch.manual_seed(0)
    model = _Checkpointed()
    path = tmp_path / "ckpt.json"
    with Timeline(path) as timeline:
        for _ in range(3):
            with timeline.step():
                model(torch.randn(16, 32)).sum().backward()
    trace = read_trace(path)
    per_key = samples(trace, warmup=0)
    by_step: dict[tuple[str, str, int], int] = {}
    for span in trace.spans:
        by_step[(span.name, span.phase, span.step)] = by_step.get((span.name, span.phase, span.step), 0) + \
            span.end_ns - span.begin_ns
    recomputes = [s for s in trace.spans if s.phase == "recompute" and s.name == "_Checkpointed.blk"]
    assert len(recomputes) == 3
    for step in range(3):
        recompute = by_step[("_Checkpointed.blk", "recompute", step)]
        leaf = per_key[("_Checkpointed.blk.4", "backward", "cpu")][step]
        # the recompute happened inside the leaf's backward span ...
        outer = next(s for s in trace.spans if s.name == "_Checkpointed.blk.4" and s.phase == "backward"
                     and s.step == step)
        inner = next(s for s in recomputes if s.step == step)
        assert outer.begin_ns <= inner.begin_ns and inner.end_ns <= outer.end_ns
        # ... and is not the leaf's: its inclusive time leaves it out, its self time too
        assert leaf.inclusive_ns == by_step[("_Checkpointed.blk.4", "backward", step)] - recompute
        assert leaf.self_ns <= leaf.inclusive_ns
        for holder in ("_Checkpointed.blk", "_Checkpointed"):  # the region and its parent keep it
            assert per_key[(holder, "backward", "cpu")][step].inclusive_ns == by_step[(holder, "backward", step)]
