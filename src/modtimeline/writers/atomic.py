"""Atomic file output: a file is either the old one, untouched, or the complete new one."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import TraceFileError


def check_writable(path: str | Path, create_folders: bool = False) -> Path:
    """Fail now, with a clear message, if ``path`` could not be written later;
    ``create_folders``: make the missing folders on the way to it first.

    (os.path, not pathlib, and as few system calls as the usual case needs: this runs
    every time a Timeline is made, once a step for a Timeline per step.)"""
    text = os.path.expanduser(os.fspath(path))
    folder = os.path.dirname(text) or "."
    # access() also answers "no" on a read-only file system.
    if not os.access(folder, os.W_OK | os.X_OK):
        if os.path.isdir(text):
            raise TraceFileError(f"cannot write trace to {text!r}: it is a directory")
        if create_folders and not os.path.isdir(folder):
            make_folders(text)
        if not os.path.isdir(folder):
            raise TraceFileError(f"cannot write trace to {text!r}: folder {folder!r} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise TraceFileError(f"cannot write trace to {text!r}: folder {folder!r} is not writable")
    try:
        mode = os.stat(text).st_mode
    except FileNotFoundError:
        return Path(text)  # nothing there yet
    except NotADirectoryError:  # (an executable file passes access(W_OK | X_OK) as a folder)
        raise TraceFileError(f"cannot write trace to {text!r}: {folder!r} is a file, not a folder") from None
    except OSError as error:
        raise TraceFileError(f"cannot write trace to {text!r}: {error.strerror or error}") from None
    if stat.S_ISDIR(mode):
        raise TraceFileError(f"cannot write trace to {text!r}: it is a directory")
    if not os.access(text, os.W_OK):
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
# This process's id, asked once (and again in a forked child): a write right after a
# training step pays for every distinct system call it makes (caches cold), so a write
# makes only those it needs.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _temporary_name(folder: str, name: str) -> str:
    return os.path.join(folder, f".{name}.{_pid}.{next(_temporary_names)}.tmp")


def _process_alive(pid: int) -> bool:
    if pid == _pid:
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
        if _exchange(new, target) != 0:
            raise TraceFileError(f"cannot write trace to {target!r}: a directory came there while it was written, "
                                 f"and could not be put back: it is now {new!r}") from None
        raise TraceFileError(f"cannot write trace to {target!r}: a directory is there now") from None
    except OSError:
        pass  # the new file is in place; the old one stays under the temporary name


_swept: set[str] = set()  # the files whose folder was swept of leftovers by this process
_SWEPT_KEPT = 64


class FileOutput:
    """A write-only stream on a new file's descriptor: what is written collects in memory
    and goes to the file a MiB at a time. (Not ``os.fdopen``: its stat and seek of the
    new file are two more system calls at every write, and a write right after a training
    step pays dearly for each distinct one.) ``bytes_written``: the file's size so far."""

    __slots__ = ("_fd", "_pending", "_pending_bytes", "bytes_written")

    FLUSH_BYTES = 1 << 20

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.bytes_written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        size = len(data) if type(data) is bytes else memoryview(data).nbytes
        if size >= self.FLUSH_BYTES // 8:
            self.flush()  # (a big piece, a chunk of rows: written as it is, never copied)
            self._write_all(data)
            return size
        # (a copy of what a caller may change later; writers pass bytes, kept as they are)
        self._pending.append(data if type(data) is bytes else bytes(data))
        self._pending_bytes += size
        if self._pending_bytes >= self.FLUSH_BYTES:
            self.flush()
        return size

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        self._write_all(data)

    def _write_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self.bytes_written += written

    def close(self) -> None:
        """Write what is pending and close the file (closed even if that write fails)."""
        if self._fd < 0:
            return
        try:
            self.flush()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close the file, what is pending left unwritten (a write that failed: its file
        is removed, and its error is the one to see, not a later one from this)."""
        self._pending.clear()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[FileOutput]:
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
            fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                         | getattr(os, "O_BINARY", 0), 0o644)  # (O_BINARY: Windows would translate newlines)
            break
        except FileExistsError:
            continue
        except FileNotFoundError as error:
            if os.path.isdir(folder or "."):
                # The folder is there, yet no file can be made in it (/proc, /sys): say what the system said.
                raise TraceFileError(f"cannot write trace to {target!r}: {error.strerror or error}") from None
            if made_folder:
                raise TraceFileError(f"cannot write trace to {target!r}: folder {folder or '.'!r} "
                                     "keeps disappearing") from None
            make_folders(target)  # removed since the path was checked (a cleanup between runs)
            made_folder = True
        except OSError as error:
            raise TraceFileError(f"cannot write trace to {target!r}: {error.strerror or error}") from None
    try:
        stream = FileOutput(fd)
        try:
            yield stream
        except BaseException:
            stream.abandon()
            raise
        stream.close()
        # (os.path.isdir follows a link: a link to a directory is refused too, not replaced)
        if os.path.isdir(target):
            raise TraceFileError(f"cannot write trace to {target!r}: a directory is there now")
        try:
            replace(tmp_name, target)
        except TraceFileError:
            raise
        except IsADirectoryError:
            raise TraceFileError(f"cannot write trace to {target!r}: a directory is there now") from None
        except OSError as error:
            raise TraceFileError(f"cannot write trace to {target!r}: {error.strerror or error}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
