"""Loading traces back losslessly, and ``modtimeline merge`` (through real files; the
several-rank recordings are in test_distributed.py)."""

from __future__ import annotations

from array import array

import orjson
import pytest
import torch

from modtimeline import Timeline
from modtimeline.readers.load import load_trace, read_metadata
from modtimeline.analysis.merge import ClockMap
from modtimeline.analysis.reader import DEFAULT_LIMITS, read_trace
from modtimeline.cli import main
from modtimeline.device.fake import FakeBackend
from modtimeline.format import BACKWARD_TRACK, FORWARD, FORWARD_TRACK, STEP, STEPS_TRACK, SpanColumns, Track, TraceData
from modtimeline.writers import write_trace

from .models import Tree, train_step
from .synthetic import write as write_synthetic

pytestmark = pytest.mark.twin


def _rows(data: TraceData) -> list[tuple]:
    s = data.spans
    return sorted(zip(s.track, s.begin, s.end, [data.names[n] for n in s.name], s.category, s.call, s.step,
                      s.flags, s.flow, s.lag))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A real trace with everything a file can hold: GPU spans with launch lags, a memory
    counter, recompute, flows, an incomplete span."""
    torch.manual_seed(0)
    model = Tree()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path_factory.mktemp("recorded") / "t.json"
    with Timeline(path, device="cuda", device_backend=FakeBackend(lag_ns=40_000), memory=True) as timeline:
        for _ in range(2):
            with timeline.step():
                train_step(model, optimizer)
        with timeline.step():
            data = timeline.trace_data()  # (while a step is open: its spans are incomplete)
    return data


@pytest.mark.parametrize("suffix", [".json", ".json.gz", ".pftrace"])
def test_a_written_trace_loads_back_exactly(tmp_path, recorded, suffix):
    path = tmp_path / f"t{suffix}"
    write_trace(recorded, path)
    loaded = load_trace(path, DEFAULT_LIMITS)
    assert not loaded.merged and len(loaded.processes) == 1
    data = loaded.processes[0]
    assert data.rank == recorded.rank and data.base_ns == recorded.base_ns
    assert _rows(data) == _rows(recorded)
    assert {(t.tid, t.name) for t in data.tracks} == {(t.tid, t.name) for t in recorded.tracks}
    assert [(c.name, c.tid, list(c.times), list(c.values)) for c in data.counters] == \
        [(c.name, c.tid, list(c.times), list(c.values)) for c in recorded.counters]
    assert read_metadata(path, DEFAULT_LIMITS) == loaded.metadata


def test_clock_map_interpolates_between_samples_and_holds_beyond():
    clock = ClockMap([(1_000, 50), (3_000, 250)], 10, "process group")
    assert [clock.offset(t) for t in (0, 1_000, 2_000, 3_000, 9_000)] == [50, 50, 150, 250, 250]
    assert list(clock.map(array("q", [0, 2_000]))) == [50, 2_150]


def _rank_file(path, rank: int, base_ns: int, samples: list[list[int]] | None, run_id: str = "job",
               wall_ns: int = 10**18) -> None:
    """Rank ``rank``'s trace: one step of one forward span at base + 1 ms, 0.5 ms long."""
    spans = SpanColumns()
    spans.append(STEPS_TRACK, base_ns, base_ns + 3_000_000, 1, STEP, 0, 0)
    spans.append(FORWARD_TRACK, base_ns + 1_000_000, base_ns + 1_500_000, 0, FORWARD, 0, 0)
    metadata = {"tool": "modtimeline", "run_id": run_id, "world_size": 2, "hostname": f"host{rank}",
                "base_wall_time_ns": wall_ns, "steps": [0]}
    if samples is not None:
        metadata["clock_sync"] = {"reference_rank": 0, "samples": samples}
    write_trace(TraceData(rank, base_ns, ["Net", "step 0"],
                          [Track(STEPS_TRACK, "steps"), Track(FORWARD_TRACK, "forward"), Track(BACKWARD_TRACK, "backward")],
                          spans, metadata=metadata), path)


def _forward(trace, pid):
    return next(s for s in trace.spans if s.phase == "forward" and s.track[0] == pid)


@pytest.mark.parametrize("out", ["job.json", "job.json.gz", "job.pftrace"])
def test_merge_maps_each_rank_through_its_samples(tmp_path, out, capsys):
    # rank 1's clock is 7 s ahead, drifting: -7 s + 0 at its t=100 s, -7 s + 1 µs at t=200 s
    _rank_file(tmp_path / "r0.json", 0, 100_000_000_000, [[100_000_000_000, 0, 0]])
    _rank_file(tmp_path / "r1.json", 1, 150_000_000_000,
               [[100_000_000_000, -7_000_000_000, 40_000], [200_000_000_000, -6_999_999_000, 30_000]])
    assert main(["merge", str(tmp_path), "-o", str(tmp_path / out)]) == 0
    said = capsys.readouterr().out
    assert "rank 1 (host1): offset -7000.000 ms ± 40.0 µs" in said
    merged = read_trace(tmp_path / out)
    assert merged.metadata["merged"] is True and merged.metadata["run_id"] == "job"
    assert [r["clock_source"] for r in merged.metadata["ranks"]] == ["reference", "process group"]
    base = merged.metadata["base_ns"]
    # rank 1's forward at its 150.001 s: offset -7 s + 500 ns (interpolated halfway)
    assert _forward(merged, 1).begin_ns + base == 150_001_000_000 - 7_000_000_000 + 500
    assert _forward(merged, 0).begin_ns + base == 100_001_000_000
    assert base == 100_000_000_000  # the earliest aligned start
    loaded = load_trace(tmp_path / out, DEFAULT_LIMITS)
    assert [p.rank for p in loaded.processes] == [0, 1]


