"""writers/atomic.replace: a swap and an unlink where it can (no ext4 flush at every
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
