"""Instructions per module call, counted by valgrind (a figure the machine's load cannot move).

    python benchmarks/instructions.py [--model tiny|encoder] [--out benchmarks/results]

Each variant runs in its own process under ``valgrind --tool=callgrind`` twice, with
``--short`` and ``--long`` steady steps after 3 warm-up steps; the difference of the two
totals, divided by the extra steps and the model's module calls, is the variant's cost
per module call with everything that does not grow with the steps (imports, start-up,
the Timeline's stop) taken out. Variants: untraced; the floor (a no-op global forward
pre-hook and an always-called no-op forward hook, as issue 26 defines it); a long-lived
Timeline over marked steps. One torch and BLAS thread: a spinning BLAS thread adds
instructions at random. Needs valgrind (``apt-get install valgrind``); issue 26's note
quotes its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VARIANTS = ("untraced", "floor", "timeline")

# What one process runs: the model, the variant, `steps` steady steps after 3 warm-up ones.
CHILD = r"""
import sys, torch
from torch import nn
from torch.nn.modules import module as torch_module
torch.set_num_threads(1)
model_name, variant, steps, trace = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
if model_name == "tiny":
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(200)])
    x = torch.randn(4, 8)
else:
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=256, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)
    x = torch.randn(8, 32, 64)
def step():
    model(x).sum().backward()
timeline = None
if variant == "floor":
    torch_module.register_module_forward_pre_hook(lambda module, args: None)
    torch_module.register_module_forward_hook(lambda module, args, output: None, always_call=True)
elif variant == "timeline":
    from modtimeline import Timeline
    timeline = Timeline(trace)
    timeline.start()
for _ in range(3 + steps):
    if timeline is None:
        step()
    else:
        with timeline.step():
            step()
"""

CALLS = {"tiny": 601, "encoder": 58}


def count(model: str, variant: str, steps: int, folder: Path) -> int:
    """Instructions of one run under callgrind (its whole process)."""
    out = folder / f"{model}.{variant}.{steps}.callgrind"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", CHILD, model, variant,
         str(steps), str(folder / f"{variant}.{steps}.json")],
        capture_output=True, text=True, env=env, check=False)
    found = re.search(r"refs:\s*([\d,]+)", result.stderr)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"{model} {variant} ({steps} steps) failed:\n{result.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(CALLS), default="tiny")
    parser.add_argument("--short", type=int, default=2, help="steady steps of the short run")
    parser.add_argument("--long", type=int, default=12, help="steady steps of the long run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("instructions.py needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {(variant, steps): pool.submit(count, args.model, variant, steps, Path(tmp))
                for variant in VARIANTS for steps in (args.short, args.long)}
        totals = {key: job.result() for key, job in jobs.items()}
    calls = CALLS[args.model] * (args.long - args.short)
    per_call = {variant: (totals[variant, args.long] - totals[variant, args.short]) / calls for variant in VARIANTS}
    floor_added = per_call["floor"] - per_call["untraced"]
    timeline_added = per_call["timeline"] - per_call["untraced"]
    rows = [("untraced", per_call["untraced"], 0.0, ""),
            ("no-op global hooks (floor)", per_call["floor"], floor_added, ""),
            ("Timeline steady", per_call["timeline"], timeline_added, f"{timeline_added / floor_added:.2f}×")]
    machine = f"{platform.processor() or platform.machine()}, Python {platform.python_version()}"
    import torch

    lines = [f"Machine: {machine}, torch {torch.__version__}; valgrind callgrind, model {args.model} "
             f"({CALLS[args.model]} module calls a step), runs of {args.short} and {args.long} steady steps "
             "differenced.", "",
             "| row | instructions / module call (whole step) | added over untraced | × the floor's added |",
             "|---|---:|---:|---:|"]
    lines += [f"| {name} | {value:,.0f} | {added:,.0f} | {ratio} |" for name, value, added, ratio in rows]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "instructions.md").write_text(table + "\n")
    (args.out / "instructions.json").write_text(json.dumps(
        {"machine": machine, "torch": torch.__version__, "model": args.model, "calls_per_step": CALLS[args.model],
         "steps": [args.short, args.long], "totals": {f"{v}.{s}": n for (v, s), n in totals.items()},
         "per_call": per_call, "floor_added": floor_added, "timeline_added": timeline_added}, indent=1) + "\n")


if __name__ == "__main__":
    main()
