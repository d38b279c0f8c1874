"""writers/atomic: the checks before a write, the stream a write goes through, and
replace: a swap and an unlink where it can (no ext4 flush at every
rewrite), os.replace elsewhere; either way a reader sees the old file or the new one."""

from __future__ import annotations

import os
import sys

import pytest

from modtimeline.errors import TraceFileError
from modtimeline.writers import atomic
from modtimeline.writers.atomic import atomic_output

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@linux_only
def test_a_rewrite_swaps_and_removes_the_old_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_bytes(b"old")
    old_inode = os.stat(path).st_ino
    with atomic_output(path) as stream:
        stream.write(b"new")
    assert path.read_bytes() == b"new" and os.stat(path).st_ino != old_inode
    assert _names(tmp_path) == ["t.json"]  # no temporary file, no old file left


@pytest.mark.parametrize("swap", [True, False], ids=["swap", "no-renameat2"])
def test_first_write_and_rewrite_without_the_swap(tmp_path, monkeypatch, swap):
    if not swap:
        monkeypatch.setattr(atomic, "_renameat2", None)
    path = tmp_path / "t.json"
    for content in (b"first", b"second"):
        with atomic_output(path) as stream:
            stream.write(content)
        assert path.read_bytes() == content and _names(tmp_path) == ["t.json"]


def test_a_file_system_without_the_swap_falls_back_to_os_replace(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda first, second: 22)  # EINVAL, as on a file system without it
    path = tmp_path / "t.json"
    path.write_bytes(b"old")
    with atomic_output(path) as stream:
        stream.write(b"new")
    assert path.read_bytes() == b"new" and _names(tmp_path) == ["t.json"]


@linux_only
def test_a_directory_that_comes_at_the_last_moment_is_swapped_back(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    real_isdir = os.path.isdir
    # The directory appears after atomic_output's last check: the swap moves it, the
    # unlink refuses it, and it goes back where it was.
    monkeypatch.setattr(atomic.os.path, "isdir", lambda p: False if os.fspath(p) == os.fspath(path) else real_isdir(p))
    (path).mkdir()
    (path / "inside").write_bytes(b"keep")
    with pytest.raises(TraceFileError, match="directory is there now"):
        with atomic_output(path) as stream:
            stream.write(b"new")
    assert real_isdir(path) and (path / "inside").read_bytes() == b"keep"
    assert _names(tmp_path) == ["t.json"]


def test_the_output_stream_writes_everything_through_short_writes(tmp_path, monkeypatch):
    """The stream on the new file's descriptor: every byte reaches the file, in order,
    however few bytes each os.write takes, whatever kind of bytes a writer hands it."""
    real_write = os.write
    sizes = []

    def short_write(fd, data):
        sizes.append(len(data))
        return real_write(fd, bytes(data[:999]))

    monkeypatch.setattr(atomic.os, "write", short_write)
    pieces = [bytes([k % 251]) * (k * 7919 % 300_000) for k in range(40)]  # ~6 MB: several flushes
    reused = bytearray(b"changed later")
    path = tmp_path / "t.bin"
    with atomic_output(path) as stream:
        for k, piece in enumerate(pieces):
            assert stream.write(piece if k % 3 else memoryview(piece)) == len(piece)
        stream.write(reused)
        reused[:] = b"XXXXXXX"  # a caller's buffer changed after the write: the file keeps what was written
    expected = b"".join(pieces) + b"changed later"
    assert path.read_bytes() == expected and stream.bytes_written == len(expected)
    assert max(sizes) >= atomic.FileOutput.FLUSH_BYTES  # written a MiB and more at a time, not piece by piece


@pytest.mark.parametrize("name", ["t.json", "t.json.gz", "t.pftrace"])
def test_writers_return_the_size_of_the_file_they_wrote(tmp_path, name):
    from .synthetic import trace_data

    from modtimeline.writers import write_processes, write_trace

    data = trace_data(count=6, steps=3, seed=1)
    assert write_trace(data, tmp_path / name) == (tmp_path / name).stat().st_size > 0
    merged = tmp_path / ("merged." + name)
    assert write_processes(merged, {"tool": "modtimeline"}, [(data, "rank 0", 0)]) == merged.stat().st_size > 0


def test_check_writable_says_why_a_path_cannot_be_written(tmp_path, monkeypatch):
    (tmp_path / "adir.json").mkdir()
    with pytest.raises(TraceFileError, match="it is a directory"):
        atomic.check_writable(tmp_path / "adir.json")
    with pytest.raises(TraceFileError, match="folder .* does not exist"):
        atomic.check_writable(tmp_path / "missing" / "t.json")
    assert atomic.check_writable(tmp_path / "made" / "t.json", create_folders=True) == tmp_path / "made" / "t.json"
    assert (tmp_path / "made").is_dir()
    (tmp_path / "t.json").write_bytes(b"old")
    assert atomic.check_writable(tmp_path / "t.json") == tmp_path / "t.json"
    # (as root every access() says yes: what a read-only folder or file answers, told by hand)
    real_access = os.access
    refused = set()
    monkeypatch.setattr(atomic.os, "access", lambda p, mode: os.fspath(p) not in refused and real_access(p, mode))
    refused.add(os.fspath(tmp_path / "t.json"))
    with pytest.raises(TraceFileError, match="the existing file is read-only"):
        atomic.check_writable(tmp_path / "t.json")
    refused.add(os.fspath(tmp_path))
    with pytest.raises(TraceFileError, match="is not writable"):
        atomic.check_writable(tmp_path / "new.json")
    with pytest.raises(TraceFileError, match="it is a directory"):
        atomic.check_writable(tmp_path / "adir.json")


def test_a_file_standing_where_a_folder_should_be_is_refused(tmp_path):
    """(An executable file answers access(W_OK | X_OK) as a folder would.)"""
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    for create_folders in (False, True):
        with pytest.raises(TraceFileError, match="is a file, not a folder"):
            atomic.check_writable(script / "out.json", create_folders=create_folders)


@linux_only
def test_a_link_to_a_directory_is_refused_not_replaced(tmp_path):
    from .synthetic import trace_data

    from modtimeline.writers import write_trace

    (tmp_path / "real").mkdir()
    link = tmp_path / "t.json"
    link.symlink_to(tmp_path / "real")
    with pytest.raises(TraceFileError, match="a directory is there now"):
        write_trace(trace_data(count=3, steps=1, seed=1), link)
    assert link.is_symlink() and (tmp_path / "real").is_dir()
    assert _names(tmp_path) == ["real", "t.json"]  # no temporary file left


def test_the_output_stream_counts_bytes_and_leaves_nothing_when_the_write_fails(tmp_path):
    from array import array

    numbers = array("q", range(10))
    path = tmp_path / "t.bin"
    with atomic_output(path) as stream:
        assert stream.write(memoryview(numbers)) == 80
    assert path.read_bytes() == numbers.tobytes() and stream.bytes_written == 80
    with pytest.raises(RuntimeError, match="the writer's own"):
        with atomic_output(tmp_path / "u.bin") as stream:
            stream.write(b"pending")
            raise RuntimeError("the writer's own")
    assert _names(tmp_path) == ["t.bin"]
