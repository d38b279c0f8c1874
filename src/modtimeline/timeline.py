"""``Timeline``: record module forward/backward spans of training steps into a trace file.

The one room that knows all the others: recorder -> buffer (-> device clock) ->
resolve -> writer -> file.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import torch

from . import __version__
from .buffer import DEFAULT_CAPACITY, STEP_BEGIN, STEP_END
from .clock import CudaBackend, DeviceBackend, DeviceClock
from .errors import DeviceError, ModTimelineError, RankSyncError
from .gc_pause import paused_gc
from .format import PROFILER_CLOCK_MARK, PROFILER_CLOCK_MARK_AFTER, TOOL, TraceData
from .resolve import resolve
from .schedule import Schedule, StepAction
from .signals import TerminationGuard
from .ranks import ClockSample, RankClock, distributed_world
from .compiled_detail import CompiledDetail
from .nvtx import NvtxApi, NvtxRanges, chained, torch_nvtx
from .profiler_export import ProfilerExport
from .recorder import Recorder, new_buffer
from .writers import TRACE_SUFFIXES, format_for, write_trace
from .writers.atomic import check_writable

DEVICES = ("auto", "cpu", "cuda")


def _local_rank() -> int:
    """The rank on this host: torchrun's LOCAL_RANK, else 0."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


PROFILER_CLOCK_PAIRS = 3


def _mark_profiler_clock() -> None:
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


def _with_infix(path: Path, infix: str) -> Path:
    """``run.json.gz`` + ``000`` -> ``run.000.json.gz``."""
    name = path.name
    for suffix in TRACE_SUFFIXES:
        if name.endswith(suffix):
            return path.with_name(f"{name[: -len(suffix)]}.{infix}{suffix}")
    return path.with_name(f"{name}.{infix}")


def _rank_path(path: str | os.PathLike[str]) -> Path:
    """One file per rank: ``{rank}`` in the path is replaced by the global rank; without
    it, a job of several ranks writes ``out.rank<N>.json`` so ranks never share a file."""
    rank, world = distributed_world()
    text = os.fspath(path)
    if "{rank}" in text:
        return Path(text.replace("{rank}", str(rank)))
    return _with_infix(Path(text), f"rank{rank}") if world > 1 else Path(text)


