"""``modtimeline merge``: the rank files of one job as one trace on rank 0's clock.

Each rank's file holds times on its own clock and, from ``Timeline``, samples of that
clock's offset to rank 0 (``metadata.clock_sync``: ``[local_ns, offset_ns, error_ns]``,
taken when the Timeline started and whenever it wrote). A time ``t`` of the file maps to
``t + offset(t)``, the offset interpolated linearly between the samples (so a clock that
drifts is followed) and held constant beyond them. A rank file without samples is put
on rank 0's clock through the wall clocks read at its window's start, and the merged
metadata says its error is unknown.

Streaming: a first pass reads each file's metadata; the second loads one file at a
time, maps its times and writes it out, so memory stays that of the largest file.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TraceFileError, TraceFormatError
from ..format import Counter, TraceData
from ..readers.load import load_trace, read_metadata
from ..readers.decoding import ReadLimits

FLOW_ID_STRIDE = 1 << 40  # flow ids of the k-th file start at k * FLOW_ID_STRIDE


@dataclass
class ClockMap:
    """Local times of one file -> rank 0's clock."""

    samples: list[tuple[int, int]]  # (local ns, offset ns), by local time
    error_ns: int | None  # the largest error bound of the samples; None: unknown
    source: str  # "reference" (rank 0), "process group" (measured), "wall clock" (fallback)

    def offset(self, local_ns: int) -> int:
        samples = self.samples
        if len(samples) == 1 or local_ns <= samples[0][0]:
            return samples[0][1]
        if local_ns >= samples[-1][0]:
            return samples[-1][1]
        i = bisect.bisect_right(samples, (local_ns, 1 << 62))
        (t0, o0), (t1, o1) = samples[i - 1], samples[i]
        return o0 + round((o1 - o0) * (local_ns - t0) / (t1 - t0))

    def map(self, times: array[int]) -> array[int]:
        if len(self.samples) == 1:
            shift = self.samples[0][1]
            return array("q", [t + shift for t in times])
        offset = self.offset
        return array("q", [t + offset(t) for t in times])


@dataclass
class _File:
    path: Path
    metadata: dict[str, Any]
    rank: int
    run_id: Any
    clock: ClockMap | None = None


@dataclass
class MergeResult:
    output: Path
    files: int
    ranks: list[dict[str, Any]] = field(default_factory=list)  # per rank: rank, host, offset, error, source


def merge(paths: list[Path], output: str | Path, limits: ReadLimits, force: bool = False,
          format: str | None = None) -> MergeResult:
    """Merge the rank files ``paths`` into ``output`` (.json, .json.gz or .pftrace)."""
    from ..writers import write_processes

    files = [_describe(path, limits) for path in paths]
    _check_one_job(files, force)
    reference = _reference_mapping(files)
    for file in files:
        file.clock = _clock_map(file, reference)
    base_ns = min(_mapped_base(file) for file in files)
    ranks = _rank_metadata(files)
    metadata = {
        "tool": files[0].metadata.get("tool"),
        "version": files[0].metadata.get("version"),
        "merged": True,
        "run_id": files[0].run_id,
        "world_size": max(int(f.metadata.get("world_size", 1)) for f in files),
        "clock": "perf_counter_ns of rank 0",
        "base_ns": base_ns,
        "files": [str(f.path) for f in files],
        "ranks": ranks,
    }

    def processes() -> Iterator[tuple[TraceData, str, int]]:
        for index, file in enumerate(files):
            loaded = load_trace(file.path, limits)
            for data in loaded.processes:
                yield _mapped(data, file.clock, base_ns), _process_name(file), index * FLOW_ID_STRIDE

    write_processes(output, metadata, processes(), format)
    summary = [{k: entry.get(k) for k in ("rank", "hostname", "clock_offset_ns", "clock_error_ns", "clock_source")}
               for entry in ranks]
    return MergeResult(Path(output), len(files), summary)


