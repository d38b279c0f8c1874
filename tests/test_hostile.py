"""Hostile and damaged input: every case exits 2 with one line naming the file (never a
traceback), reading stays within its stated bounds, a config cannot hide a regression,
and module names cannot rewrite a terminal or a PR page."""

from __future__ import annotations

import copy
import gzip
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from modtimeline.analysis.diff import diff
from modtimeline.analysis.reader import read_trace
from modtimeline.analysis.render import render_diff_markdown, render_diff_text
from modtimeline.cli import main

from . import synthetic


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict:
    path = synthetic.write(tmp_path_factory.mktemp("valid") / "t.json", count=4, steps=6, seed=1)
    return orjson.loads(path.read_bytes())


def _first_span(document: dict) -> dict:
    return next(e for e in document["traceEvents"] if e.get("ph") == "X" and e["cat"] != "step")


def _thread_name(document: dict) -> dict:
    return next(e for e in document["traceEvents"] if e.get("name") == "thread_name")


def _set(where, key, value):
    def mutate(document: dict) -> None:
        where(document)[key] = value
    return mutate


HOSTILE_JSON = {
    "name 5": _set(_first_span, "name", 5),
    "name null": _set(_first_span, "name", None),
    "name list": _set(_first_span, "name", ["a"]),
    "name dict": _set(_first_span, "name", {"a": 1}),
    "name 1 MB": _set(_first_span, "name", "x" * (1 << 20)),
    "pid list": _set(_first_span, "pid", [0]),
    "tid float": _set(_first_span, "tid", 1.5),
    "ts huge": _set(_first_span, "ts", 1.7e308),
    "ts -huge": _set(_first_span, "ts", -1.7e308),
    "dur huge": _set(_first_span, "dur", 1.7e308),
    "dur negative": _set(_first_span, "dur", -5),
    "ts string": _set(_first_span, "ts", "5" * 100_000),
    "ts bool": _set(_first_span, "ts", True),
    "args list": _set(_first_span, "args", [1]),
    "step string": _set(lambda d: _first_span(d)["args"], "step", "one"),
    "thread name 5": _set(lambda d: _thread_name(d)["args"], "name", 5),
    "thread args null": _set(_thread_name, "args", None),
    "event not an object": lambda d: d["traceEvents"].append(5),
    "metadata list": _set(lambda d: d, "metadata", []),
    "format version from the future": _set(lambda d: d["metadata"], "format_version", 99),
    "format version a string": _set(lambda d: d["metadata"], "format_version", "1"),
    "traceEvents dict": _set(lambda d: d, "traceEvents", {}),
    "no module spans": lambda d: d.update(traceEvents=[e for e in d["traceEvents"] if e.get("ph") != "X"]),
}


def _one_error_line(err: str, path: Path) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modtimeline: error: ") and str(path) in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", sorted(HOSTILE_JSON))
def test_hostile_json_exits_2_with_one_line(case, valid, tmp_path, capsys):
    document = copy.deepcopy(valid)
    HOSTILE_JSON[case](document)
    path = tmp_path / "hostile.json"
    path.write_bytes(orjson.dumps(document))
    for argv in (["summary", str(path)], ["diff", str(path), str(path)]):
        assert main(argv) == 2, case
        _one_error_line(capsys.readouterr().err, path)


@pytest.mark.parametrize("raw", [b"", b"{", b"\x1f\x8b\x08garbage", b"\x00\x01\x02", b"[]", b"{}", b"\xff" * 64])
def test_damaged_bytes_exit_2(raw, tmp_path, capsys):
    path = tmp_path / "damaged.json"
    path.write_bytes(raw)
    assert main(["summary", str(path)]) == 2
    _one_error_line(capsys.readouterr().err, path)


def test_a_newer_format_says_to_upgrade(valid, tmp_path, capsys):
    document = copy.deepcopy(valid)
    document["metadata"]["format_version"] = 99
    path = tmp_path / "new.json"
    path.write_bytes(orjson.dumps(document))
    assert main(["summary", str(path)]) == 2
    assert "written by a newer modtimeline (format version 99" in capsys.readouterr().err


def test_pftrace_metadata_of_the_wrong_type_exits_2(tmp_path, capsys):
    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace as TraceProto

    for value in (b"5", b"[1]", b'"x"', b"null"):
        proto = TraceProto()
        entry = proto.packet.add().chrome_events.metadata.add()
        entry.name, entry.json_value = "modtimeline", value.decode()
        path = tmp_path / "bad.pftrace"
        path.write_bytes(proto.SerializeToString())
        assert main(["summary", str(path)]) == 2
        _one_error_line(capsys.readouterr().err, path)


def test_a_gzip_bomb_is_refused_within_the_limit(tmp_path, capsys):
    path = tmp_path / "bomb.json.gz"
    with gzip.open(path, "wb", compresslevel=9) as stream:
        stream.write(b'{"traceEvents":[' + b" " * (64 << 20))  # 64 MiB of spaces, ~64 KiB on disk
    assert path.stat().st_size < 1 << 20
    assert main(["summary", str(path), "--max-trace-mb", "8"]) == 2
    err = capsys.readouterr().err
    _one_error_line(err, path)
    assert "inflates to more than the 8 MiB limit" in err


def test_a_compressed_packets_bomb_and_damage_are_refused(tmp_path, capsys):
    """A .pftrace span chunk is zlib inside a packet: it must not expand past the limit
    either, and damaged compressed bytes are one error line."""
    import zlib

    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace as TraceProto

    for body, message in ((zlib.compress(b"\0" * (64 << 20), 9), "once expanded"),
                          (b"not zlib at all", "damaged compressed packets")):
        proto = TraceProto()
        proto.packet.add().compressed_packets = body
        path = tmp_path / "bomb.pftrace"
        path.write_bytes(proto.SerializeToString())
        assert path.stat().st_size < 1 << 20
        assert main(["summary", str(path), "--max-trace-mb", "8"]) == 2
        err = capsys.readouterr().err
        _one_error_line(err, path)
        assert message in err


