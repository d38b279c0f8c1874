"""``modtimeline record``: an unedited script, its steps cut at optimizer steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from modtimeline.analysis.reader import read_trace

pytestmark = pytest.mark.slow

TRAIN = textwrap.dedent("""
    import os, signal, sys, torch
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
            self.head = torch.nn.Linear(8, 1)

        def forward(self, x):
            for layer in self.layers:
                x = torch.relu(layer(x))
            return self.head(x)

    accumulate, batches, fail_at = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch.distributed as dist
        dist.init_process_group("gloo")
    model = Net()
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for batch in range(batches):
        if fail_at == f"raise{batch}":
            raise ValueError(f"bad batch {batch}")
        if fail_at == f"sigterm{batch}":
            os.kill(os.getpid(), signal.SIGTERM)
        loss = model(torch.randn(4, 8)).pow(2).mean() / accumulate
        loss.backward()
        if (batch + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():  # an evaluation between steps: not in any step, not recorded
                model(torch.randn(2, 8))
    if distributed:
        dist.destroy_process_group()
    print("script done", sys.argv[1:], flush=True)
    if fail_at == "exit3":
        sys.exit(3)
""")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(TRAIN)
    return path


def _record(tmp_path: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modtimeline", "record", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=timeout)


def _counts(path: Path) -> tuple[dict, Counter, list[int]]:
    trace = read_trace(path)
    return trace.metadata, Counter((s.name, s.phase, s.step) for s in trace.spans if s.phase != "step"), \
        sorted(trace.step_ns)


def _assert_steps(path: Path, steps: list[int], micro_batches: int, net: str = "Net") -> dict:
    metadata, counts, found = _counts(path)
    assert found == steps
    for step in steps:
        for name in (net, f"{net}.layers.0", f"{net}.layers.1", f"{net}.head"):
            assert counts[(name, "forward", step)] == micro_batches, counts
            assert counts[(name, "backward", step)] == micro_batches, counts
    assert {step for (_, _, step) in counts} == set(steps)  # nothing outside the steps (the evaluations)
    return metadata


def test_record_a_plain_loop_with_gradient_accumulation(tmp_path, script):
    result = _record(tmp_path, "-o", "traces/run.json", "--", "python", str(script), "2", "6", "-")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "script done ['2', '6', '-']"  # its own argv
    metadata = _assert_steps(tmp_path / "traces" / "run.json", [0, 1, 2], micro_batches=2)
    assert "exception" not in metadata


def test_record_with_a_schedule(tmp_path, script):
    result = _record(tmp_path, "-o", "run.json", "--schedule", "1,1,1", "--", str(script), "1", "7", "-")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("run.*.json")) == ["run.000.json", "run.001.json"]
    _assert_steps(tmp_path / "run.000.json", [2], micro_batches=1)
    _assert_steps(tmp_path / "run.001.json", [5], micro_batches=1)


def test_record_writes_the_trace_when_the_script_raises(tmp_path, script):
    result = _record(tmp_path, "-o", "run.json", "--", sys.executable, str(script), "2", "8", "raise5")
    assert result.returncode == 1
    assert result.stderr.rstrip().endswith("ValueError: bad batch 5")  # the script's own traceback
    metadata, counts, steps = _counts(tmp_path / "run.json")
    assert metadata["exception"] == "ValueError: bad batch 5"
    assert steps == [0, 1, 2]  # step 2 had one micro-batch when batch 5 raised
    assert counts[("Net.layers.1", "backward", 1)] == 2 and counts[("Net.layers.1", "forward", 2)] == 1


def test_record_keeps_the_scripts_exit_code(tmp_path, script):
    result = _record(tmp_path, "-o", "run.json", "--", "python", str(script), "1", "2", "exit3")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "SystemExit: 3" in _counts(tmp_path / "run.json")[0]["exception"]


def test_record_writes_the_trace_on_sigterm(tmp_path, script):
    result = _record(tmp_path, "-o", "run.json", "--", "python", str(script), "1", "6", "sigterm3")
    assert result.returncode == -signal.SIGTERM, result.stderr[-3000:]
    metadata, _, steps = _counts(tmp_path / "run.json")
    assert metadata["exception"] == "terminated by signal SIGTERM" and steps == [0, 1, 2]


@pytest.mark.parametrize("args,message", [
    (["-o", "run.json", "python", "x.py"], "needs the command after --"),
    (["-o", "run.json", "--", "bash", "x.sh"], "runs a Python script in this process"),
    (["-o", "run.json", "--", "python", "missing.py"], "no such script"),
    (["-o", "run.pftrce", "--", "python", "train.py"], "cannot tell the trace format"),
    (["-o", "run.json", "--schedule", "1,2", "--", "python", "train.py"], "wait,warmup,active"),
])
def test_record_mistakes_are_one_line_exit_2(tmp_path, script, args, message):
    result = _record(tmp_path, *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("run*"))


def test_record_under_torchrun_each_rank_its_own_file(tmp_path, script):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "modtimeline", "record", "-o", "traces/run.json", "--", "python", str(script), "2", "4", "-"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        metadata = _assert_steps(tmp_path / "traces" / f"run.rank{rank}.json", [0, 1], micro_batches=2)
        assert metadata["rank"] == rank and metadata["world_size"] == 2
        assert metadata["clock_sync"]["samples"]  # compared with rank 0 at start and before destroy
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["run.rank0.json", "run.rank1.json"]


def test_record_says_when_the_python_named_is_not_the_one_that_runs(tmp_path, script):
    """`record -- /usr/bin/python3 train.py` runs train.py in record's own Python: said, not silent."""
    import warnings

    from modtimeline.integrations.script import _target

    other = tmp_path / "python3"
    other.write_text("")  # (some other interpreter's path)
    venv_python = tmp_path / "venv" / "bin" / "python"  # another virtual environment of this very interpreter
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(os.path.realpath(sys.executable))
    for named in (other, venv_python):
        with pytest.warns(RuntimeWarning, match=r"runs the script in this Python .*, not .*python"):
            assert _target([str(named), str(script)])[:2] == ("path", str(script))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for same in (sys.executable, "python", "python3"):
            assert _target([same, str(script)])[:2] == ("path", str(script))
