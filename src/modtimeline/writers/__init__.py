"""Writers turn ``TraceData`` into files. They know nothing about torch."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, BinaryIO, cast

if TYPE_CHECKING:
    from ..format import TraceData

from ..errors import TraceFileError

FORMATS = ("json", "json.gz", "pftrace")

# File name endings and the format each names; ".json.gz" before ".json".
SUFFIX_FORMATS = ((".json.gz", "json.gz"), (".pftrace", "pftrace"), (".perfetto-trace", "pftrace"), (".json", "json"))
TRACE_SUFFIXES = tuple(suffix for suffix, _ in SUFFIX_FORMATS)


def format_for(path: str | Path, format: str | None = None) -> str:
    """The trace format named by ``format`` or, when it is None, by the file name."""
    if format is not None:
        if format not in FORMATS:
            raise TraceFileError(f"unknown trace format {format!r}; choose one of {', '.join(FORMATS)}")
        return format
    name = str(path).lower()
    for suffix, named in SUFFIX_FORMATS:
        if name.endswith(suffix):
            return named
    return "json"


def write_trace(data: TraceData, path: str | Path, format: str | None = None) -> int:
    """Write ``data`` atomically to ``path``; returns the number of bytes written."""
    from .atomic import atomic_output
    from .chrome import write_chrome_json

    fmt = format_for(path, format)
    with atomic_output(path) as stream:
        if fmt == "pftrace":
            from .perfetto import write_pftrace  # protobuf classes load only when needed

            write_pftrace(data, stream)
        elif fmt == "json.gz":
            import gzip

            with gzip.GzipFile(fileobj=stream, mode="wb", compresslevel=6, mtime=0) as gz:
                write_chrome_json(data, cast(BinaryIO, gz))
        else:
            write_chrome_json(data, stream)
        return stream.tell()


def write_processes(path: str | Path, metadata: dict[str, Any], processes: Iterable[tuple[TraceData, str, int]],
                    format: str | None = None) -> int:
    """Write several processes (ranks) into one file, atomically, each as it comes:
    ``processes`` yields (data on the file's time base ``metadata["base_ns"]``, process
    name, flow id base). Returns the number of bytes written."""
    from .atomic import atomic_output
    from .chrome import ChromeWriter

    fmt = format_for(path, format)
    with atomic_output(path) as stream:
        if fmt == "pftrace":
            from .perfetto import PftraceWriter

            writer = PftraceWriter(stream, metadata)
            for data, name, flow_base in processes:
                writer.add_process(data, name, flow_base)
        elif fmt == "json.gz":
            import gzip

            with gzip.GzipFile(fileobj=stream, mode="wb", compresslevel=6, mtime=0) as gz:
                chrome = ChromeWriter(cast(BinaryIO, gz), metadata)
                for data, name, flow_base in processes:
                    chrome.add_process(data, name, flow_base)
                chrome.close()
        else:
            chrome = ChromeWriter(stream, metadata)
            for data, name, flow_base in processes:
                chrome.add_process(data, name, flow_base)
            chrome.close()
        return stream.tell()
