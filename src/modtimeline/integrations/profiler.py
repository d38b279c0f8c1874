"""A Timeline's module spans inside a torch.profiler trace, without merging by hand.

``Timeline(..., profiler=prof)`` wraps ``prof.export_chrome_trace`` (which torch's own
``tensorboard_trace_handler`` and users' ``on_trace_ready`` handlers call): once both the
profiler's file and the Timeline's trace exist, whichever comes second, the profiler's
file is rewritten in place as ``modtimeline merge --profiler`` would write it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..errors import ModTimelineError


class ProfilerExport:
    def __init__(self, profiler: Any) -> None:
        export = getattr(profiler, "export_chrome_trace", None)
        if not callable(export):
            raise ModTimelineError(f"profiler= takes a torch.profiler.profile; got {type(profiler).__name__}")
        self._original = export
        self._profiler = profiler
        profiler.export_chrome_trace = self._export
        self.trace: Path | None = None  # the Timeline's latest written file
        self._waiting: list[Path] = []  # profiler files exported before it

    def _export(self, path: str, *args: Any, **kwargs: Any) -> Any:
        result = self._original(path, *args, **kwargs)
        if self.trace is None:
            self._waiting.append(Path(path))
        else:
            self._merge(Path(path))
        return result

    def trace_written(self, trace: Path) -> None:
        self.trace = trace
        waiting, self._waiting = self._waiting, []
        for path in waiting:
            self._merge(path)

    def _merge(self, path: Path) -> None:
        from ..analysis.profiler import merge_profiler  # (file to file: loaded when needed)
        from ..analysis.reader import DEFAULT_LIMITS

        assert self.trace is not None
        try:
            merge_profiler(path, self.trace, path, DEFAULT_LIMITS)
        except (ModTimelineError, OSError) as error:
            # The profiler's own file stays as it was written: never lose it, never raise
            # into the training loop for it.
            warnings.warn(f"modtimeline: could not add the module spans to {path}: {error}", RuntimeWarning,
                          stacklevel=3)
