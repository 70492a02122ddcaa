"""Prometheus metrics and the `/health` + `/metrics` HTTP endpoint of every long-running node.

A leaf package (it imports only `corolla.errors`): each layer records into the metric set
of its own kind of node (`ServerMetrics`, `ClientMetrics`, `CoordinatorMetrics`,
`SiteMetrics`), each on the registry the process serves. Names follow the Prometheus
conventions: the `corolla_` prefix, base units in the name (`_seconds`, `_bytes`), counters
ending in `_total`. docs/metrics.md lists them all.
"""

from corolla.metrics.endpoint import MetricsEndpoint, Readiness
from corolla.metrics.families import (
    ClientMetrics,
    CoordinatorMetrics,
    ServerMetrics,
    SiteMetrics,
    VerificationMetrics,
)

__all__ = [
    "ClientMetrics",
    "CoordinatorMetrics",
    "MetricsEndpoint",
    "Readiness",
    "ServerMetrics",
    "SiteMetrics",
    "VerificationMetrics",
]
