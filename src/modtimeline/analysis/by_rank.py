"""The straggler view: the ranks of one run side by side (``modtimeline summary --by-rank``).

Per rank: its median step time and its gap to the median over ranks; a rank slower than
that median by more than ``threshold`` is flagged. Per module and phase: each rank's
median time per step, the slowest rank and the spread (slowest / median over ranks), the
widest spreads first; ``uneven`` when the slowest rank is above the median over ranks by
more than ``uneven_threshold`` and by more than ``uneven_floor_us``. Ranks come from the
spans' processes (pid = rank), so rank files and a merged file read the same.

Why medians over steps, and why 25 % and 20 µs: ranks of one DDP model on one machine
(2 and 4 gloo ranks of a 64-wide MLP, 20 steps, a 2-core box) differed per module by up
to 1.6x in *mean* time per step, all of it one 0.9 ms scheduling spike in one step of a
15 µs module; in *median* time per step the widest spread over six such runs was 1.10x,
on modules under 20 µs. A straggling module (slower on one rank every step) moves the
median; a spike does not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import TraceFormatError
from .reader import PHASES, Trace, samples
from .stats import median

DEFAULT_THRESHOLD = 0.05  # a rank whose median step is this much above the median over ranks is slow
DEFAULT_UNEVEN_THRESHOLD = 0.25  # a module whose slowest rank is this much above the median over ranks ...
DEFAULT_UNEVEN_FLOOR_US = 20.0  # ... and this many µs per step above it is uneven


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
    median_us: float  # median over ranks of each rank's median time per step
    max_us: float
    slowest_rank: int
    spread: float  # max / median
    uneven: bool  # spread beyond 1 + uneven_threshold and max - median beyond uneven_floor_us


@dataclass
class RankView:
    ranks: list[RankRow]
    modules: list[ModuleSpread]
    threshold: float
    run_id: str | None
    uneven_threshold: float = DEFAULT_UNEVEN_THRESHOLD
    uneven_floor_us: float = DEFAULT_UNEVEN_FLOOR_US

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "threshold": self.threshold, "uneven_threshold": self.uneven_threshold,
                "uneven_floor_us": self.uneven_floor_us,
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


def by_rank(traces: list[Trace], warmup: int = 1, threshold: float = DEFAULT_THRESHOLD, top: int | None = None,
            uneven_threshold: float = DEFAULT_UNEVEN_THRESHOLD,
            uneven_floor_us: float = DEFAULT_UNEVEN_FLOOR_US) -> RankView:
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
    times: dict[tuple[str, str], dict[int, float]] = {}  # (fqn, phase) -> rank -> median µs per step
    for rank, trace in per_rank.items():
        kept = trace.kept_steps(warmup)
        kept_steps[rank] = len(kept)
        durations = [trace.step_ns[s] for s in kept if s in trace.step_ns]
        step_us[rank] = median(durations) / 1000 if durations else None
        for (fqn, phase, device), per_step in samples(trace, warmup).items():
            if device != "cpu" or phase not in PHASES:
                continue
            # (a step the module did not run in counts as 0)
            per_kept = [per_step[s].inclusive_ns if s in per_step else 0 for s in kept]
            times.setdefault((fqn, phase), {})[rank] = median(per_kept) / 1000 if per_kept else 0.0

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
        uneven = spread > 1 + uneven_threshold and by[slowest] - typical > uneven_floor_us
        modules.append(ModuleSpread(fqn, phase, typical, by[slowest], slowest, spread, uneven))
    modules.sort(key=lambda m: (-m.spread, m.fqn, m.phase))
    if top is not None:
        modules = modules[:top]
    return RankView(ranks, modules, threshold, run_id, uneven_threshold, uneven_floor_us)
