"""GPU: host time the tracer adds per module call, and GPU span time vs torch.profiler.

Needs CUDA (exits with a message otherwise). Interleaved repetitions, medians:

* untraced vs `Timeline(device="cpu")` (host spans only) vs `Timeline()` (CUDA events
  per span boundary), on a many-small-modules model and a transformer encoder;
* a matmul-heavy module: the sum of its GPU spans against the sum of kernel times
  torch.profiler measured on the same steps.

    python benchmarks/gpu.py [--reps 21] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from report import save  # noqa: E402

from modtimeline import Timeline  # noqa: E402
from modtimeline.analysis import read_trace, samples  # noqa: E402


def workloads() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    layers: list[nn.Module] = []
    for _ in range(100):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    layer = nn.TransformerEncoderLayer(512, 8, 2048, batch_first=True)
    return {
        "tiny-modules": (nn.Sequential(*layers).cuda(), torch.randn(64, 256, device="cuda")),
        "transformer": (nn.TransformerEncoder(layer, 12, enable_nested_tensor=False).cuda(),
                        torch.randn(16, 256, 512, device="cuda")),
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


def overhead(reps: int, folder: Path) -> dict[str, object]:
    results: dict[str, object] = {}
    for name, (model, x) in workloads().items():
        variants = {
            "untraced": contextlib.nullcontext,
            "Timeline host only": lambda: Timeline(folder / "cpu.json", device="cpu"),
            "Timeline with CUDA events": lambda: Timeline(folder / "gpu.json"),
        }
        times: dict[str, list[float]] = {v: [] for v in variants}
        for rep in range(reps + 2):
            for variant, make in variants.items():
                torch.cuda.synchronize()
                gc.collect()
                start = time.perf_counter()
                with make():
                    model(x).sum().backward()
                torch.cuda.synchronize()
                if rep >= 2:
                    times[variant].append(time.perf_counter() - start)
        calls = count_calls(model, x)
        base = statistics.median(times["untraced"])
        results[name] = {
            "module_calls": calls,
            **{v: {"step_ms": statistics.median(t) * 1e3, "ratio": statistics.median(t) / base,
                   "added_us_per_call": (statistics.median(t) - base) / calls * 1e6} for v, t in times.items()},
        }
    return results


def profiler_agreement(folder: Path) -> dict[str, float]:
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
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs CUDA; none here.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "overhead": overhead(args.reps, Path(tmp)), "profiler": profiler_agreement(Path(tmp))}
    lines = [f"Device: {results['device']}, torch {results['torch']}; medians of {args.reps} interleaved reps.", "",
             "| workload | variant | step (ms) | × untraced | added host µs / module call |", "|---|---|---:|---:|---:|"]
    for workload, rows in results["overhead"].items():
        for variant, row in rows.items():
            if variant != "module_calls":
                lines.append(f"| {workload} | {variant} | {row['step_ms']:.2f} | {row['ratio']:.3f} | "
                             f"{row['added_us_per_call']:.2f} |")
    p = results["profiler"]
    lines += ["", f"Matmul-heavy module: GPU spans {p['gpu_span_us'] / 1e3:.2f} ms vs torch.profiler kernels "
                  f"{p['profiler_kernel_us'] / 1e3:.2f} ms (ratio {p['ratio']:.3f})."]
    save("gpu", results, "\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
