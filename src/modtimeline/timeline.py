"""``Timeline``: record module forward/backward spans of training steps into a trace file.

The one room that knows all the others: recorder -> buffer (-> device clock) ->
resolve -> writer -> file.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from types import TracebackType
from collections.abc import Callable
from typing import Any, cast

import torch

from . import __version__
from .capture.buffer import DEFAULT_CAPACITY, STEP_BEGIN, STEP_END, NativeEventBuffer
from .device.clock import CudaBackend, DeviceBackend, DeviceClock
from .errors import ConfigError, DeviceError, ModTimelineError, RankSyncError, TraceFileError
from .gc_pause import paused_gc
from .format import PROFILER_CLOCK_MARK, PROFILER_CLOCK_MARK_AFTER, TOOL, TraceData
from .format import STEP as STEP_CATEGORY
from .spans.resolve import resolve
from .schedule import Schedule
from .lifecycle import BoundaryLock, Event, Lifecycle, Move, WindowEnd, Work
from .capture.signals import TerminationGuard
from .integrations.distributed import ClockSample, RankClock, distributed_world
from .capture.compiled_detail import CompiledDetail
from .capture.inductor_detail import InductorDetail
from .device.nvtx import NvtxApi, NvtxRanges, chained, torch_nvtx
from .integrations.profiler import ProfilerExport
from .capture.recorder import Recorder, new_buffer
from .writers import TRACE_SUFFIXES, format_for, write_trace
from .writers.atomic import check_writable

DEVICES = ("auto", "cpu", "cuda")

# How long a SIGTERM waits for a stop or a window's write under way in another thread.
SIGNAL_WAIT_S = 30.0


@functools.cache
def _local_rank() -> int:
    """The rank on this host: torchrun's LOCAL_RANK, else 0 (read once per process: a
    launcher sets it before the process starts; a lookup in os.environ costs tens of µs
    right after a step, at every write of a Timeline made per step)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


@functools.cache
def _hostname() -> str:
    """This machine's name, asked once per process (not a system call at every write)."""
    return socket.gethostname()


PROFILER_CLOCK_PAIRS = 3


def _pair_profiler_clock() -> None:
    """Pair our clock with torch.profiler's, if one is recording: a range named by our
    clock's reading, which the profiler stamps with its own (``modtimeline merge
    --profiler`` lines the two traces up by these). Between steps only."""
    if not _profiler_enabled():
        return
    for _ in range(PROFILER_CLOCK_PAIRS):  # (the merge keeps the narrowest bracket)
        before = time.perf_counter_ns()
        with torch.profiler.record_function(f"{PROFILER_CLOCK_MARK}{before}"):
            pass
        after = time.perf_counter_ns()
        with torch.profiler.record_function(f"{PROFILER_CLOCK_MARK_AFTER}{after}"):
            pass


def _profiler_enabled() -> bool:
    # torch.autograd.profiler keeps this flag while a profile records (not a public
    # name: without it, mark always; a range costs a few µs per step).
    return bool(getattr(torch.autograd.profiler, "_is_profiler_enabled", True))


_OWN_FILES = (os.path.dirname(os.path.abspath(__file__)) + os.sep, contextlib.__file__)


