"""Instructions per module call, counted by valgrind (a figure the machine's load cannot move).

    python benchmarks/instructions.py [--workload tiny-modules] [--out benchmarks/results]

Each variant runs in its own process under ``valgrind --tool=callgrind`` twice, with
``--short`` and ``--long`` steady steps after 3 warm-up steps; the difference of the two
totals, divided by the extra steps and the workload's module calls, is the variant's cost
per module call with everything that does not grow with the steps (imports, start-up,
the Timeline's stop) taken out. Workloads and variants are overhead.py's: untraced, the
floor (no-op global hooks), a long-lived Timeline over marked steps. One torch and BLAS
thread: a spinning BLAS thread adds instructions at random. Needs valgrind (``apt-get
install valgrind``); issue 26's note quotes its figures.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import overhead
from report import machine, save

VARIANTS = ("untraced", "floor", "timeline")

# What one process runs: overhead.py's workload and row, `steps` steady steps after 3 warm-up ones.
CHILD = r"""
import contextlib, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[5])
import overhead
workload, variant, steps, trace = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
torch.manual_seed(0)
model, forward = overhead.WORKLOADS[workload]()
row = {"untraced": lambda: overhead.Row(contextlib.nullcontext), "floor": overhead.floor_row,
       "timeline": lambda: overhead.steady_row(Path(trace))}[variant]()
row.setup()
for _ in range(3 + steps):
    with row.around():
        forward(model).backward()
"""


def count(workload: str, variant: str, steps: int, folder: Path) -> int:
    """Instructions of one run under callgrind (its whole process)."""
    out = folder / f"{workload}.{variant}.{steps}.callgrind"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", CHILD, workload,
         variant, str(steps), str(folder / f"{variant}.{steps}.json"), str(Path(__file__).parent)],
        capture_output=True, text=True, env=env, check=False)
    found = re.search(r"refs:\s*([\d,]+)", result.stderr)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"{workload} {variant} ({steps} steps) failed:\n{result.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(overhead.WORKLOADS), default="tiny-modules")
    parser.add_argument("--short", type=int, default=2, help="steady steps of the short run")
    parser.add_argument("--long", type=int, default=12, help="steady steps of the long run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("instructions.py needs valgrind (apt-get install valgrind)")
    model, forward = overhead.WORKLOADS[args.workload]()
    calls_per_step = overhead.module_calls(model, lambda m: forward(m).backward())
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {(variant, steps): pool.submit(count, args.workload, variant, steps, Path(tmp))
                for variant in VARIANTS for steps in (args.short, args.long)}
        totals = {key: job.result() for key, job in jobs.items()}
    calls = calls_per_step * (args.long - args.short)
    per_call = {variant: (totals[variant, args.long] - totals[variant, args.short]) / calls for variant in VARIANTS}
    floor_added = per_call["floor"] - per_call["untraced"]
    timeline_added = per_call["timeline"] - per_call["untraced"]
    rows = [("untraced", per_call["untraced"], 0.0, ""),
            (overhead.FLOOR, per_call["floor"], floor_added, ""),
            (overhead.STEADY, per_call["timeline"], timeline_added, f"{timeline_added / floor_added:.2f}×")]
    lines = [f"Machine: {machine()}; valgrind callgrind, {args.workload} ({calls_per_step} module calls a "
             f"step), runs of {args.short} and {args.long} steady steps differenced.", "",
             "| row | instructions / module call (whole step) | added over untraced | × the floor's added |",
             "|---|---:|---:|---:|"]
    lines += [f"| {name} | {value:,.0f} | {added:,.0f} | {ratio} |" for name, value, added, ratio in rows]
    results = {"machine": machine(), "workload": args.workload, "calls_per_step": calls_per_step,
               "steps": [args.short, args.long], "totals": {f"{v}.{n}": total for (v, n), total in totals.items()},
               "per_call": per_call, "floor_added": floor_added, "timeline_added": timeline_added}
    save("instructions", results, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
