"""``modtimeline summary --by-rank``: the straggler view, from rank files and merged files."""

from __future__ import annotations

import orjson

from modtimeline.cli import main

from .synthetic import write as write_synthetic


def _rank_files(folder, slow: dict[int, dict[int, float]], ranks: int = 4, run_ids=None, clock_samples=None):
    """Rank files of one job (synthetic steps); ``slow[rank][module]`` slows a module down;
    ``clock_samples``: each rank's (default: one, no offset)."""
    folder.mkdir(exist_ok=True)
    paths = []
    for rank in range(ranks):
        path = write_synthetic(folder / f"t.rank{rank}.json", 5, 6, seed=rank, cv=0.01, slow=slow.get(rank))
        document = orjson.loads(path.read_bytes())
        document["metadata"].update(run_id=(run_ids or {}).get(rank, "job"), world_size=ranks, rank=rank,
                                    hostname=f"node{rank // 2}", base_wall_time_ns=1_700_000_000_000_000_000 + rank,
                                    clock_sync={"reference_rank": 0,
                                                "samples": (clock_samples or {}).get(rank, [[0, 0, 100]])})
        for event in document["traceEvents"]:
            event["pid"] = rank
        path.write_bytes(orjson.dumps(document))
        paths.append(path)
    return paths


def _view(capsys, *args):
    code = main(["summary", "--by-rank", "--format", "json", *map(str, args)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return orjson.loads(out.out)


def test_a_slow_rank_is_flagged_with_its_slow_module(tmp_path, capsys):
    # rank 2's module 3 takes 3x as long: its steps are ~40 % longer than the others'
    _rank_files(tmp_path / "ranks", {2: {3: 3.0}})
    view = _view(capsys, tmp_path / "ranks")
    assert view["slow_ranks"] == [2]
    assert [r["rank"] for r in view["ranks"]] == [0, 1, 2, 3]
    assert [r["hostname"] for r in view["ranks"]] == ["node0", "node0", "node1", "node1"]
    assert view["ranks"][2]["gap"] > 0.2 and all(abs(view["ranks"][r]["gap"]) < 0.05 for r in (0, 1, 3))
    top = view["modules"][0]
    assert (top["fqn"], top["slowest_rank"], top["uneven"]) == ("Model.layers.2", 2, True)
    assert 2.5 < top["spread"] < 3.5
    # the root is slower on rank 2 too, but diluted by its other children
    root = next(m for m in view["modules"] if m["fqn"] == "Model" and m["phase"] == "forward")
    assert root["slowest_rank"] == 2 and 1.2 < root["spread"] < 1.6


def test_a_merged_file_gives_the_same_view_as_its_rank_files(tmp_path, capsys):
    paths = _rank_files(tmp_path / "ranks", {1: {1: 2.0}})
    assert main(["merge", str(tmp_path / "ranks"), "-o", str(tmp_path / "job.pftrace")]) == 0
    capsys.readouterr()
    from_files = _view(capsys, *paths)
    merged = _view(capsys, tmp_path / "job.pftrace")
    assert merged["slow_ranks"] == from_files["slow_ranks"] == [1]
    for a, b in zip(merged["modules"], from_files["modules"]):
        assert (a["fqn"], a["phase"], a["slowest_rank"]) == (b["fqn"], b["phase"], b["slowest_rank"])
        assert abs(a["spread"] - b["spread"]) < 1e-6


def test_table_and_markdown_name_the_slow_rank(tmp_path, capsys):
    _rank_files(tmp_path / "ranks", {3: {2: 3.0}}, ranks=2 + 2)
    assert main(["summary", "--by-rank", str(tmp_path / "ranks")]) == 0
    text = capsys.readouterr().out
    assert "rank 3 slow" in text and "slowest rank" in text
    assert main(["summary", "--by-rank", "--format", "markdown", str(tmp_path / "ranks")]) == 0
    assert "| 3 |" in capsys.readouterr().out.replace("  ", " ")


def test_ranks_of_different_runs_are_never_compared(tmp_path, capsys):
    _rank_files(tmp_path / "ranks", {}, ranks=2, run_ids={1: "another"})
    assert main(["summary", "--by-rank", str(tmp_path / "ranks")]) == 2
    assert "different runs" in capsys.readouterr().err


def test_one_rank_is_not_a_comparison(tmp_path, capsys):
    paths = _rank_files(tmp_path / "ranks", {}, ranks=2)
    assert main(["summary", "--by-rank", str(paths[0])]) == 2
    assert "two or more ranks" in capsys.readouterr().err


def test_summary_and_diff_of_a_merged_file_count_each_ranks_steps(tmp_path, capsys):
    """Four identical ranks merged: the per-module times per step are one rank's, not the
    four summed (each rank's step is one sample)."""
    paths = _rank_files(tmp_path / "ranks", {})
    assert main(["merge", str(tmp_path / "ranks"), "-o", str(tmp_path / "job.json")]) == 0
    capsys.readouterr()
    assert main(["summary", "--format", "json", "--pool-runs", str(paths[0])]) == 0
    one = orjson.loads(capsys.readouterr().out)
    assert main(["summary", "--format", "json", str(tmp_path / "job.json")]) == 0
    merged = orjson.loads(capsys.readouterr().out)
    assert merged["steps"] == 4 * one["steps"]
    for a, b in zip(one["modules"], merged["modules"]):
        assert a["fqn"] == b["fqn"] and abs(a["total_us"]["forward"] - b["total_us"]["forward"]) < 0.1 * a["total_us"]["forward"]
        assert a["calls"] == b["calls"]
    # and diff of the merged file against its own rank 0 finds nothing changed
    assert main(["diff", "--json", str(paths[0]), str(tmp_path / "job.json")]) == 0


def test_a_recording_read_twice_is_counted_once(tmp_path, capsys):
    """A merged file beside its rank files (merge's README example leaves it there), or a
    file named twice: summary and diff count each rank's steps once, and say so."""
    # rank 1's clock drifts against rank 0's (two samples, 10 ppm apart): the merge moves
    # and stretches its spans, and they are still the same recording
    paths = _rank_files(tmp_path / "ranks", {}, clock_samples={1: [[0, 5_000, 100], [100_000_000, 6_000, 100]]})
    assert main(["summary", "--format", "json", str(tmp_path / "ranks")]) == 0
    alone = orjson.loads(capsys.readouterr().out)
    assert main(["merge", str(tmp_path / "ranks"), "-o", str(tmp_path / "ranks" / "job.json")]) == 0
    capsys.readouterr()
    assert main(["summary", "--format", "json", str(tmp_path / "ranks")]) == 0
    out = capsys.readouterr()
    beside = orjson.loads(out.out)
    assert beside["steps"] == alone["steps"] == 4 * 5  # 4 ranks, 6 steps less the warm-up
    assert out.err.count("counted once") == 4 and out.err.count("job.json") == 4  # (job.json is read first)
    for a, b in zip(beside["modules"], alone["modules"]):  # (rank 1's spans as merged, a few ns longer)
        assert a["fqn"] == b["fqn"] and all(abs(a["total_us"][p] - b["total_us"][p]) < 0.01 for p in a["total_us"])
    assert main(["summary", "--format", "json", "--pool-runs", str(paths[0]), str(paths[0])]) == 0
    assert orjson.loads(capsys.readouterr().out)["steps"] == 5
    # two recordings that are not the same one are both counted
    assert main(["summary", "--format", "json", "--pool-runs", str(paths[0]), str(paths[1])]) == 0
    assert orjson.loads(capsys.readouterr().out)["steps"] == 10


def test_merge_never_reads_or_overwrites_its_own_output(tmp_path, capsys):
    paths = _rank_files(tmp_path / "ranks", {})
    before = paths[0].read_bytes()
    assert main(["merge", str(paths[0]), str(paths[1]), "-o", str(paths[0])]) == 2
    assert "is one of the traces to merge" in capsys.readouterr().err and paths[0].read_bytes() == before
    kineto = tmp_path / "kineto.json"
    kineto.write_bytes(b"{}")
    assert main(["merge", "--profiler", str(kineto), str(paths[0]), "-o", str(kineto)]) == 2
    assert "is one of the traces to merge" in capsys.readouterr().err and kineto.read_bytes() == b"{}"
    # merged into the folder it reads, twice: the second merge leaves the first one out
    for _ in range(2):
        assert main(["merge", str(tmp_path / "ranks"), "-o", str(tmp_path / "ranks" / "job.json")]) == 0
        assert "merged 4 file(s) of 4 rank(s)" in capsys.readouterr().out
