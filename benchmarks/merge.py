"""``modtimeline merge`` at job scale, and how well ranks' clocks are aligned.

1. Merge time and peak memory: --ranks synthetic rank files (a 12-block transformer's
   module tree, 148 modules, --steps steps each: 50 steps are 14,850 spans and 2.5 MB of
   JSON per rank),
   merged into .json and .pftrace, each merge in a fresh process that reports its own
   peak RSS; the same for 8 ranks, to show memory does not grow with the job.
2. Alignment: 2 and 4 gloo ranks on this machine, one with its clock shifted by 200 ms,
   enter and leave a Timeline --rounds times; per sample, the error bound the file states
   (half the tightest round trip) and the true error of the offset (the shift is known).

    python benchmarks/merge.py [--ranks 64] [--steps 50] [--rounds 20] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from report import machine, save  # noqa: E402

from modtimeline.format import (BACKWARD, BACKWARD_TRACK, FORWARD, FORWARD_TRACK, STEP, STEPS_TRACK,  # noqa: E402
                                FLOW_IN, FLOW_OUT, SpanColumns, Track, TraceData)
from modtimeline.writers import write_trace  # noqa: E402

SHIFT_NS = 200_000_000


def module_tree(blocks: int = 12) -> list[tuple[str, int]]:
    """(FQN, depth) of a GPT-like model, in forward order."""
    tree = [("GPT", 0), ("GPT.embed", 1)]
    for b in range(blocks):
        tree.append((f"GPT.blocks.{b}", 1))
        for part in ("ln_1", "attn", "ln_2", "mlp"):
            tree.append((f"GPT.blocks.{b}.{part}", 2))
            if part == "attn":
                tree += [(f"GPT.blocks.{b}.attn.{p}", 3) for p in ("q", "k", "v", "proj")]
            if part == "mlp":
                tree += [(f"GPT.blocks.{b}.mlp.{p}", 3) for p in ("fc", "act", "proj")]
    tree += [("GPT.ln_f", 1), ("GPT.head", 1)]
    return tree


def rank_trace(rank: int, world: int, steps: int) -> TraceData:
    tree = module_tree()
    names = [fqn for fqn, _ in tree] + [f"step {s}" for s in range(steps)]
    spans = SpanColumns()
    t = 1_000_000 + rank * 1000
    call = 0
    for step in range(steps):
        step_begin = t
        for category, track in ((FORWARD, FORWARD_TRACK), (BACKWARD, BACKWARD_TRACK)):
            # leaves 20 µs; a parent covers its children (depth-first layout)
            order = tree if category == FORWARD else list(reversed(tree))
            ends: list[tuple[int, int]] = []  # (depth, row)
            for index, (_, depth) in enumerate(order):
                while ends and ends[-1][0] >= depth:
                    _, row = ends.pop()
                    spans.end[row] = t
                    t += 1000
                row = len(spans)
                name = names.index(order[index][0])
                flow = FLOW_OUT if category == FORWARD else FLOW_IN
                spans.append(track, t, t, name, category, call + name, step, flow=flow)
                ends.append((depth, row))
                t += 20_000
            while ends:
                _, row = ends.pop()
                spans.end[row] = t
                t += 1000
        spans.append(STEPS_TRACK, step_begin, t, len(tree) + step, STEP, step, step)
        call += len(tree)
        t += 50_000
    metadata = {"tool": "modtimeline", "run_id": "bench", "world_size": world, "hostname": f"node{rank // 8}",
                "base_wall_time_ns": 10**18, "steps": list(range(steps)),
                "clock_sync": {"reference_rank": 0, "samples": [[0, -rank * 1000, 50_000], [t, -rank * 1000, 40_000]]}}
    data = TraceData(rank, 0, names, [Track(STEPS_TRACK, "steps"), Track(FORWARD_TRACK, "forward"),
                                      Track(BACKWARD_TRACK, "backward")], spans.in_nesting_order(), metadata=metadata)
    return data


_CHILD = """
import resource, sys, time
from pathlib import Path
from modtimeline.analysis.merge import merge
from modtimeline.analysis.reader import DEFAULT_LIMITS, trace_files
paths = trace_files([sys.argv[1]])
started = time.perf_counter()
merge(paths, sys.argv[2], DEFAULT_LIMITS)
seconds = time.perf_counter() - started
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def time_merge(folder: Path, output: Path) -> tuple[float, int]:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(output)], check=True, capture_output=True,
                          text=True)
    seconds, peak = done.stdout.split()
    return float(seconds), int(peak)


