"""summary / diff: statistics, verdicts, outputs and input errors (no torch needed)."""

import gzip
from pathlib import Path
import subprocess
import sys

import orjson
import pytest

from modtimeline.analysis.diff import IMPROVED, INCONCLUSIVE, REGRESSED, UNCHANGED, DiffConfig, diff, load_config
from modtimeline.analysis.reader import read_trace, samples
from modtimeline.analysis.stats import benjamini_hochberg, holm, mann_whitney_u
from modtimeline.analysis.summary import summarize
from modtimeline.cli import main

from . import synthetic


# --------------------------------------------------------------------- statistics
def test_mann_whitney_matches_reference_values():
    # reference values computed with scipy.stats.mannwhitneyu (exact / asymptotic)
    assert mann_whitney_u([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(0.007936507936507936)
    tied_a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3
    tied_b = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14] * 3
    assert mann_whitney_u(tied_a, tied_b) == pytest.approx(2.0000498462209735e-05)
    assert mann_whitney_u([1, 2, 3], [1, 2, 3]) == 1.0


def test_multiple_testing_corrections():
    p = [0.01, 0.04, 0.03, 0.005]
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])  # scipy false_discovery_control


# ------------------------------------------------------------------------- reader
def test_samples_inclusive_self_and_calls(tmp_path):
    trace = read_trace(synthetic.write(tmp_path / "t.json", count=4, steps=3, seed=1))
    per_key = samples(trace)
    root = per_key[("Model", "forward", "cpu")]
    children = [per_key[(f"Model.layers.{i}", "forward", "cpu")] for i in range(3)]
    for step in range(3):
        assert root[step].calls == 1
        assert root[step].inclusive_ns == sum(c[step].inclusive_ns for c in children)
        assert root[step].self_ns == 0
        assert all(c[step].self_ns == c[step].inclusive_ns for c in children)
    assert set(samples(trace, warmup=1)[("Model", "forward", "cpu")]) == {1, 2}


def test_gzip_trace_reads_the_same(tmp_path):
    plain = synthetic.write(tmp_path / "t.json", count=4, steps=3, seed=1)
    packed = tmp_path / "t.json.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert samples(read_trace(packed)) == samples(read_trace(plain))


# --------------------------------------------------------------------------- diff
def test_ten_percent_slowdown_of_one_module_among_500_is_found_alone():
    slow_module = 137
    base = [synthetic.in_memory(500, 30, seed=1)]
    candidate = [synthetic.in_memory(500, 30, seed=2, slow={slow_module: 1.10})]
    report = diff(base, candidate, DiffConfig(warmup=0))
    regressed = {(m.fqn, m.phase) for m in report.modules if m.verdict == REGRESSED}
    assert regressed == {(f"Model.layers.{slow_module - 1}", "forward"), (f"Model.layers.{slow_module - 1}", "backward")}
    # the root is slower only through that child: its change sits in "children", not "self"
    root = next(m for m in report.modules if m.fqn == "Model" and m.phase == "forward")
    assert root.verdict != REGRESSED
    assert abs(root.self_delta_us) < 1e-9 and root.children_delta_us == pytest.approx(root.delta_us)


def test_false_positive_rate_over_many_seeds():
    """Two runs from one distribution: how often does diff claim a regression?"""
    runs = 100
    false_alarms = 0
    for seed in range(runs):
        base = [synthetic.in_memory(200, 20, seed=2 * seed)]
        candidate = [synthetic.in_memory(200, 20, seed=2 * seed + 1)]
        report = diff(base, candidate, DiffConfig(warmup=0))
        false_alarms += bool(report.regressed)
    # Holm bounds the family-wise error rate by alpha (5 %). Measured: 1 run in 100
    # (without any correction: 12 in 100, so this bound has teeth).
    assert false_alarms <= 0.05 * runs, f"{false_alarms} of {runs} same-distribution runs flagged a regression"


def test_big_change_without_significance_is_inconclusive_not_a_pass():
    # 4 steps a side cannot reach significance after correcting for 40 tests
    base = [synthetic.in_memory(20, 4, seed=5, cv=0.30)]
    candidate = [synthetic.in_memory(20, 4, seed=6, cv=0.30, slow={3: 1.6})]
    report = diff(base, candidate, DiffConfig(warmup=0, min_samples=3))
    slowed = next(m for m in report.modules if (m.fqn, m.phase) == ("Model.layers.2", "forward"))
    assert slowed.verdict == INCONCLUSIVE
    assert any("not significant" in note for note in slowed.notes)
    assert not report.regressed
    assert any("noisy" in w for w in report.warnings)


