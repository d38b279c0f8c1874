"""What ``Timeline(compiled_detail=True)`` costs a compiled training step.

A model compiled with ``aot_eager`` (where the detail is leaf functions at submodule
boundaries) and with ``inductor`` (where it is measured from the kernels: provenance at
compile time, torch.profiler in the recorded steps) runs one training step per variant, interleaved (every round runs each variant once, in a fresh
random order), a Timeline per step with its file written:

* untraced;
* Timeline: the compiled call as one span (the default);
* Timeline(compiled_detail=True): a span for every submodule call inside it too.

The detail's graph differs from the default one (two opaque leaf calls and views at
each submodule boundary), so each variant has its own compiled model, compiled under its
own context. Dynamo keeps compiled graphs per code object and would give every instance
of a class the graph compiled first; each variant's root class here gets a forward of
its own code object, so each compiles its own. Reports medians over rounds of the step
time and its ratio to the untraced step of the same round.

With inductor, a Timeline per step means a profiler started and stopped per step, and
its events read, for the detail: the cost of a one-step diagnostic.

    python benchmarks/compiled_detail.py [--reps 21] [--backends aot_eager,inductor] [--workloads mlp,transformer]
                                         [--threads 1] [--out benchmarks/results]

The results file keeps the rows of what is not run (each with its own machine, load and
date); CPU time (the process's) is less moved by other load on a shared machine than
wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from report import machine, save  # noqa: E402

from modtimeline import Timeline  # noqa: E402


def mlp() -> tuple[Callable[[], nn.Module], torch.Tensor]:
    """8 x (Linear 256 + GELU), batch 64."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(8):
            layers += [nn.Linear(256, 256), nn.GELU()]
        return nn.Sequential(*layers)

    return make, torch.randn(64, 256)


def transformer() -> tuple[Callable[[], nn.Module], torch.Tensor]:
    """A 4-layer transformer encoder, batch 8 x 64 tokens x 128."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, batch_first=True)
        return nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)

    return make, torch.randn(8, 64, 128)


WORKLOADS = {"mlp": mlp, "transformer": transformer}


def own_graph(model: nn.Module, tag: str, backend: str) -> nn.Module:
    """``model`` with a root forward of its own code object (same class name, same code):
    Dynamo compiles a graph for it alone."""
    cls = type(model)
    forward = cls.forward
    code = forward.__code__.replace(co_name=f"{forward.__name__}_{tag}")
    own = types.FunctionType(code, forward.__globals__, code.co_name, forward.__defaults__, forward.__closure__)
    model.__class__ = type(cls.__name__, (cls,), {"forward": own})
    return torch.compile(model, backend=backend)  # type: ignore[return-value]


def measure(workload: str, reps: int, folder: Path, backend: str) -> dict[str, object]:
    make, x = WORKLOADS[workload]()
    # Every torch.compile(model) runs its model through one code object of torch's
    # (external_utils.wrap_inline's ``inner``), whose compiled entries count against
    # Dynamo's recompile limit (8) for all models together: start each workload afresh.
    torch._dynamo.reset()
    variants: dict[str, tuple[nn.Module, Callable[[], contextlib.AbstractContextManager[object]]]] = {
        "untraced": (own_graph(make(), "untraced", backend), contextlib.nullcontext),
        "Timeline": (own_graph(make(), "timeline", backend), lambda: Timeline(folder / "plain.json")),
        "Timeline(compiled_detail=True)": (own_graph(make(), "detail", backend),
                                           lambda: Timeline(folder / "detail.json", compiled_detail=True)),
    }
    for model, context in variants.values():  # compile each under its own context, outside the timing
        with context():
            model(x).sum().backward()
    spans = {}
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    order = random.Random(0)
    load = os.getloadavg()[0]
    for rep in range(reps + 2):
        names = list(variants)
        order.shuffle(names)
        for name in names:
            model, context = variants[name]
            model.zero_grad(set_to_none=True)
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            with context():
                model(x).sum().backward()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if rep >= 2:
                times[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
    load = max(load, os.getloadavg()[0])
    for name, path in (("Timeline", folder / "plain.json"), ("Timeline(compiled_detail=True)", folder / "detail.json")):
        events = json.loads(path.read_bytes())["traceEvents"]
        spans[name] = sum(1 for e in events if e.get("ph") == "X" and e.get("cat") in ("forward", "backward"))
    rows = {}
    for name, samples in times.items():
        ratios = [t / u for t, u in zip(samples, times["untraced"])]
        cpu_ratios = [t / u for t, u in zip(cpu[name], cpu["untraced"])]
        rows[name] = {"step_ms": statistics.median(samples) * 1e3, "ratio": statistics.median(ratios),
                      "cpu_ms": statistics.median(cpu[name]) * 1e3, "cpu_ratio": statistics.median(cpu_ratios),
                      "spans_per_step": spans.get(name, 0)}
    detail = json.loads((folder / "detail.json").read_bytes())["metadata"].get("compiled_detail")
    return {"variants": rows, "compiled_detail": detail, "machine": machine(), "reps": reps,
            "load_average": round(load, 2), "date": time.strftime("%Y-%m-%d")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--backends", default="aot_eager,inductor")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (on a shared, loaded machine 1 keeps OpenMP's barriers out of it)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # (torch.compile's notes on global hooks)
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = args.backends.split(",")
    # Rows of the workloads not run now stay as they were (each says its own machine and load).
    previous = args.out / "compiled_detail.json"
    results: dict[str, Any] = {"workloads": {}}
    with contextlib.suppress(OSError, ValueError):
        results = json.loads(previous.read_text())
        for result in results["workloads"].values():
            result.setdefault("machine", results.get("machine"))
            result.setdefault("reps", results.get("reps"))
    results.pop("machine", None)
    results.pop("reps", None)
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            for workload in args.workloads.split(","):
                key = workload if backend == "aot_eager" else f"{workload} ({backend})"
                results["workloads"][key] = measure(workload, args.reps, Path(tmp), backend)
    lines = ["A Timeline per step (file written); medians over interleaved rounds of the step's wall time and "
             "process CPU time, and of their ratios to the untraced step of the same round.", ""]
    for workload, result in results["workloads"].items():
        load = f", load average {result['load_average']}" if "load_average" in result else ""
        lines += [f"**{workload}** ({result.get('date', 'earlier run')}: {result.get('machine')}; "
                  f"{result.get('reps')} rounds{load})", "",
                  "| variant | step (ms) | × untraced | CPU (ms) | CPU × untraced | module spans per step |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, row in result["variants"].items():
            cpu = (f"{row['cpu_ms']:.2f} | {row['cpu_ratio']:.3f}" if "cpu_ms" in row else " | ")
            lines.append(f"| {name} | {row['step_ms']:.2f} | {row['ratio']:.3f} | {cpu} | "
                         f"{row['spans_per_step'] or ''} |")
        detail = result.get("compiled_detail")
        if detail and detail.get("coverage") is not None:
            lines.append(f"\nkernel time attributed to modules: {detail['coverage']:.1%} "
                         f"of {detail['kernel_ns'] / 1e3:.0f} µs")
        lines.append("")
    save("compiled_detail", results, "\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
