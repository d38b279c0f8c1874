"""Atomic file output: a file is either the old one, untouched, or the complete new one."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

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


# renameat2(2)'s RENAME_EXCHANGE, from the C library (Linux 3.15+, glibc 2.28+); None
# elsewhere (then os.replace does). Looked up at the first write.
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2: Any = False  # (False: not looked up yet)


def _exchange_function() -> Any:
    global _renameat2
    if _renameat2 is False:
        _renameat2 = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(Exception):
                import ctypes

                function = ctypes.CDLL(None, use_errno=True).renameat2
                function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                function.restype = ctypes.c_int
                _renameat2 = function
    return _renameat2


def _exchange(first: str, second: str) -> int:
    """Swap the two names in one atomic step; 0, or the errno why not (ENOSYS: no renameat2)."""
    function = _exchange_function()
    if function is None:
        return errno.ENOSYS
    import ctypes

    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return 0
    return ctypes.get_errno() or errno.EINVAL


def replace(new: str, target: str) -> None:
    """``os.replace(new, target)``: a reader of ``target`` sees the old file or the new
    one, never none and never half of one; ``new`` is gone afterwards.

    Where an old file is there, the two names are first swapped (RENAME_EXCHANGE, one
    atomic step) and the old file, now under ``new``, is then removed. ext4 treats a
    rename over an existing file as a cue to push the new file's data to disk at once
    (its auto_da_alloc); a trace overwritten at every short step (a Timeline per step)
    then waits 3-7 ms a write on the disk, where the swap takes tens of µs. What that cue
    gave is survival of a power loss in the next seconds, which these writes never
    promised (no fsync, and other file systems give no such cue). Anywhere the swap is
    not to be had (no file there yet, not Linux, a file system without it), os.replace."""
    if _exchange(new, target) != 0:
        os.replace(new, target)
        return
    try:
        os.unlink(new)  # (the old file now)
    except IsADirectoryError:
        # A directory came to ``target`` since it was checked: put it back, refuse.
        _exchange(new, target)
        raise TraceFileError(f"cannot write trace to {target!r}: a directory is there now") from None
    except OSError:
        pass  # the new file is in place; the old one stays under the temporary name


_swept: set[str] = set()  # the files whose folder was swept of leftovers by this process
_SWEPT_KEPT = 64


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[BinaryIO]:
    """Write to a temporary file beside ``path`` and rename it over ``path`` on success.

    A reader sees the old file or the complete new one, never none and never half of one
    (``replace``: one atomic rename or swap). On failure the temporary file is removed and
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
            replace(tmp_name, target)
        except OSError as error:
            raise TraceFileError(f"cannot write trace to {target!r}: {error.strerror or error}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
