"""Thread scenarios that once crashed the process (SIGSEGV), run in a subprocess by
test_threads.py: ``python -m tests.thread_scenarios MODE STEPS OUT_DIR``."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import torch
from torch import nn

from modtimeline import Timeline


def _model() -> nn.Module:
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)])


def steps_beside_a_training_thread(steps: int, out: Path) -> None:
    """The main thread marks steps on its own model while a worker trains the same one."""
    model = _model()
    stop = threading.Event()

    def train() -> None:
        for _ in range(steps):
            if stop.is_set():
                return
            model(torch.randn(4, 16)).sum().backward()

    with Timeline(out / "main.json") as timeline:
        worker = threading.Thread(target=train)
        worker.start()
        try:
            while worker.is_alive():
                with timeline.step():
                    model(torch.randn(4, 16)).sum().backward()
        finally:
            stop.set()
            worker.join()


def two_threads_two_timelines(steps: int, out: Path) -> None:
    def train(name: str) -> None:
        model = _model()
        with Timeline(out / f"{name}.json") as timeline:
            for _ in range(steps):
                with timeline.step():
                    model(torch.randn(4, 16)).sum().backward()

    threads = [threading.Thread(target=train, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, steps, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    {"steps": steps_beside_a_training_thread, "two": two_threads_two_timelines}[mode](steps, out)
    print("ok")
