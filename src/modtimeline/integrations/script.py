"""``modtimeline record -o OUT -- python train.py ARGS``: trace a script nobody edited.

The script runs in this process (``runpy``, as ``python`` would run it: ``sys.argv``,
``sys.path[0]``, ``__main__``) under a Timeline whose steps are cut at optimizer steps,
found through torch's global optimizer step hooks:

- a step begins at the first module call with gradients on after the last optimizer
  step (so loading the next batch and a ``no_grad`` evaluation between steps are not
  in it, and are not recorded), and ends when the optimizer has stepped: with gradient
  accumulation, the micro-batches are inside one step. With several optimizers, the
  first one that steps cuts the steps.
- under ``torchrun`` (``WORLD_SIZE`` > 1), the Timeline starts when
  ``init_process_group`` returns (so each rank writes its own file, ``OUT`` with
  ``.rankN`` or ``{rank}``) and is written when ``destroy_process_group`` is called or
  the script ends, whichever is first; run it as
  ``torchrun ... -m modtimeline record -o OUT -- python train.py ARGS``.
- an exception of the script, ``sys.exit`` and SIGTERM write the trace (flagged as
  for any Timeline); the script's exception and exit code are the run's.

What it cannot see: other threads' and other processes' models (``mp.spawn``'d
workers: put ``record`` in front of each); steps of a loop that never calls a
``torch.optim.Optimizer`` (a hand-written update): the trace then has module spans
but no steps; a forward with gradients on that no optimizer step follows (the
trailing step is flagged by nothing but its lack of an optimizer step); what runs
before ``init_process_group`` under torchrun; and a process killed by SIGKILL or
``os._exit``.
"""

from __future__ import annotations

import os
import re
import runpy
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from collections import OrderedDict
from typing import Any, cast

import torch
from torch.nn.modules import module as _torch_module
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..errors import ModTimelineError
from ..schedule import Schedule
from ..timeline import Timeline
from ..writers import format_for

__all__ = ["Recording", "parse_schedule", "run_command"]

# Our key in torch's global forward pre-hooks (negative: torch's own handles count up
# from 0); moved to the front, so a step begins before any hook records the call.
_STEP_TRIGGER_KEY = -0x6D_7500

_PYTHON = re.compile(r"python(\d+(\.\d+)?)?(\.exe)?")


def parse_schedule(text: str) -> Schedule:
    """``wait,warmup,active[,repeat]`` -> ``Schedule``."""
    try:
        numbers = [int(part) for part in text.split(",")]
        if len(numbers) not in (3, 4):
            raise ValueError("three or four numbers")
        return Schedule(*numbers)
    except ValueError as error:
        raise ModTimelineError(f"--schedule takes wait,warmup,active[,repeat] (whole numbers, active >= 1), "
                               f"got {text!r}: {error}") from None


