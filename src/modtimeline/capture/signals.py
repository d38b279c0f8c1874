"""Write the trace when the process is told to stop (SIGTERM), then stop as it would have.

torchrun sends SIGTERM to every worker when one of them fails: exactly when the trace is
wanted. SIGINT needs nothing here: Python turns it into KeyboardInterrupt, which leaves
the ``with Timeline`` block, and the block writes the trace on its way out.

Signal handlers can only be set from the main thread, so a Timeline entered in another
thread does not install one. A process that ignores SIGTERM keeps ignoring it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["TerminationGuard"]

# The signal module's own functions underneath (CPython's C module): the signal module's
# signal() and getsignal() turn a handler that is a function into an enum the slow way, by
# raising and catching two errors a call; a Timeline made per step installs and removes
# its handler each step, right after the step, where that cost ~110 µs a step.
try:
    import _signal as _handlers
except ImportError:  # (another Python: the signal module's own)
    _handlers = signal

_HANDLED = (signal.SIGTERM,)


class TerminationGuard:
    """While installed, SIGTERM first calls ``write(signum)``, then does what the handler
    it replaced would have done (the default: the process ends, killed by SIGTERM).

    ``write`` returns False to defer (a write is under way): its caller then calls
    ``deliver(signum)`` once that write is done."""

    def __init__(self, write: Callable[[int], bool]) -> None:
        self._write = write
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Install in the main thread; False (and nothing done) anywhere else."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in _HANDLED:
            previous = _handlers.getsignal(signum)
            if previous is None or previous == signal.SIG_IGN:
                continue  # ignored on purpose, or set from C: left as it is
            self._previous[signum] = previous
            _handlers.signal(signum, self._handle)
        return True

    def uninstall(self) -> None:
        """Put the replaced handlers back. Only the main thread can: from another thread
        (a Timeline stopped by a watchdog) the handler stays, and passes the signal on
        to the handler it replaced (its ``write`` has nothing to write any more)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if _handlers.getsignal(signum) == self._handle:  # (else somebody else's since: theirs stays)
                _handlers.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        written = True
        try:
            written = self._write(signum)
        finally:
            if written:
                self.deliver(signum, frame)

    def deliver(self, signum: int, frame: FrameType | None = None) -> None:
        """Do what the replaced handler does with ``signum``."""
        if signum not in self._previous:
            # Uninstalled meanwhile (a signal deferred until a stop was done): the handler
            # in place now is the one it replaced.
            signal.raise_signal(signum)
            return
        previous = self._previous[signum]
        if callable(previous):
            previous(signum, frame)
        else:
            # The default action: restore it and deliver the signal again.
            self.uninstall()
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
