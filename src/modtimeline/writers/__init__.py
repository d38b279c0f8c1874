"""Writers turn ``TraceData`` into files. They know nothing about torch."""

from __future__ import annotations

from pathlib import Path

from ..errors import TraceFileError

FORMATS = ("json", "json.gz", "pftrace")


def format_for(path: str | Path, format: str | None = None) -> str:
    """The trace format named by ``format`` or, when it is None, by the file name."""
    if format is not None:
        if format not in FORMATS:
            raise TraceFileError(f"unknown trace format {format!r}; choose one of {', '.join(FORMATS)}")
        return format
    name = str(path).lower()
    if name.endswith(".json.gz"):
        return "json.gz"
    if name.endswith(".pftrace") or name.endswith(".perfetto-trace"):
        return "pftrace"
    return "json"


def write_trace(data, path: str | Path, format: str | None = None) -> int:  # type: ignore[no-untyped-def]
    """Write ``data`` atomically to ``path``; returns the number of bytes written."""
    from .atomic import atomic_output

    fmt = format_for(path, format)
    with atomic_output(path) as stream:
        if fmt == "pftrace":
            from .perfetto import write_pftrace

            write_pftrace(data, stream)
        elif fmt == "json.gz":
            import gzip

            with gzip.GzipFile(fileobj=stream, mode="wb", compresslevel=6, mtime=0) as gz:
                from .chrome import write_chrome_json

                write_chrome_json(data, gz)
        else:
            from .chrome import write_chrome_json

            write_chrome_json(data, stream)
        return stream.tell()
