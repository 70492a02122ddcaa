"""What a training run records, typed: each site's outcome in a round, the round's progress
line, the run's summary.

One schema for the federated run and `platform train --in-process` (both drive
`coordinator.rounds.run_rounds`). The coordinator writes these models as JSON
(`progress.jsonl`, `summary.json`, the run log); the launcher reads them back through the
same models, so a field renamed on one side fails on the other instead of going missing.
Values a site reports are validated here too (`SiteMetrics`): they come from the network.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "AuditInfo",
    "AuditSummary",
    "BaselineEvent",
    "DoneEvent",
    "EvalEvent",
    "ProgressEvent",
    "RoundEvent",
    "RoundStartEvent",
    "RunSummary",
    "Scores",
    "SecureAggInfo",
    "SiteEvent",
    "SiteMetrics",
    "SiteOutcome",
    "SiteRound",
    "SiteSummary",
    "StartEvent",
    "Status",
    "StepEvent",
]

Scores = dict[str, float | None]  # held-out "loss", "accuracy", "chance"; None where not finite


class Status(StrEnum):
    """A site's outcome in one round."""

    OK = "ok"  # trained; its update is in the round's aggregate
    REFUSED = "refused"  # the site declined (e.g. its privacy budget would be exceeded)
    FAILED = "failed"  # an error on the site, or its reply did not check
    OFFLINE = "offline"  # the SuperLink reports the node gone (no heartbeat)
    MISSING = "missing"  # no reply within the round's timeout, or the message expired
    SKIPPED = "skipped"  # not asked: no secure aggregation was possible this round
    # trained and uploaded (privacy budget spent), but the round's secure aggregation was lost
    NOT_AGGREGATED = "not_aggregated"


# Which list of the summary an outcome goes to.
_EVENT_LISTS = {
    Status.REFUSED: "refusals",
    Status.FAILED: "failures",
    Status.OFFLINE: "missing",
    Status.MISSING: "missing",
}


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_json(self) -> dict[str, object]:
        """The JSON object written to progress.jsonl / summary.json (unset optional fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)


class SiteMetrics(_Record):
    """What a site reports with its update (metrics record of the reply). A site's own
    training loss travels only without DP: no accountant covers it."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)  # a newer site may report more; no coercion

    round: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=0)
    seconds: float | None = Field(default=None, ge=0)
    dp: int | None = Field(default=None, ge=0, le=1)  # 1 under DP-SGD, 0 without
    sample_rate: float | None = Field(default=None, ge=0, le=1)
    loss: float | None = None
    epsilon: float | None = Field(default=None, ge=0)  # the site's spending on this run so far
    noise_multiplier: float | None = Field(default=None, ge=0)
    delta: float | None = Field(default=None, ge=0, lt=1)
    audits: int | None = Field(default=None, ge=0)  # spot-check verdicts it reports this round
    clipped: int | None = Field(default=None, ge=0)  # update values clipped into secure aggregation's range

    @field_validator("seconds", "sample_rate", "loss", "epsilon", "noise_multiplier", "delta")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        return value if value is None or math.isfinite(value) else None


