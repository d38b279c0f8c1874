"""Read a trace file (``.json``, ``.json.gz`` or ``.pftrace``) into the one trace model,
``decoding.TraceFile``: the format is told from the bytes, then its one decoder
(``chrome_reader`` or ``pftrace_reader``) reads it.

``load_trace`` reads it losslessly (tracks, spans with their calls, flags, flows and
launch lags, counters, metadata; each process's spans in nesting order): ``modtimeline
merge`` rewrites files through it. ``reader.read_trace`` reads what the analysis uses.
``read_metadata`` reads only a file's metadata, from its start where it can.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from ..errors import TraceFileError, TraceFormatError
from ..gc_pause import paused_gc
from .chrome import read_chrome
from .decoding import ReadLimits, TraceFile, checked_metadata, guarded_read, read_bytes


def decode_trace(path: Path, limits: ReadLimits, lossless: bool) -> TraceFile:
    """``path`` decoded by the decoder of its format (see ``decoding`` for ``lossless``);
    ``TraceFormatError`` for anything but a readable modtimeline trace."""
    with paused_gc():
        return guarded_read(path, lambda: _decode(path, limits, lossless))


def _decode(path: Path, limits: ReadLimits, lossless: bool) -> TraceFile:
    raw = read_bytes(path, limits)
    if not raw:
        raise TraceFormatError(f"{path}: empty file")
    if raw.lstrip()[:1] == b"{":
        return read_chrome(path, raw, limits, lossless)
    from .pftrace import read_pftrace  # (protobuf: imported where a .pftrace is read, ~50 ms)

    return read_pftrace(path, raw, limits, lossless)


def load_trace(path: str | Path, limits: ReadLimits) -> TraceFile:
    """Read ``path`` completely: everything its writer wrote, each process's spans in
    nesting order, on the file's time base."""
    return decode_trace(Path(path), limits, lossless=True)


_PEEK_BYTES = 1 << 20  # a file's metadata comes first, within this many (decompressed) bytes


def read_metadata(path: str | Path, limits: ReadLimits) -> dict[str, Any]:
    """A trace file's metadata, read from its start (the writers put it first); the whole
    file is read only where the start does not hold it."""
    path = Path(path)
    with paused_gc():
        return guarded_read(path, lambda: _peek_metadata(path) or _decode(path, limits, lossless=True).metadata)


def _peek_metadata(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as raw:
            magic = raw.read(2)
            raw.seek(0)
            if magic == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=raw) as stream:
                    head = stream.read(_PEEK_BYTES)
            else:
                head = raw.read(_PEEK_BYTES)
    except OSError as error:
        raise TraceFileError(f"{path}: cannot read: {error.strerror or error}") from None
    except (EOFError, gzip.BadGzipFile):
        return None  # damaged: the full read says how
    if head.lstrip()[:1] == b"{":
        # {"displayTimeUnit":"ns","metadata":{...},"traceEvents":[
        at = head.find(b'"metadata":')
        if at < 0:
            return None
        try:
            value, _ = json.JSONDecoder().raw_decode(head.decode("utf-8", errors="replace"), at + len('"metadata":'))
        except ValueError:
            return None
        return checked_metadata(path, value)
    # .pftrace: the first TracePacket (field 1, length-delimited) holds the metadata.
    if head[:1] != b"\x0a":
        return None
    length, shift, at = 0, 0, 1
    while at < len(head) and at < 11:
        byte = head[at]
        length |= (byte & 0x7F) << shift
        shift += 7
        at += 1
        if not byte & 0x80:
            break
    if at + length > len(head):
        return None
    from google.protobuf.message import DecodeError
    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import TracePacket

    from .pftrace import packet_metadata

    try:
        packet = TracePacket.FromString(head[at: at + length])
    except DecodeError:
        return None  # damaged: the full read says how
    return packet_metadata(path, packet)