def merge_rows(ranks: int, steps: int, work: Path) -> list[dict]:
    rows = []
    for count in (8, ranks):
        folder = work / f"ranks{count}"
        folder.mkdir()
        for rank in range(count):
            write_trace(rank_trace(rank, count, steps), folder / f"job.rank{rank}.json")
        size = sum(p.stat().st_size for p in folder.iterdir())
        spans = len(rank_trace(0, count, steps).spans) * count
        for suffix in (".json", ".pftrace"):
            out = work / f"merged{count}{suffix}"
            seconds, peak = time_merge(folder, out)
            rows.append({"ranks": count, "output": suffix, "spans": spans, "input_mb": size / 2**20,
                         "output_mb": out.stat().st_size / 2**20, "seconds": seconds, "peak_rss_mb": peak / 2**20,
                         "spans_per_s": spans / seconds})
            out.unlink()
    return rows


def _alignment_worker(rank: int, world: int, folder: str, rounds: int) -> None:
    import torch
    import torch.distributed as dist

    if rank == world - 1:
        real = time.perf_counter_ns
        time.perf_counter_ns = lambda: real() + SHIFT_NS  # type: ignore[assignment]
    from modtimeline import Timeline

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    model = torch.nn.Linear(4, 4)
    samples = []
    for n in range(rounds):
        with Timeline(os.path.join(folder, f"a{n}-{{rank}}.json")) as timeline:
            model(torch.randn(2, 4)).sum().backward()
        metadata = json.loads(Path(timeline.written[0]).read_bytes())["metadata"]
        samples += metadata["clock_sync"]["samples"]
    truth = -SHIFT_NS if rank == world - 1 else 0
    if rank:
        Path(folder, f"samples{rank}.json").write_text(json.dumps(
            [{"error_bound_ns": e, "true_error_ns": abs(o - truth)} for _, o, e in samples]))
    dist.destroy_process_group()


def alignment_rows(rounds: int, work: Path) -> list[dict]:
    import torch.multiprocessing as mp

    rows = []
    for world in (2, 4):
        folder = work / f"align{world}"
        folder.mkdir()
        mp.spawn(_alignment_worker, args=(world, str(folder), rounds), nprocs=world)
        samples = [s for rank in range(1, world) for s in json.loads((folder / f"samples{rank}.json").read_text())]
        bounds = [s["error_bound_ns"] for s in samples]
        errors = [s["true_error_ns"] for s in samples]
        rows.append({"ranks": world, "samples": len(samples), "bound_median_us": statistics.median(bounds) / 1000,
                     "bound_max_us": max(bounds) / 1000, "true_error_median_us": statistics.median(errors) / 1000,
                     "true_error_max_us": max(errors) / 1000,
                     "within_bound": sum(e <= b for e, b in zip(errors, bounds)) / len(samples)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        merges = merge_rows(args.ranks, args.steps, Path(work))
        alignment = alignment_rows(args.rounds, Path(work))
    lines = [f"Machine: {machine()}.", "",
             "| ranks | output | spans | input MB | output MB | seconds | spans/s | peak RSS MB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['ranks']} | {r['output']} | {r['spans']:,} | {r['input_mb']:.0f} | {r['output_mb']:.0f} | "
              f"{r['seconds']:.1f} | {r['spans_per_s'] / 1e6:.2f} M | {r['peak_rss_mb']:.0f} |" for r in merges]
    lines += ["", f"Clock alignment on this machine ({args.rounds} Timelines per job, 2 samples each, one rank's "
              f"clock shifted by {SHIFT_NS / 1e6:.0f} ms):", "",
              "| ranks | samples | stated bound, median µs | max µs | true error, median µs | max µs | within bound |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['ranks']} | {r['samples']} | {r['bound_median_us']:.1f} | {r['bound_max_us']:.1f} | "
              f"{r['true_error_median_us']:.1f} | {r['true_error_max_us']:.1f} | {r['within_bound']:.0%} |"
              for r in alignment]
    save("merge", {"machine": machine(), "merge": merges, "alignment": alignment}, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
