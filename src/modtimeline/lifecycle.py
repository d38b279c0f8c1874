"""A Timeline's life cycle in one place: its states, what each event does in each state,
what a step does under a schedule, and the lock its boundaries share with SIGTERM.

Read the two tables; ``timeline.py`` only does the work they name.

**States and events** (``TRANSITIONS``). A Timeline is made ``NEW``; ``start()`` makes it
record (``BETWEEN_STEPS``); ``begin_step()``/``end_step()`` move it in and out of a step;
``stop()`` ends it (``STOPPED``; it may start again). A ``stop()`` that comes while a step
is open (from another thread, or a framework's exception path) closes that step itself;
the state ``STOPPED_IN_STEP`` remembers that the caller still owes its ``end_step()``, so
that call (or a ``begin_step()`` on a stopped Timeline, and its ``end_step()``) does
nothing instead of raising::

    state \\ event    start()            begin_step()         end_step()          stop()
    NEW              BETWEEN_STEPS      error: start first   error: no step      (nothing)
    BETWEEN_STEPS    error: recording   IN_STEP              error: no step      STOPPED, write
    IN_STEP          error: recording   error: nested        BETWEEN_STEPS       STOPPED_IN_STEP, end the step, write
    STOPPED          BETWEEN_STEPS      STOPPED_IN_STEP      error: no step      (nothing)
    STOPPED_IN_STEP  BETWEEN_STEPS      (nothing)            STOPPED             (nothing)

``Lifecycle.check(event)`` answers with the ``Move`` (or raises the documented
``ModTimelineError``); the Timeline does the move's ``work`` and calls ``enter(move)`` at
the point the state changes. The only other move: a ``start()`` whose hooks fail to go
on ends ``STOPPED`` (``Event.START_FAILED``). ``plain_step(event)`` makes the two step
moves of a Timeline without a schedule in one call, as check and enter would.

**Steps under a schedule** (``STEP_PLANS``, as ``torch.profiler`` keeps its schedule
actions in one table). The schedule gives each step an action; the action says whether
the step is recorded (hooks on, step span) and what its end does to the window: nothing
(skipped), throw it away (warm-up), keep it, or keep it and write the window to its own
file (the last step of an active window). Without a schedule every step is ``RECORD`` and
the one window is the whole run, written by ``stop()``.

**Hooks**: on inside a recorded step; between steps only without a schedule and with
``record_between_steps`` (set on at start), or after a kept step while
``record_between_steps``; off after a window is written, and at stop. Off between two
steps of a window (``record_between_steps=False``) is paused: left in torch, recording
nothing, till the next recorded step (Timeline._hooks); taken out at a step not recorded.

**SIGTERM** (``BoundaryLock``): start, stop and the step boundaries hold one lock, so a
stop from another thread waits for a window's write. A SIGTERM writes what is recorded
(``Lifecycle.signal_window``); one that comes while its own thread holds the lock (inside
a boundary, maybe mid-write) is delivered when the outermost block ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Union

from .errors import ModTimelineError
from .schedule import Schedule, StepAction

__all__ = ["State", "Event", "Work", "Move", "TRANSITIONS", "WindowEnd", "StepPlan", "STEP_PLANS", "Lifecycle",
           "BoundaryLock"]


class State(Enum):
    __hash__ = object.__hash__  # (members are singletons; Enum's own hash is a Python call, 4 a step)

    NEW = "new"  # made, never started
    BETWEEN_STEPS = "between steps"  # recording, no step open
    IN_STEP = "in step"  # recording, a step open
    STOPPED = "stopped"  # stopped (may start again)
    STOPPED_IN_STEP = "stopped in step"  # stopped while its caller's step was open: that step's end_step() is a no-op


class Event(Enum):
    __hash__ = object.__hash__

    START = "start"
    BEGIN_STEP = "begin_step"
    END_STEP = "end_step"
    STOP = "stop"
    START_FAILED = "start failed"  # start()'s hooks or signal handler could not be installed


class Work(Enum):
    """What the Timeline does for a move."""
    NOTHING = "nothing"
    START = "start"  # new window, device clock, hooks between steps, SIGTERM handler
    BEGIN_STEP = "begin step"  # the step's plan: hooks, step begin
    END_STEP = "end step"  # the step's plan: step end, the window kept, discarded or written
    STOP = "stop"  # (the open step ended as by end_step), hooks off, the last window written


# The errors, as raised (``{step}``: the open step's number).
ALREADY_RECORDING = ("this Timeline is already recording: start() (or `with Timeline`) was called twice; "
                     "call stop() first")
ENTERED_TWICE = "this Timeline is already recording; it cannot be entered twice"
NOT_STARTED = "begin_step() needs a recording Timeline: call start() first (or use `with Timeline(...)`)"
NESTED = "begin_step() was called while step {step} is open: call end_step() first (steps cannot be nested)"
NO_STEP_OPEN = "end_step() was called with no step open: call begin_step() first"
STEP_BLOCK_OUTSIDE = "Timeline.step() must be used inside `with Timeline(...)` (or after start())"
STEP_BLOCK_NESTED = "Timeline.step() blocks cannot be nested"

_S = State
_E = Event
_W = Work

# (state, event) -> (next state, work), or the error that event raises in that state.
TRANSITIONS: dict[tuple[State, Event], Union[tuple[State, Work], str]] = {
    (_S.NEW, _E.START): (_S.BETWEEN_STEPS, _W.START),
    (_S.NEW, _E.BEGIN_STEP): NOT_STARTED,
    (_S.NEW, _E.END_STEP): NO_STEP_OPEN,
    (_S.NEW, _E.STOP): (_S.NEW, _W.NOTHING),

    (_S.BETWEEN_STEPS, _E.START): ALREADY_RECORDING,
    (_S.BETWEEN_STEPS, _E.BEGIN_STEP): (_S.IN_STEP, _W.BEGIN_STEP),
    (_S.BETWEEN_STEPS, _E.END_STEP): NO_STEP_OPEN,
    (_S.BETWEEN_STEPS, _E.STOP): (_S.STOPPED, _W.STOP),
    (_S.BETWEEN_STEPS, _E.START_FAILED): (_S.STOPPED, _W.NOTHING),

    (_S.IN_STEP, _E.START): ALREADY_RECORDING,
    (_S.IN_STEP, _E.BEGIN_STEP): NESTED,
    (_S.IN_STEP, _E.END_STEP): (_S.BETWEEN_STEPS, _W.END_STEP),
    (_S.IN_STEP, _E.STOP): (_S.STOPPED_IN_STEP, _W.STOP),

    (_S.STOPPED, _E.START): (_S.BETWEEN_STEPS, _W.START),
    (_S.STOPPED, _E.BEGIN_STEP): (_S.STOPPED_IN_STEP, _W.NOTHING),
    (_S.STOPPED, _E.END_STEP): NO_STEP_OPEN,
    (_S.STOPPED, _E.STOP): (_S.STOPPED, _W.NOTHING),

    (_S.STOPPED_IN_STEP, _E.START): (_S.BETWEEN_STEPS, _W.START),
    (_S.STOPPED_IN_STEP, _E.BEGIN_STEP): (_S.STOPPED_IN_STEP, _W.NOTHING),
    (_S.STOPPED_IN_STEP, _E.END_STEP): (_S.STOPPED, _W.NOTHING),
    (_S.STOPPED_IN_STEP, _E.STOP): (_S.STOPPED_IN_STEP, _W.NOTHING),
}


class WindowEnd(Enum):
    """What the end of a step does to the window being recorded."""
    NOTHING = "nothing"  # (a skipped step)
    DISCARD = "discard"  # warm-up: recorded, then thrown away
    KEEP = "keep"  # the step joins the window
    WRITE = "write"  # the step joins the window, which is written and a new one begun (at stop: kept only)


@dataclass(frozen=True)
class StepPlan:
    recorded: bool  # hooks on inside the step, its begin and end recorded
    at_end: WindowEnd


STEP_PLANS: dict[StepAction, StepPlan] = {
    StepAction.SKIP: StepPlan(recorded=False, at_end=WindowEnd.NOTHING),
    StepAction.WARMUP: StepPlan(recorded=True, at_end=WindowEnd.DISCARD),
    StepAction.RECORD: StepPlan(recorded=True, at_end=WindowEnd.KEEP),
    StepAction.RECORD_AND_FLUSH: StepPlan(recorded=True, at_end=WindowEnd.WRITE),
}
_RECORD = STEP_PLANS[StepAction.RECORD]


@dataclass(slots=True)
class Move:
    """One allowed transition, as ``Lifecycle.check`` plans it. ``step``, ``plan``: the step
    it begins (BEGIN_STEP) or ends (END_STEP; STOP from IN_STEP), else the next step's."""
    source: State
    target: State
    work: Work
    step: int
    plan: StepPlan

    @property
    def ends_step(self) -> bool:
        return self.source is State.IN_STEP and self.target is not State.IN_STEP


