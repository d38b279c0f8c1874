"""The lifecycle a framework drives: start/stop, begin_step/end_step (issue 23)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from torch.nn.modules import module as torch_module

from modtimeline import ModTimelineError, Schedule, Timeline
from modtimeline import timeline as timeline_module

from .trace_checks import assert_nested, load, spans

pytestmark = pytest.mark.twin  # the pure-Python pass runs these too


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))


def _hooks_gone() -> bool:
    return not torch_module._global_forward_pre_hooks and not torch_module._global_forward_hooks


def _steps(path: Path) -> list[str]:
    return [e["name"] for e in spans(load(path)) if e["cat"] == "step"]


def test_start_begin_end_stop_without_context_managers(tmp_path):
    model, x = _model(), torch.randn(2, 4)
    timeline = Timeline(tmp_path / "t.json")
    assert not timeline.started
    assert timeline.start() is timeline and timeline.started
    for expected in range(3):
        assert timeline.begin_step() == expected
        model(x).sum().backward()
        timeline.end_step()
    timeline.stop()
    assert not timeline.started and _hooks_gone()
    trace = load(tmp_path / "t.json")
    assert _steps(tmp_path / "t.json") == ["step 0", "step 1", "step 2"]
    assert len([e for e in spans(trace) if e["cat"] == "forward"]) == 3 * 4
    assert "exception" not in trace["metadata"]
    assert_nested(trace)
    timeline.stop()  # idempotent: nothing written again
    assert timeline.written == [tmp_path / "t.json"]


def test_starting_twice_is_a_clear_error(tmp_path):
    timeline = Timeline(tmp_path / "t.json")
    with timeline:
        with pytest.raises(ModTimelineError, match="already recording"):
            timeline.start()
        with pytest.raises(ModTimelineError, match="already recording"):
            timeline.__enter__()
    assert _hooks_gone()
    timeline.start()  # a stopped Timeline may start again
    timeline.stop()
    assert timeline.written == [tmp_path / "t.json"] * 2


def test_step_calls_out_of_order_are_clear_errors(tmp_path):
    timeline = Timeline(tmp_path / "t.json")
    with pytest.raises(ModTimelineError, match="call start"):
        timeline.begin_step()
    with pytest.raises(ModTimelineError, match="inside `with Timeline"):
        with timeline.step():
            pass
    with timeline:
        with pytest.raises(ModTimelineError, match="no step open"):
            timeline.end_step()
        timeline.begin_step()
        with pytest.raises(ModTimelineError, match="cannot be nested"):
            timeline.begin_step()
        timeline.end_step()
    assert _hooks_gone()


def test_stop_after_an_error_writes_the_trace_and_removes_every_hook(tmp_path):
    model, x = _model(), torch.randn(2, 4)
    timeline = Timeline(tmp_path / "t.json").start()
    timeline.begin_step()
    model(x).sum().backward()
    timeline.end_step()
    timeline.begin_step()
    model(x)
    error = RuntimeError("CUDA out of memory (pretend)")
    timeline.stop(error)  # a framework's exception path: the step is still open
    assert _hooks_gone()
    trace = load(tmp_path / "t.json")
    assert trace["metadata"]["exception"] == "RuntimeError: CUDA out of memory (pretend)"
    steps = {e["name"]: e for e in spans(trace) if e["cat"] == "step"}
    assert set(steps) == {"step 0", "step 1"} and steps["step 1"]["args"].get("incomplete")
    assert not steps["step 0"]["args"].get("incomplete")
    timeline.end_step()  # the framework's own end of that step, after the stop: nothing to do


def test_end_step_with_an_error_flags_the_step(tmp_path):
    model, x = _model(), torch.randn(2, 4)
    with Timeline(tmp_path / "t.json") as timeline:
        timeline.begin_step()
        model(x).sum().backward()
        timeline.end_step(ValueError("skipped batch"))
        timeline.begin_step()
        model(x).sum().backward()
        timeline.end_step()
    steps = {e["name"]: e for e in spans(load(tmp_path / "t.json")) if e["cat"] == "step"}
    assert steps["step 0"]["args"].get("incomplete") and not steps["step 1"]["args"].get("incomplete")


def test_a_stop_from_another_thread_never_disturbs_training(tmp_path):
    model, x = _model(), torch.randn(2, 4)
    timeline = Timeline(tmp_path / "t.json")
    stopped = []
    with timeline:
        for number in range(6):
            with timeline.step():
                model(x).sum().backward()
                if number == 2:
                    watchdog = threading.Thread(target=lambda: stopped.append(timeline.stop()))
                    watchdog.start()
                    watchdog.join()
                    assert not timeline.started and _hooks_gone()
    assert stopped == [None] and _hooks_gone()
    assert timeline.written == [tmp_path / "t.json"]  # once, by the watchdog
    assert _steps(tmp_path / "t.json") == ["step 0", "step 1", "step 2"]


def test_a_stop_from_another_thread_waits_for_a_windows_write(tmp_path, monkeypatch):
    model, x = _model(), torch.randn(2, 4)
    writing, release = threading.Event(), threading.Event()
    real_write = timeline_module.write_trace

    def slow_write(data, path, fmt=None):
        writing.set()
        release.wait(30)
        return real_write(data, path, fmt)

    monkeypatch.setattr(timeline_module, "write_trace", slow_write)
    timeline = Timeline(tmp_path / "run.json", schedule=Schedule(active=2))
    watchdog = threading.Thread(target=lambda: (writing.wait(30), timeline.stop()))
    with timeline:
        watchdog.start()
        for number in range(3):
            with timeline.step():
                model(x).sum().backward()
            if number == 1:
                assert timeline.written == [tmp_path / "run.000.json"]
                release.set()
                watchdog.join(30)
                assert not timeline.started
    release.set()
    assert timeline.written == [tmp_path / "run.000.json"]  # window 1 had no step when the watchdog stopped
    assert _steps(tmp_path / "run.000.json") == ["step 0", "step 1"] and _hooks_gone()


SIGNAL_WHILE_WRITING = textwrap.dedent("""
    import os, signal, sys, torch
    from modtimeline import Schedule, Timeline
    from modtimeline import timeline as timeline_module
    path, mode = sys.argv[1], sys.argv[2]
    if mode == "handler":
        signal.signal(signal.SIGTERM, lambda signum, frame: print("user handler ran", flush=True))
    real_write = timeline_module.write_trace
    def write_then_signal(data, target, fmt=None):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the window is written
        size = real_write(data, target, fmt)
        print("written", os.path.basename(target), flush=True)
        return size
    timeline_module.write_trace = write_then_signal
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    timeline = Timeline(path, schedule=Schedule(active=2)).start()
    for number in range(4):
        timeline.begin_step()
        model(torch.randn(2, 4)).sum().backward()
        timeline.end_step()
        print("step", number, flush=True)
        if number == 1:
            timeline_module.write_trace = real_write
    timeline.stop()
    print("finished", flush=True)
""")


def test_sigterm_while_a_window_is_written_waits_for_the_write(tmp_path):
    path = tmp_path / "run.json"
    result = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_WRITING, str(path), "default"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGTERM, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["step 0", "written run.000.json"]  # killed after the write
    assert _steps(tmp_path / "run.000.json") == ["step 0", "step 1"]


def test_sigterm_while_a_window_is_written_with_a_user_handler(tmp_path):
    path = tmp_path / "run.json"
    result = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_WRITING, str(path), "handler"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["step 0", "written run.000.json", "user handler ran", "step 1",
                                          "step 2", "step 3", "finished"]
    assert _steps(tmp_path / "run.001.json") == ["step 2", "step 3"]
