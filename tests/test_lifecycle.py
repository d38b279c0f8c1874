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


# ------------------------------------------------------------ the transition table itself
from modtimeline.lifecycle import (  # noqa: E402
    STEP_PLANS, TRANSITIONS, Event, Lifecycle, State, WindowEnd, Work,
)
from modtimeline.schedule import StepAction  # noqa: E402

_PUBLIC_EVENTS = (Event.START, Event.BEGIN_STEP, Event.END_STEP, Event.STOP)


def _at(state: State, schedule: Schedule | None = None, step: int = 0) -> Lifecycle:
    life = Lifecycle(schedule, record_between_steps=True)
    life.state, life.step = state, step
    return life


def test_the_table_answers_every_public_event_in_every_state():
    for state in State:
        for event in _PUBLIC_EVENTS:
            assert (state, event) in TRANSITIONS, (state, event)
    for row in TRANSITIONS.values():
        assert isinstance(row, str) or (isinstance(row[0], State) and isinstance(row[1], Work))


@pytest.mark.parametrize("state, event, message", [
    (State.NEW, Event.BEGIN_STEP, r"call start\(\) first"),
    (State.NEW, Event.END_STEP, "no step open"),
    (State.BETWEEN_STEPS, Event.START, "already recording"),
    (State.BETWEEN_STEPS, Event.END_STEP, "no step open"),
    (State.IN_STEP, Event.START, "already recording"),
    (State.IN_STEP, Event.BEGIN_STEP, "while step 7 is open.*cannot be nested"),
    (State.STOPPED, Event.END_STEP, "no step open"),
])
def test_illegal_transitions_raise_the_documented_errors(state, event, message):
    life = _at(state, step=7)
    with pytest.raises(ModTimelineError, match=message):
        life.check(event)
    assert life.state is state and life.step == 7  # a refused event changes nothing


@pytest.mark.parametrize("state, event, target, work", [
    (State.NEW, Event.START, State.BETWEEN_STEPS, Work.START),
    (State.NEW, Event.STOP, State.NEW, Work.NOTHING),
    (State.BETWEEN_STEPS, Event.BEGIN_STEP, State.IN_STEP, Work.BEGIN_STEP),
    (State.BETWEEN_STEPS, Event.STOP, State.STOPPED, Work.STOP),
    (State.IN_STEP, Event.END_STEP, State.BETWEEN_STEPS, Work.END_STEP),
    (State.IN_STEP, Event.STOP, State.STOPPED_IN_STEP, Work.STOP),
    (State.STOPPED, Event.START, State.BETWEEN_STEPS, Work.START),
    (State.STOPPED, Event.BEGIN_STEP, State.STOPPED_IN_STEP, Work.NOTHING),
    (State.STOPPED, Event.STOP, State.STOPPED, Work.NOTHING),
    (State.STOPPED_IN_STEP, Event.END_STEP, State.STOPPED, Work.NOTHING),
    (State.STOPPED_IN_STEP, Event.BEGIN_STEP, State.STOPPED_IN_STEP, Work.NOTHING),
    (State.STOPPED_IN_STEP, Event.START, State.BETWEEN_STEPS, Work.START),
])
def test_allowed_transitions(state, event, target, work):
    life = _at(state)
    move = life.check(event)
    assert (move.source, move.target, move.work) == (state, target, work)
    life.enter(move)
    assert life.state is target


def test_steps_count_and_join_the_window_as_their_plan_says():
    life = _at(State.NEW, Schedule(wait=1, warmup=1, active=2))
    life.enter(life.check(Event.START))
    kinds = []
    for _ in range(5):
        begin = life.check(Event.BEGIN_STEP)
        life.enter(begin)
        kinds.append(begin.plan.at_end)
        life.enter(life.check(Event.END_STEP))
    assert kinds == [WindowEnd.NOTHING, WindowEnd.DISCARD, WindowEnd.KEEP, WindowEnd.WRITE, WindowEnd.NOTHING]
    assert life.step == 5 and life.window_steps == [2, 3]  # (the Timeline empties it when it writes)
    assert not STEP_PLANS[StepAction.SKIP].recorded and STEP_PLANS[StepAction.WARMUP].recorded


