"""Threads: autograd runs backward on its own threads, and users train several models in
several threads. A Timeline must never crash the run, and records the thread that
entered it (plus the recompute inside its own backward passes)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from modtimeline import Timeline

from .trace_checks import assert_nested, load, spans

pytestmark = pytest.mark.twin

ROOT = Path(__file__).resolve().parents[1]


def run_scenario(mode: str, steps: int, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.thread_scenarios", mode, str(steps), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_steps_marked_while_another_thread_trains_do_not_crash(tmp_path):
    # 3 of 3 runs died with SIGSEGV at 3,000 steps when the compiled marks were erased
    # from nodes that another thread's engine was iterating.
    result = run_scenario("steps", 3000, tmp_path)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    trace = load(tmp_path / "main.json")
    assert_nested(trace)
    assert {e["args"]["step"] for e in spans(trace) if e["cat"] == "forward"}


def test_two_threads_with_a_timeline_each_do_not_crash(tmp_path):
    result = run_scenario("two", 1500, tmp_path)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    for name in ("a", "b"):
        assert_nested(load(tmp_path / f"{name}.json"))


class Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class ModelA(Named):
    pass


class ModelB(Named):
    pass


def test_each_timeline_records_only_its_own_thread(tmp_path):
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def train(model_class: type[nn.Module], name: str) -> None:
        try:
            model = model_class()
            with Timeline(tmp_path / f"{name}.json") as timeline:
                for _ in range(20):
                    barrier.wait(timeout=30)  # both threads train at the same time
                    with timeline.step():
                        model(torch.randn(2, 8)).sum().backward()
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=train, args=(cls, name)) for cls, name in ((ModelA, "a"), (ModelB, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    for name, own in (("a", "ModelA"), ("b", "ModelB")):
        names = {e["name"] for e in spans(load(tmp_path / f"{name}.json")) if e["cat"] != "step"}
        assert names == {own, f"{own}.fc"}, names


def test_timeline_in_a_worker_thread_ignores_the_main_threads_model(tmp_path):
    main_model, worker_model = ModelA(), ModelB()
    entered, done = threading.Event(), threading.Event()

    def worker() -> None:
        with Timeline(tmp_path / "worker.json"):
            entered.set()
            worker_model(torch.randn(2, 8)).sum().backward()
            done.wait(timeout=30)

    thread = threading.Thread(target=worker)
    thread.start()
    entered.wait(timeout=30)
    main_model(torch.randn(2, 8)).sum().backward()  # while the worker's Timeline is active
    done.set()
    thread.join(timeout=30)
    names = {e["name"] for e in spans(load(tmp_path / "worker.json"))}
    assert names == {"ModelB", "ModelB.fc"}
