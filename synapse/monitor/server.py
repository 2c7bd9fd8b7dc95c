"""The live endpoint: ``/metrics`` (Prometheus text format, from prometheus_client) and
``/health`` (JSON) on one port, served from a daemon thread.

    srv = synapse.monitor.serve(port=9400)          # 127.0.0.1 unless told otherwise
    ... a generate() loop, a synapse.stream model, a scenario ...
    srv.close()

``/health`` answers 200 while healthy or unverified and 503 once the residency monitor
found a violation (until ``acknowledge()``), so a load balancer can act on the code alone.
Requests are handled in the server's threads; the loop being observed only increments
counters.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import REGISTRY
from .residency_monitor import DEFAULT_INTERVAL_S, ResidencyMonitor


class _Handler(BaseHTTPRequestHandler):
    server_version = "synapse-monitor"

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
        elif path == "/health":
            h = self.server.monitor.health()
            code = 503 if h["status"] == "unhealthy" else 200
            self._send(code, "application/json", json.dumps(h).encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /health\n")

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # scrapes every few seconds: keep stderr quiet
        pass


class MonitorServer:
    def __init__(self, monitor: ResidencyMonitor, port: int, host: str, registry) -> None:
        self.monitor = monitor
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.monitor, self.httpd.registry = monitor, registry
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="synapse-metrics",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)
        self.monitor.stop()

    def __enter__(self) -> "MonitorServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(port: int = 9400, host: str = "127.0.0.1", *, monitor: ResidencyMonitor | None = None,
          interval_s: float = DEFAULT_INTERVAL_S, memory_type="driver") -> MonitorServer:
    """Start ``/metrics`` and ``/health`` on ``host:port`` (port 0: any free port) and the
    residency monitor's thread; returns the server (``.url``, ``.monitor``, ``.close()``)."""
    from ..errors import ScenarioError
    if monitor is None:
        monitor = ResidencyMonitor(memory_type=memory_type, interval_s=interval_s)
    try:
        srv = MonitorServer(monitor, port, host, REGISTRY)
    except OSError as e:
        raise ScenarioError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
    monitor.start()
    return srv