def test_too_many_events_is_refused_and_the_flag_raises_the_bound(valid, tmp_path, capsys):
    path = tmp_path / "t.json"
    path.write_bytes(orjson.dumps(valid))
    assert main(["summary", str(path), "--max-events", "10"]) == 2
    assert "--max-events raises it" in capsys.readouterr().err
    assert main(["summary", str(path), "--max-events", "100000"]) == 0


def test_unreadable_file_and_folder_exit_2(tmp_path, capsys, monkeypatch):
    import builtins

    path = tmp_path / "t.json"
    synthetic.write(path, count=3, steps=6, seed=1)
    real_open = builtins.open

    def denied(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    assert main(["summary", str(path)]) == 2
    _one_error_line(capsys.readouterr().err, path)
    monkeypatch.setattr(builtins, "open", real_open)
    monkeypatch.setattr(Path, "iterdir", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    assert main(["summary", str(tmp_path)]) == 2
    _one_error_line(capsys.readouterr().err, tmp_path)


def test_broken_pipe_ends_quietly(tmp_path):
    path = synthetic.write(tmp_path / "t.json", count=200, steps=6, seed=1)
    command = f"{sys.executable} -m modtimeline summary {path} | head -c1"
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    assert result.stderr == "", result.stderr


# ------------------------------------------------------------------- config

SLOW = {i: 37.0 for i in range(1, 4)}  # the candidate is 37x slower


@pytest.fixture(scope="module")
def slower_pair(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pair")
    return (synthetic.write(folder / "base.json", count=4, steps=12, seed=1),
            synthetic.write(folder / "cand.json", count=4, steps=12, seed=2, slow=SLOW))


@pytest.mark.parametrize("text, key", [
    ("[diff]\nthreshold = nan", "threshold"),
    ("[diff]\nfloor_us = nan", "floor_us"),
    ("[diff]\nfloor_us = inf", "floor_us"),
    ("[diff]\nalpha = nan", "alpha"),
    ("[diff]\nalpha = -1", "alpha"),
    ("[diff]\nalpha = 5", "alpha"),
    ("[diff]\nwarmup = -5", "warmup"),
    ("[diff]\nwarmup = 1.5", "warmup"),
    ("[diff]\nmin_samples = 0", "min_samples"),
    ("[diff]\nthreshold = \"0.05\"", "threshold"),
    ("[diff]\ncorrection = \"none\"", "correction"),
    ("[diff]\nfrobnicate = 1", "frobnicate"),
    ("[[diff.module]]\nmatch = \"*\"\nignore = \"false\"", "ignore"),
    ("[[diff.module]]\nmatch = 5", "match"),
    ("[[diff.module]]\nthreshold = 0.1", "match"),
    ("[[diff.module]]\nmatch = \"*\"\nthresold = 0.1", "thresold"),
    ("diff = 5", "diff must be a table"),
    ("[other]\nx = 1", "other"),
    ("[diff]\nmodule = 5", "module"),
    ("x = " + "[" * 5000 + "]" * 5000, "TOML"),
])
def test_a_config_that_could_hide_a_regression_exits_2_naming_the_key(text, key, slower_pair, tmp_path, capsys):
    config = tmp_path / "gate.toml"
    config.write_text(text)
    assert main(["diff", "--config", str(config), *map(str, slower_pair)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and key in err, err


def test_config_that_is_not_utf8_exits_2(slower_pair, tmp_path, capsys):
    config = tmp_path / "gate.toml"
    config.write_bytes(b"[diff]\nthreshold = 0.1 # \xff\xfe")
    assert main(["diff", "--config", str(config), *map(str, slower_pair)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--floor-us", "nan"], ["--floor-us", "-1"], ["--threshold", "nan"],
                                  ["--alpha", "nan"], ["--alpha", "0"], ["--max-drift", "nan"]])
def test_flags_that_could_hide_a_regression_exit_2(flag, slower_pair, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["diff", *flag, *map(str, slower_pair)])
    assert exit_info.value.code == 2


def test_the_37x_slower_candidate_fails_the_gate(slower_pair):
    assert main(["diff", *map(str, slower_pair)]) == 1


# ------------------------------------------------------------------- output

INJECTED = "Model.evil`\n## ✅ safe to merge\n<!-- hide -->\x1b[2J|x"


def _report_with_a_hostile_name():
    base = synthetic.in_memory(4, 12, seed=1)
    candidate = synthetic.in_memory(4, 12, seed=2, slow={1: 2.0})
    for trace in (base, candidate):
        for span in trace.spans:
            if span.name == "Model.layers.0":
                span.name = INJECTED
    return diff([base], [candidate])


def test_markdown_cannot_be_rewritten_by_a_module_name():
    markdown = render_diff_markdown(_report_with_a_hostile_name())
    assert "\n## " not in markdown and "\x1b" not in markdown
    row = next(line for line in markdown.splitlines() if "Model.evil" in line)
    # the whole name sits in one code span of one table cell, the | escaped
    assert "``Model.evil`\\n## ✅ safe to merge\\n<!-- hide -->\\x1b[2J\\|x``" in row
    assert row.count(" | ") == markdown.splitlines()[2].count(" | ")  # same cells as the header row


def test_terminal_output_shows_control_characters_as_escapes():
    text = render_diff_text(_report_with_a_hostile_name())
    assert "\x1b" not in text and "\\x1b[2J" in text
    assert "Model.evil`\\n## ✅" in text
