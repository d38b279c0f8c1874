"""Faults around writing: atomic rewrites, the user's exception, user files, leftovers, SIGTERM."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from modtimeline import Schedule, Timeline
from modtimeline import timeline as timeline_module
from modtimeline.errors import TraceFileError
from modtimeline.writers.atomic import atomic_output

from .trace_checks import load, spans


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))


def test_a_concurrent_reader_always_finds_the_file(tmp_path):
    # The old write moved the previous file aside before renaming the new one in: a reader
    # got ENOENT in between (78,406 of 1.63 M opens).
    path = tmp_path / "t.json"
    path.write_bytes(b"old")
    stop = threading.Event()
    missing = []

    def read() -> None:
        while not stop.is_set():
            try:
                with open(path, "rb") as f:
                    data = f.read()
                assert data in (b"old", b"x" * 1000)
            except FileNotFoundError:
                missing.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(3000):
            with atomic_output(path) as stream:
                stream.write(b"x" * 1000)
    finally:
        stop.set()
        reader.join()
    assert not missing


def test_user_exception_wins_over_a_full_disk_at_a_windows_end(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(timeline_module, "write_trace", full_disk)
    model = _model()
    with pytest.warns(RuntimeWarning, match="could not write"), pytest.raises(ValueError, match="mine"):
        with Timeline(tmp_path / "t.json", schedule=Schedule(wait=0, warmup=0, active=2)) as timeline:
            for _ in range(2):
                with timeline.step() as number:
                    model(torch.randn(2, 4)).sum().backward()
                    if number == 1:  # the window's last step
                        raise ValueError("mine")


@pytest.mark.parametrize("strict", [False, True])
def test_a_directory_made_at_the_trace_path_is_left_alone(tmp_path, strict):
    path = tmp_path / "x.json"
    failed = pytest.raises(TraceFileError, match="directory") if strict else \
        pytest.warns(RuntimeWarning, match="directory is there now; training goes on")
    with failed:
        with Timeline(path, strict=strict):
            _model()(torch.randn(2, 4)).sum().backward()
            os.mkdir(path)
            (path / "mine.txt").write_text("keep")
    assert (path / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # nothing renamed, no leftovers


def test_leftovers_of_a_killed_write_are_removed_by_the_next_write(tmp_path):
    path = tmp_path / "t.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    leftover = tmp_path / f".t.json.{dead_pid}.0.tmp"
    leftover.write_bytes(b"half a trace")
    other_name = tmp_path / f".other.json.{dead_pid}.0.tmp"
    other_name.write_bytes(b"not ours to touch")
    live = tmp_path / f".t.json.{os.getppid()}.0.tmp"  # a live process's write in progress
    live.write_bytes(b"in progress")
    with Timeline(path):
        _model()(torch.randn(2, 4)).sum().backward()
    assert not leftover.exists() and other_name.exists() and live.exists()
    assert spans(load(path))


SIGTERM_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    from modtimeline import Timeline
    path, mode = sys.argv[1], sys.argv[2]
    if mode == "handler":
        signal.signal(signal.SIGTERM, lambda signum, frame: print("user handler ran", flush=True))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    with Timeline(path) as timeline:
        for number in range(3):
            with timeline.step():
                model(torch.randn(2, 4)).sum().backward()
                if number == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
    print("finished", flush=True)
""")


def test_sigterm_writes_the_trace_then_terminates(tmp_path):
    path = tmp_path / "t.json"
    result = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(path), "default"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGTERM, result.stderr[-2000:]
    assert "finished" not in result.stdout
    trace = load(path)
    assert trace["metadata"]["exception"] == "terminated by signal SIGTERM"
    steps = {e["name"]: e for e in spans(trace) if e["cat"] == "step"}
    assert set(steps) == {"step 0", "step 1"} and steps["step 1"]["args"].get("incomplete")


def test_sigterm_with_a_user_handler_writes_then_runs_it(tmp_path):
    path = tmp_path / "t.json"
    result = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(path), "handler"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["user handler ran", "finished"]
    assert {e["name"] for e in spans(load(path)) if e["cat"] == "step"} == {"step 0", "step 1", "step 2"}


def test_signal_handling_can_be_turned_off_and_is_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with Timeline(tmp_path / "a.json", handle_signals=False):
        assert signal.getsignal(signal.SIGTERM) == before
    with Timeline(tmp_path / "b.json"):
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_handler_set_inside_the_timeline_stays_and_an_ignored_signal_stays_ignored(tmp_path):
    def theirs(signum, frame):
        pass

    before = signal.getsignal(signal.SIGTERM)
    try:
        with Timeline(tmp_path / "a.json"):
            signal.signal(signal.SIGTERM, theirs)  # (a framework's, set while recording)
        assert signal.getsignal(signal.SIGTERM) is theirs
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with Timeline(tmp_path / "b.json"):
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