class Lifecycle:
    """The state, step counter and window of one Timeline (no torch, no I/O): ``check``
    says what an event does now, ``enter`` makes it so."""

    def __init__(self, schedule: Schedule | None, record_between_steps: bool) -> None:
        self.schedule = schedule
        self.record_between_steps = record_between_steps
        self.state = State.NEW
        self.step = 0  # the open step's number, or the next step's
        self.plan = _RECORD  # the open (or last begun) step's
        self.window_steps: list[int] = []  # the steps of the window being recorded

    # ------------------------------------------------------------------ the table
    def check(self, event: Event) -> Move:
        """The move ``event`` makes now; raises its ``ModTimelineError`` when not allowed."""
        row = TRANSITIONS.get((self.state, event))
        if row is None:
            raise ModTimelineError(f"internal: {event.value} cannot happen while {self.state.value}")
        if isinstance(row, str):
            raise ModTimelineError(row.format(step=self.step))
        target, work = row
        plan = self.step_plan(self.step) if work is Work.BEGIN_STEP else self.plan
        return Move(self.state, target, work, self.step, plan)

    def enter(self, move: Move) -> None:
        """Take ``move`` (from ``check``, in the same state): a step it ends counts, and
        joins the window when its plan keeps it."""
        assert move.source is self.state, (move, self.state)
        if move.work is Work.BEGIN_STEP:
            self.plan = move.plan
        elif move.ends_step:
            self.step += 1
            if move.plan.at_end in (WindowEnd.KEEP, WindowEnd.WRITE):
                self.window_steps.append(move.step)
        self.state = move.target

    def plain_step(self, event: Event) -> int | None:
        """The common step boundary in one call (it runs twice a step, right after the
        step's work, where each call of check and enter costs µs): without a schedule and
        with hooks on between steps, ``BEGIN_STEP`` between steps and ``END_STEP`` in a step
        are the table's moves with the plan ``RECORD`` (hooks stay on, the step joins the
        one window), made here as ``enter(check(event))`` would make them. Returns the
        step's number; None, changing nothing, for any other event or state (then
        ``check`` and ``enter``)."""
        if self.schedule is not None or not self.record_between_steps:
            return None
        if event is Event.BEGIN_STEP and self.state is State.BETWEEN_STEPS:
            self.plan = _RECORD
            self.state = State.IN_STEP
            return self.step
        if event is Event.END_STEP and self.state is State.IN_STEP:
            step = self.step
            self.step = step + 1
            self.window_steps.append(step)
            self.state = State.BETWEEN_STEPS
            return step
        return None

    def step_plan(self, step: int) -> StepPlan:
        """What step number ``step`` does (every step is recorded without a schedule)."""
        if self.schedule is None:
            return _RECORD
        return STEP_PLANS[self.schedule.action(step)]

    # -------------------------------------------------------------------- queries
    @property
    def recording(self) -> bool:
        return self.state in (State.BETWEEN_STEPS, State.IN_STEP)

    @property
    def in_step(self) -> bool:
        return self.state is State.IN_STEP

    def check_enter(self) -> None:
        """``with timeline`` on a recording Timeline."""
        if self.recording:
            raise ModTimelineError(ENTERED_TWICE)

    def check_step_block(self) -> None:
        """``with timeline.step()``: refused before any start and inside another step."""
        if self.state is State.NEW:
            raise ModTimelineError(STEP_BLOCK_OUTSIDE)
        if self.state is State.IN_STEP:
            raise ModTimelineError(STEP_BLOCK_NESTED)

    @property
    def hooks_at_start(self) -> bool:
        """Hooks on between steps from the start: without a schedule, unless off between steps."""
        return self.schedule is None and self.record_between_steps

    def hooks_off_after(self, move: Move) -> bool:
        """Whether the hooks go off when the recorded step ``move`` ends (a stop takes them
        all off anyway): off between steps, or its window written."""
        if move.work is Work.STOP:
            return False
        return not self.record_between_steps or move.plan.at_end is WindowEnd.WRITE

    def window(self, step: int) -> int:
        assert self.schedule is not None
        return self.schedule.window(step)

    def file_window(self) -> int | None:
        """The window whose file ``stop()`` writes (None: the one file without a schedule)."""
        return None if self.schedule is None else self.window(self.window_steps[0])

    def writes_at_stop(self) -> bool:
        return self.schedule is None or bool(self.window_steps)

    def signal_window(self) -> tuple[bool, int | None]:
        """What a SIGTERM writes now: (whether anything, the window, None without a
        schedule). Nothing when not recording, or between windows."""
        if not self.recording:
            return False, None
        if self.schedule is None:
            return True, None
        if self.window_steps:
            return True, self.file_window()
        if self.in_step and self.plan.at_end in (WindowEnd.KEEP, WindowEnd.WRITE):
            return True, self.window(self.step)
        return False, None


