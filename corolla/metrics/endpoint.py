"""`/metrics` (Prometheus text) and `/health` over plain HTTP on a node's metrics port.

`/health` answers 200 `ready` once the node says so (a server: span loaded, gRPC listening,
announced) and 503 `starting` (or the reason it is not ready) before; orchestrators probe
it (Compose `healthcheck`, Kubernetes `readinessProbe`). Nothing else is served: any other
path is 404, any other method 405. The endpoint exposes figures, not data: no prompt, no
record, no key. Bind it to loopback or an operator network, not to the consortium's peers.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from corolla.errors import CorollaError


class MetricsEndpointError(CorollaError):
    """The metrics port cannot be opened (in use, not permitted)."""

    exit_code = 7  # a local launch failure, as a gRPC port in use


class Readiness:
    """What `/health` reports: not ready (with a reason) until `ready()` is called."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = False
        self._reason = "starting"

    def ready(self) -> None:
        with self._lock:
            self._ready, self._reason = True, "ready"

    def not_ready(self, reason: str) -> None:
        with self._lock:
            self._ready, self._reason = False, reason

    def state(self) -> tuple[bool, str]:
        with self._lock:
            return self._ready, self._reason


class MetricsEndpoint:
    """A daemon HTTP server for one registry and one readiness; `close()` stops it."""

    def __init__(self, registry: CollectorRegistry, readiness: Readiness, *, host: str = "127.0.0.1", port: int = 0):
        handler = _handler(registry, readiness)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise MetricsEndpointError(f"cannot open the metrics port {host}:{port}: {exc.strerror or exc}") from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handler(registry: CollectorRegistry, readiness: Readiness) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "corolla-metrics"
        sys_version = ""

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/health":
                ok, reason = readiness.state()
                self._send(200 if ok else 503, f"{reason}\n".encode(), "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found: /metrics or /health\n", "text/plain; charset=utf-8")

        def do_HEAD(self) -> None:
            self.do_GET()

        def _refuse(self) -> None:
            self._send(405, b"method not allowed\n", "text/plain; charset=utf-8")

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # probed every few seconds: keep quiet
            pass

    return Handler
