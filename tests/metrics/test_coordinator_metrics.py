"""The coordinator's metrics follow the run's progress events."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from corolla.federation.outcomes import BaselineEvent, RoundEvent, RoundStartEvent, SiteOutcome, Status
from corolla.metrics import CoordinatorMetrics
from corolla.platform.launch.run_metrics import record


def _values(metrics: CoordinatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_rounds_scores_and_budgets_follow_the_events() -> None:
    metrics = CoordinatorMetrics()
    record(metrics, BaselineEvent(rounds=2, seconds=1.0, eval={"loss": 6.9, "accuracy": 0.43}, dp=True))
    record(metrics, RoundStartEvent(round=1, rounds=2, nodes=2))
    assert _values(metrics)[("corolla_train_round", ())] == 1.0
    sites = {
        "site-0": SiteOutcome(status=Status.OK, epsilon=1.5),
        "site-1": SiteOutcome(status=Status.REFUSED, reason="budget", epsilon=2.9),
    }
    record(metrics, RoundEvent(round=1, rounds=2, seconds=12.5, eval={"loss": 3.7, "accuracy": 0.6}, sites=sites))
    record(metrics, RoundEvent(round=2, rounds=2, seconds=3.0, kept=True))
    values = _values(metrics)
    assert values[("corolla_train_rounds_total", (("outcome", "ok"),))] == 1.0
    assert values[("corolla_train_rounds_total", (("outcome", "failed"),))] == 1.0
    assert values[("corolla_train_round_duration_seconds_sum", ())] == 15.5
    assert values[("corolla_train_held_out_accuracy_ratio", ())] == 0.6
    assert values[("corolla_train_held_out_loss", ())] == 3.7
    assert values[("corolla_privacy_epsilon_spent", (("site", "site-0"),))] == 1.5
    assert values[("corolla_privacy_epsilon_spent", (("site", "site-1"),))] == 2.9
