"""Callbacks that put a ``Timeline`` around a framework's training loop.

``modtimeline.integrations.transformers.TimelineCallback`` for ``transformers.Trainer``,
``modtimeline.integrations.lightning.TimelineCallback`` for ``lightning.Trainer``. Neither
framework is a dependency of modtimeline: each module imports its framework when it is
imported itself, and says what to install when it is missing.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Any

from ..errors import ModTimelineError
from ..schedule import Schedule

__all__ = ["require", "CallbackTimeline"]


def require(module: str, package: str, integration: str) -> ModuleType:
    """Import ``module`` or say, in one line, what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ModTimelineError(f"{integration} needs {package}, which cannot be imported here ({error}): "
                               f"pip install {package}") from None


class CallbackTimeline:
    """What both callbacks share: a Timeline made when training starts (after the
    framework has set up the process group, so every rank names its own file), steps
    begun and ended from the framework's events, modules recorded inside steps only, and
    a stop that never replaces the user's exception."""

    def __init__(self, path: str | os.PathLike[str], schedule: Schedule | None, timeline_kwargs: dict[str, Any]) -> None:
        from ..writers import format_for

        format_for(os.fspath(path), timeline_kwargs.get("format"))  # a mistyped name fails now, not at train()
        self.path = path
        self.schedule = schedule
        self.timeline_kwargs = timeline_kwargs
        self.timeline: Any = None  # the Timeline of the current (or last) training run

    def start(self) -> None:
        from ..timeline import Timeline

        self.stop()  # one left running by a run that raised where no callback saw it
        # Evaluation between steps is left out.
        timeline = Timeline(self.path, schedule=self.schedule, record_between_steps=False, **self.timeline_kwargs)
        self.timeline = timeline.start()

    @property
    def in_step(self) -> bool:
        return self.timeline is not None and self.timeline.in_step

    def begin_step(self) -> None:
        if self.timeline is not None and self.timeline.started and not self.timeline.in_step:
            self.timeline.begin_step()

    def end_step(self) -> None:
        if self.timeline is not None and self.timeline.in_step:
            self.timeline.end_step()

    def stop(self, error: BaseException | None = None) -> None:
        timeline = self.timeline
        if timeline is None or not timeline.started:
            return
        if error is None:
            timeline.stop()
            return
        try:
            timeline.stop(error)
        except Exception as ours:  # never replace the user's exception with ours
            warnings.warn(f"modtimeline: could not stop the Timeline: {ours}", RuntimeWarning, stacklevel=2)