def test_too_few_steps_is_inconclusive_and_judges_nothing():
    report = diff([synthetic.in_memory(5, 3, seed=1)], [synthetic.in_memory(5, 3, seed=2, slow={2: 3.0})],
                  DiffConfig(warmup=0))
    slowed = next(m for m in report.modules if (m.fqn, m.phase) == ("Model.layers.1", "forward"))
    assert slowed.verdict == INCONCLUSIVE and any("too few steps" in note for note in slowed.notes)
    # a change under the thresholds is no change, however few the steps
    assert all(m.verdict == UNCHANGED for m in report.modules if abs(m.ratio - 1) <= 0.05)
    assert any("few steps" in w for w in report.warnings)
    assert "no module has 5 steps a side" in report.cannot_judge


def test_steps_too_few_for_the_correction_judge_nothing():
    """5 steps a side pass min_samples, but over 24 module rows the rank test's smallest
    p after Holm (24 x 0.0079) is past alpha: a module 3x slower could not fail the gate,
    and the report must say so rather than pass."""
    base = [synthetic.in_memory(12, 5, seed=1)]
    candidate = [synthetic.in_memory(12, 5, seed=2, slow={3: 3.0})]
    report = diff(base, candidate, DiffConfig(warmup=0))
    slowed = next(m for m in report.modules if (m.fqn, m.phase) == ("Model.layers.2", "forward"))
    assert slowed.verdict == INCONCLUSIVE and any("steps cannot reach significance" in note for note in slowed.notes)
    assert not report.regressed
    assert "record at least 7 steps a side" in report.cannot_judge
    assert report.to_json()["cannot_judge"] == report.cannot_judge
    # with enough steps the same slowdown is found, and the report judged
    enough = diff([synthetic.in_memory(12, 8, seed=1)], [synthetic.in_memory(12, 8, seed=2, slow={3: 3.0})],
                  DiffConfig(warmup=0))
    assert ("Model.layers.2", "forward") in {(m.fqn, m.phase) for m in enough.regressed}
    assert enough.cannot_judge is None


def test_improvement_and_structural_changes():
    base = [synthetic.in_memory(30, 20, seed=1)]
    candidate = [synthetic.in_memory(31, 20, seed=2, slow={4: 0.5})]
    report = diff(base, candidate, DiffConfig(warmup=0))
    assert {(m.fqn, m.verdict) for m in report.modules if m.verdict == IMPROVED} >= {("Model.layers.3", IMPROVED)}
    added = [(s.fqn, s.change) for s in report.structural]
    assert ("Model.layers.29", "added") in added


def test_per_module_thresholds_from_config(tmp_path):
    config_file = tmp_path / "perf.toml"
    config_file.write_text(
        '[diff]\nthreshold = 0.05\nwarmup = 0\n\n'
        '[[diff.module]]\nmatch = "Model.layers.1*"\nthreshold = 0.50\n\n'
        '[[diff.module]]\nmatch = "Model.layers.2"\nignore = true\n'
    )
    config = load_config(config_file)
    base = [synthetic.in_memory(30, 20, seed=1)]
    candidate = [synthetic.in_memory(30, 20, seed=2, slow={11: 1.2, 3: 1.2, 5: 1.2})]
    report = diff(base, candidate, config)
    regressed = {m.fqn for m in report.regressed}
    assert regressed == {"Model.layers.4"}  # layers.10 is under its 50 % rule, layers.2 ignored
    assert "Model.layers.2" not in {m.fqn for m in report.modules}


def test_bad_config_is_a_clear_error(tmp_path):
    from modtimeline.errors import ConfigError, ModTimelineError, TraceFormatError

    assert issubclass(ConfigError, ModTimelineError) and not issubclass(ConfigError, TraceFormatError)
    bad = tmp_path / "bad.toml"
    bad.write_text("[diff]\nthreshhold = 0.1\n")
    with pytest.raises(ConfigError, match="unknown \\[diff\\] settings: threshhold"):
        load_config(bad)