def test_a_stop_inside_a_step_ends_it_and_owes_its_end_step_nothing():
    life = _at(State.NEW)
    life.enter(life.check(Event.START))
    life.enter(life.check(Event.BEGIN_STEP))
    stop = life.check(Event.STOP)
    assert stop.ends_step and stop.step == 0
    life.enter(stop)
    assert (life.state, life.step, life.window_steps, life.recording) == (State.STOPPED_IN_STEP, 1, [0], False)
    assert life.signal_window() == (False, None)  # stopped: a SIGTERM writes nothing
    life.enter(life.check(Event.END_STEP))  # the caller's own end: a no-op
    assert life.state is State.STOPPED
    with pytest.raises(ModTimelineError, match="no step open"):
        life.check(Event.END_STEP)


def test_what_a_signal_writes():
    life = _at(State.BETWEEN_STEPS)
    assert life.signal_window() == (True, None)  # no schedule: the one file
    life = _at(State.BETWEEN_STEPS, Schedule(wait=1, active=2))
    assert life.signal_window() == (False, None)  # between windows
    life.enter(life.check(Event.BEGIN_STEP))  # step 0: skipped
    assert life.signal_window() == (False, None)
    life.enter(life.check(Event.END_STEP))
    life.enter(life.check(Event.BEGIN_STEP))  # step 1: first of window 0
    assert life.signal_window() == (True, 0)


def test_a_start_that_fails_while_hooking_leaves_no_hook_behind(monkeypatch, tmp_path):
    # The last part of the hooks (inductor detail's profiler) fails: the parts already on
    # come off, the failure reaches the caller, and a later Timeline starts as usual.
    from modtimeline.capture.inductor_detail import InductorDetail

    def broken(self):
        raise RuntimeError("the profiler could not start")

    hooks_before = (dict(torch_module._global_forward_pre_hooks), dict(torch_module._global_forward_hooks))
    monkeypatch.setattr(InductorDetail, "recording", broken)
    timeline = Timeline(tmp_path / "t.json", compiled_detail=True)
    with pytest.raises(RuntimeError, match="could not start"):
        timeline.start()
    monkeypatch.undo()
    assert not timeline.started
    assert (dict(torch_module._global_forward_pre_hooks), dict(torch_module._global_forward_hooks)) == hooks_before
    model = torch.nn.Linear(2, 2)
    with Timeline(tmp_path / "u.json") as later:
        model(torch.randn(1, 2)).sum().backward()
    assert later.written


@pytest.mark.parametrize("schedule, between", [(None, True), (None, False), (Schedule(wait=1, warmup=1, active=2), True)])
def test_the_plain_step_makes_the_tables_move_or_changes_nothing(schedule, between):
    # Every event in every state: plain_step either leaves the life cycle as it was (None)
    # or leaves it as enter(check(event)) does, returning that move's step.
    taken = 0
    for state in State:
        for event in _PUBLIC_EVENTS:
            for step in (0, 3):
                plain = Lifecycle(schedule, between)
                plain.state, plain.step, plain.window_steps = state, step, [9]
                by_table = Lifecycle(schedule, between)
                by_table.state, by_table.step, by_table.window_steps = state, step, [9]
                before = (plain.state, plain.step, list(plain.window_steps), plain.plan)
                number = plain.plain_step(event)
                if number is None:
                    assert (plain.state, plain.step, plain.window_steps, plain.plan) == before, (state, event)
                    continue
                taken += 1
                move = by_table.check(event)
                by_table.enter(move)
                # (the work the Timeline then skips: hooks stay on, no window is written or thrown away)
                assert number == move.step and move.plan.recorded and not by_table.hooks_off_after(move)
                assert move.plan.at_end is WindowEnd.KEEP
                assert (plain.state, plain.step, plain.window_steps, plain.plan) == \
                    (by_table.state, by_table.step, by_table.window_steps, by_table.plan), (state, event)
    # Only the two step boundaries of a recording Timeline without a schedule, hooks on between steps.
    assert taken == (4 if schedule is None and between else 0)


