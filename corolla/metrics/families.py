"""The metric families, one class per kind of node, each registered on a given registry.

Latency buckets span a decode step on a small model (a few ms) to a training round (minutes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# seconds: 1 ms .. 10 min
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_BATCH = (1, 2, 4, 8, 16, 32, 64)


@dataclass(slots=True)
class ServerMetrics:
    """A block server (`platform serve`)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    requests: Counter = field(init=False)
    latency: Histogram = field(init=False)
    sessions_open: Gauge = field(init=False)
    kv_cache_used: Gauge = field(init=False)
    kv_cache_capacity: Gauge = field(init=False)
    batch_rows: Histogram = field(init=False)
    tokens: Counter = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "corolla_server_requests", "RPCs answered, by method and gRPC status code", ["rpc", "code"], registry=r
        )
        self.latency = Histogram(
            "corolla_server_request_duration_seconds",
            "Wall time of a unary RPC or of one step of a stream, by method",
            ["rpc"],
            buckets=_LATENCY,
            registry=r,
        )
        self.sessions_open = Gauge("corolla_server_sessions_open", "Inference sessions open now", registry=r)
        self.kv_cache_used = Gauge(
            "corolla_server_kv_cache_used_bytes", "KV cache bytes held by open sessions", registry=r
        )
        self.kv_cache_capacity = Gauge("corolla_server_kv_cache_capacity_bytes", "KV cache budget", registry=r)
        self.batch_rows = Histogram(
            "corolla_server_batch_rows", "Rows (sequences) per forward through the span", buckets=_BATCH, registry=r
        )
        self.tokens = Counter("corolla_server_tokens", "Token positions computed through the span", ["rpc"], registry=r)


@dataclass(slots=True)
class ClientMetrics:
    """A client generating through the swarm (`platform generate`, an API front)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    time_to_first_token: Histogram = field(init=False)
    inter_token_latency: Histogram = field(init=False)
    generated_tokens: Counter = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.time_to_first_token = Histogram(
            "corolla_client_time_to_first_token_seconds",
            "From the request to the first new token (session open + prefill + head)",
            buckets=_LATENCY,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "corolla_client_inter_token_latency_seconds", "Between two new tokens", buckets=_LATENCY, registry=r
        )
        self.generated_tokens = Counter("corolla_client_generated_tokens", "New tokens generated", registry=r)


@dataclass(slots=True)
class VerificationMetrics:
    """Spot checks and their consequences, wherever audits run (clients, sites, coordinator)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    spot_checks: Counter = field(init=False)
    quarantines: Counter = field(init=False)
    quarantined_nodes: Gauge = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.spot_checks = Counter(
            "corolla_spot_checks", "Spot-check verdicts, by kind of work and verdict", ["kind", "verdict"], registry=r
        )
        self.quarantines = Counter("corolla_quarantines", "Quarantine decisions recorded", registry=r)
        self.quarantined_nodes = Gauge("corolla_quarantined_nodes", "Nodes out of routing now", registry=r)


@dataclass(slots=True)
class CoordinatorMetrics:
    """The training coordinator (`platform train`)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    rounds: Counter = field(init=False)
    round_duration: Histogram = field(init=False)
    current_round: Gauge = field(init=False)
    epsilon_spent: Gauge = field(init=False)
    held_out_accuracy: Gauge = field(init=False)
    held_out_loss: Gauge = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.rounds = Counter("corolla_train_rounds", "Training rounds finished, by outcome", ["outcome"], registry=r)
        self.round_duration = Histogram(
            "corolla_train_round_duration_seconds", "Wall time of a round", buckets=_LATENCY, registry=r
        )
        self.current_round = Gauge("corolla_train_round", "The round in progress (0 before the first)", registry=r)
        self.epsilon_spent = Gauge(
            "corolla_privacy_epsilon_spent", "Each site's privacy budget spent (epsilon)", ["site"], registry=r
        )
        self.held_out_accuracy = Gauge(
            "corolla_train_held_out_accuracy_ratio", "Held-out label accuracy after the last round", registry=r
        )
        self.held_out_loss = Gauge("corolla_train_held_out_loss", "Held-out loss after the last round", registry=r)


@dataclass(slots=True)
class SiteMetrics:
    """A training site (its ClientApp)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    steps: Counter = field(init=False)
    step_duration: Histogram = field(init=False)
    epsilon_spent: Gauge = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.steps = Counter("corolla_site_dp_steps", "DP-SGD steps taken", registry=r)
        self.step_duration = Histogram(
            "corolla_site_dp_step_duration_seconds", "Wall time of a DP-SGD step", buckets=_LATENCY, registry=r
        )
        self.epsilon_spent = Gauge("corolla_site_privacy_epsilon_spent", "This site's epsilon spent", registry=r)
