"""What a Timeline made per step costs, part by part, right after a training step.

``with Timeline(path): step()`` makes, starts and stops a Timeline around every step, and
each of those runs right after the step, when the caches hold the step's tensors and not
our code or data: every part then costs several times what it costs in a loop. So each
part here is timed once after each step of overhead.py's workload (default the 6-layer
encoder of issue 26's per-step goal), in rounds, medians over the rounds:

* make, start, stop: ``Timeline(path)``, ``start()``, and ``stop()`` after a traced step
  (hooks off, resolve, write, signal handler put back);
* parts of those, each after a step: ``trace_data()`` (resolve and metadata, after a
  traced step of its own Timeline), ``write_trace`` of a one-step trace's data (encode +
  file), its encode alone into memory, its file alone (the encoded bytes through the atomic
  writer), the SIGTERM handler set and put back (``TerminationGuard``);
* nothing: the timer's own cost, cold.

Each part that can run twice in a row is then run once more at once, warm: the same
work with our code and data in the caches. The two columns apart are what the step's
eviction of them costs.

    python benchmarks/per_step.py [--workload encoder] [--rounds 40] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import overhead  # noqa: E402
from report import machine, save  # noqa: E402

from modtimeline import Timeline  # noqa: E402
from modtimeline.capture.signals import TerminationGuard  # noqa: E402
from modtimeline.writers import write_trace  # noqa: E402
from modtimeline.writers.atomic import atomic_output  # noqa: E402
from modtimeline.writers.chrome import write_chrome_json  # noqa: E402


def measure(workload: str, rounds: int, folder: Path) -> dict[str, object]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, forward = overhead.WORKLOADS[workload]()
    path = folder / "per_step.json"

    def step() -> None:
        forward(model).backward()

    clock = time.perf_counter_ns
    times: dict[str, list[float]] = {}
    warm_times: dict[str, list[float]] = {}

    def timed(name: str, part: Callable[[], object], again: bool = True) -> object:
        """``part`` right after a step; with ``again``, once more at once (warm)."""
        begin = clock()
        result = part()
        times.setdefault(name, []).append((clock() - begin) / 1e3)
        if again:
            timed_warm(name, part)
        return result

    def timed_warm(name: str, part: Callable[[], object]) -> None:
        begin = clock()
        part()
        warm_times.setdefault(name, []).append((clock() - begin) / 1e3)

    for _ in range(3):  # (warm-up: imports, first writes)
        with Timeline(path):
            step()
    timeline = Timeline(path).start()
    step()
    data = timeline.trace_data()  # (a one-step trace's data, for the writes)
    timeline.stop()
    encoded = io.BytesIO()
    write_chrome_json(data, encoded)
    guard = TerminationGuard(lambda signum: True)

    def write_file() -> None:
        with atomic_output(path) as file:
            file.write(encoded.getvalue())

    for _ in range(rounds):
        begin = clock()
        step()
        times.setdefault("untraced step", []).append((clock() - begin) / 1e3)
        timeline = timed("make: Timeline(path)", lambda: Timeline(path))
        assert isinstance(timeline, Timeline)
        timed("start()", timeline.start, again=False)
        step()
        timed("stop(): all of it", timeline.stop, again=False)
        timeline = Timeline(path).start()
        step()
        timed("stop: trace_data(), resolve + metadata", timeline.trace_data)
        timeline.stop()
        step()
        timed("stop: write_trace(), encode + file", lambda: write_trace(data, path, "json"))
        step()
        timed("write_trace: the encode alone (into memory)", lambda: write_chrome_json(data, io.BytesIO()))
        step()
        timed("write_trace: the file alone (atomic write of the bytes)", write_file)
        step()
        timed("start: SIGTERM handler set", guard.install, again=False)
        guard.uninstall()
        timed_warm("start: SIGTERM handler set", guard.install)
        step()
        timed("stop: SIGTERM handler put back", guard.uninstall, again=False)
        guard.install()
        timed_warm("stop: SIGTERM handler put back", guard.uninstall)
        step()
        timed("nothing (the timer, cold)", lambda: None)
    untraced = statistics.median(times["untraced step"])
    parts = {name: {"median_us": statistics.median(values),
                    "p25_us": statistics.quantiles(values, n=4)[0] if len(values) > 1 else values[0],
                    "p75_us": statistics.quantiles(values, n=4)[2] if len(values) > 1 else values[0],
                    "of_untraced_step": statistics.median(values) / untraced,
                    "warm_us": statistics.median(warm_times[name]) if name in warm_times else None}
             for name, values in times.items() if name != "untraced step"}
    return {"machine": machine(), "workload": workload, "rounds": rounds, "untraced_step_us": untraced,
            "trace_bytes": len(encoded.getvalue()), "spans": len(data.spans), "parts": parts}


def markdown(result: dict[str, object]) -> str:
    parts = result["parts"]
    assert isinstance(parts, dict)
    lines = [f"Machine: {result['machine']}; workload {result['workload']}, untraced step "
             f"{float(result['untraced_step_us']) / 1e3:.2f} ms (wall time), a {result['spans']}-span trace of "
             f"{result['trace_bytes']:,} bytes; each part timed right after a step, medians of {result['rounds']} "
             "rounds.", "",
             "| part | µs | rounds' p25–p75 | of the untraced step | µs, run again at once (warm) |",
             "|---|---:|---:|---:|---:|"]
    for name, part in parts.items():
        warm = part.get("warm_us")
        lines.append(f"| {name} | {part['median_us']:.0f} | {part['p25_us']:.0f}–{part['p75_us']:.0f} | "
                     f"{100 * part['of_untraced_step']:.2f} % | {'' if warm is None else f'{warm:.0f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="encoder", choices=sorted(overhead.WORKLOADS))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = measure(args.workload, args.rounds, Path(folder))
    save("per_step", result, markdown(result), args.out)


if __name__ == "__main__":
    main()
