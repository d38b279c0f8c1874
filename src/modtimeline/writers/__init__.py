"""Writers turn ``TraceData`` into files. They know nothing about torch."""

from __future__ import annotations

from pathlib import Path
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO, cast

if TYPE_CHECKING:
    from ..format import TraceData

from ..errors import TraceFileError
from .atomic import FileOutput, atomic_output

FORMATS = ("json", "json.gz", "pftrace")

# File name endings and the format each names; ".json.gz" before ".json".
SUFFIX_FORMATS = ((".json.gz", "json.gz"), (".pftrace", "pftrace"), (".perfetto-trace", "pftrace"), (".json", "json"))
TRACE_SUFFIXES = tuple(suffix for suffix, _ in SUFFIX_FORMATS)


def format_for(path: str | Path, format: str | None = None) -> str:
    """The trace format named by ``format`` or, when it is None, by the file name; a name
    with another ending (a typo: ``.pftrce``, ``.json.gzip``) is refused, never written as
    JSON under a name that says otherwise."""
    if format is not None:
        if format not in FORMATS:
            raise TraceFileError(f"unknown trace format {format!r}; choose one of {', '.join(FORMATS)}")
        return format
    name = str(path).lower()
    for suffix, named in SUFFIX_FORMATS:
        if name.endswith(suffix):
            return named
    raise TraceFileError(f"cannot tell the trace format of {os.fspath(path)!r} from its name: end it with "
                         ".json, .json.gz, .pftrace or .perfetto-trace, or name the format (format=...)")


@contextmanager
def trace_output(path: str | Path, fmt: str) -> Iterator[BinaryIO]:
    """The stream to write a trace to: a file that replaces ``path`` atomically when the
    block ends (for ``json.gz``, compressing into it)."""
    with _trace_file(path, fmt) as (stream, _):
        yield stream


@contextmanager
def _trace_file(path: str | Path, fmt: str) -> Iterator[tuple[BinaryIO, FileOutput]]:
    """``trace_output``'s stream and the file under it (whose size it counts)."""
    with atomic_output(path) as file:
        if fmt == "json.gz":
            import gzip

            with gzip.GzipFile(fileobj=file, mode="wb", compresslevel=6, mtime=0) as gz:
                yield cast(BinaryIO, gz), file
        else:
            yield cast(BinaryIO, file), file


def write_trace(data: TraceData, path: str | Path, format: str | None = None) -> int:
    """Write ``data`` atomically to ``path``; returns the number of bytes written."""
    from .chrome import write_chrome_json

    fmt = format_for(path, format)
    with _trace_file(path, fmt) as (stream, file):
        if fmt == "pftrace":
            from .perfetto import write_pftrace  # protobuf classes load only when needed

            write_pftrace(data, stream)
        else:
            write_chrome_json(data, stream)
    return file.bytes_written


def write_processes(path: str | Path, metadata: dict[str, Any], processes: Iterable[tuple[TraceData, str, int]],
                    format: str | None = None) -> int:
    """Write several processes (ranks) into one file, atomically, each as it comes:
    ``processes`` yields (data on the file's time base ``metadata["base_ns"]``, process
    name, flow id base). Returns the number of bytes written."""
    from .chrome import ChromeWriter

    fmt = format_for(path, format)
    with _trace_file(path, fmt) as (stream, file):
        if fmt == "pftrace":
            from .perfetto import PftraceWriter

            writer = PftraceWriter(stream, metadata)
            for data, name, flow_base in processes:
                writer.add_process(data, name, flow_base)
        else:
            chrome = ChromeWriter(stream, metadata)
            for data, name, flow_base in processes:
                chrome.add_process(data, name, flow_base)
            chrome.close()
    return file.bytes_written
