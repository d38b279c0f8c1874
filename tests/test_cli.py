"""The command line: demo, and user mistakes as one line with exit code 2."""

import pytest
import torch

from modtimeline.cli import main

from .trace_checks import load, spans


def test_demo_writes_a_trace_and_says_how_to_open_it(tmp_path, capsys):
    path = tmp_path / "demo.json"
    assert main(["demo", "-o", str(path), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {path}" in out and "ui.perfetto.dev" in out
    assert {e["args"]["step"] for e in spans(load(path))} == {0, 1}


@pytest.mark.parametrize("argv, message", [
    (["demo", "--steps", "0"], "--steps: must be at least 1"),
    (["summary", "x.json", "--top", "0"], "--top: must be at least 1"),
    (["summary", "x.json", "--depth", "-1"], "--depth: must be at least 0"),
    (["diff", "a.json", "b.json", "--alpha", "2"], "--alpha: must be between 0 and 1"),
    (["diff", "a.json", "b.json", "--threshold", "abc"], "'abc' is not a number"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    """(argparse's own errors)"""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_on_cuda_without_cuda_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["demo", "--device", "cuda", "-o", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err == "modtimeline: error: --device cuda was asked for, but CUDA is not available on this machine\n"


def test_demo_whose_trace_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    """(A folder in which no file can be made, as /proc is: the demo said a warning, then
    died in a traceback on the file it had not written.)"""
    import os

    from modtimeline.writers import atomic

    real_open = os.open

    def no_file_here(path, *args, **kwargs):
        if os.fspath(path).startswith(os.fspath(tmp_path)):
            raise FileNotFoundError(2, "No such file or directory")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "open", no_file_here)
    assert main(["demo", "--steps", "1", "-o", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modtimeline: error: cannot write trace to") and "No such file or directory" in err
    assert "keeps disappearing" not in err and "Traceback" not in err


def test_record_help_shows_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["record", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--schedule" in out and "-- python train.py ARGS" in out


def test_info_names_versions_and_compiled_parts(capsys, monkeypatch):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("modtimeline ") and "torch " in out
    for part in ("native._hotpath", "native._resolve_cpu", "writers._chrome_rows"):
        assert f"  {part}: " in out
    monkeypatch.setenv("MODTIMELINE_PURE_PYTHON", "1")
    assert main(["info"]) == 0
    assert "_hotpath: not in use: turned off by MODTIMELINE_PURE_PYTHON" in capsys.readouterr().out


def test_a_missing_hot_path_is_said_once(monkeypatch, tmp_path):
    import warnings

    from modtimeline.capture import recorder
    from modtimeline.native import loader as _native
    from modtimeline import Timeline

    monkeypatch.setattr(recorder, "compiled_part", lambda name, api: None)
    monkeypatch.setitem(_native.why_not, "native._hotpath", "not built (test)")
    monkeypatch.setattr(_native, "_warned", False)
    with pytest.warns(RuntimeWarning, match="not built \\(test\\).*with: modtimeline build"):
        Timeline(tmp_path / "a.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Timeline(tmp_path / "b.json")  # once per process


def test_open_serves_the_trace_for_ui_perfetto_dev_and_stops(tmp_path):
    import re
    import subprocess
    import sys
    import urllib.request

    trace = tmp_path / "t.json"
    assert main(["demo", "-o", str(trace), "--steps", "1"]) == 0
    command = subprocess.Popen([sys.executable, "-m", "modtimeline", "open", str(trace), "--ui", "perfetto",
                                "--port", "0", "--no-browser", "--wait", "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert command.stdout is not None
        url = next(line.strip() for line in command.stdout if line.startswith("https://ui.perfetto.dev/"))
        served = re.search(r"url=(http://127\.0\.0\.1:\d+/t\.json)$", url)
        assert served, url
        with urllib.request.urlopen(served.group(1), timeout=30) as response:  # what the UI fetches
            assert response.headers["Access-Control-Allow-Origin"] == "https://ui.perfetto.dev"
            assert response.read() == trace.read_bytes()
        assert command.wait(timeout=60) == 0
    finally:
        command.kill()


def test_open_a_missing_file_is_one_line(capsys):
    assert main(["open", "missing.json", "--no-browser"]) == 2
    assert capsys.readouterr().err == "modtimeline: error: missing.json: no such file\n"


def test_diff_with_nothing_after_the_bare_dashes_is_one_line(capsys):
    assert main(["diff", "a.json", "--"]) == 2
    assert capsys.readouterr().err == "modtimeline: error: no candidate traces after --: give BASE... -- CANDIDATE...\n"
