"""Atomic file output: a file is either the old one, untouched, or the complete new one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import TraceFileError


def check_writable(path: str | Path) -> Path:
    """Fail now, with a clear message, if ``path`` could not be written later."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise TraceFileError(f"cannot write trace to {str(target)!r}: it is a directory")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise TraceFileError(f"cannot write trace to {str(target)!r}: folder {str(folder)!r} does not exist")
    # access() also answers "no" on a read-only file system.
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TraceFileError(f"cannot write trace to {str(target)!r}: folder {str(folder)!r} is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise TraceFileError(f"cannot write trace to {str(target)!r}: the existing file is read-only")
    return target


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[BinaryIO]:
    """Write to a temporary file beside ``path`` and rename it over ``path`` on success."""
    target = Path(path).expanduser()
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as error:
        raise TraceFileError(f"cannot write trace to {str(target)!r}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as stream:
            yield stream
        os.chmod(tmp_name, 0o644)
        _replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _replace(source: str, target: Path) -> None:
    """Rename ``source`` over ``target``, moving an existing ``target`` aside first.

    ext4 flushes a file to disk when it is renamed over an existing one (auto_da_alloc:
    1.7 ms here against 2 µs for a fresh name). A trace needs crash-consistency, not
    power-loss durability, so the old file steps aside, and comes back if the rename fails.
    """
    if not target.exists():
        os.replace(source, target)
        return
    aside = f"{source}.old"
    os.replace(target, aside)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(aside, target)
        raise
    os.unlink(aside)
