"""`--metrics-port` / `--metrics-host` of the long-running commands (`serve`, `swarm bootstrap`,
`train`): where the node serves `/health` and `/metrics` (corolla/metrics)."""

from __future__ import annotations

import argparse

from prometheus_client import CollectorRegistry

from corolla.metrics import MetricsEndpoint, Readiness
from corolla.platform.identity_args import check_port


def add_metrics_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("monitoring")
    group.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="N",
        help="serve GET /health and /metrics (Prometheus) over plain HTTP on this port (default: off)",
    )
    group.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="ADDR",
        help="address of the metrics port (default 127.0.0.1: keep it off the consortium's network)",
    )


def start_metrics(
    args: argparse.Namespace, registry: CollectorRegistry, readiness: Readiness
) -> MetricsEndpoint | None:
    """The endpoint `args` ask for, started (None without --metrics-port)."""
    if args.metrics_port is None:
        return None
    check_port(args.metrics_port, "--metrics-port", listen=True)
    endpoint = MetricsEndpoint(registry, readiness, host=args.metrics_host, port=args.metrics_port)
    print(f"metrics: {endpoint.url}/metrics and {endpoint.url}/health", flush=True)
    return endpoint