def test_merged_json_and_pftrace_hold_the_same_spans(tmp_path):
    (tmp_path / "in").mkdir()
    for rank in (0, 1):
        write_synthetic(tmp_path / f"in/t.rank{rank}.json", 4, 3, seed=rank)
    for name in ("t.rank0.json", "t.rank1.json"):  # make them one job's ranks
        document = orjson.loads((tmp_path / "in" / name).read_bytes())
        document["metadata"].update(run_id="job", world_size=2, rank=int(name[6]),
                                    clock_sync={"reference_rank": 0, "samples": [[0, 1000 * int(name[6]), 10]]})
        for event in document["traceEvents"]:
            event["pid"] = int(name[6])
        (tmp_path / "in" / name).write_bytes(orjson.dumps(document))
    for out in ("job.json", "job.pftrace"):
        assert main(["merge", str(tmp_path / "in"), "-o", str(tmp_path / out)]) == 0
    a, b = (load_trace(tmp_path / out, DEFAULT_LIMITS) for out in ("job.json", "job.pftrace"))
    assert [_rows(p) for p in a.processes] == [_rows(p) for p in b.processes]
    assert len(a.processes) == 2 and all(len(p.spans) for p in a.processes)


def test_merge_refuses_two_runs_unless_forced(tmp_path, capsys):
    _rank_file(tmp_path / "a.json", 0, 10**9, [[10**9, 0, 0]], run_id="one")
    _rank_file(tmp_path / "b.json", 1, 10**9, [[10**9, 5, 1]], run_id="two")
    assert main(["merge", str(tmp_path), "-o", str(tmp_path / "m.json")]) == 2
    assert "different runs" in capsys.readouterr().err and not (tmp_path / "m.json").exists()
    assert main(["merge", str(tmp_path), "-o", str(tmp_path / "m.json"), "--force"]) == 0


def test_merge_refuses_a_merged_file_and_names_a_rank_it_cannot_align(tmp_path, capsys):
    _rank_file(tmp_path / "r0.json", 0, 10**9, [[10**9, 0, 0]])
    _rank_file(tmp_path / "r1.json", 1, 10**9, None)
    assert main(["merge", str(tmp_path / "r0.json"), str(tmp_path / "r1.json"), "-o", str(tmp_path / "m.json")]) == 0
    assert "error unknown" in capsys.readouterr().out  # no samples: the wall clocks, and it says so
    assert main(["merge", str(tmp_path / "m.json"), "-o", str(tmp_path / "again.json")]) == 2
    assert "already a merged trace" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "r1.json"), "-o", str(tmp_path / "alone.json")]) == 2
    assert "no clock samples" in capsys.readouterr().err


def test_wall_clock_fallback_lines_ranks_up_by_their_wall_clocks(tmp_path):
    # rank 1 started its window 2 ms of wall time after rank 0, with a very different perf clock
    _rank_file(tmp_path / "r0.json", 0, 10**9, None, wall_ns=10**18)
    _rank_file(tmp_path / "r1.json", 1, 5 * 10**12, None, wall_ns=10**18 + 2_000_000)
    assert main(["merge", str(tmp_path), "-o", str(tmp_path / "m.json")]) == 0
    merged = read_trace(tmp_path / "m.json")
    assert _forward(merged, 1).begin_ns - _forward(merged, 0).begin_ns == 2_000_000
    assert merged.metadata["ranks"][1]["clock_error_ns"] is None


@pytest.mark.parametrize("content", [
    b"", b"\x1f\x8b\x08garbage", b"{not json", b'{"traceEvents": 5}', b'[1, 2]',
    b'{"traceEvents": [{"ph": "X", "pid": "a"}], "metadata": {"tool": "modtimeline", "rank": 1, "base_ns": 0}}',
    b'{"traceEvents": [{"ph": "X", "pid": 1, "tid": 2, "ts": "x", "dur": 1, "name": "n", "cat": "forward"}],'
    b' "metadata": {"tool": "modtimeline", "rank": 1, "base_ns": 0, "clock_sync": {"samples": [[1, 2]]}}}',
    b"\x0a\x05hello",
])
def test_damaged_inputs_end_in_one_clear_line(tmp_path, capsys, content):
    _rank_file(tmp_path / "r0.json", 0, 10**9, [[10**9, 0, 0]])
    (tmp_path / "bad.json").write_bytes(content)
    for argv in (["merge", str(tmp_path / "r0.json"), str(tmp_path / "bad.json"), "-o", str(tmp_path / "m.json")],
                 ["merge", "--profiler", str(tmp_path / "bad.json"), str(tmp_path / "r0.json"), "-o",
                  str(tmp_path / "p.json")],
                 ["merge", "--profiler", str(tmp_path / "r0.json"), str(tmp_path / "bad.json"), "-o",
                  str(tmp_path / "p.json")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("modtimeline: error:") and "Traceback" not in err
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "p.json").exists()
