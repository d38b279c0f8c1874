"""False alarms of `modtimeline diff` on sequential same-code runs, and what drift hides.

Models a shared machine: base and candidate of the *same* code recorded one after the
other, the machine's speed changed in between by a common factor drawn from +-D % (every
module alike), per-step noise 5 %. Counts, over --runs pairs, how often `diff` flags a
regression (a false alarm) with the drift correction and without it; and how often a
real 10 % slowdown of one module on top of such drift is found.

    python benchmarks/drift.py [--runs 200] [--modules 50] [--steps 20]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from report import machine, save  # noqa: E402

from modtimeline.analysis.diff import DiffConfig, diff  # noqa: E402
from tests import synthetic  # noqa: E402


def rates(runs: int, modules: int, steps: int, drift: float, max_drift: float, slow: float) -> tuple[float, float]:
    """(false-alarm rate, detection rate) over ``runs`` sequential pairs."""
    rng = random.Random(0)
    false_alarms = found = 0
    config = DiffConfig(warmup=0, max_drift=max_drift)
    for run in range(runs):
        factor = 1 + rng.uniform(-drift, drift)
        everything = {i: factor for i in range(1, modules)}
        base = [synthetic.in_memory(modules, steps, seed=3 * run)]
        same = [synthetic.in_memory(modules, steps, seed=3 * run + 1, slow=everything)]
        false_alarms += bool(diff(base, same, config).regressed)
        slowed = dict(everything)
        slowed[7] = factor * slow
        report = diff(base, [synthetic.in_memory(modules, steps, seed=3 * run + 2, slow=slowed)], config)
        found += any(m.fqn == "Model.layers.6" for m in report.regressed)
    return false_alarms / runs, found / runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--modules", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = []
    for drift in (0.0, 0.05, 0.10, 0.20):
        for label, max_drift in (("on", 0.25), ("off", 0.0)):
            false_rate, found = rates(args.runs, args.modules, args.steps, drift, max_drift, 1.10)
            rows.append({"drift": drift, "correction": label, "false_alarms": false_rate, "found_10pct": found})
    lines = [f"Machine: {machine()}. {args.runs} sequential pairs per row, {args.modules} modules x 2 phases, "
             f"{args.steps} steps per side, 5 % per-step noise; the machine's speed moved by a factor drawn from "
             "+-drift between the two runs.", "",
             "| drift | correction | false alarms (same code) | one module +10 % found |", "|---:|---|---:|---:|"]
    for row in rows:
        lines.append(f"| ±{row['drift']:.0%} | {row['correction']} | {row['false_alarms']:.1%} | "
                     f"{row['found_10pct']:.1%} |")
    save("drift", {"machine": machine(), "runs": args.runs, "rows": rows}, "\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