# ------------------------------------------------- hooks between steps (issue 26)
# Off between steps (record_between_steps=False, what the integrations use): between two
# recorded steps the hooks stay in torch, paused, rather than being taken out and put back
# each step (that cost a step ~0.3 ms: benchmarks/overhead.py).
def _forward_spans_per_step(path: Path) -> dict[int, list[str]]:
    steps: dict[int, list[str]] = {}
    for e in spans(load(path)):
        if e["cat"] == "forward":
            steps.setdefault(e["args"]["step"], []).append(e["name"])
    return {step: sorted(names) for step, names in steps.items()}


_ONE_STEP = sorted(["Sequential", "Sequential.0", "Sequential.1", "Sequential.2"])


def test_between_recorded_steps_the_hooks_are_paused_and_record_nothing(tmp_path):
    model, x = _model(), torch.randn(2, 4)
    torch_call_impl = torch.nn.Module._call_impl
    timeline = Timeline(tmp_path / "t.json", record_between_steps=False).start()
    assert _hooks_gone()
    for _ in range(3):
        with timeline.step():
            model(x).sum().backward()
        assert not _hooks_gone()  # paused in torch, not taken out
        with torch.no_grad():
            model(x)  # evaluation between steps: not recorded
        model(x).sum().backward()  # nor a backward between steps
    timeline.stop()
    assert _hooks_gone() and torch.nn.Module._call_impl is torch_call_impl
    assert _forward_spans_per_step(tmp_path / "t.json") == {0: _ONE_STEP, 1: _ONE_STEP, 2: _ONE_STEP}
    backward = [e for e in spans(load(tmp_path / "t.json")) if e["cat"] == "backward"]
    assert len(backward) == 3 * len(_ONE_STEP)
    assert_nested(load(tmp_path / "t.json"))


def test_after_a_written_window_the_hooks_are_out_of_torch(tmp_path):
    model, x = _model(), torch.randn(2, 4)
    timeline = Timeline(tmp_path / "t.json", schedule=Schedule(wait=1, active=2, repeat=1),
                        record_between_steps=False).start()
    seen = []
    for _ in range(5):
        with timeline.step():
            model(x).sum().backward()
        seen.append(_hooks_gone())
    timeline.stop()
    # step 0 waits, 1 and 2 are recorded (paused between them: in torch), the window is
    # written at the end of 2, and 3 and 4 are not recorded.
    assert seen == [True, False, True, True, True]
    assert _forward_spans_per_step(tmp_path / "t.000.json") == {1: _ONE_STEP, 2: _ONE_STEP}


def test_a_step_begun_from_a_modules_own_pre_hook_records_that_call_once(tmp_path):
    model, x = _model(), torch.randn(2, 4)
    timeline = Timeline(tmp_path / "t.json", record_between_steps=False).start()

    def begin(module: torch.nn.Module, args: object) -> None:  # (after the global hooks)
        if not timeline.in_step:
            timeline.begin_step(first_call=(module, args))

    handle = model.register_forward_pre_hook(begin)
    for _ in range(3):  # the first from hooks out of torch, the others from paused hooks
        model(x).sum().backward()
        timeline.end_step()
    handle.remove()
    timeline.stop()
    assert _forward_spans_per_step(tmp_path / "t.json") == {0: _ONE_STEP, 1: _ONE_STEP, 2: _ONE_STEP}
    assert_nested(load(tmp_path / "t.json"))


def test_a_step_begun_from_a_global_pre_hook_ahead_of_ours_records_that_call_once(tmp_path):
    # What `modtimeline record` does: paused, our pre-hook still runs for that call after
    # the one that began the step, and must not begin it again.
    model, x = _model(), torch.randn(2, 4)
    timeline = Timeline(tmp_path / "t.json", record_between_steps=False).start()
    key = -0x7E57

    def begin(module: torch.nn.Module, args: object) -> None:
        if not timeline.in_step:
            timeline.begin_step(first_call=(module, args))

    hooks = torch_module._global_forward_pre_hooks
    try:
        for _ in range(3):
            hooks[key] = begin
            hooks.move_to_end(key, last=False)
            model(x).sum().backward()
            del hooks[key]
            timeline.end_step()
    finally:
        hooks.pop(key, None)
        timeline.stop()
    assert _forward_spans_per_step(tmp_path / "t.json") == {0: _ONE_STEP, 1: _ONE_STEP, 2: _ONE_STEP}
    assert_nested(load(tmp_path / "t.json"))
