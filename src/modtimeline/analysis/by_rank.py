"""The straggler view: the ranks of one run side by side (``modtimeline summary --by-rank``).

Per rank: its median step time and its gap to the median over ranks; a rank slower than
that median by more than ``threshold`` is flagged. Per module and phase: each rank's
time per step, the slowest rank and the spread (slowest / median over ranks), the
widest spreads first. Ranks come from the spans' processes (pid = rank), so rank files
and a merged file read the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import TraceFormatError
from .reader import PHASES, Trace, samples
from .stats import median

DEFAULT_THRESHOLD = 0.05


@dataclass
class RankRow:
    rank: int
    hostname: str
    steps: int
    step_us: float | None  # median step time after warm-up; None when no steps were marked
    gap: float | None  # step_us / median over ranks - 1
    slow: bool


@dataclass
class ModuleSpread:
    fqn: str
    phase: str
    median_us: float  # median over ranks of the mean time per step
    max_us: float
    slowest_rank: int
    spread: float  # max / median
    uneven: bool  # spread beyond 1 + threshold


@dataclass
class RankView:
    ranks: list[RankRow]
    modules: list[ModuleSpread]
    threshold: float
    run_id: str | None

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "threshold": self.threshold,
                "slow_ranks": [r.rank for r in self.ranks if r.slow],
                "ranks": [asdict(r) for r in self.ranks], "modules": [asdict(m) for m in self.modules]}


def _one_run(traces: list[Trace]) -> str | None:
    runs = {t.metadata.get("run_id") for t in traces}
    runs.discard(None)
    if len(runs) > 1:
        raise TraceFormatError(f"these traces are of {len(runs)} different runs (run_id differs); a per-rank view "
                               "compares the ranks of one run: give the files of one run")
    return next(iter(runs), None)


def _hostnames(traces: list[Trace]) -> dict[int, str]:
    hosts: dict[int, str] = {}
    for trace in traces:
        metadata = trace.metadata
        entries = metadata.get("ranks") if metadata.get("merged") is True else [metadata]
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and isinstance(entry.get("rank", 0), int):
                hosts[entry.get("rank", 0)] = str(entry.get("hostname", ""))
    return hosts


def by_rank(traces: list[Trace], warmup: int = 1, threshold: float = DEFAULT_THRESHOLD, top: int | None = None) -> RankView:
    run_id = _one_run(traces)
    # Every rank's spans and step times, from however many files (windows) hold them.
    per_rank: dict[int, Trace] = {}
    for trace in traces:
        for span in trace.spans:
            rank = span.track[0]
            if rank not in per_rank:
                per_rank[rank] = Trace(trace.path, trace.metadata, [])
            per_rank[rank].spans.append(span)
        for rank, steps in trace.rank_step_ns.items():
            per_rank.setdefault(rank, Trace(trace.path, trace.metadata, [])).step_ns.update(steps)
    if len(per_rank) < 2:
        raise TraceFormatError("--by-rank needs the traces of two or more ranks (rank files, or a merged file)")

    step_us: dict[int, float | None] = {}
    kept_steps: dict[int, int] = {}
    times: dict[tuple[str, str], dict[int, float]] = {}  # (fqn, phase) -> rank -> µs per step
    for rank, trace in per_rank.items():
        kept = trace.steps()[warmup:]
        kept_steps[rank] = len(kept)
        durations = [trace.step_ns[s] for s in kept if s in trace.step_ns]
        step_us[rank] = median(durations) / 1000 if durations else None
        for (fqn, phase, device), per_step in samples(trace, warmup).items():
            if device != "cpu" or phase not in PHASES:
                continue
            total = sum(s.inclusive_ns for s in per_step.values())
            times.setdefault((fqn, phase), {})[rank] = total / max(len(kept), 1) / 1000

    known = [v for v in step_us.values() if v is not None]
    middle = median(known) if known else None
    hosts = _hostnames(traces)
    ranks = []
    for rank in sorted(per_rank):
        value = step_us[rank]
        gap = value / middle - 1 if value is not None and middle else None
        ranks.append(RankRow(rank, hosts.get(rank, ""), kept_steps[rank], value, gap,
                             gap is not None and gap > threshold))

    modules = []
    for (fqn, phase), by in times.items():
        if len(by) < 2:
            continue
        typical = median(list(by.values()))
        slowest = max(by, key=lambda r: (by[r], -r))
        spread = by[slowest] / typical if typical > 0 else 1.0
        modules.append(ModuleSpread(fqn, phase, typical, by[slowest], slowest, spread, spread > 1 + threshold))
    modules.sort(key=lambda m: (-m.spread, m.fqn, m.phase))
    if top is not None:
        modules = modules[:top]
    return RankView(ranks, modules, threshold, run_id)
