"""What the two trace decoders share: the trace model they build (``TraceFile``), the
limits a file is read within, and the checks every value from a file goes through.

The model is the writers' own: one ``format.TraceData`` per process (rank). A decoder
reads either everything (``lossless``: tracks, spans with their flags, flows and launch
lags, counters; what merge rewrites, refusing what it could not keep), or only what the
analysis derives its view from (spans of our categories, track names; another tool's
events skipped, times relative to the file's base, since only differences are used).
"""

from __future__ import annotations

import math
import os
import zlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import TraceFileError, TraceFormatError
from ..format import APPROXIMATE, CATEGORIES, COMPILED, FUSED, INCOMPLETE, TOOL, Counter, SpanColumns, Track, TraceData, \
    check_version

T = TypeVar("T")


@dataclass(frozen=True)
class ReadLimits:
    """What one trace file may hold before reading it stops with a clear error (so a
    hostile or runaway file cannot take the machine's memory). ``--max-trace-mb`` and
    ``--max-events`` raise the first two."""

    max_bytes: int = 512 << 20  # the file's size, after gunzip
    max_events: int = 3_000_000  # trace events (spans, metadata)
    max_name: int = 4096  # characters in a module, track or category name


DEFAULT_LIMITS = ReadLimits()
# Timestamps and durations beyond this (µs, ~31 years) are damage, not time.
_MAX_MICROSECONDS = 1e15

CATEGORY_INDEX = {name: index for index, name in enumerate(CATEGORIES)}


@dataclass
class TraceFile:
    """A trace file as decoded: its metadata and one ``TraceData`` per process (rank)."""

    path: Path
    metadata: dict[str, Any]  # the file's own metadata (a merged file's: the job's)
    processes: list[TraceData]  # one per rank, in rank order

    @property
    def merged(self) -> bool:
        return self.metadata.get("merged") is True


def guarded_read(path: Path, read: Callable[[], T]) -> T:
    """``read()``, with whatever a damaged file makes the parsing raise turned into a
    ``TraceFormatError`` that names the file."""
    try:
        return read()
    except (TraceFileError, TraceFormatError):
        raise
    except MemoryError:
        raise TraceFormatError(f"{path}: too big to read in this process's memory") from None
    except RecursionError:
        raise TraceFormatError(f"{path}: nested too deeply") from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, UnicodeError, IndexError) as error:
        raise TraceFormatError(f"{path}: malformed trace ({type(error).__name__}: {error})") from None


