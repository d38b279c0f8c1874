"""Speed of `modtimeline summary` and `modtimeline diff` on a 1,000-module x 50-step trace.

Writes synthetic traces with the real writer (root + 999 children, forward and
backward, 50 steps: 100,000 spans each), then times the two commands end to end,
in-process, file reading included. Medians over --reps.

    python benchmarks/analysis.py [--modules 1000] [--steps 50] [--reps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from report import machine, save  # noqa: E402

from modtimeline.cli import main as cli  # noqa: E402
from tests import synthetic  # noqa: E402


def timed(argv: list[str], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            cli(argv)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = synthetic.write(Path(tmp) / "base.json", args.modules, args.steps, seed=1)
        candidate = synthetic.write(Path(tmp) / "candidate.json", args.modules, args.steps, seed=2, slow={7: 1.2})
        size_mb = base.stat().st_size / 1e6
        summary_s = timed(["summary", str(base)], args.reps)
        diff_s = timed(["diff", str(base), str(candidate)], args.reps)
    results = {"machine": machine(), "modules": args.modules, "steps": args.steps, "trace_mb": size_mb,
               "summary_s": summary_s, "diff_s": diff_s}
    table = "\n".join([
        f"Machine: {results['machine']}. {args.modules:,} modules x {args.steps} steps "
        f"({2 * args.modules * args.steps:,} spans, {size_mb:.1f} MB per trace); medians of {args.reps}.",
        "",
        "| command | seconds (goal < 2) |",
        "|---|---:|",
        f"| modtimeline summary TRACE | {summary_s:.2f} |",
        f"| modtimeline diff BASE CANDIDATE | {diff_s:.2f} |",
    ])
    save("analysis", results, table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
