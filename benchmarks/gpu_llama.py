"""GPU: a transformers Llama training step (random init) under ``Timeline(device="cuda")``.

Two things are measured, each against something the Timeline does not compute itself:

* synchronisations inside steps: the CUDA sync warnings torch raises under
  ``torch.cuda.set_sync_debug_mode("warn")``, and the host-blocking calls it does not see
  (``torch.cuda.synchronize``, ``Event.synchronize``/``query``/``elapsed_time``,
  ``Stream.synchronize``) counted by wrapping them: traced steps against untraced ones;
* each module's GPU time (its CUDA-event spans, summed per step) against torch.profiler's
  kernel time for the same module (Kineto's kernels put under the modules around their
  launch by ``modtimeline merge --profiler``, the CLI run as a user runs it).

Event spans include any idle gap between a module's kernels, kernel sums do not: on a
launch-bound step (a small model on a big GPU) they differ by the gaps. Our own event
records are among the gaps' causes: the profiler's trace says which gaps had one issued in
them (``record_gaps``). ``--size bound``
(the default) is big enough to keep the GPU busy; ``--size small`` shows the gap.

    python benchmarks/gpu_llama.py [--size bound|small] [--steps 6] [--out benchmarks/results] [--keep DIR]

``--keep DIR`` keeps the three traces (ours, the profiler's, the merged one), gzipped.
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import save  # noqa: E402

from modtimeline import Timeline  # noqa: E402

SIZES = {  # hidden, intermediate, layers, heads, batch, sequence
    "bound": (2048, 5632, 4, 16, 8, 1024),
    "small": (256, 512, 4, 8, 4, 128),
}


def build(size: str) -> tuple[torch.nn.Module, Callable[[], None]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, batch, length = SIZES[size]
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=length)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 32000, (batch, length), device="cuda")

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


class SyncCounter:
    """Sync warnings (sync debug mode) and host-blocking CUDA calls, counted by where the
    program was when they happened (``where``: set by the caller)."""

    def __init__(self) -> None:
        self.where = "outside"
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def hit(self, what: str) -> None:
        self.counts[self.where][what] += 1

    @contextmanager
    def counting(self) -> Iterator[None]:
        patched: list[tuple[Any, str, Any]] = []

        def wrap(owner: Any, name: str) -> None:
            original = getattr(owner, name)
            label = f"{owner.__name__}.{name}"

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.hit(label)
                return original(*args, **kwargs)

            patched.append((owner, name, original))
            setattr(owner, name, counted)

        def shown(message: Any, *args: Any, **kwargs: Any) -> None:
            if "synchroniz" in str(message):
                self.hit("sync debug warning")

        wrap(torch.cuda, "synchronize")
        for name in ("synchronize", "query", "elapsed_time"):
            wrap(torch.cuda.Event, name)
        wrap(torch.cuda.Stream, "synchronize")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = shown
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    yield
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        finally:
            for owner, name, original in reversed(patched):
                setattr(owner, name, original)


def sync_check(step: Callable[[], None], steps: int, folder: Path) -> dict[str, Any]:
    """Inside each step (where our hooks run) and at the step boundaries (where the
    Timeline may read finished events), traced against untraced steps."""
    counter = SyncCounter()
    with counter.counting():
        counter.where = "untraced steps"
        for _ in range(steps):
            step()
        counter.where = "outside"
    torch.cuda.synchronize()
    with counter.counting():
        timeline = Timeline(folder / "syncs.json", device="cuda", memory=True)
        with timeline:
            for _ in range(steps):
                counter.where = "step boundaries"
                with timeline.step():
                    counter.where = "inside traced steps"
                    step()
                    counter.where = "step boundaries"
                counter.where = "outside"
    return {"steps": steps, **{where: dict(counts) for where, counts in counter.counts.items()}}


def per_module_times(merged: Path, skip_steps: int) -> dict[tuple[str, str], dict[str, float]]:
    """(FQN, phase) -> {"events": µs of event spans, "kernels": µs of kernels under it}."""
    trace = orjson.loads(merged.read_bytes())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {(e.get("pid"), e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    times: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: {"events": 0.0, "kernels": 0.0})
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("forward", "backward"):
            continue
        if e.get("args", {}).get("step", 0) < skip_steps:
            continue
        track = names.get((e.get("pid"), e.get("tid")), "")
        if not track.startswith("cuda:"):
            continue
        kind = "kernels" if track.endswith("(kernels)") else "events"
        times[e["name"], e["cat"]][kind] += float(e["dur"])
    return dict(times)


def nesting_errors(path: Path) -> int:
    """Pairs of spans on one track that overlap without one containing the other."""
    trace = orjson.loads(path.read_bytes())
    by_track: dict[Any, list[tuple[int, int]]] = defaultdict(list)
    for e in trace["traceEvents"]:
        if e.get("ph") == "X":
            begin = round(e["ts"] * 1000)
            by_track[e["tid"]].append((begin, begin + round(e["dur"] * 1000)))
    errors = 0
    for rows in by_track.values():
        rows.sort(key=lambda r: (r[0], -r[1]))
        stack: list[int] = []
        for begin, end in rows:
            while stack and stack[-1] <= begin:
                stack.pop()
            if stack and end > stack[-1]:
                errors += 1
            stack.append(end)
    return errors


def record_gaps(kineto: Path) -> dict[str, Any]:
    """The GPU's gaps between consecutive operations (kernels, memsets, copies), split by
    whether one of our CUDA event records was issued between them: what a record costs
    the GPU, read off the profiler's own trace (launches and records carry correlation
    ids in issue order)."""
    import bisect
    import statistics

    trace = orjson.loads(kineto.read_bytes())
    events = [e for e in trace["traceEvents"] if isinstance(e, dict) and e.get("ph") == "X"]
    records = sorted(e["args"]["correlation"] for e in events
                     if e.get("cat") in ("cuda_runtime", "cuda_driver") and str(e.get("name")).startswith("cudaEventRecord")
                     and "correlation" in e.get("args", {}))
    work = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")
                   and "correlation" in e.get("args", {})), key=lambda e: e["ts"])
    split: dict[str, list[float]] = {"with our records": [], "without": []}
    for a, b in zip(work, work[1:]):
        first, second = a["args"]["correlation"], b["args"]["correlation"]
        if second < first:
            continue  # (issued out of order: another stream)
        ours = bisect.bisect_left(records, second) - bisect.bisect_right(records, first)
        split["with our records" if ours else "without"].append(b["ts"] - (a["ts"] + a["dur"]))
    profiled_us = work[-1]["ts"] + work[-1]["dur"] - work[0]["ts"] if work else 0.0
    return {"first_to_last_operation_us": profiled_us, "records": len(records),
            **{name: {"gaps": len(gaps), "median_us": statistics.median(gaps) if gaps else None,
                      "sum_us": sum(g for g in gaps if g > 0)} for name, gaps in split.items()}}


def agreement(step: Callable[[], None], steps: int, folder: Path) -> dict[str, Any]:
    ours, kineto, merged = folder / "llama.json", folder / "kineto.json", folder / "merged.json"
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        timeline = Timeline(ours, device="cuda")
        with timeline:
            for _ in range(steps):
                with timeline.step():
                    step()
        torch.cuda.synchronize()
    profiler.export_chrome_trace(str(kineto))
    done = subprocess.run([sys.executable, "-m", "modtimeline", "merge", "--profiler", str(kineto), str(ours),
                           "-o", str(merged)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"modtimeline merge --profiler failed: {done.stderr}")
    times = per_module_times(merged, skip_steps=1)  # step 0 pays the device clock's first anchor
    rows = []
    for (name, phase), t in sorted(times.items()):
        if t["kernels"] > 0:
            rows.append({"module": name, "phase": phase, "event_us": t["events"], "kernel_us": t["kernels"],
                         "ratio": t["events"] / t["kernels"] if t["kernels"] else None})
    return {"rows": rows, "nesting_errors": nesting_errors(ours), "merge_stderr": done.stderr.strip(),
            "record_gaps": record_gaps(kineto)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="bound")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--keep", type=Path, help="keep the traces here, gzipped")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu_llama.py needs CUDA; none here.", file=sys.stderr)
        return 2
    model, step = build(args.size)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    with tempfile.TemporaryDirectory() as tmp:
        results: dict[str, Any] = {"device": where, "size": args.size, "config": SIZES[args.size],
                                   "syncs": sync_check(step, 3, Path(tmp)),
                                   "agreement": agreement(step, args.steps, Path(tmp))}
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for name in ("llama.json", "kineto.json", "merged.json"):
                (args.keep / f"{args.size}-{name}.gz").write_bytes(gzip.compress((Path(tmp) / name).read_bytes(), 6))
    rows = results["agreement"]["rows"]
    total = sum(r["kernel_us"] for r in rows if r["module"] == "LlamaForCausalLM")
    big = [r for r in rows if r["kernel_us"] >= 0.01 * total]  # modules with >= 1 % of the step's kernel time
    worst = max(big, key=lambda r: abs(r["ratio"] - 1), default=None)
    results["worst_over_1pct"] = worst
    syncs = results["syncs"]
    lines = [f"{where}; Llama {args.size} {SIZES[args.size]} (hidden, intermediate, layers, heads, batch, sequence), "
             f"bf16, SGD; {args.steps} steps profiled, step 0 left out.", "",
             f"Syncs in {syncs['steps']} steps: untraced {syncs.get('untraced steps', 'none')}; traced, inside steps "
             f"{syncs.get('inside traced steps', 'none')}, at step boundaries {syncs.get('step boundaries', 'none')}, "
             f"outside steps (start, stop, write) {syncs.get('outside', 'none')}. "
             f"GPU span nesting errors: {results['agreement']['nesting_errors']}.", "",
             "| module | phase | GPU event spans ms | profiler kernels ms | ratio |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if r["module"].count(".") <= 4 and r in big:
            lines.append(f"| {r['module']} | {r['phase']} | {r['event_us'] / 1e3:.3f} | {r['kernel_us'] / 1e3:.3f} | "
                         f"{r['ratio']:.4f} |")
    if worst is not None:
        lines += ["", f"Largest difference among modules with >= 1 % of the kernel time ({len(big)} rows): "
                      f"{worst['module']} {worst['phase']} ratio {worst['ratio']:.4f}."]
    gaps = results["agreement"]["record_gaps"]
    lines += ["", "GPU gaps between consecutive operations, " + "; ".join(
        f"{name}: {row['gaps']} gaps, median {row['median_us']:.2f} µs, {row['sum_us'] / 1e3:.2f} ms in all"
        for name, row in gaps.items() if isinstance(row, dict) and row["median_us"] is not None)
        + f" ({gaps['records']} records, {gaps['first_to_last_operation_us'] / 1e3:.1f} ms from the first GPU operation to the last)."]
    save(f"gpu-llama-{args.size}", results, "\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
