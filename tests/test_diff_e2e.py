"""`modtimeline diff` on real Timeline traces: one module made slower in the candidate."""

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
    record(candidate, 0.002)
    assert main(["diff", "--json", str(base), str(candidate)]) == 1
    report = orjson.loads(capsys.readouterr().out)
    regressed = {(m["fqn"], m["phase"]): m for m in report["modules"] if m["verdict"] == "regressed"}
    # The root's backward spans the whole backward pass; everything else must hold still.
    assert set(regressed) - {("Model", "backward")} == {("Model.slow", "forward"), ("Model", "forward")}
    slow, root = regressed[("Model.slow", "forward")], regressed[("Model", "forward")]
    assert slow["delta_us"] > 1500 and slow["self_delta_us"] > 1500  # the sleep is its own code
    assert root["children_delta_us"] > 1500 and abs(root["self_delta_us"]) < 500  # the root only called it
    # and the same two traces the other way round: an improvement, exit 0
    assert main(["diff", "--json", str(candidate), str(base)]) == 0
    improved = {(m["fqn"], m["phase"]) for m in orjson.loads(capsys.readouterr().out)["modules"]
                if m["verdict"] == "improved"}
    assert improved - {("Model", "backward")} == {("Model.slow", "forward"), ("Model", "forward")}