def _describe(path: Path, limits: ReadLimits) -> _File:
    metadata = read_metadata(path, limits)
    if metadata.get("merged") is True:
        raise TraceFormatError(f"{path}: already a merged trace; merge the rank files it was made from")
    rank = metadata.get("rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise TraceFormatError(f"{path}: metadata.rank is {rank!r}, not a rank")
    return _File(path, metadata, rank, metadata.get("run_id"))


def _check_one_job(files: list[_File], force: bool) -> None:
    if not files:
        raise TraceFileError("no trace files to merge")
    runs: dict[Any, Path] = {}
    for file in files:
        runs.setdefault(file.run_id, file.path)
    if len(runs) > 1 and not force:
        (run_a, path_a), (run_b, path_b) = list(runs.items())[:2]
        raise TraceFormatError(f"{path_a} and {path_b} are of different runs (run_id {run_a!r} and {run_b!r}); "
                               "merge the files of one job, or pass --force")
    seen: dict[tuple[int, Any], Path] = {}
    for file in files:
        key = (file.rank, tuple(file.metadata.get("steps") or ()))
        if key in seen and not force:
            raise TraceFormatError(f"{seen[key]} and {file.path} are both rank {file.rank} with the same steps; "
                                   "pass --force to merge them anyway")
        seen[key] = file.path


def _samples(file: _File) -> list[tuple[int, int, int]]:
    sync = file.metadata.get("clock_sync")
    if not isinstance(sync, dict) or not isinstance(sync.get("samples"), list):
        return []
    samples = []
    for sample in sync["samples"]:
        if (not isinstance(sample, list) or len(sample) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in sample) or sample[2] < 0):
            raise TraceFormatError(f"{file.path}: damaged metadata.clock_sync sample {str(sample)[:60]}")
        samples.append((sample[0], sample[1], sample[2]))
    return sorted(samples)


def _wall_offset(file: _File) -> int | None:
    """The file's (perf clock - wall clock), from the two read at its window's start."""
    wall, base = file.metadata.get("base_wall_time_ns"), file.metadata.get("base_ns")
    if isinstance(wall, int) and isinstance(base, int) and not isinstance(wall, bool):
        return base - wall
    return None


def _reference_mapping(files: list[_File]) -> int | None:
    """Rank 0's (perf clock - wall clock), for files that have no clock samples."""
    for file in files:
        if file.rank == 0:
            return _wall_offset(file)
    return None


def _clock_map(file: _File, reference: int | None) -> ClockMap:
    samples = _samples(file)
    world = file.metadata.get("world_size", 1)
    if file.rank == 0 or world == 1:
        return ClockMap([(0, 0)], 0, "reference")
    if samples:
        return ClockMap([(t, o) for t, o, _ in samples], max(e for _, _, e in samples), "process group")
    own = _wall_offset(file)
    if reference is None or own is None:
        raise TraceFormatError(f"{file.path}: rank {file.rank} has no clock samples and no rank 0 file to "
                               "align its wall clock with; merge it together with rank 0's file")
    # local perf -> wall -> rank 0's perf: t - own + reference
    return ClockMap([(0, reference - own)], None, "wall clock")


def _mapped_base(file: _File) -> int:
    base: int = file.metadata.get("base_ns", 0)
    assert file.clock is not None
    return base + file.clock.offset(base)


def _rank_metadata(files: list[_File]) -> list[dict[str, Any]]:
    """One entry per rank: its first file's metadata, with how its clock was mapped."""
    by_rank: dict[int, dict[str, Any]] = {}
    for file in sorted(files, key=lambda f: (f.rank, f.metadata.get("base_ns", 0))):
        assert file.clock is not None
        entry = by_rank.get(file.rank)
        if entry is None:
            entry = by_rank[file.rank] = dict(file.metadata)
            entry.pop("clock_sync", None)
            entry.update(clock_offset_ns=file.clock.samples[0][1], clock_error_ns=file.clock.error_ns,
                         clock_source=file.clock.source, clock_samples=[], files=[])
        entry["files"].append(str(file.path))
        entry["clock_samples"].extend([list(s) for s in _samples(file)])
        if file.clock.error_ns is None or entry["clock_error_ns"] is None:
            entry["clock_error_ns"] = None
        else:
            entry["clock_error_ns"] = max(entry["clock_error_ns"], file.clock.error_ns)
    return [by_rank[rank] for rank in sorted(by_rank)]


def _process_name(file: _File) -> str:
    host = file.metadata.get("hostname")
    return f"rank {file.rank} · {host}" if isinstance(host, str) and host else f"rank {file.rank}"


def _mapped(data: TraceData, clock: ClockMap | None, base_ns: int) -> TraceData:
    assert clock is not None
    spans = data.spans
    spans.begin = clock.map(spans.begin)
    spans.end = clock.map(spans.end)
    counters = [Counter(c.name, c.tid, clock.map(c.times), c.values) for c in data.counters]
    return TraceData(data.rank, base_ns, data.names, data.tracks, spans, counters, data.metadata)
