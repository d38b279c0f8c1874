"""Tracer overhead per module call and per step: untraced vs torch's ModuleTracker, ModTracker,
torch.profiler(with_modules=True) and `with Timeline(path): step()` (file written).

Runs everything in one process, interleaved (every round runs each variant once, in a
fresh random order), and reports per-round ratios to the untraced step of the same
round, medians over rounds: this shared machine's speed swings by 30-50 % within
minutes, and a ratio taken within one round cancels that. Garbage is collected before
each timed run, so no variant pays for another's.

    python benchmarks/overhead.py [--reps 21] [--out benchmarks/results]

Prints a markdown table and writes overhead.json / overhead.md under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from report import machine, save

from modtimeline import ModuleTracker as OurTracker
from modtimeline import Timeline


def tiny_modules() -> tuple[nn.Module, Callable[[nn.Module], None]]:
    """200 x (Linear + ReLU): the per-call cost dominates."""
    layers: list[nn.Module] = []
    for _ in range(100):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    model = nn.Sequential(*layers)
    x = torch.randn(4, 16)

    def step(m: nn.Module) -> None:
        m(x).sum().backward()

    return model, step


def transformer() -> tuple[nn.Module, Callable[[nn.Module], None]]:
    """A 12-layer small transformer encoder, batch 8 x 64 tokens."""
    layer = nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=12, enable_nested_tensor=False)
    x = torch.randn(8, 64, 128)

    def step(m: nn.Module) -> None:
        m(x).sum().backward()

    return model, step


def cnn() -> tuple[nn.Module, Callable[[nn.Module], None]]:
    """A small ResNet-like CNN on 8 x 3 x 32 x 32 images."""

    class Residual(nn.Module):
        def __init__(self, ch: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(ch)
            self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(ch)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        *[Residual(32) for _ in range(4)], nn.MaxPool2d(2),
        *[Residual(32) for _ in range(4)], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    x = torch.randn(8, 3, 32, 32)

    def step(m: nn.Module) -> None:
        m(x).sum().backward()

    return model, step


def compiled_transformer() -> tuple[nn.Module, Callable[[nn.Module], None]]:
    """The transformer under torch.compile (inductor): a Timeline sees one call per step."""
    model, step = transformer()
    compiled = torch.compile(model)

    def compiled_step(m: nn.Module) -> None:
        step(compiled)

    return model, compiled_step


WORKLOADS = {"tiny-modules": tiny_modules, "transformer": transformer, "cnn": cnn,
             "transformer-compiled": compiled_transformer}


def module_calls(model: nn.Module, step: Callable[[nn.Module], None]) -> int:
    calls = 0

    def count(module: nn.Module, args: object) -> None:
        nonlocal calls
        calls += 1

    tracker = OurTracker()
    tracker.register_user_hooks(pre_fw_hook=count)
    with tracker:
        step(model)
    return calls


def variants(trace_dir: Path) -> dict[str, Callable[[], contextlib.AbstractContextManager[object]]]:
    from torch.distributed._tools.mod_tracker import ModTracker
    from torch.utils.module_tracker import ModuleTracker

    def profiler() -> contextlib.AbstractContextManager[object]:
        return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_modules=True)

    return {
        "untraced": contextlib.nullcontext,
        "torch ModuleTracker": ModuleTracker,
        "torch ModTracker": ModTracker,
        "torch.profiler": profiler,
        "Timeline (file written)": lambda: Timeline(trace_dir / "bench.json"),
    }


def measure(workload: str, reps: int, trace_dir: Path) -> dict[str, object]:
    torch.manual_seed(0)
    model, step = WORKLOADS[workload]()
    step(model)  # (a compiled workload compiles here, outside every measurement)
    calls = max(module_calls(model, step), 1)
    contexts = variants(trace_dir)
    times: dict[str, list[float]] = {name: [] for name in contexts}
    order = random.Random(0)
    for rep in range(reps + 2):  # the first two rounds warm up
        names = list(contexts)
        order.shuffle(names)
        for name in names:
            make = contexts[name]
            model.zero_grad(set_to_none=True)
            # Each variant starts with no garbage left by the previous one (torch.profiler
            # leaves plenty, which the next variant's allocations would pay to collect).
            gc.collect()
            start = time.perf_counter()
            with make():
                step(model)
            elapsed = time.perf_counter() - start
            if rep >= 2:
                times[name].append(elapsed)
    base = statistics.median(times["untraced"])
    rows = {}
    for name, samples in times.items():
        # Within each round: this variant against the untraced step of the same round.
        ratios = [t / u for t, u in zip(samples, times["untraced"])]
        added = [(t - u) / calls * 1e6 for t, u in zip(samples, times["untraced"])]
        rows[name] = {
            "step_ms": statistics.median(samples) * 1e3,
            "ratio": statistics.median(ratios),
            "added_us_per_call": statistics.median(added),
        }
    tracker_added = rows["torch ModuleTracker"]["added_us_per_call"]
    rows["Timeline (file written)"]["vs_ModuleTracker_added"] = (
        rows["Timeline (file written)"]["added_us_per_call"] / tracker_added if tracker_added > 0 else None
    )
    return {"module_calls_per_step": calls, "untraced_us_per_call": base / calls * 1e6, "variants": rows}


def markdown(results: dict[str, object]) -> str:
    lines = [f"Machine: {results['machine']}; medians of {results['reps']} interleaved rounds (ratios and added "
             "time taken within each round).", ""]
    for workload, result in results["workloads"].items():  # type: ignore[attr-defined]
        lines.append(f"**{workload}** ({result['module_calls_per_step']} module calls per step, "
                     f"untraced {result['untraced_us_per_call']:.1f} µs per call)")
        lines.append("")
        lines.append("| variant | step (ms) | × untraced | added µs / module call (fw+bw) |")
        lines.append("|---|---:|---:|---:|")
        for name, row in result["variants"].items():
            extra = ""
            if row.get("vs_ModuleTracker_added") is not None:
                extra = f" ({row['vs_ModuleTracker_added']:.2f}× ModuleTracker's)"
            lines.append(f"| {name} | {row['step_ms']:.2f} | {row['ratio']:.3f} | {row['added_us_per_call']:.2f}{extra} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results: dict[str, object] = {"machine": machine(), "reps": args.reps, "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads:
            results["workloads"][workload] = measure(workload, args.reps, Path(tmp))  # type: ignore[index]
            print(f"measured {workload}", file=sys.stderr)
    save("overhead", results, markdown(results), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