# ---------------------------------------------------------------------------- CLI
def test_cli_diff_exit_codes_and_outputs(tmp_path, capsys, monkeypatch):
    base = synthetic.write(tmp_path / "base.json", 40, 15, seed=1)
    same = synthetic.write(tmp_path / "same.json", 40, 15, seed=2)
    slower = synthetic.write(tmp_path / "slower.json", 40, 15, seed=3, slow={7: 1.3})
    step_summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))

    assert main(["diff", str(base), str(same)]) == 0
    assert "OK: no module slower beyond noise" in capsys.readouterr().out

    assert main(["diff", "--markdown", str(base), str(slower)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("### modtimeline diff: FAIL")
    assert "| 🔴 regressed | `Model.layers.6` | forward |" in out
    assert step_summary.read_text().count("### modtimeline diff") == 2

    assert main(["diff", "--json", str(base), str(slower)]) == 1
    report = orjson.loads(capsys.readouterr().out)
    assert report["counts"]["regressed"] == 2
    assert {m["fqn"] for m in report["modules"] if m["verdict"] == "regressed"} == {"Model.layers.6"}


def test_cli_diff_that_cannot_judge_exits_3_and_says_why(tmp_path, capsys):
    """6 steps a trace (5 after the warm-up step) over 24 module rows: under Holm no
    slowdown could be significant, so the gate neither passes nor fails quietly."""
    base = synthetic.write(tmp_path / "base.json", 12, 6, seed=1)
    slower = synthetic.write(tmp_path / "slower.json", 12, 6, seed=3, slow={4: 3.0})
    assert main(["diff", str(base), str(slower)]) == 3
    out = capsys.readouterr().out
    assert out.startswith("CANNOT JUDGE: with 5 steps a side") and "record at least 7 steps" in out
    assert main(["diff", "--json", str(base), str(slower)]) == 3
    assert "record at least 7 steps" in orjson.loads(capsys.readouterr().out)["cannot_judge"]
    # Benjamini-Hochberg's best case with the same steps can reach alpha (every row moving
    # together): those traces can be judged, and the slower module is found
    assert main(["diff", "--json", "--correction", "bh", str(base), str(slower)]) == 1
    report = orjson.loads(capsys.readouterr().out)
    assert report["cannot_judge"] is None
    assert ("Model.layers.3", "forward") in {(m["fqn"], m["phase"]) for m in report["modules"]
                                             if m["verdict"] == "regressed"}
    same = synthetic.write(tmp_path / "same.json", 12, 6, seed=2)
    assert main(["diff", "--correction", "bh", str(base), str(same)]) == 0
    assert capsys.readouterr().out.startswith("OK")


def test_cli_pools_several_traces_per_side(tmp_path, capsys):
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    for seed in range(3):
        synthetic.write(base_dir / f"b{seed}.json", 20, 4, seed=seed)
    cands = [synthetic.write(tmp_path / f"c{seed}.json", 20, 4, seed=10 + seed, slow={5: 1.5}) for seed in range(3)]
    code = main(["diff", "--json", "--warmup", "0", str(base_dir), "--", *map(str, cands)])
    report = orjson.loads(capsys.readouterr().out)
    assert code == 1
    slow = next(m for m in report["modules"] if m["fqn"] == "Model.layers.4" and m["phase"] == "forward")
    assert slow["base_steps"] == 12 and slow["candidate_steps"] == 12 and slow["verdict"] == "regressed"


BAD_INPUTS = {
    "missing": None,
    "empty": b"",
    "truncated": None,  # filled in from a real trace
    "not json": b"hello world",
    "no events": b'{"metadata": {"tool": "modtimeline"}}',
    "foreign chrome trace": b'{"traceEvents": [{"ph": "X", "name": "f", "ts": 1, "dur": 2, "pid": 1, "tid": 1}]}',
    "bad gzip": b"\x1f\x8b\x08\x00garbage",
    "no modules": b'{"metadata": {"tool": "modtimeline"}, "traceEvents": []}',
    "malformed event": b'{"metadata": {"tool": "modtimeline"}, "traceEvents": [{"ph": "X", "name": "a"}]}',
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, case):
    good = synthetic.write(tmp_path / "good.json", 5, 3, seed=1)
    bad = tmp_path / ("bad.json.gz" if case == "bad gzip" else "bad.json")
    if case == "truncated":
        bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    elif BAD_INPUTS[case] is not None:
        bad.write_bytes(BAD_INPUTS[case])
    for command in (["summary", str(bad)], ["diff", str(good), str(bad)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("modtimeline: error: ") and str(bad) in err, err


def test_mismatched_models_exit_2(tmp_path, capsys):
    a = synthetic.write(tmp_path / "a.json", 5, 8, seed=1)
    other = tmp_path / "b.json"
    other.write_bytes(a.read_bytes().replace(b'"Model', b'"Other'))
    assert main(["diff", str(a), str(other)]) == 2
    assert "no module in common" in capsys.readouterr().err


def test_no_traceback_from_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "modtimeline", "summary", str(tmp_path / "nope.json")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"modtimeline: error: {tmp_path / 'nope.json'}: no such file or directory"
    assert "Traceback" not in result.stderr


def test_analysis_never_imports_torch(tmp_path):
    path = synthetic.write(tmp_path / "t.json", 5, 3, seed=1)
    result = subprocess.run([sys.executable, "-c",
                             "import sys; from modtimeline.cli import main; "
                             f"main(['summary', {str(path)!r}]); main(['diff', {str(path)!r}, {str(path)!r}]); "
                             "assert 'torch' not in sys.modules, 'torch was imported'"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------ summary
def test_summary_formats(tmp_path, capsys):
    path = synthetic.write(tmp_path / "t.json", 6, 4, seed=1)
    assert main(["summary", str(path)]) == 0
    table = capsys.readouterr().out
    assert "  Model.layers.0" in table and "% of step" in table
    assert main(["summary", "--format", "json", "--top", "2", str(path)]) == 0
    document = orjson.loads(capsys.readouterr().out)
    assert [m["fqn"] for m in document["modules"]][0] == "Model" and len(document["modules"]) == 2
    assert main(["summary", "--format", "markdown", "--depth", "0", str(path)]) == 0
    markdown = capsys.readouterr().out
    assert "| `Model` |" in markdown and "layers" not in markdown.split("\n", 3)[-1]
    summary = summarize([read_trace(path)])
    root = summary.rows[0]
    assert root.share_of_step == pytest.approx(1.0, rel=1e-6)


# ------------------------------------------------------------------ machine drift
def _uniform(count: int, factor: float) -> dict[int, float]:
    return {i: factor for i in range(1, count)}


@pytest.mark.parametrize("drift", [1.08, 0.92, 1.15])
def test_uniform_drift_of_the_whole_machine_is_not_a_regression_either_way(drift):
    # Same code, recorded one after the other while the machine's speed changed: every
    # module moved by the same factor. Before the correction, one direction failed.
    a = [synthetic.in_memory(30, 20, seed=1)]
    b = [synthetic.in_memory(30, 20, seed=2, slow=_uniform(30, drift))]
    for base, candidate in ((a, b), (b, a)):
        report = diff(base, candidate, DiffConfig(warmup=0))
        assert not report.regressed, [(m.fqn, m.phase, m.ratio) for m in report.regressed]
        assert report.drift != 1.0 and any("machine drift" in w for w in report.warnings)


def test_one_module_ten_percent_slower_is_still_found_on_a_drifting_machine():
    slow = _uniform(30, 1.08)
    slow[7] = 1.08 * 1.10
    report = diff([synthetic.in_memory(30, 20, seed=1)], [synthetic.in_memory(30, 20, seed=2, slow=slow)],
                  DiffConfig(warmup=0))
    assert {(m.fqn, m.phase) for m in report.regressed} == {("Model.layers.6", "forward"), ("Model.layers.6", "backward")}


def test_a_shift_beyond_max_drift_is_judged_as_measured():
    report = diff([synthetic.in_memory(30, 20, seed=1)], [synthetic.in_memory(30, 20, seed=2, slow=_uniform(30, 1.5))],
                  DiffConfig(warmup=0))
    assert report.drift == 1.0 and report.regressed
    assert any("more than machine drift" in w for w in report.warnings)


def test_drift_correction_can_be_turned_off():
    report = diff([synthetic.in_memory(30, 20, seed=1)], [synthetic.in_memory(30, 20, seed=2, slow=_uniform(30, 1.08))],
                  DiffConfig(warmup=0, max_drift=0))
    assert report.drift == 1.0 and report.regressed


# ------------------------------------------------------------------ summary arithmetic
def test_summary_shares_count_recompute_once_and_skip_warmup_as_diff_does():
    from modtimeline.analysis.reader import Span, Trace

    spans = []
    for step in range(3):
        t = step * 1000
        spans += [Span("M", "forward", "cpu", (0, 2), step, t, t + 100),
                  Span("M", "backward", "cpu", (0, 10), step, t + 200, t + 500),
                  Span("M", "recompute", "cpu", (0, 10), step, t + 250, t + 350)]
    trace = Trace(Path("mem"), {"tool": "modtimeline"}, spans, {0: 1000, 1: 1000, 2: 1000})
    summary = summarize([trace])
    assert summary.steps == 2  # one warm-up step left out, as diff does by default
    assert summary.rows[0].share_of_step == pytest.approx(0.4)  # (100 + 300) / 1000, recompute inside


def test_summary_refuses_two_runs_in_one_folder(tmp_path, capsys):
    for name, run in (("a.json", "run-a"), ("b.json", "run-b")):
        path = synthetic.write(tmp_path / name, count=3, steps=4, seed=1)
        document = orjson.loads(path.read_bytes())
        document["metadata"]["run_id"] = run
        path.write_bytes(orjson.dumps(document))
    assert main(["summary", str(tmp_path)]) == 2
    assert "different runs" in capsys.readouterr().err
    assert main(["summary", str(tmp_path), "--pool-runs"]) == 0


def test_approximate_spans_are_footnoted_in_summary_and_diff(tmp_path, capsys):
    path = synthetic.write(tmp_path / "t.json", count=3, steps=6, seed=1)
    document = orjson.loads(path.read_bytes())
    for event in document["traceEvents"]:
        if event.get("name") == "Model.layers.0" and event.get("cat") == "backward":
            event["args"]["approximate"] = True
    path.write_bytes(orjson.dumps(document))
    assert main(["summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Model.layers.0 *" in out and out.rstrip().splitlines()[-1].startswith("* approximate:")
    assert main(["diff", "--json", str(path), str(path)]) == 0
    notes = {m["fqn"]: m["notes"] for m in orjson.loads(capsys.readouterr().out)["modules"] if m["phase"] == "backward"}
    assert any("approximate backward end" in n for n in notes["Model.layers.0"])
    assert not any("approximate" in n for n in notes["Model"])


@pytest.mark.parametrize("suffix", [".json", ".json.gz", ".pftrace"])
def test_approximate_flag_reads_back_from_every_format(tmp_path, suffix):
    from modtimeline.format import APPROXIMATE, BACKWARD, BACKWARD_TRACK, FORWARD, FORWARD_TRACK, SpanColumns, TraceData, Track
    from modtimeline.writers import write_trace

    columns = SpanColumns()
    columns.append(FORWARD_TRACK, 0, 10, 0, FORWARD, 0, 0)
    columns.append(BACKWARD_TRACK, 20, 40, 0, BACKWARD, 0, 0, flags=APPROXIMATE)
    data = TraceData(0, 0, ["M"], [Track(FORWARD_TRACK, "forward"), Track(BACKWARD_TRACK, "backward")], columns,
                     metadata={"tool": "modtimeline"})
    path = tmp_path / f"t{suffix}"
    write_trace(data, path)
    spans = {s.phase: s for s in read_trace(path).spans}
    assert spans["backward"].approximate and not spans["forward"].approximate


def test_summary_whose_steps_are_all_warm_up_says_so(tmp_path, capsys):
    """A one-step trace (`modtimeline demo --steps 1`, a window of Schedule(active=1)): the
    table was empty under '1 step(s)'."""
    path = synthetic.write(tmp_path / "one.json", count=3, steps=1, seed=1)
    assert main(["summary", str(path)]) == 2
    assert "every marked step is warm-up" in capsys.readouterr().err
    assert main(["summary", "--warmup", "0", "--format", "json", str(path)]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert shown["steps"] == 1 and len(shown["modules"]) == 3


def test_recompute_is_charged_to_its_region_also_under_a_wrapper_and_when_it_overhangs():
    """`_charge_recompute_to_its_region` on hand-made spans: a region wrapped by
    CheckpointWrapper (its wrapper span named `Net.blk (CheckpointWrapper)`), recomputed
    inside its last layer's backward; a second step whose recompute was stamped past the
    end of that backward span (a late hook) takes off only what lies inside it."""
    from modtimeline.analysis.reader import Span, Trace

    def step(number, t, recompute_end):
        return [Span("Net", "backward", "cpu", (0, 3), number, t, t + 100),
                Span("Net.blk (CheckpointWrapper)", "backward", "cpu", (0, 3), number, t + 5, t + 95),
                Span("Net.blk", "backward", "cpu", (0, 3), number, t + 5, t + 95),
                Span("Net.blk.c", "backward", "cpu", (0, 3), number, t + 10, t + 90),
                Span("Net.blk", "recompute", "cpu", (0, 3), number, t + 50, t + recompute_end),
                Span("Net.blk.a", "recompute", "cpu", (0, 3), number, t + 55, t + 60)]

    found = samples(Trace(Path("t.json"), {}, step(0, 0, 80) + step(1, 1000, 94)))
    leaf = found[("Net.blk.c", "backward", "cpu")]
    assert leaf[0].inclusive_ns == 80 - 30 and leaf[1].inclusive_ns == 80 - 40  # (94 overhangs 90: 40 inside)
    for holder, length in (("Net.blk (CheckpointWrapper)", 90), ("Net.blk", 90), ("Net", 100)):
        assert [found[(holder, "backward", "cpu")][n].inclusive_ns for n in (0, 1)] == [length, length]
    assert found[("Net.blk", "recompute", "cpu")][0].inclusive_ns == 30