def read_bytes(path: Path, limits: ReadLimits) -> bytes:
    """The file's bytes, gunzipped where it is gzip, within ``limits.max_bytes``."""
    try:
        size = os.stat(path).st_size
        if size > limits.max_bytes:
            raise TraceFormatError(f"{path}: {size / 2**20:.0f} MiB is over the {limits.max_bytes / 2**20:.0f} MiB "
                                   "limit (--max-trace-mb raises it)")
        with open(path, "rb") as stream:
            raw = stream.read(limits.max_bytes + 1)
    except OSError as error:
        raise TraceFileError(f"{path}: cannot read: {error.strerror or error}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    # gzip, inflated in bounded pieces: a small file can inflate to gigabytes.
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflate.decompress(raw, limits.max_bytes + 1)
        if len(out) > limits.max_bytes or inflate.unconsumed_tail:
            raise TraceFormatError(f"{path}: inflates to more than the {limits.max_bytes / 2**20:.0f} MiB limit "
                                   "(--max-trace-mb raises it)")
        if not inflate.eof:
            raise TraceFormatError(f"{path}: damaged or truncated gzip data")
    except zlib.error:
        raise TraceFormatError(f"{path}: damaged or truncated gzip data") from None
    return out


def checked_name(path: Path, value: Any, what: str, limits: ReadLimits) -> str:
    """A name from a trace file: a string of bounded length."""
    if not isinstance(value, str):
        raise TraceFormatError(f"{path}: {what} is {type(value).__name__}, not a string")
    if len(value) > limits.max_name:
        raise TraceFormatError(f"{path}: {what} is {len(value):,} characters long (limit {limits.max_name:,})")
    return value


def checked_int(path: Path, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 1 << 62:
        raise TraceFormatError(f"{path}: {what} is not a whole number ({str(value)[:40]!r})")
    return value


def checked_microseconds(path: Path, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or abs(value) > _MAX_MICROSECONDS:
        raise TraceFormatError(f"{path}: event {what} is not a usable time ({str(value)[:40]!r})")
    microseconds: float = value  # (an int stays one: µs * 1000 exact)
    return microseconds


def checked_metadata(path: Path, metadata: Any) -> dict[str, Any]:
    if not isinstance(metadata, dict) or metadata.get("tool") != TOOL:
        raise TraceFormatError(f"{path}: not a modtimeline trace (metadata.tool is not {TOOL!r})")
    problem = check_version(metadata)
    if problem:
        raise TraceFormatError(f"{path}: {problem}")
    return metadata


def span_flags(args: dict[str, Any]) -> int:
    """The flags (``format.INCOMPLETE`` ...) a span's arguments set."""
    return ((INCOMPLETE if args.get("incomplete") is True else 0) | (APPROXIMATE if args.get("approximate") is True else 0)
            | (COMPILED if args.get("compiled") is True else 0) | (FUSED if args.get("fused") is True else 0))


class ProcessRows:
    """One process's rows as they are decoded, turned into a ``TraceData`` at the end."""

    def __init__(self, rank: int, metadata: dict[str, Any]) -> None:
        self.rank = rank
        self.metadata = metadata
        self.names: list[str] = []
        self.name_index: dict[str, int] = {}
        self.tracks: dict[int, str] = {}
        self.spans = SpanColumns()
        self.counters: dict[tuple[int, str], Counter] = {}

    def name(self, text: str) -> int:
        index = self.name_index.get(text)
        if index is None:
            index = self.name_index[text] = len(self.names)
            self.names.append(text)
        return index

    def counter(self, tid: int, name: str) -> Counter:
        counter = self.counters.get((tid, name))
        if counter is None:
            counter = self.counters[tid, name] = Counter(name, tid, array("q"), array("q"))
        return counter

    def data(self, base_ns: int, in_nesting_order: bool) -> TraceData:
        tracks = [Track(tid, name) for tid, name in sorted(self.tracks.items())]
        spans = self.spans.in_nesting_order() if in_nesting_order else self.spans
        return TraceData(self.rank, base_ns, self.names, tracks, spans, list(self.counters.values()), self.metadata)


class Processes:
    """The processes of one file, by rank (pid). Lossless: the ranks its metadata names,
    and an event of any other pid is damage; otherwise a process per pid seen."""

    def __init__(self, path: Path, lossless: bool) -> None:
        self.path = path
        self.lossless = lossless
        self.base_ns = 0
        self.metadata: dict[str, Any] | None = None
        self.by_rank: dict[int, ProcessRows] = {}

    def declare(self, metadata: dict[str, Any]) -> None:
        """Take in the file's metadata (checked): its base and, lossless, its ranks."""
        self.metadata = metadata
        if not self.lossless:
            return
        path = self.path
        self.base_ns = checked_int(path, metadata.get("base_ns", 0), "metadata.base_ns")
        if metadata.get("merged") is True:
            ranks = metadata.get("ranks")
            if not isinstance(ranks, list) or not ranks:
                raise TraceFormatError(f"{path}: a merged trace without its ranks' metadata")
            for entry in ranks:
                entry = checked_metadata(path, entry)
                rank = checked_int(path, entry.get("rank"), "ranks[].rank")
                self.by_rank[rank] = ProcessRows(rank, entry)
        else:
            rank = checked_int(path, metadata.get("rank", 0), "metadata.rank")
            self.by_rank[rank] = ProcessRows(rank, metadata)

    def of(self, pid: Any) -> ProcessRows:
        rank = checked_int(self.path, pid, "event pid")
        process = self.by_rank.get(rank)
        if process is None:
            if self.lossless:
                raise TraceFormatError(f"{self.path}: an event of process {pid}, which the metadata does not name")
            process = self.by_rank[rank] = ProcessRows(rank, {})
        return process

    def trace_file(self) -> TraceFile:
        assert self.metadata is not None
        if not self.lossless:
            for process in self.by_rank.values():
                process.metadata = self.metadata
        processes = [self.by_rank[rank].data(self.base_ns, self.lossless) for rank in sorted(self.by_rank)]
        return TraceFile(self.path, self.metadata, processes)