_COMPILED_AUTOGRAD = ("compiled autograd ran a backward pass: it runs as one compiled graph, without the marks "
                      "backward spans come from, so those passes have no backward spans (forward spans are "
                      "complete). A Timeline made while compiled autograd is on records backward in Python.")


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
    ) -> None:
        self.path = check_writable(_rank_path(path))
        self.format = format_for(self.path, format)
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
        self._clock: DeviceClock | None = None
        self._step = 0
        self._action = StepAction.RECORD
        self._in_step = False
        self._hooks_on = False
        self._entered = False
        self._base_ns = 0
        self._base_wall_ns = 0
        self._window_steps: list[int] = []
        self._raised_steps: set[int] = set()
        self.written: list[Path] = []
        self._guard = TerminationGuard(self._write_on_signal) if handle_signals else None
        # One id for every file of this run (its windows; under torchrun, every rank's).
        self._run_id = os.environ.get("TORCHELASTIC_RUN_ID") or uuid.uuid4().hex
        self._writing = False
        self._said_compiled_autograd = False
        self._deferred_signal: int | None = None
        # Several ranks: clock samples against rank 0 (at entry and at every write).
        self._rank_clock = RankClock(rank_timeout_s) if align_ranks and distributed_world()[1] > 1 else None
        self._clock_samples: list[ClockSample] = []
        self._clock_sync_problem: str | None = None
        # With a torch.profiler.profile: its exported trace gets our spans by itself.
        self._profiler_export = ProfilerExport(profiler) if profiler is not None else None
        self._nvtx: NvtxRanges | None = None
        if nvtx is not False:
            api = torch_nvtx() if nvtx is True else nvtx
            self._nvtx = NvtxRanges(cast(NvtxApi, api), self.recorder.module_names, self.buffer)
            self._wire_events()

    # ------------------------------------------------------------------ context
    def __enter__(self) -> Timeline:
        if self._entered:
            raise ModTimelineError("this Timeline is already recording; it cannot be entered twice")
        if self._rank_clock is not None:
            # Before any hook: a rank that cannot meet the others records nothing.
            self._run_id = self._rank_clock.share_run_id(self._run_id)
            self._clock_samples = [self._rank_clock.sample()]
        self._entered = True
        self.recorder.own_thread()  # the thread that enters records (see README: threads)
        _mark_profiler_clock()
        self._start_window()
        self._maybe_start_device_clock()
        if self.schedule is None:
            self._hooks(True)
        if self._guard is not None:
            self._guard.install()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self._close(exc)
        finally:
            if self._guard is not None:
                self._guard.uninstall()

    def _close(self, exc: BaseException | None) -> None:
        self._entered = False
        if self._in_step:
            self._end_step(closing=True)
        self._hooks(False)
        if self.schedule is not None and self._step == 0 and exc is None:
            warnings.warn("modtimeline: a Timeline with a schedule records only inside `with timeline.step():` "
                          "blocks, and none were marked: nothing was written", RuntimeWarning, stacklevel=2)
        if self.schedule is None or self._window_steps:
            try:
                self._flush(self._final_path(), exception=exc)
            except Exception as error:
                if exc is None:
                    raise
                # Never replace the user's exception with ours.
                warnings.warn(f"modtimeline: could not write the trace: {error}", RuntimeWarning, stacklevel=2)
        self.recorder.__exit__(None, None, None)
        if self._nvtx is not None:
            self._nvtx.close()

    # -------------------------------------------------------------------- steps
    @contextmanager
    def step(self) -> Iterator[int]:
        """Mark one training step; yields its number (0, 1, ...)."""
        if not self._entered:
            raise ModTimelineError("Timeline.step() must be used inside `with Timeline(...)`")
        if self._in_step:
            raise ModTimelineError("Timeline.step() blocks cannot be nested")
        number = self._begin_step()
        try:
            yield number
        except BaseException:
            self._raised_steps.add(number)
            try:
                self._end_step()
            except Exception as error:
                # Never replace the user's exception with ours (a full disk at a window's end).
                warnings.warn(f"modtimeline: could not write the trace: {error}", RuntimeWarning, stacklevel=3)
            raise
        self._end_step()

    def _begin_step(self) -> int:
        number = self._step
        action = StepAction.RECORD if self.schedule is None else self.schedule.action(number)
        self._action = action
        if action is not StepAction.SKIP:
            self._maybe_start_device_clock()
            if self._clock is not None:
                self._clock.begin_step()  # still between steps: harvest, anchor new devices, refill
            _mark_profiler_clock()
        self._in_step = True
        if action is not StepAction.SKIP:
            self._hooks(True)
            self.buffer.record(STEP_BEGIN, number, 0)
        else:
            self._hooks(False)
        return number

    def _end_step(self, closing: bool = False) -> None:
        number = self._step
        action = self._action
        self._in_step = False
        self._step += 1
        if action is StepAction.SKIP:
            return
        self.buffer.record(STEP_END, number, 0)
        _mark_profiler_clock()
        # The step's backward has run: its autograd hooks are done with.
        self.recorder.end_step()
        if action is StepAction.WARMUP:
            self._discard_window()
            return
        self._window_steps.append(number)
        if action is StepAction.RECORD_AND_FLUSH and not closing:
            self._hooks(False)
            assert self.schedule is not None
            self._flush(self._window_path(self.schedule.window(number)))
            self._start_window()

    # ------------------------------------------------------------------ helpers
    def _hooks(self, on: bool) -> None:
        if on and not self._hooks_on:
            self.recorder.__enter__()
            if self._detail is not None:
                self._detail.__enter__()
        elif not on and self._hooks_on:
            if self._detail is not None:
                self._detail.__exit__(None, None, None)
            self.recorder.__exit__(None, None, None)
        self._hooks_on = on

    def _maybe_start_device_clock(self) -> None:
        if self._clock is not None or self.device == "cpu":
            return
        backend = self._backend
        if backend is None:
            in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
            if self.device == "auto" and not in_use:
                return
            backend = CudaBackend()
        # Nothing is synchronised here: a device is anchored at the first step boundary
        # after it is first used, and at each write.
        self._clock = DeviceClock(backend, sample_memory=self.memory, module_device=self._module_device)
        self._wire_events()

    def _wire_events(self) -> None:
        """Each recorded event goes to the device clock and to NVTX, as they are on."""
        self.buffer.on_recorded = chained(self._clock.mark if self._clock is not None else None,
                                          self._nvtx.on_event if self._nvtx is not None else None)

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
        self.recorder.end_step()  # node ids start again with the cleared buffer
        if self._detail is not None:
            self._detail.retire()
        self._window_steps = []
        self._base_wall_ns = time.time_ns()
        self._base_ns = time.perf_counter_ns()
        # A new window's first clock sample is the one its predecessor was written with.
        self._clock_samples = self._clock_samples[-1:]

    def _discard_window(self) -> None:
        if self._clock is not None:
            self._clock.discard()  # (without synchronising)
        self._start_window()

    def _final_path(self) -> Path:
        if self.schedule is None:
            return self.path
        return self._window_path(self.schedule.window(self._window_steps[0]))

    def _window_path(self, window: int) -> Path:
        return _with_infix(self.path, f"{window:03d}")

    def trace_data(self, exception: BaseException | str | None = None) -> TraceData:
        """Resolve what has been recorded so far into spans (closing what is open)."""
        close_ns = time.perf_counter_ns()
        marks = self._clock.resolve() if self._clock is not None else None
        self.buffer.warn_if_overflowed()
        metadata: dict[str, Any] = {
            "tool": TOOL,
            "version": __version__,
            "torch": torch.__version__,
            "base_wall_time_ns": self._base_wall_ns,
            "run_id": self._run_id,
            "world_size": distributed_world()[1],
            "local_rank": _local_rank(),
            "hostname": socket.gethostname(),
            "clock": "perf_counter_ns",
            "steps": list(self._window_steps),
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
            if marks.dropped:
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
        if isinstance(exception, BaseException):
            metadata["exception"] = f"{type(exception).__name__}: {exception}"
        elif exception is not None:
            metadata["exception"] = exception
        timestamps, codes, link_node, link_code = self.buffer.columns()
        return resolve(
            timestamps,
            codes,
            self.recorder.module_names,
            close_ns,
            links=(link_node, link_code),
            rank=distributed_world()[0],
            base_ns=self._base_ns,
            marks=marks,
            metadata=metadata,
            raised_calls=self.recorder.raised_calls,
            raised_steps=self._raised_steps,
            compiled_modules=self.recorder.registry.compiled,
        )

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

    def _flush(self, path: Path, exception: BaseException | str | None = None) -> None:
        _mark_profiler_clock()
        if exception is None:
            # Not when a step raised or a signal came: the other ranks may never arrive.
            self._sample_rank_clock()
        self._writing = True
        try:
            with paused_gc():
                data = self.trace_data(exception)
                write_trace(data, path, self.format)
        finally:
            self._writing = False
        self.recorder.raised_calls.clear()
        self._raised_steps.clear()
        self.written.append(path)
        if self._profiler_export is not None:
            self._profiler_export.trace_written(path)
        deferred, self._deferred_signal = self._deferred_signal, None
        if deferred is not None and self._guard is not None:
            self._guard.deliver(deferred)

    def _write_on_signal(self, signum: int) -> bool:
        """SIGTERM inside the Timeline: write what was recorded, open spans flagged
        incomplete. False: a write is under way; the signal waits for it."""
        if self._writing:
            self._deferred_signal = signum
            return False
        if not self._entered:
            return True
        if self.schedule is None:
            path = self.path
        elif self._window_steps:
            path = self._final_path()
        elif self._in_step and self._action not in (StepAction.SKIP, StepAction.WARMUP):
            path = self._window_path(self.schedule.window(self._step))
        else:
            return True  # between windows: nothing recorded to lose
        try:
            self._flush(path, exception=f"terminated by signal {signal.Signals(signum).name}")
        except Exception as error:
            warnings.warn(f"modtimeline: could not write the trace: {error}", RuntimeWarning, stacklevel=2)
        return True
