"""Atomic file output: a file is either the old one, untouched, or the complete new one."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import TraceFileError


def check_writable(path: str | Path, create_folders: bool = False) -> Path:
    """Fail now, with a clear message, if ``path`` could not be written later;
    ``create_folders``: make the missing folders on the way to it first.

    (os.path, not pathlib: this runs every time a Timeline is made, and it is 3x faster.)"""
    text = os.path.expanduser(os.fspath(path))
    if os.path.isdir(text):
        raise TraceFileError(f"cannot write trace to {text!r}: it is a directory")
    folder = os.path.dirname(text) or "."
    if create_folders and not os.path.isdir(folder):
        make_folders(text)
    if not os.path.isdir(folder):
        raise TraceFileError(f"cannot write trace to {text!r}: folder {folder!r} does not exist")
    # access() also answers "no" on a read-only file system.
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TraceFileError(f"cannot write trace to {text!r}: folder {folder!r} is not writable")
    if os.path.exists(text) and not os.access(text, os.W_OK):
        raise TraceFileError(f"cannot write trace to {text!r}: the existing file is read-only")
    return Path(text)


def make_folders(path: str) -> None:
    """Make the missing folders on the way to the file ``path``, or say in one line why not."""
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise TraceFileError(f"cannot write trace to {path!r}: a part of {folder!r} is a file, not a folder") from None
    except OSError as error:
        raise TraceFileError(f"cannot write trace to {path!r}: cannot make folder {folder!r}: "
                             f"{error.strerror or error}") from None


_temporary_names = itertools.count()
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.\d+\.tmp")


def _temporary_name(folder: str, name: str) -> str:
    return os.path.join(folder, f".{name}.{os.getpid()}.{next(_temporary_names)}.tmp")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (PermissionError: it exists, as another user's)
        return True
    return True


def remove_leftovers(folder: str, name: str) -> list[str]:
    """Delete the temporary files of writes to ``name`` whose process died mid-write
    (killed, out of memory); a live process's are left alone. Returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder or "."):
            match = _TEMPORARY.fullmatch(entry.name)
            if match and match["name"] == name and not _process_alive(int(match["pid"])):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(entry.path)
    return removed


_swept: set[str] = set()  # the files whose folder was swept of leftovers by this process
_SWEPT_KEPT = 64


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[BinaryIO]:
    """Write to a temporary file beside ``path`` and rename it over ``path`` on success.

    A reader sees the old file or the complete new one, never none and never half of one
    (``os.replace`` is one atomic rename). On failure the temporary file is removed and
    ``path`` is untouched; a directory at ``path`` is never moved or replaced."""
    target = os.path.expanduser(os.fspath(path))
    folder, name = os.path.split(target)
    if target not in _swept:
        # Once per file and process: a folder of many traces is not listed at every write,
        # and what a process killed later leaves is swept by the next process that writes.
        # (Bounded: a long scheduled run writes a new file per window.)
        remove_leftovers(folder, name)
        if len(_swept) >= _SWEPT_KEPT:
            _swept.clear()
        _swept.add(target)
    # Unique within the process by the counter, across processes by the pid; O_EXCL
    # refuses anything already there. Mode 0o644 less the umask, as for any new file.
    made_folder = False
    while True:
        tmp_name = _temporary_name(folder, name)
        try:
            fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            break
        except FileExistsError:
            continue
        except FileNotFoundError:
            if made_folder:
                raise TraceFileError(f"cannot write trace to {target!r}: folder {folder or '.'!r} "
                                     "keeps disappearing") from None
            make_folders(target)  # removed since the path was checked (a cleanup between runs)
            made_folder = True
        except OSError as error:
            raise TraceFileError(f"cannot write trace to {target!r}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as stream:
            yield stream
        if os.path.isdir(target):
            raise TraceFileError(f"cannot write trace to {target!r}: a directory is there now")
        try:
            os.replace(tmp_name, target)
        except OSError as error:
            raise TraceFileError(f"cannot write trace to {target!r}: {error.strerror or error}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