class SiteOutcome(SiteMetrics):
    """A site's outcome in a round: its status, why (when not ok), and its metrics."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)  # written by the coordinator itself

    status: Status
    reason: str | None = None
    code: int | None = None  # the error reply's code (ours 100-102, Flower's 0-8)

    @classmethod
    def ok(cls, metrics: SiteMetrics) -> SiteOutcome:
        return cls(status=Status.OK, **metrics.model_dump(exclude_none=True))

    @classmethod
    def absent(cls, status: Status, reason: str, *, code: int | None = None) -> SiteOutcome:
        return cls(status=status, reason=reason, code=code)


class SecureAggInfo(_Record):
    """What secure aggregation reports for a round."""

    uploads: int | None = None  # masked uploads accepted
    threshold: int | None = None  # shares needed to unmask a dropped site
    survivors: int | None = None  # sites whose updates are in the sum
    dropped: int | None = None  # sites that uploaded nothing, their masks removed
    unmask_answers: int | None = None
    unmask_failures: dict[str, str] | None = None  # site node id -> why its unmask answer was refused
    error: str | None = None  # the round's secure aggregation was lost (or impossible)


class AuditInfo(_Record):
    """The spot checks of a round: audits recorded, nodes quarantined."""

    audits: int
    quarantined: list[str]


class StartEvent(_Record):
    event: Literal["start"] = "start"
    rounds: int
    dp: bool
    dp_epsilon: float | None = None
    secure_agg: bool
    aggregation: str
    sites_expected: int | None = None
    time: float | None = None  # Unix seconds, set by ProgressLog


class BaselineEvent(_Record):
    event: Literal["baseline"] = "baseline"
    round: int = 0
    rounds: int
    seconds: float
    eval: Scores
    dp: bool
    sites: dict[str, SiteOutcome] = Field(default_factory=dict)
    time: float | None = None


class RoundEvent(_Record):
    """One round: its held-out scores, each site's outcome, secure aggregation and audits."""

    event: Literal["round"] = "round"
    round: int
    rounds: int
    seconds: float
    nodes: int | None = None  # sites asked
    aggregated: int | None = None  # updates in the aggregate
    kept: bool = False  # no update: the weights are unchanged
    eval: Scores = Field(default_factory=dict)
    dp: bool = True
    sites: dict[str, SiteOutcome] = Field(default_factory=dict)
    secure_agg: SecureAggInfo | None = None
    verify: AuditInfo | None = None
    time: float | None = None


class RoundStartEvent(_Record):
    """A round's train messages are about to go out."""

    event: Literal["round_start"] = "round_start"
    round: int
    rounds: int
    nodes: int  # sites asked
    time: float | None = None


class EvalEvent(_Record):
    """Held-out scoring under way: `done` of `total` records scored (round 0 = the baseline)."""

    event: Literal["eval"] = "eval"
    round: int
    rounds: int
    done: int = Field(ge=0)
    total: int = Field(ge=0)
    seconds: float  # since this evaluation began
    time: float | None = None


class StepEvent(_Record):
    """A site finished one optimizer step of a round (written where the site trains: its own
    store's progress.jsonl, or the run's with --in-process). Carries no loss: under DP nothing
    about the records leaves the site outside the accountant."""

    event: Literal["step"] = "step"
    site: str
    round: int
    step: int = Field(ge=1)
    steps: int = Field(ge=1)
    seconds: float  # since the round's training began
    time: float | None = None


class DoneEvent(_Record):
    event: Literal["done"] = "done"
    adapter: str
    summary: str
    time: float | None = None


ProgressEvent = Annotated[
    StartEvent | BaselineEvent | RoundStartEvent | EvalEvent | StepEvent | RoundEvent | DoneEvent,
    Field(discriminator="event"),
]


class SiteRound(SiteOutcome):
    """A site's outcome, with the round it is for (a site's history)."""

    round: int | None = None


class SiteEvent(SiteOutcome):
    """A refusal, failure or absence, as the summary lists them."""

    round: int | None = None
    site: str
    node_id: int | None = None


class SiteSummary(_Record):
    node_id: int | None = None  # Flower node id (the in-process grid numbers its sites 1, 2, ...)
    epsilon: float | None = None  # its last reported spending; None without DP or any report
    rounds_trained: int  # rounds whose aggregate holds its update
    rounds_not_aggregated: int = 0  # rounds it trained for (budget spent) lost with secure aggregation
    history: list[SiteRound]


class AuditSummary(_Record):
    audits: int
    quarantined: list[str]


class RunSummary(_Record):
    """`summary.json`: the run's settings, every round, every site, and the final scores."""

    mode: Literal["federated", "local"] = "federated"
    config: dict[str, str | int | float | bool | list[str] | None]  # the run's TrainConfig
    dp: bool
    aggregation: str
    secure_agg: bool
    rounds: list[RoundEvent]
    sites: dict[str, SiteSummary]
    refusals: list[SiteEvent]
    failures: list[SiteEvent]
    missing: list[SiteEvent]
    final: Scores
    initial: Scores
    verify: AuditSummary | None = None
    adapter: str | None = None

    @staticmethod
    def list_for(status: Status) -> str | None:
        """The summary list (refusals, failures, missing) an outcome of `status` belongs to."""
        return _EVENT_LISTS.get(status)