class BoundaryLock:
    """The one lock that start, stop, the step boundaries and SIGTERM's write take (a stop
    from another thread, a signal while a window is written). A SIGTERM in a thread that
    holds it is deferred and delivered (``deliver``) when that thread's outermost block ends."""

    def __init__(self, deliver: Callable[[int], None]) -> None:
        self._lock = threading.RLock()
        self._busy_thread: int | None = None
        self._deferred_signal: int | None = None
        self._depth = 0  # blocks open in the busy thread
        self._deliver = deliver

    def held(self) -> BoundaryLock:
        """``with lock.held():``. (The lock is its own context manager: a boundary is
        taken twice a step, where a generator's context costs a few µs more.)"""
        return self

    def __enter__(self) -> None:
        self._lock.acquire()
        if self._busy_thread is None:
            self._busy_thread = threading.get_ident()
            self._depth = 1
        else:
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        outer = self._depth == 0
        if outer:
            self._busy_thread = None
        self._lock.release()
        if outer:
            deferred, self._deferred_signal = self._deferred_signal, None
            if deferred is not None:
                self._deliver(deferred)

    def on_signal(self, signum: int, write: Callable[[], None], wait_s: float) -> bool:
        """Run ``write`` for a signal under the lock. False: this thread is inside a block
        (a write may be under way), the signal is delivered when its outermost block ends.
        Another thread's stop or write is waited for, at most ``wait_s`` (then True,
        nothing written)."""
        me = threading.get_ident()
        if self._busy_thread == me:
            self._deferred_signal = signum
            return False
        if not self._lock.acquire(timeout=wait_s):
            return True
        try:
            # (Here with the lock but not busy, this thread was between taking the lock and
            # beginning a block, or after ending one: nothing is half done.)
            self._busy_thread, self._depth = me, 1
            try:
                write()
            finally:
                self._busy_thread, self._depth = None, 0
                if self._deferred_signal == signum:
                    self._deferred_signal = None  # (delivered once, by the guard)
        finally:
            self._lock.release()
        return True
