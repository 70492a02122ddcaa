"""The `/metrics` and `/health` endpoint: Prometheus text a real parser reads, 503 until ready,
nothing else served."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from corolla.metrics import (
    ClientMetrics,
    CoordinatorMetrics,
    MetricsEndpoint,
    Readiness,
    ServerMetrics,
    SiteMetrics,
    VerificationMetrics,
)
from corolla.metrics.endpoint import MetricsEndpointError


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_is_503_until_ready_then_200() -> None:
    metrics = ServerMetrics()
    readiness = Readiness()
    with MetricsEndpoint(metrics.registry, readiness) as endpoint:
        assert _get(f"{endpoint.url}/health") == (503, "starting\n")
        readiness.ready()
        assert _get(f"{endpoint.url}/health") == (200, "ready\n")
        readiness.not_ready("draining")
        assert _get(f"{endpoint.url}/health") == (503, "draining\n")


def test_metrics_are_prometheus_text_with_the_recorded_values() -> None:
    metrics = ServerMetrics()
    metrics.requests.labels(rpc="Forward", code="OK").inc(3)
    metrics.latency.labels(rpc="Forward").observe(0.004)
    metrics.sessions_open.set(2)
    with MetricsEndpoint(metrics.registry, Readiness()) as endpoint:
        status, text = _get(f"{endpoint.url}/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["corolla_server_requests"]
    assert requests.type == "counter"
    assert [(s.labels, s.value) for s in requests.samples if s.name.endswith("_total")] == [
        ({"rpc": "Forward", "code": "OK"}, 3.0)
    ]
    assert families["corolla_server_sessions_open"].samples[0].value == 2.0
    count = [s for s in families["corolla_server_request_duration_seconds"].samples if s.name.endswith("_count")]
    assert count[0].value == 1.0


def test_every_metric_name_follows_the_conventions() -> None:
    for kind in (ServerMetrics, ClientMetrics, VerificationMetrics, CoordinatorMetrics, SiteMetrics):
        names = [f.name for f in kind().registry.collect()]
        assert names, kind
        for name in names:
            assert name.startswith("corolla_"), name
            assert name == name.lower() and " " not in name


def test_other_paths_and_methods_are_refused() -> None:
    with MetricsEndpoint(ServerMetrics().registry, Readiness()) as endpoint:
        assert _get(f"{endpoint.url}/")[0] == 404
        assert _get(f"{endpoint.url}/metrics/../etc/passwd")[0] == 404
        request = urllib.request.Request(f"{endpoint.url}/metrics", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=5)
        assert info.value.code == 405


def test_a_port_in_use_is_a_typed_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(MetricsEndpointError, match="cannot open the metrics port"):
            MetricsEndpoint(ServerMetrics().registry, Readiness(), port=taken.getsockname()[1])
