"""Which steps to record, like ``torch.profiler.schedule``."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from enum import Enum


class StepAction(Enum):
    SKIP = "skip"  # not recorded: the tracker's hooks are off
    WARMUP = "warmup"  # recorded and thrown away (first-call costs stay out of the trace)
    RECORD = "record"  # recorded
    RECORD_AND_FLUSH = "record_and_flush"  # last step of an active window: written when it ends


@dataclass(frozen=True)
class Schedule:
    """``skip_first`` steps, then ``repeat`` cycles (0: forever) of ``wait`` skipped,
    ``warmup`` discarded and ``active`` recorded steps. Each active window is written
    to its own file when it ends, so memory stays flat however long the run.

    ``skip_first_wait`` (non-zero): the first cycle has no ``wait`` (after ``skip_first``
    steps, warm-up begins at once; later cycles wait ``wait`` steps). Step for step what
    ``torch.profiler.schedule`` with the same arguments does, so a Timeline's windows
    line up with a profiler's."""

    wait: int = 0
    warmup: int = 0
    active: int = 1
    repeat: int = 0
    skip_first: int = 0
    skip_first_wait: int = 0

    def __post_init__(self) -> None:
        for name in ("wait", "warmup", "active", "repeat", "skip_first", "skip_first_wait"):
            value = getattr(self, name)
            try:
                if isinstance(value, bool):
                    raise TypeError
                number = operator.index(value)  # (a numpy or torch integer is one)
            except TypeError:
                raise TypeError(f"Schedule({name}=...) must be a whole number, got {value!r}") from None
            object.__setattr__(self, name, number)
        for name in ("wait", "warmup", "repeat", "skip_first", "skip_first_wait"):
            if getattr(self, name) < 0:
                raise ValueError(f"Schedule({name}=...) must be >= 0, got {getattr(self, name)}")
        if self.active < 1:
            raise ValueError(f"Schedule(active=...) must be >= 1, got {self.active}")

    def action(self, step: int) -> StepAction:
        """What to do at step number ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"a step number is >= 0, got {step}")
        if step < self.skip_first:
            return StepAction.SKIP
        step = self._cycle_step(step)
        cycle = self.wait + self.warmup + self.active
        if self.repeat and step >= cycle * self.repeat:
            return StepAction.SKIP
        position = step % cycle
        if position < self.wait:
            return StepAction.SKIP
        if position < self.wait + self.warmup:
            return StepAction.WARMUP
        if position == cycle - 1:
            return StepAction.RECORD_AND_FLUSH
        return StepAction.RECORD

    def window(self, step: int) -> int:
        """Number of the active window that ``step`` belongs to."""
        return max(0, self._cycle_step(step)) // (self.wait + self.warmup + self.active)

    def _cycle_step(self, step: int) -> int:
        """Steps since the first cycle began (the first ``wait`` counted as done when
        ``skip_first_wait`` says so), as torch.profiler.schedule counts them."""
        return step - self.skip_first + (self.wait if self.skip_first_wait else 0)
