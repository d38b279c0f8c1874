"""A trace that cannot be written never stops training (issue 24, item 1).

On a real, full file system where this process may mount one (a 64 KiB tmpfs; root
only), else on a write that fails with ENOSPC as a full disk makes it fail.
"""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.nn.modules import module as torch_module

from modtimeline import Schedule, Timeline
from modtimeline import timeline as timeline_module

from .trace_checks import load, spans

pytestmark = pytest.mark.twin  # the pure-Python pass runs these too


class SmallDisk:
    """A folder on a small file system that can be filled up and emptied again."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch, real: bool) -> None:
        self.folder = folder
        self.real = real
        self._monkeypatch = monkeypatch
        self._filler = folder / "filler"

    def fill(self) -> None:
        if not self.real:
            def no_space(*args: object, **kwargs: object) -> int:
                raise OSError(errno.ENOSPC, "No space left on device")

            self._monkeypatch.setattr(timeline_module, "write_trace", no_space)
            return
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while True:
                os.write(fd, b"\0" * 512)
        except OSError as error:
            assert error.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def free(self) -> None:
        if not self.real:
            self._monkeypatch.undo()
            return
        self._filler.unlink()

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    folder = tmp_path / f"small-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True).returncode == 0
    try:
        yield SmallDisk(folder, monkeypatch, real=mounted)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))


def _hooks_gone() -> bool:
    return not torch_module._global_forward_pre_hooks and not torch_module._global_forward_hooks


def test_a_window_that_cannot_be_written_does_not_stop_training(small_disk: SmallDisk):
    model, x = _model(), torch.randn(2, 4)
    steps_run = 0
    freed = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Timeline(small_disk.folder / "run.json", schedule=Schedule(wait=1, warmup=0, active=1)) as timeline:
            small_disk.fill()
            for _ in range(6):  # windows at steps 1, 3, 5
                with timeline.step():
                    model(x).sum().backward()
                steps_run += 1
                if not freed and any("training goes on" in str(w.message) for w in caught):
                    small_disk.free()  # the disk has room again after window 0 failed
                    freed = True
    assert steps_run == 6 and freed
    failures = [w for w in caught if issubclass(w.category, RuntimeWarning) and "training goes on" in str(w.message)]
    assert len(failures) == 1 and "No space left" in str(failures[0].message)
    assert failures[0].filename == __file__  # it names the user's line
    assert [p.name for p in timeline.written] == ["run.001.json", "run.002.json"]
    trace = load(timeline.written[0])
    [failure] = trace["metadata"]["write_failures"]
    assert failure["path"].endswith("run.000.json") and failure["steps"] == [1]
    assert "No space left" in failure["error"]
    assert "write_failures" not in load(timeline.written[1])["metadata"]  # said once, in the next file
    assert trace["metadata"]["steps"] == [3] and {e["args"]["step"] for e in spans(trace)} == {3}
    assert small_disk.leftovers() == [] and _hooks_gone()


def test_a_trace_that_cannot_be_written_at_exit_is_a_warning(small_disk: SmallDisk):
    model, x = _model(), torch.randn(2, 4)
    timeline = Timeline(small_disk.folder / "run.json")
    small_disk.fill()
    with pytest.warns(RuntimeWarning, match="No space left on device; training goes on"):
        with timeline:  # no error escapes a block that succeeded
            model(x).sum().backward()
    assert timeline.written == [] and small_disk.leftovers() == [] and _hooks_gone()
    small_disk.free()
    with timeline:  # the next file this Timeline writes says what was lost
        model(x).sum().backward()
    [failure] = load(timeline.path)["metadata"]["write_failures"]
    assert failure["path"] == str(timeline.path) and "No space left" in failure["error"]


def test_strict_raises_the_write_error(small_disk: SmallDisk):
    model, x = _model(), torch.randn(2, 4)
    timeline = Timeline(small_disk.folder / "run.json", strict=True)
    small_disk.fill()
    with pytest.raises(OSError, match="No space left") as raised:
        with timeline:
            model(x).sum().backward()
    assert raised.value.errno == errno.ENOSPC
    assert small_disk.leftovers() == [] and _hooks_gone()


def test_strict_raises_at_the_windows_end_but_never_over_the_users_error(small_disk: SmallDisk):
    model, x = _model(), torch.randn(2, 4)
    timeline = Timeline(small_disk.folder / "run.json", schedule=Schedule(active=1), strict=True)
    small_disk.fill()
    with pytest.raises(OSError, match="No space left"):
        with timeline:
            with timeline.step():
                model(x).sum().backward()
    assert _hooks_gone()
    with pytest.warns(RuntimeWarning, match="training goes on"), pytest.raises(KeyError, match="mine"):
        with timeline:
            with timeline.step():
                model(x).sum().backward()
                raise KeyError("mine")
    assert _hooks_gone()
