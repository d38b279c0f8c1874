"""Writer throughput and size: events/s, bytes per event on disk and in memory.

Records a real trace (a 4-layer torch.nn.TransformerEncoder language model, --steps
training steps under a Timeline: torch's own module names, as real models have),
then, for .json, .json.gz and .pftrace, times resolve + write and write alone
(medians over --reps), and reports:

* buffered events/s: events in the recording buffer turned into a file per second
  (resolve + write), the figure the issue's ">= 2 million events/s" asks about;
* spans/s: trace events (one per span) written per second, write alone;
* bytes per span on disk, and bytes per buffered event in memory;
* read back: the file read into spans as ``summary`` and ``diff`` read it.

    python benchmarks/writer.py [--steps 1000] [--reps 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import machine, save  # noqa: E402

from modtimeline import Timeline  # noqa: E402
from modtimeline.gc_pause import paused_gc  # noqa: E402
from modtimeline.spans import resolve as resolve_module  # noqa: E402
from modtimeline.spans.resolve import resolve  # noqa: E402
from modtimeline.writers import write_trace  # noqa: E402
from modtimeline.analysis.reader import read_trace  # noqa: E402


class LanguageModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(256, 64)
        layer = torch.nn.TransformerEncoderLayer(64, 4, 256, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.lm_head = torch.nn.Linear(64, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.encoder(self.embedding(tokens)))


def record(steps: int, folder: Path) -> Timeline:
    torch.manual_seed(0)
    model = LanguageModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (4, 32))
    timeline = Timeline(folder / "unused.json")
    with timeline:
        for _ in range(steps):
            with timeline.step():
                model(tokens).sum().backward()
                optimizer.step()
                optimizer.zero_grad()
        # keep the buffer: measure here, before the Timeline flushes and clears it
        buffer = timeline.buffer
        events = len(buffer)
        memory = buffer.bytes_used()
        names = timeline.recorder.module_names
        close = time.perf_counter_ns()
        args = (buffer.timestamps, buffer.codes, names, close)
        kwargs = {"links": (buffer.link_node, buffer.link_code), "base_ns": timeline._base_ns, "metadata": {"tool": "modtimeline"}}
        timeline._bench = (events, memory, args, kwargs)  # type: ignore[attr-defined]
    return timeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        timeline = record(args.steps, folder)
        events, memory, resolve_args, resolve_kwargs = timeline._bench  # type: ignore[attr-defined]
        resolve_times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            with paused_gc():  # as Timeline does when it flushes
                data = resolve(*resolve_args, **resolve_kwargs)
            resolve_times.append(time.perf_counter() - start)
        # The same resolve on its pure-Python twin (resolve.py without _resolve_cpu): what
        # the compiled one is worth at flush, and what GPU windows (always Python) pay.
        python_times = []
        compiled_resolve = resolve_module._resolve_cpu
        resolve_module._resolve_cpu = None
        try:
            for _ in range(args.reps):
                start = time.perf_counter()
                with paused_gc():
                    resolve(*resolve_args, **resolve_kwargs)
                python_times.append(time.perf_counter() - start)
        finally:
            resolve_module._resolve_cpu = compiled_resolve
        spans = len(data.spans)
        results = {"machine": machine(), "steps": args.steps, "buffered_events": events, "spans": spans,
                   "bytes_per_buffered_event_in_memory": memory / events,
                   "resolve_s": statistics.median(resolve_times), "python_resolve_s": statistics.median(python_times),
                   "compiled_resolve": compiled_resolve is not None, "formats": {}}
        for suffix in (".json", ".json.gz", ".pftrace"):
            path = folder / f"trace{suffix}"
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                with paused_gc():
                    write_trace(data, path)
                times.append(time.perf_counter() - start)
            write_s = statistics.median(times)
            size = path.stat().st_size
            # Read back as summary and diff read it (file -> spans).
            read_times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                read_trace(path)
                read_times.append(time.perf_counter() - start)
            results["formats"][suffix] = {
                "write_s": write_s,
                "spans_per_s": spans / write_s,
                "buffered_events_per_s": events / (write_s + results["resolve_s"]),
                "bytes_per_span": size / spans,
                "file_bytes": size,
                "read_s": statistics.median(read_times),
            }
    json_size = results["formats"][".json"]["file_bytes"]
    lines = [
        f"Machine: {results['machine']}. Trace: a 4-layer nn.TransformerEncoder LM, {args.steps} steps: "
        f"{events:,} buffered events -> {spans:,} spans; {results['bytes_per_buffered_event_in_memory']:.1f} "
        f"bytes per buffered event in memory; resolve {results['resolve_s'] * 1e3:.0f} ms "
        f"({events / results['resolve_s'] / 1e6:.2f} M events/s{'' if results['compiled_resolve'] else ', not compiled'})"
        f", pure-Python resolve {results['python_resolve_s'] * 1e3:.0f} ms "
        f"({events / results['python_resolve_s'] / 1e6:.2f} M events/s). Medians of {args.reps}.",
        "",
        "| format | write (ms) | spans/s (write) | buffered events/s (resolve + write) | bytes/span on disk | size vs .json "
        "| read back (ms) | read vs .json |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    json_read = results["formats"][".json"]["read_s"]
    for suffix, row in results["formats"].items():
        ratio = json_size / row["file_bytes"]
        lines.append(f"| {suffix} | {row['write_s'] * 1e3:.0f} | {row['spans_per_s'] / 1e6:.2f} M | "
                     f"{row['buffered_events_per_s'] / 1e6:.2f} M | {row['bytes_per_span']:.1f} | "
                     f"{'1×' if suffix == '.json' else f'{ratio:.1f}× smaller'} | {row['read_s'] * 1e3:.0f} | "
                     f"{row['read_s'] / json_read:.2f}× |")
    save("writer", results, "\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
