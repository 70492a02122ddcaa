"""Reputation per (node, model, span): Beta counts with decay, and a sequential test for quarantine.

Pure bookkeeping over ledger events: no I/O and no clock (time is each event's `at`). The
ledger replays its events through `ReputationBook.replay`; the spot-check path feeds new
ones through `observe` and writes a `QuarantineEvent` when it returns a decision.

What moves reputation
---------------------
Only audited work does. A node's unaudited answers are never seen here, so a node that is
always wrong gains nothing: its score only ever moves on audits, and every audit of a wrong
answer is a FAIL. Per audit verdict:

- PASS: the Beta pass count gains 1, the sequential statistic moves down by log((1-p1)/(1-p0)).
- FAIL (a referee sided with the check against the subject): the fail count gains 1, the
  statistic moves up by log(p1/p0), and the event id joins the evidence. An event's
  `blamed` subject (the check server, when the referee sided with the primary) gets the
  same FAIL from that event.
- INCONCLUSIVE (no referee, or the referee agreed with nobody): nothing moves, and it does
  not count as an audit for decay or probation. Such a verdict says nothing about which
  answer was wrong, so its likelihood ratio between "honest" and "corrupting" is taken as
  1 (log 0). Counting it either way would let a flaky or dishonest referee move an honest
  node's reputation, or let a corrupting node hide behind unavailable referees.

Both counts decay: on every PASS or FAIL of a subject, its old counts are multiplied by
`decay` before the new one is added, so about 1/(1-decay) = 100 recent audits carry the
score. `score` is the posterior mean of honesty, (prior_pass + passes) / (prior_pass +
passes + prior_fail + fails). The counts stay below 1/(1-decay), so a PASS always raises
the pass count and a FAIL the fail count: a PASS never lowers the score, a FAIL never
raises it.

The sequential test
-------------------
A one-sided Page CUSUM of the Bernoulli log-likelihood ratio between H0, "the subject is
honest", and H1, "it corrupts a fraction p1 = dishonest_fail_rate of its outputs" (the
smallest corruption rate we must catch). FAILs come in two strengths, told apart by how far
the subject's output lay from the check's: `severity` = the larger of the comparison's two
figures over their tolerances (both recorded in the event), so 1 is the tolerance's edge.

- gross FAIL, severity >= gross_factor (4): the output is at least 4x further from the check
  than the tolerance allows, itself 4x the largest honest disagreement ever calibrated (16x
  in all). An honest server gets one at a rate of at most p0 = honest_fail_rate (1e-6).
- borderline FAIL, 1 < severity < gross_factor: past the tolerance but within reach of an
  honest server on an input or span the calibration did not see (a model audited with the
  fallback bounds, an unusually long context). Its honest rate is taken as the much higher
  p0b = honest_borderline_rate (1e-4), so it weighs less.

    S <- max(0, S + log(p1/p0))            on a gross FAIL
    S <- max(0, S + log(p1/p0b))           on a borderline FAIL
    S <- max(0, S + log((1-p1)/(1-p0)))    on a PASS
    quarantine when S >= h = log(1/alpha), alpha = false_quarantine

With the defaults p0 = 1e-6, p0b = 1e-4, p1 = 0.01, alpha = 1e-3:

    gross FAIL:      log(0.01 / 1e-6)  = log(1e4)  = +9.2103
    borderline FAIL: log(0.01 / 1e-4)  = log(1e2)  = +4.6052
    one PASS:        log(0.99 / 0.999999)          = -0.0101
    threshold:       log(1 / 1e-3)     = log(1e3)  =  6.9078

so a single gross FAIL, from any history (S >= 0 always), crosses the threshold, while one
borderline FAIL never does: it takes two with at most (2 x 4.6052 - 6.9078) / 0.0101 = 229
PASSes between them (or three within about 1,140). A gross FAIL must be enough on its own: a
node corrupting f = 1% of its outputs grossly is caught within n audits with probability
1-(1-f)^n, which is 0.9976 at n = 600 with one FAIL but only about 0.983 if two were needed.
It is safe because an honest node's refereed gross-FAIL rate is about 0: a FAIL needs the
check and a third run (the referee) to agree with each other and not with the subject,
and a gross one 16x beyond the largest honest disagreement measured (`tolerance.py`). A
corruption too subtle to be gross (1% noise against an int8 pair) is caught only as
repeated borderline FAILs, and a 1% rate of those mostly is not: that is the price of not
quarantining honest servers at a tolerance's edge. INCONCLUSIVE adds log 1 = 0, so no number
of them ever quarantines anyone.

In general one gross FAIL suffices when log(p1/p0) >= log(1/alpha), that is p0 <= alpha * p1
(`ReputationPolicy.fails_to_quarantine` gives the count, `borderline_fails_to_quarantine` the
borderline one).

Why clamped at 0 (Page's form, not Wald's SPRT): Wald's statistic keeps going down on every
PASS, so 10,000 honest audits would bank 10,000 * 0.0101 = 101 nats of credit, and with a
looser policy a node could then corrupt a burst of outputs before the statistic came back
up. Clamped, a long honest past buys nothing: detection after a node turns bad takes the
same number of FAILs however long its honest history. Each excursion above 0 is a Wald
test between 0 and h, which under H0 reaches h with probability at most e^-h = alpha.

Quarantine and re-admission
---------------------------
A subject is quarantined when `observe` returns a `QuarantineDecision` (the caller writes
the `QuarantineEvent`; replaying it later changes nothing), or when a `QuarantineEvent` is
observed (also an operator's or another book's). `quarantined_nodes(model_id)` is what
routing excludes at its next refresh. Audits keep being counted while quarantined (late
reports), but never yield a second decision.

A quarantined node comes back only through a `ReadmitEvent` (`platform audit readmit`,
an operator command). It then starts on probation:

- its SPRT statistic restarts at 0 (its earlier FAILs were judged by the operator);
- its Beta counts keep their history (the score still shows the past);
- for its next `probation_audits` audits (PASS or FAIL) `audit_rate` returns at least
  `probation_audit_rate` instead of the base rate, so a still-corrupting node shows up
  again quickly;
- any FAIL during probation quarantines it again, whatever the statistic says.

Events are applied in ledger order, and an event id already seen is ignored (a resent
event is not counted twice).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from corolla.verify.errors import VerifyError
from corolla.verify.events import AuditEvent, QuarantineEvent, ReadmitEvent, Subject, Verdict

__all__ = ["QuarantineDecision", "ReputationBook", "ReputationPolicy", "SubjectState", "severity"]

_MAX_EVIDENCE = 1000  # QuarantineEvent.evidence holds at most this many event ids

Event = AuditEvent | QuarantineEvent | ReadmitEvent


@dataclass(frozen=True, kw_only=True, slots=True)
class ReputationPolicy:
    decay: float = 0.99  # old Beta counts are multiplied by this on each audit of the subject
    prior_pass: float = 1.0  # Beta prior: pseudo-passes
    prior_fail: float = 1.0  # Beta prior: pseudo-fails
    honest_fail_rate: float = 1e-6  # p0: refereed gross-FAIL rate of an honest node
    honest_borderline_rate: float = 1e-4  # p0b: refereed borderline-FAIL rate of an honest node
    gross_factor: float = 4.0  # a FAIL this many times beyond its tolerance (or more) is gross
    dishonest_fail_rate: float = 0.01  # p1: smallest corruption rate that must be caught
    false_quarantine: float = 1e-3  # alpha: threshold = log(1/alpha)
    probation_audit_rate: float = 0.5  # audit rate of a re-admitted node while on probation
    probation_audits: int = 100  # audits a re-admitted node spends on probation

    def __post_init__(self) -> None:
        _check_range("decay", self.decay, 0.0, 1.0, low_open=True, high_open=False)
        for name in ("prior_pass", "prior_fail"):
            _check_range(name, getattr(self, name), 0.0, math.inf, low_open=True, high_open=True)
        _check_range("honest_fail_rate", self.honest_fail_rate, 0.0, 1.0, low_open=True, high_open=True)
        _check_range("honest_borderline_rate", self.honest_borderline_rate, 0.0, 1.0, low_open=True, high_open=True)
        _check_range(
            "dishonest_fail_rate", self.dishonest_fail_rate, self.honest_fail_rate, 1.0, low_open=True, high_open=True
        )
        _check_range("gross_factor", self.gross_factor, 1.0, math.inf, low_open=False, high_open=True)
        _check_range("false_quarantine", self.false_quarantine, 0.0, 1.0, low_open=True, high_open=True)
        _check_range("probation_audit_rate", self.probation_audit_rate, 0.0, 1.0, low_open=True, high_open=False)
        if (
            isinstance(self.probation_audits, bool)
            or not isinstance(self.probation_audits, int)
            or self.probation_audits < 0
        ):
            raise VerifyError(f"probation_audits={self.probation_audits!r} must be an integer >= 0")

    @property
    def threshold(self) -> float:
        """h = log(1/alpha): the CUSUM statistic at which a subject is quarantined."""
        return -math.log(self.false_quarantine)

    @property
    def fail_step(self) -> float:
        """log(p1/p0): what one FAIL adds to the statistic."""
        return math.log(self.dishonest_fail_rate / self.honest_fail_rate)

    @property
    def borderline_step(self) -> float:
        """log(p1/p0b): what one borderline FAIL adds to the statistic (never more than a gross
        FAIL, and never less than 0: p0b is taken as at least p0, at most p1)."""
        p0b = min(max(self.honest_borderline_rate, self.honest_fail_rate), self.dishonest_fail_rate)
        return math.log(self.dishonest_fail_rate / p0b)

    @property
    def pass_step(self) -> float:
        """log((1-p1)/(1-p0)) < 0: what one PASS adds to the statistic."""
        return math.log1p(-self.dishonest_fail_rate) - math.log1p(-self.honest_fail_rate)

    @property
    def fails_to_quarantine(self) -> int:
        """FAILs in a row that quarantine a subject from a statistic of 0 (1 with the defaults)."""
        return max(1, math.ceil(self.threshold / self.fail_step))

    @property
    def borderline_fails_to_quarantine(self) -> int:
        """Borderline FAILs in a row that quarantine a subject from a statistic of 0 (2 with the defaults)."""
        step = self.borderline_step
        return max(1, math.ceil(self.threshold / step)) if step > 0 else 0  # 0: borderline FAILs alone never do

    def is_gross(self, severity: float) -> bool:
        """Whether a FAIL this far beyond its tolerance (`severity`, 1 = at the edge) is gross."""
        return severity >= self.gross_factor


@dataclass(slots=True)
class SubjectState:
    subject: Subject
    passes: float = 0.0  # decayed Beta pass count
    fails: float = 0.0  # decayed Beta fail count
    audits_passed: int = 0  # undecayed totals, for reports
    audits_failed: int = 0
    inconclusive: int = 0
    llr: float = 0.0  # the CUSUM statistic, >= 0
    quarantined: bool = False
    evidence: list[str] = field(default_factory=list)  # event ids of every FAIL, in order
    probation_left: int = 0  # audits left on probation after a re-admission
    last_at: float = 0.0  # latest `at` of an event about this subject
    prior_pass: float = 1.0  # copied from the policy, so `score` needs nothing else
    prior_fail: float = 1.0
    run: list[str] = field(default_factory=list)  # FAILs since the statistic last left 0
    borderline: int = 0  # undecayed count of borderline (not gross) FAILs

    @property
    def score(self) -> float:
        """Posterior mean of honesty under the Beta(prior_pass + passes, prior_fail + fails)."""
        good = self.prior_pass + self.passes
        return good / (good + self.prior_fail + self.fails)


@dataclass(frozen=True, slots=True)
class QuarantineDecision:
    subject: Subject
    evidence: tuple[str, ...]  # the FAIL audits behind the decision, at most 1000, latest last
    llr: float  # the statistic when it crossed (goes into QuarantineEvent.log_likelihood_ratio)
    reason: str

    def event(self, *, event_id: str, at: float, reporter: str) -> QuarantineEvent:
        """The `QuarantineEvent` that records this decision (the caller supplies id and time)."""
        return QuarantineEvent(
            event_id=event_id,
            at=at,
            reporter=reporter,
            subject=self.subject,
            evidence=list(self.evidence),
            log_likelihood_ratio=self.llr,
            reason=self.reason,
        )


class ReputationBook:
    """The reputation of every subject seen in a stream of ledger events."""

    def __init__(self, policy: ReputationPolicy | None = None) -> None:
        self.policy = policy if policy is not None else ReputationPolicy()
        self._states: dict[Subject, SubjectState] = {}
        self._seen: set[str] = set()

    @classmethod
    def replay(cls, events: Iterable[Event], policy: ReputationPolicy | None = None) -> ReputationBook:
        """The book after `events`, in order: the same as observing them one by one."""
        book = cls(policy)
        for event in events:
            book.observe(event)
        return book

    def seen(self, event_id: str) -> bool:
        """Whether an event with this id has been observed (a resend or a reused id is ignored)."""
        return event_id in self._seen

    def observe(self, event: Event) -> QuarantineDecision | None:
        """Apply one event; return a decision only when an audit newly quarantines its subject.

        For an audit with a `blamed` subject, the decision returned is the subject's if both
        cross at once; the blamed node's quarantine then shows in `quarantined()`, and the
        caller should write a `QuarantineEvent` for each newly quarantined subject (see
        `observe_all`).
        """
        decisions = self.observe_all(event)
        return decisions[0] if decisions else None

    def observe_all(self, event: Event) -> list[QuarantineDecision]:
        """Like `observe`, returning every subject the event newly quarantines (0, 1 or 2)."""
        if event.event_id in self._seen:
            return []
        self._seen.add(event.event_id)
        if isinstance(event, AuditEvent):
            decisions = []
            strength = severity(event)
            decision = self._audit(event.subject, event.verdict, event.event_id, event.at, strength)
            if decision is not None:
                decisions.append(decision)
            if event.blamed is not None and event.blamed != event.subject:
                decision = self._audit(event.blamed, Verdict.FAIL, event.event_id, event.at, strength)
                if decision is not None:
                    decisions.append(decision)
            return decisions
        state = self._state_for(event.subject)
        state.last_at = max(state.last_at, event.at)
        if isinstance(event, QuarantineEvent):
            state.quarantined = True
            state.probation_left = 0
        else:
            state.quarantined = False
            state.llr = 0.0
            state.run = []
            state.probation_left = self.policy.probation_audits
        return []

    def state(self, subject: Subject) -> SubjectState:
        """A copy of the subject's state (a fresh one for a subject never seen)."""
        state = self._states.get(subject)
        if state is None:
            return self._fresh(subject)
        return replace(state, evidence=list(state.evidence), run=list(state.run))

    def subjects(self) -> list[Subject]:
        return sorted(self._states, key=lambda s: (s.model_id, s.start, s.end, s.node_id))

    def is_quarantined(self, subject: Subject) -> bool:
        state = self._states.get(subject)
        return state is not None and state.quarantined

    def quarantined(self) -> frozenset[Subject]:
        return frozenset(s for s, state in self._states.items() if state.quarantined)

    def quarantined_nodes(self, model_id: str) -> frozenset[str]:
        """Node ids quarantined for any span of `model_id`: what routing leaves out."""
        return frozenset(s.node_id for s, state in self._states.items() if state.quarantined and s.model_id == model_id)

    def audit_rate(self, subject: Subject, base_rate: float) -> float:
        """The fraction of the subject's work to audit: `base_rate`, raised while on probation."""
        _check_range("base_rate", base_rate, 0.0, 1.0, low_open=False, high_open=False)
        state = self._states.get(subject)
        if state is not None and state.probation_left > 0:
            return max(base_rate, self.policy.probation_audit_rate)
        return base_rate

    # -- internals ---------------------------------------------------------------------------

    def _fresh(self, subject: Subject) -> SubjectState:
        return SubjectState(subject=subject, prior_pass=self.policy.prior_pass, prior_fail=self.policy.prior_fail)

    def _state_for(self, subject: Subject) -> SubjectState:
        state = self._states.get(subject)
        if state is None:
            state = self._states[subject] = self._fresh(subject)
        return state

    def _audit(
        self, subject: Subject, verdict: Verdict, event_id: str, at: float, strength: float
    ) -> QuarantineDecision | None:
        policy = self.policy
        state = self._state_for(subject)
        state.last_at = max(state.last_at, at)
        if verdict == Verdict.INCONCLUSIVE:
            state.inconclusive += 1
            return None
        failed = verdict == Verdict.FAIL
        state.passes = policy.decay * state.passes + (0.0 if failed else 1.0)
        state.fails = policy.decay * state.fails + (1.0 if failed else 0.0)
        on_probation = state.probation_left > 0
        if on_probation:
            state.probation_left -= 1
        if not failed:
            state.audits_passed += 1
            state.llr = max(0.0, state.llr + policy.pass_step)
            if state.llr == 0.0:
                state.run = []
            return None
        gross = policy.is_gross(strength)
        state.audits_failed += 1
        state.borderline += not gross
        state.evidence.append(event_id)
        state.run.append(event_id)
        state.llr = max(0.0, state.llr + (policy.fail_step if gross else policy.borderline_step))
        if state.quarantined:
            return None
        if state.llr >= policy.threshold:
            what = f"a gross FAIL ({strength:.3g}x its tolerance)" if gross else "borderline FAIL(s)"
            reason = (
                f"{len(state.run)} refereed FAIL(s), the last {what}, raised the CUSUM log-likelihood ratio to "
                f"{state.llr:.4g} "
                f">= threshold {policy.threshold:.4g} (p0={policy.honest_fail_rate:g}, "
                f"p1={policy.dishonest_fail_rate:g}, alpha={policy.false_quarantine:g})"
            )
        elif on_probation:
            reason = f"a refereed FAIL during probation (statistic {state.llr:.4g})"
        else:
            return None
        state.quarantined = True
        state.probation_left = 0
        return QuarantineDecision(
            subject=subject, evidence=tuple(state.run[-_MAX_EVIDENCE:]), llr=state.llr, reason=reason
        )


def severity(event: AuditEvent) -> float:
    """How far beyond its tolerance the primary/check comparison of an audit lay: the larger of
    its two figures over their bounds (1 = at the edge; saturated figures give a huge value).
    For a FAIL this is the subject's distance from the check (which the referee sided with);
    for a blamed check server, the same distance seen from the other side."""
    c = event.comparison
    return max(c.rel_l2 / event.tolerance_rel_l2, c.max_abs / event.tolerance_max_abs)


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
    """Raise naming the field, its value and the allowed interval unless `value` lies in it (NaN never does)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        ok = above and below
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise VerifyError(f"{name}={value!r} must be a number in {interval}")