class Recording:
    """A Timeline around a script: started now or after ``init_process_group``, steps cut
    at optimizer steps, stopped by ``finish``."""

    def __init__(self, output: str | os.PathLike[str], schedule: Schedule | None = None,
                 **timeline_kwargs: Any) -> None:
        format_for(os.fspath(output), timeline_kwargs.get("format"))  # a mistyped name fails before the script
        self.output = output
        self.schedule = schedule
        self.timeline_kwargs = timeline_kwargs
        self.timeline: Timeline | None = None
        self._optimizer: weakref.ref[torch.optim.Optimizer] | None = None
        self._thread = threading.get_ident()
        self._step_hook: Any = None
        self._patched: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        self._step_hook = register_optimizer_step_post_hook(self._after_optimizer_step)
        import torch.distributed as dist

        distributed = dist.is_available()
        if distributed:
            self._patch(dist, "destroy_process_group", self._stopping_first)
        if distributed and _world_size() > 1 and not dist.is_initialized():
            self._patch(dist, "init_process_group", self._starting_after)
        else:
            self.start()

    def start(self) -> None:
        if self.timeline is not None:
            return
        timeline = Timeline(self.output, schedule=self.schedule, record_between_steps=False, **self.timeline_kwargs)
        self._thread = threading.get_ident()
        self.timeline = timeline.start()
        self._arm()

    def finish(self, error: BaseException | None = None) -> None:
        """Stop and write (idempotent); every hook and patch is removed."""
        self._disarm()
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched = []
        if self.timeline is not None and self.timeline.started:
            if error is None:
                self.timeline.stop()
                return
            try:
                self.timeline.stop(error)
            except Exception as ours:  # never replace the script's exception with ours
                warnings.warn(f"modtimeline: could not stop the Timeline: {ours}", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ steps
    def _arm(self) -> None:
        hooks = cast("OrderedDict[int, Any]", _torch_module._global_forward_pre_hooks)  # (an OrderedDict)
        hooks[_STEP_TRIGGER_KEY] = self._begin_step
        hooks.move_to_end(_STEP_TRIGGER_KEY, last=False)

    def _disarm(self) -> None:
        _torch_module._global_forward_pre_hooks.pop(_STEP_TRIGGER_KEY, None)

    def _begin_step(self, module: torch.nn.Module, args: Any) -> None:
        """The first module call with gradients on since the last optimizer step."""
        if torch.compiler.is_compiling() or not torch.is_grad_enabled() or threading.get_ident() != self._thread:
            return None
        timeline = self.timeline
        self._disarm()
        if timeline is None or not timeline.started or timeline.in_step:
            return None
        # (torch took this call's hooks before recording was on: begin_step records its start)
        timeline.begin_step(first_call=(module, args))
        return None

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.timeline is None:
            return
        if self._optimizer is None or self._optimizer() is None:
            self._optimizer = weakref.ref(optimizer)
        elif self._optimizer() is not optimizer:
            return
        if threading.get_ident() != self._thread or not self.timeline.started:
            return
        if self.timeline.in_step:
            self.timeline.end_step()
        self._arm()

    # -------------------------------------------------------------- process group
    def _patch(self, owner: Any, name: str, wrap: Callable[[Any], Any]) -> None:
        original = getattr(owner, name)
        self._patched.append((owner, name, original))
        setattr(owner, name, wrap(original))

    def _starting_after(self, init: Callable[..., Any]) -> Callable[..., Any]:
        def init_process_group(*args: Any, **kwargs: Any) -> Any:
            result = init(*args, **kwargs)
            self.start()  # every rank, at the same point (the ranks compare clocks here)
            return result

        return init_process_group

    def _stopping_first(self, destroy: Callable[..., Any]) -> Callable[..., Any]:
        def destroy_process_group(*args: Any, **kwargs: Any) -> Any:
            if self.timeline is not None and self.timeline.started:
                self._disarm()
                self.timeline.stop()  # while the ranks can still compare clocks
            return destroy(*args, **kwargs)

        return destroy_process_group


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _another_python(word: str) -> bool:
    """A path to a Python other than this one (another virtual environment of the same
    interpreter counts: its packages differ). A bare ``python`` means this one."""
    if not any(sep in word for sep in (os.sep, os.altsep) if sep):
        return False
    path = os.path.abspath(word)
    if path == os.path.abspath(sys.executable):
        return False
    same_binary = os.path.realpath(path) == os.path.realpath(sys.executable)
    return not (same_binary and os.path.dirname(os.path.dirname(path)) == os.path.abspath(sys.prefix))


def _target(command: Sequence[str]) -> tuple[str, str, list[str]]:
    """("path" | "module", what, its argv) of ``python SCRIPT ARGS`` / ``python -m MODULE ARGS``
    / ``SCRIPT.py ARGS``."""
    words = list(command)
    if not words:
        raise ModTimelineError("record needs a command after --: modtimeline record -o OUT -- python train.py ARGS")
    first = os.path.basename(words[0])
    if _PYTHON.fullmatch(first) or os.path.realpath(words[0]) == os.path.realpath(sys.executable):
        if _another_python(words[0]):
            warnings.warn(f"modtimeline: record runs the script in this Python ({sys.executable}), not {words[0]}",
                          RuntimeWarning, stacklevel=2)
        words = words[1:]
        while words and words[0] in ("-u", "-B"):  # harmless here; others change the interpreter
            words = words[1:]
        if words[:1] == ["-m"]:
            if len(words) < 2:
                raise ModTimelineError("record: `python -m` needs a module name")
            return "module", words[1], words[1:]
        if not words or words[0].startswith("-"):
            raise ModTimelineError(f"record runs a script in this Python: give `python SCRIPT ARGS` or "
                                   f"`python -m MODULE ARGS` (got {' '.join(command)!r})")
    elif not first.endswith(".py"):
        raise ModTimelineError(f"record runs a Python script in this process, not {words[0]!r}: give "
                               "`python SCRIPT ARGS` or `python -m MODULE ARGS`; under torchrun, put record inside it: "
                               "`torchrun ... -m modtimeline record -o OUT -- python train.py ARGS`")
    script = words[0]
    if not os.path.isfile(script):
        raise ModTimelineError(f"record: no such script: {script!r}")
    return "path", script, words


def run_command(output: str, command: Sequence[str], schedule: Schedule | None = None) -> int:
    """Run ``command`` (a Python script or module) in this process under a Recording;
    returns its exit code. Its exception propagates after the trace is written."""
    kind, what, argv = _target(command)
    recording = Recording(output, schedule)
    saved_argv, saved_path0 = sys.argv[:], sys.path[0] if sys.path else None
    sys.argv = argv
    if sys.path:
        sys.path[0] = os.path.dirname(os.path.abspath(what)) if kind == "path" else os.getcwd()
    recording.install()
    try:
        if kind == "path":
            runpy.run_path(what, run_name="__main__")
        else:
            runpy.run_module(what, run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        code = exit.code
        recording.finish(None if code in (None, 0) else exit)
        raise
    except BaseException as error:
        recording.finish(error)
        raise
    finally:
        sys.argv = saved_argv
        if sys.path and saved_path0 is not None:
            sys.path[0] = saved_path0
    recording.finish()
    return 0
