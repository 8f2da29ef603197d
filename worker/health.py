"""HTTP endpoints for operators: /metrics (Prometheus), /healthz (alive), /readyz (ready).

Ready means: partitions are assigned and the last Redis operation succeeded, which is
what a load balancer or Kubernetes needs to know before trusting this worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.metrics import Metrics


class HealthServer:
    def __init__(
        self, metrics: Metrics, readiness: Callable[[], str | None], host: str, port: int
    ) -> None:
        """`readiness` returns None when ready, else why not."""
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._reply(200, b"ok\n")
                elif path == "/readyz":
                    why_not = readiness()
                    if why_not is None:
                        self._reply(200, b"ready\n")
                    else:
                        self._reply(503, f"not ready: {why_not}\n".encode())
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # scrapes every few seconds would drown the worker's own log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
