"""The coordinator's metrics, kept from the run's progress events: what `platform train
--metrics-port` serves (docs/metrics.md)."""

from __future__ import annotations

from corolla.federation.outcomes import BaselineEvent, ProgressEvent, RoundEvent, RoundStartEvent, Scores, Status
from corolla.metrics import CoordinatorMetrics


def record(metrics: CoordinatorMetrics, event: ProgressEvent) -> None:
    """Update `metrics` from one progress event (others are ignored)."""
    if isinstance(event, RoundStartEvent):
        metrics.current_round.set(event.round)
    elif isinstance(event, BaselineEvent):
        _scores(metrics, event.eval)
    elif isinstance(event, RoundEvent):
        metrics.current_round.set(event.round)
        ok = any(site.status is Status.OK for site in event.sites.values()) and not event.kept
        metrics.rounds.labels(outcome="ok" if ok else "failed").inc()
        metrics.round_duration.observe(event.seconds)
        _scores(metrics, event.eval)
        for name, site in event.sites.items():
            if site.epsilon is not None:
                metrics.epsilon_spent.labels(site=name).set(site.epsilon)


def _scores(metrics: CoordinatorMetrics, scores: Scores) -> None:
    accuracy, loss = scores.get("accuracy"), scores.get("loss")
    if accuracy is not None:
        metrics.held_out_accuracy.set(accuracy)
    if loss is not None:
        metrics.held_out_loss.set(loss)
