"""What module calls between two recorded steps cost while a Timeline's hooks are paused.

With ``record_between_steps=False`` (the integrations' way) the hooks stay in torch
between two recorded steps, recording nothing (cheaper than taking them out and putting
them back at every step). So an evaluation forward between steps (``torch.no_grad()``)
runs with them there: this times such a forward of overhead.py's workloads, in
interleaved rounds: untraced; between two steps of a Timeline made so (hooks paused);
the floor (no-op global forward hooks, what any global hook costs a call).
Each round: each row's median of --forwards forwards; the table gives the medians over
rounds of the time added per module call against the untraced row of the same round.

    python benchmarks/between_steps.py [--workloads tiny-modules encoder] [--rounds 30]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import overhead  # noqa: E402
from report import machine, save  # noqa: E402

from modtimeline import Timeline  # noqa: E402


@contextlib.contextmanager
def untraced(model: torch.nn.Module, step: Callable[[], None], path: Path) -> Iterator[None]:
    yield


@contextlib.contextmanager
def paused(model: torch.nn.Module, step: Callable[[], None], path: Path) -> Iterator[None]:
    """Between two recorded steps of a Timeline off between steps."""
    timeline = Timeline(path, record_between_steps=False).start()
    try:
        with timeline.step():
            step()
        yield
    finally:
        timeline.stop()


@contextlib.contextmanager
def floor(model: torch.nn.Module, step: Callable[[], None], path: Path) -> Iterator[None]:
    row = overhead.floor_row()
    row.setup()
    try:
        yield
    finally:
        row.teardown()


ROWS = {"untraced": untraced, "between two steps, hooks paused": paused, "no-op global hooks (floor)": floor}


def measure(workload: str, rounds: int, forwards: int, folder: Path) -> dict[str, object]:
    torch.manual_seed(0)
    model, forward = overhead.WORKLOADS[workload]()

    def step() -> None:
        forward(model).backward()

    step()
    calls = overhead.module_calls(model, lambda m: forward(m).backward())
    clock = time.process_time_ns

    def evaluate() -> float:
        with torch.no_grad():
            begin = clock()
            forward(model)
            return (clock() - begin) / 1e3

    samples: dict[str, list[float]] = {name: [] for name in ROWS}
    order = random.Random(0)
    for round_ in range(rounds + 1):  # (the first warms up)
        names = list(ROWS)
        order.shuffle(names)
        for name in names:
            with ROWS[name](model, step, folder / "between.json"):
                times = [evaluate() for _ in range(forwards)]
            if round_:
                samples[name].append(statistics.median(times))
    added = {name: statistics.median((t - u) / calls for t, u in zip(values, samples["untraced"]))
             for name, values in samples.items()}
    return {"workload": workload, "module_calls": calls, "untraced_forward_us": statistics.median(samples["untraced"]),
            "added_us_per_call": added}


def markdown(results: list[dict[str, object]], rounds: int) -> str:
    lines = [f"Machine: {machine()}; an evaluation forward (torch.no_grad()), CPU time, medians of {rounds} "
             "interleaved rounds of the time added per module call against the untraced forward of the same round.",
             "", "| workload | module calls | untraced forward | " + " | ".join(list(ROWS)[1:]) + " |",
             "|---|---:|---:|" + "---:|" * (len(ROWS) - 1)]
    for result in results:
        added = result["added_us_per_call"]
        assert isinstance(added, dict)
        lines.append(f"| {result['workload']} | {result['module_calls']} | "
                     f"{float(result['untraced_forward_us']) / 1e3:.2f} ms | "
                     + " | ".join(f"{added[name]:+.2f} µs" for name in list(ROWS)[1:]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["tiny-modules", "encoder", "llama"],
                        choices=sorted(overhead.WORKLOADS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--forwards", type=int, default=5, help="timed forwards per row per round")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        results = [measure(workload, args.rounds, args.forwards, Path(folder)) for workload in args.workloads]
    save("between_steps", {"machine": machine(), "rounds": args.rounds, "results": results},
         markdown(results, args.rounds), args.out)


if __name__ == "__main__":
    main()
