"""``TimelineCallback`` for ``transformers.Trainer``.

::

    from modtimeline.integrations.transformers import TimelineCallback

    trainer = Trainer(model, args, train_dataset=data, callbacks=[TimelineCallback("traces/run.json")])
    trainer.train()    # writes traces/run.json (rank N of several: traces/run.rankN.json)
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import weakref
from typing import Any

from . import CallbackTimeline, require
from ..schedule import Schedule

_transformers = require("transformers", "transformers", "modtimeline.integrations.transformers")

__all__ = ["TimelineCallback"]

_GUARDED = "_modtimeline_guarded"


class TimelineCallback(_transformers.TrainerCallback):  # type: ignore[name-defined]
    """Record every optimizer step of ``Trainer.train()`` into a trace at ``path``.

    One step span per optimizer step: with ``gradient_accumulation_steps=N`` the N
    micro-batches' forward and backward are inside one step (``on_step_begin`` to
    ``on_step_end``). **Evaluation is left out**: modules are recorded inside steps only,
    and the Trainer evaluates (and logs and saves) after a step's end. ``schedule``
    (a ``Schedule``) counts optimizer steps; other keyword arguments go to ``Timeline``
    (``format=``, ``device=``, ``memory=``, ``strict=``, ...).

    The Timeline starts at ``on_train_begin`` (the process group is set up by then: every
    rank writes its own file, ``{rank}`` in ``path`` or ``.rankN`` added) and is written at
    ``on_train_end``. Transformers has no callback for a training run that raises, so the
    callback wraps the Trainer's ``train`` (found when the callback is given to
    ``Trainer(callbacks=[...])``) and its ``training_step``: when training raises, the
    trace is written with ``metadata.exception``, every hook is removed, and the
    exception goes on unchanged. A callback added later (``trainer.add_callback``) wraps
    them at the first ``train()``, where an error outside ``training_step`` (loading a
    batch, say) is caught from the next ``train()`` on; for that first one, the Timeline
    is stopped at the latest when the process exits, or when training starts again.
    """

    def __init__(self, path: str | os.PathLike[str], schedule: Schedule | None = None, **timeline_kwargs: Any) -> None:
        self._run = CallbackTimeline(path, schedule, timeline_kwargs)
        atexit.register(_stop_at_exit, weakref.ref(self))

    @property
    def timeline(self) -> Any:
        """The Timeline of the current (or last) ``train()``; None before the first."""
        return self._run.timeline

    # ------------------------------------------------------------------ events
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._guard(_calling_trainer())

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._guard(_calling_trainer())
        self._run.start()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._run.begin_step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._run.end_step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._run.stop()

    # -------------------------------------------------------------- exceptions
    def _guard(self, trainer: Any) -> None:
        """Wrap the trainer's ``train`` and ``training_step`` (its own attributes, not
        the class's) so that an exception stops the Timeline on its way out."""
        if trainer is None:
            return
        me = weakref.ref(self)
        for name in ("train", "training_step"):
            method = getattr(trainer, name, None)
            if method is None or getattr(method, _GUARDED, None) is me:
                continue
            setattr(trainer, name, _stopping_on_error(method, me))


def _stopping_on_error(method: Any, callback: weakref.ref[TimelineCallback]) -> Any:
    @functools.wraps(method)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except BaseException as error:
            owner = callback()
            if owner is not None:
                owner._run.stop(error)
            raise

    setattr(guarded, _GUARDED, callback)
    return guarded


def _calling_trainer() -> Any:
    """The ``transformers.Trainer`` whose method is calling the callback (up the stack)."""
    frame = sys._getframe(2)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, _transformers.Trainer):
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _stop_at_exit(callback: weakref.ref[TimelineCallback]) -> None:
    """At interpreter exit, a Timeline still recording (a run that raised where nothing
    saw it) is written, with the exception that ended the program if there was one."""
    owner = callback()
    if owner is not None:
        owner._run.stop(getattr(sys, "last_value", None))
