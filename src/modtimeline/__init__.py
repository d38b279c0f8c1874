"""modtimeline: per-module forward/backward timeline of PyTorch training steps.

``Timeline`` records; ``ModuleTracker`` is the drop-in tracker it stands on;
``Schedule`` picks which steps of a long run to record. The trace analysis
(``modtimeline.analysis``) does not import torch.
"""

__version__ = "0.1.0"

from .errors import DeviceError, ModTimelineError, RankSyncError, TraceFileError, TraceFormatError  # noqa: E402
from .schedule import Schedule  # noqa: E402

from typing import Any  # noqa: E402


def __getattr__(name: str) -> Any:
    # Timeline and ModuleTracker import torch; load them only when asked for, so that
    # `modtimeline summary/diff` (and modtimeline.analysis) run where torch is absent.
    if name == "Timeline":
        from .timeline import Timeline

        return Timeline
    if name == "ModuleTracker":
        from .capture.tracker import ModuleTracker

        return ModuleTracker
    raise AttributeError(f"module 'modtimeline' has no attribute {name!r}")


__all__ = [
    "DeviceError",
    "ModTimelineError",
    "ModuleTracker",
    "RankSyncError",
    "Schedule",
    "Timeline",
    "TraceFileError",
    "TraceFormatError",
    "__version__",
]
