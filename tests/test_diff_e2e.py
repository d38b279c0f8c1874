"""`modtimeline diff` on real Timeline traces: one module made slower in the candidate."""

import os
import time

import orjson
import torch

from modtimeline import Timeline
from modtimeline.cli import main


class Sleepy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.delay_s = 0.0
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Busy-wait rather than sleep: a sleeping core wakes up cold and makes the
        # following backward genuinely slower too, which is not what this test is about.
        deadline = time.perf_counter() + self.delay_s
        while time.perf_counter() < deadline:
            pass
        if self.delay_s:
            # Spinning uses up the process's time slice: on a loaded machine the
            # scheduler then preempts it in whatever runs next (this module's Linear).
            # Yielding here takes that switch inside the slow code, where it belongs.
            os.sched_yield()
        return self.lin(x)


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.before = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
        self.slow = Sleepy()
        self.after = torch.nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.slow(self.before(x)))


def record(path, delay_s: float, steps: int = 12) -> None:
    torch.manual_seed(0)
    # One intra-op thread: with a pool, the pause before `lin` lets the pool's workers go
    # to sleep, and waking them on a loaded machine made `lin` itself slower (a real
    # effect of the delay, but not the one this test is about).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _record(path, delay_s, steps)
    finally:
        torch.set_num_threads(threads)


def _record(path, delay_s: float, steps: int) -> None:
    model = Model()
    model.slow.delay_s = delay_s
    x = torch.randn(8, 16)
    with Timeline(path) as timeline:
        for _ in range(steps):
            with timeline.step():
                model(x).sum().backward()


def test_slower_module_is_caught_and_attributed(tmp_path, capsys):
    base, candidate = tmp_path / "base.json", tmp_path / "candidate.json"
    record(base, 0.0)
    record(candidate, 0.0005)
    # The modules here take 10-50 µs a step; on a loaded machine a module run right after
    # the spin really does run up to ~50 µs slower, past the default 20 µs floor. A floor
    # of 100 µs, a fifth of the injected delay, is the gate set for this model's scale.
    gate = ["diff", "--json", "--floor-us", "100"]
    assert main([*gate, str(base), str(candidate)]) == 1
    report = orjson.loads(capsys.readouterr().out)
    regressed = {(m["fqn"], m["phase"]): m for m in report["modules"] if m["verdict"] == "regressed"}
    # The injected 500 µs is found in the slowed module and its parent, and nowhere else.
    assert set(regressed) == {("Model.slow", "forward"), ("Model", "forward")}
    slow, root = regressed[("Model.slow", "forward")], regressed[("Model", "forward")]
    assert slow["delta_us"] > 400 and slow["self_delta_us"] > 400  # the sleep is its own code
    assert root["children_delta_us"] > 400 and abs(root["self_delta_us"]) < 200  # the root only called it
    # and the same two traces the other way round: an improvement, exit 0
    assert main([*gate, str(candidate), str(base)]) == 0
    improved = {(m["fqn"], m["phase"]) for m in orjson.loads(capsys.readouterr().out)["modules"]
                if m["verdict"] == "improved"}
    assert improved == {("Model.slow", "forward"), ("Model", "forward")}