def _user_stacklevel() -> int:
    """The ``stacklevel`` of a warning that names the user's line (the first frame
    outside modtimeline and contextlib), however deep in the Timeline it is raised."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_OWN_FILES):
        frame = frame.f_back
        level += 1
    return level


def _with_infix(path: Path, infix: str) -> Path:
    """``run.json.gz`` + ``000`` -> ``run.000.json.gz``."""
    name = path.name
    for suffix in TRACE_SUFFIXES:
        if name.endswith(suffix):
            return path.with_name(f"{name[: -len(suffix)]}.{infix}{suffix}")
    return path.with_name(f"{name}.{infix}")


def _rank_path(path: str | os.PathLike[str], rank: int, world: int) -> str:
    """One file per rank: ``{rank}`` in the path is replaced by the global rank (``{rank:03d}``:
    formatted so); without it, a job of several ranks writes ``out.rank<N>.json`` so ranks
    never share a file. (A string: a Timeline made per step makes one Path, not three.)"""
    text = os.fspath(path)
    if "{" in text and _RANK_FIELD.search(text):
        try:
            return _RANK_FIELD.sub(lambda field: format(rank, field["spec"] or ""), text)
        except ValueError as error:
            raise TraceFileError(f"cannot put the rank into {text!r}: {error}") from None
    return os.fspath(_with_infix(Path(text), f"rank{rank}")) if world > 1 else text


# A run's id: this process's random part and a count, the 32 hex digits of a uuid4 (which
# costs tens of µs right after a training step, and a Timeline made per step makes one
# each step). A forked child draws its own random part.
_run_numbers = itertools.count()
_process_part = os.urandom(8).hex()


def _new_run_id() -> str:
    return f"{_process_part}{next(_run_numbers):016x}"


def _forked() -> None:
    global _process_part, _run_numbers
    _process_part = os.urandom(8).hex()
    _run_numbers = itertools.count()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


_RANK_FIELD = re.compile(r"\{rank(?::(?P<spec>[^{}]*))?\}")


_COMPILED_AUTOGRAD = ("compiled autograd ran a backward pass: it runs as one compiled graph, without the marks "
                      "backward spans come from, so those passes have no backward spans (forward spans are "
                      "complete). A Timeline made while compiled autograd is on records backward in Python.")


_NO_MODULE_SPANS = ("the Timeline recorded no module span: no nn.Module call ran eagerly on the thread that entered "
                    "it. Likely causes: the model was compiled in place (model.compile()) before modtimeline was "
                    "imported (import modtimeline first, or let the Timeline see one eager call of the model), "
                    "the model runs in another thread, the model is called from inside a torch.compile'd function "
                    "(torch.compile(lambda x: model(x)): compile the model itself instead), "
                    "or no model ran inside the Timeline")


class _StepBlock(contextlib.ContextDecorator):
    """``with timeline.step():`` (a class, not a generator: it runs twice a step)."""

    __slots__ = ("_timeline",)

    def __init__(self, timeline: Timeline) -> None:
        self._timeline = timeline

    def __enter__(self) -> int:
        self._timeline._life.check_step_block()
        return self._timeline.begin_step()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self._timeline.end_step()
            return
        try:
            self._timeline.end_step(exc if exc is not None else exc_type())
        except Exception as ours:  # never replace the user's exception with ours
            warnings.warn(f"modtimeline: could not end the step: {ours}", RuntimeWarning, stacklevel=2)


class Timeline:
    """Record when each module's forward, backward and recompute ran, and write a trace.

    ::

        with Timeline("out.json") as tl:
            for batch in loader:
                with tl.step():
                    model(batch).sum().backward()
                    optimizer.step()

    ``path``: ``.json``, ``.json.gz`` or ``.pftrace`` (or ``format=``). With a
    ``schedule``, only the steps marked with ``timeline.step()`` that the schedule makes
    active are recorded, and each active window is written to ``<stem>.<window><suffix>``
    as soon as it ends. ``device``: ``"auto"`` (CUDA spans when CUDA is in use),
    ``"cpu"`` (host only) or ``"cuda"``. ``memory=True`` adds a CUDA memory-allocated
    counter track. ``capacity`` bounds the events held between flushes.
    ``handle_signals``: on SIGTERM inside the Timeline (main thread only), write the
    trace first, open spans flagged incomplete, then do what SIGTERM did before.
    Threads: the Timeline records the module calls of the thread that entered it, and
    the activation-checkpoint recompute inside its own backward passes; other threads'
    models are not recorded.
    ``device_backend`` replaces the CUDA event backend (tests pass a ``FakeBackend``).
    Under ``torch.distributed`` (create the Timeline after ``init_process_group``) each
    rank writes its own file: ``{rank}`` in ``path`` becomes the rank, and without it a
    job of several ranks writes ``out.rank<N>.json``. Every rank must then enter the
    Timeline (and end each scheduled window) at the same point: there the ranks compare
    clocks with rank 0 (for ``modtimeline merge``) and share one run id; a rank that does not
    arrive within ``rank_timeout_s`` seconds makes the others raise ``RankSyncError``.
    ``align_ranks=False``: a Timeline on some ranks only (rank 0 alone, say): no clock
    comparison, no waiting; ``merge`` then lines such files up by their wall clocks.
    ``nvtx=True``: NVTX ranges per module call (forward, backward, recompute) for Nsight
    Systems, opened and closed as the calls run.
    ``profiler``: a ``torch.profiler.profile`` recording around the Timeline; its exported
    trace (``export_chrome_trace``, also through ``on_trace_ready`` handlers) gets the
    module spans, on its clock (as ``modtimeline merge --profiler`` does).
    ``compiled_detail=True``: spans for the submodules inside ``torch.compile``'d regions
    too (an opaque call at each of their boundaries in the compiled graph; see
    compiled_detail.py and the README's "torch.compile" for what it shows and costs).

    Lifecycle: ``with Timeline(...)`` is ``start()`` ... ``stop(error)``; ``with tl.step():``
    is ``begin_step()`` ... ``end_step(error)``: frameworks drive the methods from their
    callbacks (``modtimeline.integrations``). Missing folders of ``path`` are made; a
    file name whose ending names no format (``.json``, ``.json.gz``, ``.pftrace``,
    ``.perfetto-trace``) is refused unless ``format=`` says which.
    ``strict``: a trace that cannot be written (a full disk, a folder gone) never stops
    training by default: a ``RuntimeWarning``, training goes on, and the next file this
    Timeline writes lists it in ``metadata.write_failures``; ``strict=True`` raises the
    write error instead (from ``stop()``/the ``with`` exit, or from the ``end_step()`` that
    ends a scheduled window), except over an exception of the user's, which always wins.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        format: str | None = None,
        device: str = "auto",
        schedule: Schedule | None = None,
        capacity: int = DEFAULT_CAPACITY,
        memory: bool = False,
        handle_signals: bool = True,
        device_backend: DeviceBackend | None = None,
        rank_timeout_s: float = 60.0,
        align_ranks: bool = True,
        profiler: Any = None,
        nvtx: bool | NvtxApi = False,
        compiled_detail: bool = False,
        strict: bool = False,
        record_between_steps: bool = True,
    ) -> None:
        if schedule is not None and not isinstance(schedule, Schedule):
            # (torch.profiler.schedule(...) returns a function: refused here, not at the
            # first step, where it would stop training; before any folder is made)
            raise ConfigError(f"schedule must be a modtimeline.Schedule, e.g. Schedule(wait=1, warmup=1, active=3) "
                              f"(it takes torch.profiler.schedule's arguments); got {type(schedule).__name__} "
                              f"{schedule!r:.60}")
        rank, world = distributed_world()
        rank_path = _rank_path(path, rank, world)
        self.format = format_for(rank_path, format)  # (before any folder is made for it)
        self.path = check_writable(rank_path, create_folders=True)
        self.strict = strict
        if device not in DEVICES:
            raise DeviceError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
        if device == "cuda" and device_backend is None and not torch.cuda.is_available():
            raise DeviceError("device='cuda' was asked for, but CUDA is not available on this machine")
        self.device = device
        self.schedule = schedule
        self.memory = memory
        self._backend = device_backend
        self.buffer = new_buffer(capacity)
        self.recorder = Recorder(self.buffer)
        self._detail = CompiledDetail(self.buffer, self.recorder.registry) if compiled_detail else None
        # (inductor regions: kernels measured by torch.profiler, named by inductor's provenance)
        self._kernels = InductorDetail(profiler, _pair_profiler_clock) if compiled_detail else None
        self._clock: DeviceClock | None = None
        # The state, steps and window (lifecycle.py: its table says what each call does).
        # record_between_steps=False (integrations, `record`): hooks on only inside steps,
        # so evaluation between steps is left out.
        self._life = Lifecycle(schedule, record_between_steps)
        self._hooks_on = False  # recording: the hooks in torch and not paused
        self._hooks_paused = False  # the hooks in torch, paused (between two recorded steps)
        # start/stop/begin_step/end_step and the SIGTERM write exclude one another (a stop
        # from another thread, a signal while a window is written).
        self._lock = BoundaryLock(self._deliver_signal)
        # Writes that failed since the last one that did not (metadata.write_failures).
        self._write_failures: list[dict[str, Any]] = []
        self._base_ns = 0
        self._base_wall_ns = 0
        self._raised_steps: set[int] = set()
        self.written: list[Path] = []
        self._guard = TerminationGuard(self._write_on_signal) if handle_signals else None
        # One id for every file of this run (its windows; under torchrun, every rank's).
        self._run_id = os.environ.get("TORCHELASTIC_RUN_ID") or _new_run_id()
        self._said_compiled_autograd = False
        self._said_no_module_spans = False
        # Several ranks: clock samples against rank 0 (at entry and at every write).
        self._rank_clock = RankClock(rank_timeout_s) if align_ranks and world > 1 else None
        self._clock_samples: list[ClockSample] = []
        self._clock_sync_problem: str | None = None
        # With a torch.profiler.profile: its exported trace gets our spans by itself.
        self._profiler_export = ProfilerExport(profiler) if profiler is not None else None
        self._nvtx: NvtxRanges | None = None
        if nvtx is not False:
            api = torch_nvtx() if nvtx is True else nvtx
            self._nvtx = NvtxRanges(cast(NvtxApi, api), self.recorder.module_names, self.buffer)
            self._wire_events()

    # ---------------------------------------------------------------- lifecycle
    # Each method asks the Lifecycle for its move (lifecycle.py's table; it raises the
    # documented error), does the move's work, and enters the move where the state changes.
    @property
    def started(self) -> bool:
        """Whether the Timeline is recording (between ``start()`` and ``stop()``)."""
        return self._life.recording

    def start(self) -> Timeline:
        """Start recording (what ``with Timeline(...)`` does on entry); returns the Timeline.

        A Timeline that is recording cannot be started again (``ModTimelineError``); one
        that was stopped can, and then writes its file(s) anew. Under several ranks, every
        rank must start at the same point (they compare clocks here)."""
        with self._lock.held():
            move = self._life.check(Event.START)
            if self._rank_clock is not None:
                # Before any hook: a rank that cannot meet the others records nothing.
                self._run_id = self._rank_clock.share_run_id(self._run_id)
                self._clock_samples = [self._rank_clock.sample()]
            self.recorder.own_thread()  # the thread that starts records (see README: threads)
            if self._kernels is not None:
                self._kernels.start()  # (before the model's first compiled call)
            entered = False
            try:
                _pair_profiler_clock()
                self._start_window()
                self._maybe_start_device_clock()
                self._life.enter(move)
                entered = True
                if self._life.hooks_at_start:
                    self._hooks(True)
                if self._guard is not None:
                    self._guard.install()
            except BaseException:
                # A failed start leaves nothing behind: no hook, inductor's config as it was.
                # (each step runs even if one before it raised; the last registered first)
                with contextlib.ExitStack() as cleanup:
                    if entered:
                        cleanup.callback(lambda: self._life.enter(self._life.check(Event.START_FAILED)))
                    if self._kernels is not None:
                        cleanup.callback(self._kernels.undo)
                    cleanup.callback(self._hooks, False)
                raise
        return self

    def stop(self, error: BaseException | None = None) -> None:
        """Stop recording: close what is open, remove every hook and write the trace (what
        ``with Timeline(...)`` does on exit). ``error``: the exception that ended the run,
        if one did: it is named in ``metadata.exception`` and open spans are flagged
        ``incomplete``; a write that fails then only warns. Without ``error``, a failed
        write warns too (training is never stopped by a trace), unless ``strict=True``.

        Idempotent, and safe from any thread (a framework's teardown, a watchdog): a stop
        while a step's window is being written waits for that write."""
        with self._lock.held():
            move = self._life.check(Event.STOP)
            if move.work is Work.NOTHING:
                return
            self._life.enter(move)
            try:
                self._close(move, error)
            finally:
                if self._kernels is not None:
                    self._kernels.stop()
                if self._guard is not None:
                    self._guard.uninstall()

    def __enter__(self) -> Timeline:
        self._life.check_enter()
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(exc)

    def _close(self, move: Move, exc: BaseException | None) -> None:
        if move.ends_step:  # (its end_step(), a framework's or a `with step`'s, is then a no-op)
            if exc is not None:
                self._raised_steps.add(move.step)
            self._end_step(move)
        self._hooks(False)
        if self.schedule is not None and self._life.step == 0 and exc is None:
            warnings.warn("modtimeline: a Timeline with a schedule records only inside `with timeline.step():` "
                          "blocks, and none were marked: nothing was written", RuntimeWarning,
                          stacklevel=_user_stacklevel())
        try:
            if self._life.writes_at_stop():
                self._write(self._path_of(self._life.file_window()), exception=exc)  # (strict=True: may raise)
        finally:
            self.recorder.__exit__(None, None, None)
            if self._nvtx is not None:
                self._nvtx.close()

    # -------------------------------------------------------------------- steps
    def step(self) -> contextlib.AbstractContextManager[int]:
        """Mark one training step: ``with timeline.step() as number:`` (0, 1, ...). Built
        on ``begin_step()`` and ``end_step()``."""
        return _StepBlock(self)

    @property
    def in_step(self) -> bool:
        """Whether a step is open (between ``begin_step()`` and ``end_step()``)."""
        return self._life.in_step

    def begin_step(self, first_call: tuple[torch.nn.Module, Any] | None = None) -> int:
        """A training step begins now; returns its number (0, 1, ...). With a schedule,
        whether it is recorded is the schedule's to say. On a Timeline already stopped
        (by another thread, say) it records nothing. ``first_call``: (module, args) of a
        module call being made now, from a forward pre-hook, that begins the step: torch
        took that call's hooks before recording was on, so its start is recorded here."""
        with self._lock.held():
            if (first_call is None and self.schedule is None and self._hooks_on and self._clock is None
                    and self._kernels is None):
                # The common boundary (no schedule: every step recorded; no device, hooks
                # on): the plan's work is the step's begin recorded (and the profiler's
                # clock paired).
                self._maybe_start_device_clock()  # (a GPU used since: the general path anchors it)
                step = self._life.plain_step(Event.BEGIN_STEP) if self._clock is None else None
                if step is not None:
                    _pair_profiler_clock()
                    self.buffer.record(STEP_BEGIN, step, 0)
                    return step
            move = self._life.check(Event.BEGIN_STEP)
            if move.work is Work.NOTHING:  # stopped: its end_step() is a no-op too
                self._life.enter(move)
                return move.step
            was_on = self._hooks_on
            self._begin_step(move)
            if first_call is not None and self._hooks_on and not was_on:
                self.recorder.record_call_begin(*first_call)
            return move.step

    def end_step(self, error: BaseException | None = None) -> None:
        """The step begun by ``begin_step()`` ends now. ``error``: the exception that ended
        it, if one did (the step is flagged incomplete). With a schedule, the last step of
        an active window writes the window: a write that fails warns and training goes
        on (``strict=True``: it raises, unless ``error`` is given)."""
        with self._lock.held():
            step = self._life.plain_step(Event.END_STEP)
            if step is not None:  # the common boundary: the step's end recorded, nothing else
                if error is not None:
                    self._raised_steps.add(step)
                self.buffer.record(STEP_END, step, 0)
                _pair_profiler_clock()
                return
            move = self._life.check(Event.END_STEP)
            self._life.enter(move)
            if move.work is Work.NOTHING:  # stop() closed it already
                return
            if error is not None:
                self._raised_steps.add(move.step)
            self._end_step(move, error=error)

    def _begin_step(self, move: Move) -> None:
        if move.plan.recorded:
            self._maybe_start_device_clock()
            if self._clock is not None:
                self._clock.begin_step()  # still between steps: harvest, anchor new devices, refill
            if self._kernels is not None:
                self._kernels.recording()
            _pair_profiler_clock()
        self._life.enter(move)
        self._hooks(move.plan.recorded)
        if move.plan.recorded:
            self.buffer.record(STEP_BEGIN, move.step, 0)

    def _end_step(self, move: Move, error: BaseException | None = None) -> None:
        """The work of a step's end (entered already): by end_step(), or by stop() (which
        writes the window itself)."""
        plan = move.plan
        if not plan.recorded:
            return
        self.buffer.record(STEP_END, move.step, 0)
        _pair_profiler_clock()
        if self._life.hooks_off_after(move):
            # Paused till the next step of the window; taken out when a window is written
            # (the steps after it are most often not recorded).
            self._hooks(False, pause=plan.at_end is not WindowEnd.WRITE)
        if plan.at_end is WindowEnd.DISCARD:
            self._discard_window()
        elif plan.at_end is WindowEnd.WRITE and move.work is Work.END_STEP:
            try:
                self._write(self._path_of(self._life.window(move.step)), user_error=error)
            finally:
                self._start_window()  # written or not: the next window starts empty (memory stays flat)

    # ------------------------------------------------------------------ helpers
    def _hooks(self, on: bool, pause: bool = False) -> None:
        """Recording on, or off: the hooks taken out of torch, or with ``pause`` (between
        two recorded steps) left in torch recording nothing, which costs the module calls
        between the steps less than taking them out and putting them back costs each step
        (benchmarks/overhead.py's integrations)."""
        if on and self._hooks_paused:
            self.recorder.resume()
            self._hooks_paused = False
        elif not on and pause and (self._hooks_on or self._hooks_paused) and self.recorder.can_pause \
                and self._detail is None and self._kernels is None:
            if not self._hooks_paused:
                self._hooks_paused = True  # (first: whatever pause() raises, a stop takes them out)
                self.recorder.pause()
        # Each part on is taken off again if a later one fails, and each part off is taken
        # off even if an earlier one raised: hooks are all on or all off. (An ExitStack runs
        # every callback, the last registered first, whatever one of them raises.)
        elif on and not self._hooks_on:
            with contextlib.ExitStack() as undo:
                self.recorder.__enter__()
                undo.callback(self.recorder.__exit__, None, None, None)
                if self._detail is not None:
                    self._detail.__enter__()
                    undo.callback(self._detail.__exit__, None, None, None)
                if self._kernels is not None:
                    self._kernels.recording()
                undo.pop_all()  # all on: nothing to undo
        elif not on and (self._hooks_on or self._hooks_paused):
            self._hooks_paused = False
            with contextlib.ExitStack() as off:
                off.callback(self.recorder.__exit__, None, None, None)
                if self._detail is not None:
                    off.callback(self._detail.__exit__, None, None, None)
                if self._kernels is not None:
                    off.callback(self._kernels.pause)
        self._hooks_on = on

    def _maybe_start_device_clock(self) -> None:
        if self._clock is not None or self.device == "cpu":
            return
        backend = self._backend
        if backend is None:
            # (is_initialized first: it is a flag, where is_available costs µs on every step
            # of a CPU-only torch)
            in_use = torch.cuda.is_initialized() and torch.cuda.is_available()
            if self.device == "auto" and not in_use:
                return
            backend = CudaBackend()
        # Nothing is synchronised here: a device is anchored at the first step boundary
        # after it is first used, and at each write.
        # (memory sampling is Python's, at most once a ms between marks: those stay in Python)
        marks_type = None if self.memory else getattr(backend, "marks_type", None)
        self._clock = DeviceClock(backend, sample_memory=self.memory, module_device=self._module_device,
                                  marks_type=marks_type)
        self._wire_events()

    def _wire_events(self) -> None:
        """Each recorded event goes to the device clock and to NVTX, as they are on: to
        compiled device marks straight from the compiled buffer where both are built."""
        device_marks: Callable[[int, int, int, int], None] | None = None
        if self._clock is not None:
            marks = self._clock.marks
            if marks is None:
                device_marks = self._clock.record_event
            elif isinstance(self.buffer, NativeEventBuffer) and hasattr(marks, "capsule"):
                self.buffer.device_marker = marks
            else:
                device_marks = marks.mark
        self.buffer.on_recorded = chained(device_marks, self._nvtx.on_event if self._nvtx is not None else None)

    def _module_device(self, index: int) -> int | None:
        """The GPU a module's forward runs on: that of its first parameter or buffer."""
        module = self.recorder.registry.module(index)
        if module is None:
            return None
        assert self._clock is not None
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            return self._clock.backend.tensor_device(tensor)
        return None

    def _start_window(self) -> None:
        if self._nvtx is not None:
            self._nvtx.reset()
        self.buffer.clear()
        self.recorder.retire_marks()  # node ids start again with the cleared buffer
        if self._detail is not None:
            self._detail.retire()
        if self._kernels is not None:
            self._kernels.retire()
        self._life.window_steps = []
        self._base_wall_ns = time.time_ns()
        self._base_ns = time.perf_counter_ns()
        # A new window's first clock sample is the one its predecessor was written with.
        self._clock_samples = self._clock_samples[-1:]

    def _discard_window(self) -> None:
        if self._clock is not None:
            self._clock.discard()  # (without synchronising)
        self._start_window()

    def _path_of(self, window: int | None) -> Path:
        """A window's file (None: the one file of a Timeline without a schedule)."""
        return self.path if window is None else _with_infix(self.path, f"{window:03d}")

    def trace_data(self, exception: BaseException | str | None = None) -> TraceData:
        """Resolve what has been recorded so far into spans (closing what is open)."""
        close_ns = time.perf_counter_ns()
        marks = self._clock.resolve() if self._clock is not None else None
        self.buffer.warn_if_overflowed()
        rank, world_size = distributed_world()
        metadata: dict[str, Any] = {
            "tool": TOOL,
            "version": __version__,
            "torch": torch.__version__,
            "base_wall_time_ns": self._base_wall_ns,
            "run_id": self._run_id,
            "world_size": world_size,
            "local_rank": _local_rank(),
            "hostname": _hostname(),
            "clock": "perf_counter_ns",
            "steps": list(self._life.window_steps),
            "events_dropped": self.buffer.dropped,
            "device": "cuda" if marks is not None else "cpu",
        }
        if marks is not None:
            metadata["gpu_marks_skipped_in_capture"] = marks.skipped_in_capture
            metadata["gpu_marks_dropped"] = marks.dropped
            if marks.skipped_in_capture:
                warnings.warn(f"modtimeline: {marks.skipped_in_capture:,} GPU marks were skipped while a CUDA graph "
                              "was being captured (an event recorded into a graph cannot be timed); the captured "
                              "calls have CPU spans only", RuntimeWarning, stacklevel=3)
            if marks.error:
                metadata["gpu_marks_error"] = marks.error
                warnings.warn(f"modtimeline: {marks.dropped:,} GPU marks were dropped, a GPU mark failed (their "
                              f"spans are missing): {marks.error}", RuntimeWarning, stacklevel=3)
            elif marks.dropped:
                warnings.warn(f"modtimeline: {marks.dropped:,} GPU marks were dropped: more device events were "
                              "waiting for the GPU than the pool holds", RuntimeWarning, stacklevel=3)
        store = getattr(self.buffer, "store", None)
        if store is not None and getattr(store, "compiled_autograd_seen", False):
            metadata["backward_not_recorded"] = _COMPILED_AUTOGRAD
            if not self._said_compiled_autograd:
                self._said_compiled_autograd = True
                warnings.warn(f"modtimeline: {_COMPILED_AUTOGRAD}", RuntimeWarning, stacklevel=3)
        if self._clock_samples:
            metadata["clock_sync"] = {"reference_rank": 0, "samples": [c.to_json() for c in self._clock_samples]}
        if self._clock_sync_problem is not None:
            metadata["clock_sync_problem"] = self._clock_sync_problem
        if self._write_failures:
            metadata["write_failures"] = [dict(failure) for failure in self._write_failures]
        if isinstance(exception, BaseException):
            metadata["exception"] = f"{type(exception).__name__}: {exception}"
        elif exception is not None:
            metadata["exception"] = exception
        timestamps, codes, link_node, link_code = self.buffer.columns()
        data = resolve(
            timestamps,
            codes,
            self.recorder.module_names,
            close_ns,
            links=(link_node, link_code),
            rank=rank,
            base_ns=self._base_ns,
            marks=marks,
            metadata=metadata,
            raised_calls=self.recorder.raised_calls,
            raised_steps=self._raised_steps,
            compiled_modules=self.recorder.registry.compiled_indices(),
        )
        if self._kernels is not None:
            self._kernels.add_to(data)
        self._say_if_no_module_span(data)
        return data

    def _say_if_no_module_span(self, data: TraceData) -> None:
        """A window with no module span at all: say why it likely is, once (and in every
        such file's metadata)."""
        if any(category != STEP_CATEGORY for category in data.spans.category):
            return
        data.metadata["no_module_spans"] = _NO_MODULE_SPANS
        if not self._said_no_module_spans:
            self._said_no_module_spans = True
            warnings.warn(f"modtimeline: {_NO_MODULE_SPANS}", RuntimeWarning, stacklevel=_user_stacklevel())

    def _sample_rank_clock(self) -> None:
        """Compare clocks with rank 0 once more (every rank writes at the same point). A
        rank that does not come loses the comparison, never the trace."""
        if self._rank_clock is None:
            return
        try:
            self._clock_samples.append(self._rank_clock.sample())
        except RankSyncError as error:
            self._rank_clock = None  # do not wait on a missing rank at every window
            self._clock_sync_problem = str(error)
            warnings.warn(f"modtimeline: {error}", RuntimeWarning, stacklevel=3)

    def _write(self, path: Path, exception: BaseException | str | None = None,
               user_error: BaseException | None = None) -> bool:
        """Write the trace; a write that fails (a full disk, a folder gone) warns, is noted
        in the next file written (``metadata.write_failures``), and training goes on.
        ``strict=True`` raises it instead, unless the user's own exception is on its way."""
        try:
            self._flush(path, exception)
        except Exception as error:
            failure = {"path": os.fspath(path), "error": f"{type(error).__name__}: {error}",
                       "steps": list(self._life.window_steps), "wall_time_ns": time.time_ns()}
            self._write_failures.append(failure)
            if self.strict and exception is None and user_error is None:
                raise
            what = str(error) if isinstance(error, TraceFileError) else \
                f"could not write the trace to {os.fspath(path)!r}: {type(error).__name__}: {error}"
            warnings.warn(f"modtimeline: {what}; training goes on (the next trace this Timeline writes lists it in "
                          "metadata.write_failures)",
                          RuntimeWarning, stacklevel=_user_stacklevel())
            return False
        return True

    def _flush(self, path: Path, exception: BaseException | str | None = None) -> None:
        _pair_profiler_clock()
        if exception is None:
            # Not when a step raised or a signal came: the other ranks may never arrive.
            self._sample_rank_clock()
        with paused_gc():
            data = self.trace_data(exception)
            write_trace(data, path, self.format)
        if self._kernels is not None:
            self._kernels.written(data, path, self.format)
        self._write_failures = []
        self.recorder.raised_calls.clear()
        self._raised_steps.clear()
        self.written.append(path)
        if self._profiler_export is not None:
            self._profiler_export.trace_written(path)

    def _write_on_signal(self, signum: int) -> bool:
        """SIGTERM inside the Timeline: write what was recorded, open spans flagged
        incomplete. False: this thread is inside start/stop/a step boundary (a write may be
        under way); the signal is delivered when that ends. A stop or write under way in
        another thread is waited for (at most SIGNAL_WAIT_S)."""
        return self._lock.on_signal(signum, lambda: self._write_on_signal_locked(signum), SIGNAL_WAIT_S)

    def _write_on_signal_locked(self, signum: int) -> None:
        anything, window = self._life.signal_window()
        if anything:  # (not between windows: nothing recorded to lose)
            self._write(self._path_of(window), exception=f"terminated by signal {signal.Signals(signum).name}")

    def _deliver_signal(self, signum: int) -> None:
        """A SIGTERM deferred while this thread was inside a boundary: deliver it now."""
        if self._guard is not None:
            self._guard.deliver(signum)
