"""Per-module summary of one or more traces: where each step's time goes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import TraceFormatError
from .reader import PHASES, Trace, samples
from .stats import median


def call_depths(fqns: Iterable[str]) -> dict[str, int]:
    """Each FQN's level in the call tree: 0 for a root, else its parent's plus one, the
    parent being its nearest ancestor FQN that was called (is in ``fqns``). A container
    that is never called itself (a ``ModuleList``) is no level: ``Llama.model.layers.0``
    sits right below ``Llama.model``. A wrapper's own call (``Net (DistributedDataParallel)``,
    ``Net.blocks.0 (CheckpointWrapper)``) sits at the level of the module it wraps, so a
    wrapped model has the levels of the plain one."""
    present = set(fqns)
    depths: dict[str, int] = {}

    def parent(fqn: str) -> str | None:
        at = fqn.rfind(".")
        while at > 0:
            if fqn[:at] in present:
                return fqn[:at]
            at = fqn.rfind(".", 0, at)
        return None

    for fqn in present:
        chain = []  # (walked up without recursion: a trace's names may nest deep)
        node: str | None = fqn
        while node is not None and node not in depths:
            chain.append(node)
            node = parent(node)
        level = -1 if node is None else depths[node]
        for name in reversed(chain):
            level += 1
            depths[name] = level
    return depths


@dataclass
class ModuleRow:
    """Mean per step, in µs. ``total``/``self`` by phase; GPU columns are 0 on CPU traces."""

    fqn: str
    depth: int  # level in the call tree (``call_depths``): a root is 0
    calls: float  # forward calls per step
    total_us: dict[str, float] = field(default_factory=dict)  # phase -> inclusive
    self_us: dict[str, float] = field(default_factory=dict)  # phase -> self
    gpu_us: dict[str, float] = field(default_factory=dict)  # phase -> inclusive on GPU tracks
    share_of_step: float | None = None  # (forward + backward) / step time (recompute lies inside backward)
    approximate_calls: int = 0  # calls whose backward end is only a bound (README: approximate)

    @property
    def cpu_total_us(self) -> float:
        return sum(self.total_us.values())


@dataclass
class Summary:
    rows: list[ModuleRow]
    steps: int
    step_us: float | None  # mean step time, when steps were marked
    has_gpu: bool
    files: list[str]
    # False: no trace marked steps (no ``timeline.step()``), each whole trace is one step
    steps_marked: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "steps_marked": self.steps_marked, "step_us": self.step_us,
                "has_gpu": self.has_gpu, "files": self.files, "modules": [asdict(r) for r in self.rows]}


def check_one_run(traces: list[Trace]) -> None:
    """Refuse traces of different runs of one rank (two runs sharing a folder): averaging
    them would mix two sets of numbers silently. Traces written before run ids pass."""
    first_of_run: dict[tuple[object, str], Trace] = {}
    for trace in traces:
        run = trace.metadata.get("run_id")
        if not isinstance(run, str):
            continue
        rank = trace.metadata.get("rank", 0)
        other = next((t for (r, known), t in first_of_run.items() if r == rank and known != run), None)
        if other is not None:
            raise TraceFormatError(f"{trace.path} and {other.path} are traces of different runs (run_id differs); "
                                   "summarise one run at a time, or pass --pool-runs to average them")
        first_of_run.setdefault((rank, run), trace)


def summarize(traces: list[Trace], warmup: int = 1, depth: int | None = None, top: int | None = None,
              pool_runs: bool = False) -> Summary:
    """Rows in model order (first forward first), or the ``top`` rows by total time."""
    if not pool_runs:
        check_one_run(traces)
    totals: dict[tuple[str, str, str], list[float]] = {}
    selfs: dict[tuple[str, str, str], list[float]] = {}
    calls: dict[str, list[int]] = {}
    first_seen: dict[str, int] = {}
    approximate: dict[str, int] = {}
    steps = 0
    step_times: list[int] = []
    for trace in traces:
        kept = trace.kept_steps(warmup)
        steps += len(kept)
        step_times += [trace.step_ns[s] for s in kept if s in trace.step_ns]
        for span in trace.spans:
            if span.phase == "forward" and span.device == "cpu":
                first_seen.setdefault(span.name, span.begin_ns)
        for key, per_step in samples(trace, warmup).items():
            approximate[key[0]] = approximate.get(key[0], 0) + sum(s.approximate for s in per_step.values())
            totals.setdefault(key, []).append(sum(s.inclusive_ns for s in per_step.values()))
            selfs.setdefault(key, []).append(sum(s.self_ns for s in per_step.values()))
            if key[1] == "forward" and key[2] == "cpu":
                calls.setdefault(key[0], []).extend(s.calls for s in per_step.values())
    if not steps:
        marked = sum(len(trace.kept_steps(0)) for trace in traces)
        raise TraceFormatError(f"every marked step is warm-up: {len(traces)} trace(s) with {marked} marked step(s), "
                               f"and --warmup leaves out the first {warmup} of each; pass --warmup 0 to see them, "
                               "or record more steps")
    step_us = sum(step_times) / len(step_times) / 1000 if step_times else None

    rows: dict[str, ModuleRow] = {}
    for (fqn, phase, device), values in totals.items():
        row = rows.get(fqn)
        if row is None:
            row = rows[fqn] = ModuleRow(fqn, 0, median(calls[fqn]) if fqn in calls else 0.0)
        per_step_us = sum(values) / steps / 1000
        if device == "cpu":
            row.total_us[phase] = per_step_us
            row.self_us[phase] = sum(selfs[(fqn, phase, device)]) / steps / 1000
        else:
            row.gpu_us[phase] = row.gpu_us.get(phase, 0.0) + per_step_us
    depths = call_depths(rows)
    for row in rows.values():
        row.depth = depths[row.fqn]
        row.approximate_calls = approximate.get(row.fqn, 0)
        for phase in PHASES:
            row.total_us.setdefault(phase, 0.0)
            row.self_us.setdefault(phase, 0.0)
        if step_us:
            # Recompute spans lie inside backward spans: counting them again would add up
            # to more than the module's share.
            row.share_of_step = (row.total_us["forward"] + row.total_us["backward"]) / step_us

    ordered = sorted(rows.values(), key=lambda r: (first_seen.get(r.fqn, 1 << 62), r.fqn))
    if depth is not None:
        ordered = [r for r in ordered if r.depth <= depth]
    if top is not None:
        ordered = sorted(ordered, key=lambda r: -r.cpu_total_us)[:top]
    files = [str(t.path) for t in traces]
    return Summary(ordered, steps, step_us, any(r.gpu_us for r in rows.values()), files,
                   any(t.steps_marked for t in traces))
