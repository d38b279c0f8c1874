"""GPU: the host time a Timeline adds per module call in steady state, and GPU span time
against torch.profiler's kernel times.

Steady state: each variant is one long-lived Timeline with a schedule (1 skipped step,
1 warm-up step, --steps active steps, written once at the end), as a long run uses it;
the variants take turns in shuffled rounds. Reported per variant: the median host time
of an active step (the first active step apart: it pays the device's first anchor), and,
taken within each round and then the median over rounds, its ratio to untraced steps
and the host µs added per module call. Variants:
untraced, ``device="cpu"`` (host spans only), ``device="cuda"`` (CUDA events at span
boundaries) and ``device="cuda", memory=True``. The table says whether the compiled hot
path was in use (the machine's torch and Python must match the build).

Then a matmul-heavy module: its GPU spans against torch.profiler's kernel sums, per
module. Needs CUDA; ``--fake`` runs the same steady-state table on the CPU with the fake
device backend (the host cost of the device-clock bookkeeping, no GPU).

    python benchmarks/gpu.py [--rounds 5] [--steps 20] [--fake] [--out benchmarks/results]
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
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from report import machine, save  # noqa: E402

from modtimeline import Schedule, Timeline  # noqa: E402
from modtimeline.native import loader as _native  # noqa: E402
from modtimeline.analysis.reader import read_trace, samples  # noqa: E402
from modtimeline.device.clock import CudaBackend  # noqa: E402
from modtimeline.device.fake import FakeBackend  # noqa: E402
from modtimeline.capture.recorder import native_hotpath  # noqa: E402


def workloads(device: str) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    layers: list[nn.Module] = []
    for _ in range(100):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    layer = nn.TransformerEncoderLayer(512, 8, 2048, batch_first=True)
    small = device == "cpu"
    return {
        "tiny-modules": (nn.Sequential(*layers).to(device), torch.randn(8 if small else 64, 256, device=device)),
        "transformer": (nn.TransformerEncoder(layer, 4 if small else 12, enable_nested_tensor=False).to(device),
                        torch.randn(2 if small else 16, 64 if small else 256, 512, device=device)),
    }


def count_calls(model: nn.Module, x: torch.Tensor) -> int:
    calls = 0

    def hook(module: nn.Module, args: object) -> None:
        nonlocal calls
        calls += 1

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    model(x)
    handle.remove()
    return calls


Variant = Callable[[Path], Any]


def variants(fake: bool) -> dict[str, Variant]:
    schedule = dict(wait=1, warmup=1, repeat=1)

    def timeline(device: str, memory: bool = False, python_marks: bool = False) -> Variant:
        def make(path: Path) -> Timeline:
            backend: Any = None
            if device == "cuda" and (fake or python_marks):
                backend = FakeBackend(lag_ns=5_000, native_marks=not python_marks) if fake else CudaBackend()
                backend.marks_type = None if python_marks else backend.marks_type
            return Timeline(path, device=device, memory=memory, device_backend=backend,
                            schedule=Schedule(active=1 << 30, **schedule))
        return make

    # device=cuda: the marks inside steps in C++ where _cuda_marks is built (the default);
    # "marks in Python": as before it (and as wherever it is not built).
    return {"untraced": lambda path: None, "Timeline device=cpu": timeline("cpu"),
            "Timeline device=cuda": timeline("cuda"),
            "Timeline device=cuda, marks in Python": timeline("cuda", python_marks=True),
            "Timeline device=cuda, memory": timeline("cuda", memory=True)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def maybe_step(timeline: Timeline | None) -> Iterator[None]:
    if timeline is None:
        yield
    else:
        with timeline.step():
            yield


def steady_state(rounds: int, steps: int, fake: bool, folder: Path) -> dict[str, Any]:
    device = "cpu" if fake else "cuda"
    results: dict[str, Any] = {}
    for name, (model, x) in workloads(device).items():
        for _ in range(3):
            model(x).sum().backward()
        sync(device)
        made = variants(fake)
        first: dict[str, list[float]] = {v: [] for v in made}
        step: dict[str, list[float]] = {v: [] for v in made}  # per round: median active step
        for round_ in range(rounds):
            order = list(made)
            random.Random(round_).shuffle(order)
            for variant in order:
                timeline = made[variant](folder / f"{name}.json")
                with timeline if timeline is not None else contextlib.nullcontext():
                    times = []
                    for _ in range(steps + 2):  # the schedule's skipped and warm-up steps first
                        sync(device)  # (the user's, between steps: steps start on an idle GPU)
                        start = time.perf_counter()
                        with maybe_step(timeline):
                            model(x).sum().backward()
                        times.append(time.perf_counter() - start)
                first[variant].append(times[2])
                step[variant].append(statistics.median(times[3:]))
        calls = count_calls(model, x)
        # Ratios and differences within each round (the machine's speed drifts between
        # rounds), then their medians.
        untraced = step["untraced"]
        results[name] = {"module_calls": calls, "variants": {
            v: {"step_ms": statistics.median(step[v]) * 1e3, "first_active_step_ms": statistics.median(first[v]) * 1e3,
                "ratio": statistics.median(a / b for a, b in zip(step[v], untraced)),
                "added_us_per_call": statistics.median((a - b) / calls * 1e6 for a, b in zip(step[v], untraced))}
            for v in made}}
    return results


def profiler_agreement(folder: Path) -> dict[str, Any]:
    """GPU span time per module against the kernels torch.profiler saw inside it."""

    class Heavy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(3)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x).square().mean()

    model = Heavy().cuda()
    x = torch.randn(4096, 4096, device="cuda")
    for _ in range(3):
        model(x).backward()
    path = folder / "heavy.json"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler, \
            Timeline(path) as timeline:
        for _ in range(10):
            with timeline.step():
                model(x).backward()
    kernel_us = sum(e.self_device_time_total for e in profiler.key_averages())
    per_key = samples(read_trace(path))
    span_us = sum(s.inclusive_ns for p in ("forward", "backward") for s in per_key[("Heavy", p, "cuda")].values()) / 1000
    return {"gpu_span_us": span_us, "profiler_kernel_us": kernel_us, "ratio": span_us / kernel_us}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fake", action="store_true", help="on the CPU, through the fake device backend")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not args.fake and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs CUDA (or --fake for the host-side table on the CPU); none here.", file=sys.stderr)
        return 2
    hot = native_hotpath() is not None
    hot_text = "compiled hot path in use" if hot else f"pure-Python hot path ({_native.why_not.get('native._hotpath')})"
    compiled_marks = not args.fake and CudaBackend().marks_type is not None
    hot_text += "; compiled device marks in use" if compiled_marks or args.fake else \
        f"; device marks in Python ({_native.why_not.get('native._cuda_marks')})"
    where = f"{machine()}, fake device backend" if args.fake else \
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    with tempfile.TemporaryDirectory() as tmp:
        results: dict[str, Any] = {"device": where, "compiled_hot_path": hot, "compiled_device_marks": compiled_marks,
                                   "steady_state": steady_state(args.rounds, args.steps, args.fake, Path(tmp))}
        if not args.fake:
            results["profiler"] = profiler_agreement(Path(tmp))
    lines = [f"{where}; {hot_text}. Medians over {args.rounds} shuffled rounds of {args.steps} active steps "
             "(one Timeline per round, scheduled).", "",
             "| workload | variant | step ms | first active step ms | × untraced | added host µs / module call |",
             "|---|---|---:|---:|---:|---:|"]
    for workload, rows in results["steady_state"].items():
        for variant, row in rows["variants"].items():
            lines.append(f"| {workload} | {variant} | {row['step_ms']:.2f} | {row['first_active_step_ms']:.2f} | "
                         f"{row['ratio']:.3f} | {row['added_us_per_call']:.2f} |")
    if "profiler" in results:
        p = results["profiler"]
        lines += ["", f"Matmul-heavy module: GPU spans {p['gpu_span_us'] / 1e3:.2f} ms vs torch.profiler kernels "
                      f"{p['profiler_kernel_us'] / 1e3:.2f} ms (ratio {p['ratio']:.3f})."]
    save("gpu-fake" if args.fake else "gpu", results, "\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
