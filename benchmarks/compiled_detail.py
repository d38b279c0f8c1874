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

    python benchmarks/compiled_detail.py [--reps 21] [--backends aot_eager,inductor] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

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
    return torch.compile(model, backend=backend)


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
    order = random.Random(0)
    for rep in range(reps + 2):
        names = list(variants)
        order.shuffle(names)
        for name in names:
            model, context = variants[name]
            model.zero_grad(set_to_none=True)
            gc.collect()
            start = time.perf_counter()
            with context():
                model(x).sum().backward()
            elapsed = time.perf_counter() - start
            if rep >= 2:
                times[name].append(elapsed)
    for name, path in (("Timeline", folder / "plain.json"), ("Timeline(compiled_detail=True)", folder / "detail.json")):
        events = json.loads(path.read_bytes())["traceEvents"]
        spans[name] = sum(1 for e in events if e.get("ph") == "X" and e.get("cat") in ("forward", "backward"))
    rows = {}
    for name, samples in times.items():
        ratios = [t / u for t, u in zip(samples, times["untraced"])]
        rows[name] = {"step_ms": statistics.median(samples) * 1e3, "ratio": statistics.median(ratios),
                      "spans_per_step": spans.get(name, 0)}
    detail = json.loads((folder / "detail.json").read_bytes())["metadata"].get("compiled_detail")
    return {"variants": rows, "compiled_detail": detail}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--backends", default="aot_eager,inductor")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # (torch.compile's notes on global hooks)
    backends = args.backends.split(",")
    results: dict[str, object] = {"machine": machine(), "reps": args.reps, "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            for workload in WORKLOADS:
                key = workload if backend == "aot_eager" else f"{workload} ({backend})"
                results["workloads"][key] = measure(workload, args.reps, Path(tmp), backend)  # type: ignore[index]
    lines = [f"Machine: {results['machine']}; backends {', '.join(backends)}; medians of {args.reps} interleaved "
             "rounds, a Timeline per step (file written).", ""]
    for workload, result in results["workloads"].items():  # type: ignore[attr-defined]
        lines += [f"**{workload}**", "", "| variant | step (ms) | × untraced | module spans per step |",
                  "|---|---:|---:|---:|"]
        for name, row in result["variants"].items():
            lines.append(f"| {name} | {row['step_ms']:.2f} | {row['ratio']:.3f} | {row['spans_per_step'] or ''} |")
        detail = result.get("compiled_detail")
        if detail and detail.get("coverage") is not None:
            lines.append(f"\nkernel time attributed to modules: {detail['coverage']:.1%} "
                         f"of {detail['kernel_ns'] / 1e3:.0f} µs")
        lines.append("")
    save("compiled_detail", results, "\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
