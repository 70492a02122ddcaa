"""Build a `Report` from the ledger's events in one streaming pass.

The events are replayed through a `ReputationBook` with the given policy, so the scores
in the report are exactly the ones the coordinator acted on (same events, same policy).
Per event the work is constant: the book's update, a few counters, and now and then one
sample of the subject's score. Score histories are downsampled as they grow (keep every
other point and double the stride), so each subject keeps fewer than `max_points` points
however long the ledger is.

Memory: counters per subject, the ids of audits seen (to count a resent event once), and
the audits that could be evidence (failed, inconclusive or disputed ones); passing audits
with agreeing outputs are not kept.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from corolla.verify.errors import LedgerTamperedError, VerifyError
from corolla.verify.events import AuditEvent, QuarantineEvent, ReadmitEvent, Subject, Verdict
from corolla.verify.ledger import ChainCheck, Ledger, LedgerPublicKey, StoredEvent
from corolla.verify.report.model import (
    ChainStatus,
    EvidenceReport,
    PolicyDecision,
    QuarantineReport,
    ReadmitReport,
    Report,
    ScorePoint,
    Side,
    SubjectReport,
    Totals,
)
from corolla.verify.reputation import QuarantineDecision, ReputationBook, ReputationPolicy

__all__ = ["build_report", "chain_status", "ledger_report"]

_Key = tuple[str, str, int, int]  # (node_id, model_id, start, end): cheaper to hash than a Subject
DEFAULT_MAX_POINTS = 256


def _key(s: Subject) -> _Key:
    return (s.node_id, s.model_id, s.start, s.end)


@dataclass(slots=True)
class _Trace:
    """A subject's running tallies and its downsampled score history."""

    subject: Subject
    blamed: int = 0
    quarantines: int = 0
    readmits: int = 0
    seen: int = 0  # events that touched this subject
    stride: int = 1  # sample the score every `stride` events
    points: list[tuple[float, float]] = field(default_factory=list)
    last_sampled: int = 0  # `seen` at the last sample


@dataclass(slots=True)
class _Builder:
    book: ReputationBook
    max_points: int
    traces: dict[_Key, _Trace] = field(default_factory=dict)
    seen_ids: set[str] = field(default_factory=set)  # a resent event is counted once, as the book does
    disputed: dict[str, tuple[int, AuditEvent]] = field(default_factory=dict)  # possible evidence
    quarantines: list[tuple[int, QuarantineEvent]] = field(default_factory=list)
    readmits: list[tuple[int, ReadmitEvent, bool]] = field(default_factory=list)
    ended_by: dict[int, tuple[int, float]] = field(default_factory=dict)  # quarantine index -> readmit
    open_quarantine: dict[_Key, int] = field(default_factory=dict)
    pending: dict[_Key, tuple[int, QuarantineDecision]] = field(default_factory=dict)  # decided, not yet recorded
    events: int = 0
    duplicates: int = 0
    passed: int = 0
    failed: int = 0
    inconclusive: int = 0
    first_at: float | None = None
    last_at: float | None = None
    last_seq: int | None = None
    last_hash: str | None = None

    def trace(self, subject: Subject) -> _Trace:
        k = _key(subject)
        t = self.traces.get(k)
        if t is None:
            t = self.traces[k] = _Trace(subject=subject)
        return t

    def touch(self, subject: Subject, at: float, *, force: bool = False) -> None:
        """Count one event for `subject`; sample its score when the stride says so."""
        t = self.trace(subject)
        t.seen += 1
        if not force and t.seen % t.stride:
            return
        t.points.append((at, self.book.state(subject).score))
        t.last_sampled = t.seen
        if len(t.points) >= self.max_points:
            t.points = t.points[1::2]
            t.stride *= 2

    def feed(self, stored: StoredEvent) -> None:
        self.events += 1
        self.last_seq, self.last_hash = stored.seq, stored.event_hash
        event = stored.event
        if event.event_id in self.seen_ids:
            self.duplicates += 1
            return
        self.seen_ids.add(event.event_id)
        at = event.at
        self.first_at = at if self.first_at is None else min(self.first_at, at)
        self.last_at = at if self.last_at is None else max(self.last_at, at)
        if isinstance(event, AuditEvent):
            self._audit(stored.seq, event)
        elif isinstance(event, QuarantineEvent):
            self.book.observe(event)
            k = _key(event.subject)
            self.pending.pop(k, None)
            self.trace(event.subject).quarantines += 1
            self.open_quarantine[k] = len(self.quarantines)
            self.quarantines.append((stored.seq, event))
            self.touch(event.subject, at, force=True)
        else:
            was = self.book.is_quarantined(event.subject)
            self.book.observe(event)
            k = _key(event.subject)
            self.pending.pop(k, None)
            self.trace(event.subject).readmits += 1
            index = self.open_quarantine.pop(k, None)
            if index is not None:
                self.ended_by[index] = (stored.seq, at)
            self.readmits.append((stored.seq, event, was))
            self.touch(event.subject, at, force=True)

    def _audit(self, seq: int, event: AuditEvent) -> None:
        for decision in self.book.observe_all(event):
            self.pending[_key(decision.subject)] = (seq, decision)
        if event.verdict is Verdict.PASS:
            self.passed += 1
        elif event.verdict is Verdict.FAIL:
            self.failed += 1
        else:
            self.inconclusive += 1
        if event.verdict is not Verdict.PASS or not event.comparison.agree or event.blamed is not None:
            self.disputed[event.event_id] = (seq, event)
        self.touch(event.subject, event.at)
        if event.blamed is not None and event.blamed != event.subject:  # as the book counts it
            self.trace(event.blamed).blamed += 1
            self.touch(event.blamed, event.at)

    def finish(self, chain: ChainStatus, policy: ReputationPolicy, now: float, unreadable: list[int]) -> Report:
        subjects = []
        for t in sorted(
            self.traces.values(), key=lambda t: (t.subject.model_id, t.subject.start, t.subject.end, t.subject.node_id)
        ):
            state = self.book.state(t.subject)
            history = [ScorePoint(at=a, score=s) for a, s in t.points]
            if t.last_sampled != t.seen:
                history.append(ScorePoint(at=state.last_at, score=state.score))  # always end at the current score
            subjects.append(
                SubjectReport(
                    subject=t.subject,
                    score=state.score,
                    log_likelihood_ratio=state.llr,
                    audits_passed=state.audits_passed,
                    audits_failed=state.audits_failed,
                    audits_inconclusive=state.inconclusive,
                    blamed=t.blamed,
                    quarantined=state.quarantined,
                    quarantines=t.quarantines,
                    readmits=t.readmits,
                    probation_left=state.probation_left,
                    last_at=state.last_at,
                    history=history,
                )
            )
        quarantines = []
        for i, (seq, q) in enumerate(self.quarantines):
            evidence, missing = [], []
            for event_id in q.evidence:
                found = self.disputed.get(event_id)
                if found is None:
                    missing.append(event_id)
                else:
                    evidence.append(_evidence(*found))
            readmit = self.ended_by.get(i)
            quarantines.append(
                QuarantineReport(
                    seq=seq,
                    event_id=q.event_id,
                    at=q.at,
                    reporter=q.reporter,
                    subject=q.subject,
                    log_likelihood_ratio=q.log_likelihood_ratio,
                    reason=q.reason,
                    evidence=evidence,
                    missing_evidence=missing,
                    readmitted_seq=readmit[0] if readmit else None,
                    readmitted_at=readmit[1] if readmit else None,
                )
            )
        readmits = [
            ReadmitReport(
                seq=seq,
                event_id=r.event_id,
                at=r.at,
                reporter=r.reporter,
                subject=r.subject,
                reason=r.reason,
                was_quarantined=was,
            )
            for seq, r, was in self.readmits
        ]
        return Report(
            generated_at=now,
            chain=chain,
            policy=_policy_fields(policy),
            first_at=self.first_at,
            last_at=self.last_at,
            last_seq=self.last_seq,
            last_hash=self.last_hash,
            totals=Totals(
                events=self.events,
                audits=self.passed + self.failed + self.inconclusive,
                passed=self.passed,
                failed=self.failed,
                inconclusive=self.inconclusive,
                duplicates=self.duplicates,
                quarantines=len(self.quarantines),
                readmits=len(self.readmits),
                subjects=len(subjects),
                quarantined_now=sum(s.quarantined for s in subjects),
            ),
            models=sorted({s.subject.model_id for s in subjects}),
            subjects=subjects,
            quarantines=quarantines,
            readmits=readmits,
            unrecorded_decisions=[
                PolicyDecision(
                    seq=seq, subject=d.subject, log_likelihood_ratio=d.llr, reason=d.reason, evidence=list(d.evidence)
                )
                for seq, d in sorted(self.pending.values(), key=lambda p: p[0])
            ],
            unreadable_seqs=unreadable,
        )


def _evidence(seq: int, e: AuditEvent) -> EvidenceReport:
    sided_with: Side | None = None
    disagreeing: list[str] = []
    if e.referee is not None and e.referee_vs_primary is not None and e.referee_vs_check is not None:
        with_primary, with_check = e.referee_vs_primary.agree, e.referee_vs_check.agree
        sided_with = (
            "both" if with_primary and with_check else
            "primary" if with_primary else
            "check" if with_check else "neither"
        )  # fmt: skip
        if not with_primary:
            disagreeing.append(e.primary.node_id)
        if not with_check:
            disagreeing.append(e.check.node_id)
    elif not e.comparison.agree:
        disagreeing = [e.primary.node_id, e.check.node_id]  # unrefereed: either may be wrong
    return EvidenceReport(
        seq=seq,
        event_id=e.event_id,
        at=e.at,
        reporter=e.reporter,
        subject=e.subject,
        work=e.work,
        input_sha256=e.input_sha256,
        primary=e.primary,
        check=e.check,
        referee=e.referee,
        comparison=e.comparison,
        referee_vs_primary=e.referee_vs_primary,
        referee_vs_check=e.referee_vs_check,
        tolerance_rel_l2=e.tolerance_rel_l2,
        tolerance_max_abs=e.tolerance_max_abs,
        verdict=e.verdict,
        blamed=e.blamed,
        sided_with=sided_with,
        disagreeing=disagreeing,
    )


def _policy_fields(policy: ReputationPolicy) -> dict[str, float | int | str | bool | None]:
    if not dataclasses.is_dataclass(policy):
        return {}
    out: dict[str, float | int | str | bool | None] = {}
    for f in dataclasses.fields(policy):
        value = getattr(policy, f.name)
        if value is None or isinstance(value, float | int | str | bool):
            out[f.name] = value
        else:
            out[f.name] = str(value)
    return out


def chain_status(chain: ChainCheck | LedgerTamperedError | None) -> ChainStatus:
    """The report's chain section from the outcome of `Ledger.verify` (None: not checked)."""
    if chain is None:
        return ChainStatus(state="unchecked", message="the chain was not checked (no public key given)")
    if isinstance(chain, LedgerTamperedError):
        where = f"first bad event: seq {chain.seq}" if chain.seq is not None else "the signed head does not verify"
        return ChainStatus(
            state="tampered",
            first_bad_seq=chain.seq,
            message=f"THE LEDGER DOES NOT VERIFY ({where}): {chain}",
        )
    return ChainStatus(
        state="verified",
        events=chain.events,
        head_seq=chain.head_seq,
        head_hash=chain.head_hash,
        message=f"hash chain and signed head verify: {chain.events} events, head seq {chain.head_seq}",
    )


def build_report(
    events: Iterable[StoredEvent],
    *,
    policy: ReputationPolicy | None = None,
    chain: ChainCheck | LedgerTamperedError | None,
    max_points: int = DEFAULT_MAX_POINTS,
    now: float | None = None,
    progress: Callable[[int], None] | None = None,
    progress_every: int = 10_000,
) -> Report:
    """The report of a ledger: `events` in sequence order (e.g. `ledger.events()`), `chain`
    the outcome of `ledger.verify` (a `LedgerTamperedError` still gives a report, one that
    says the chain does not verify), `progress(n)` called every `progress_every` events.
    `ledger_report` does the same from a ledger in one pass."""
    policy = policy if policy is not None else ReputationPolicy()
    builder = _replay(events, policy, max_points, progress, progress_every)
    return builder.finish(chain_status(chain), policy, time.time() if now is None else now, [])


def ledger_report(
    ledger: Ledger,
    public_key: LedgerPublicKey | None,
    *,
    policy: ReputationPolicy | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    now: float | None = None,
    progress: Callable[[int], None] | None = None,
    progress_every: int = 10_000,
) -> Report:
    """The report of `ledger`, its chain checked against `public_key` (None: not checked) while
    its events are read and replayed: one read and one parse per row (`Ledger.scan`), where
    `build_report(ledger.events(), chain=ledger.verify(key))` makes two.

    The same report: a chain that does not verify names the first bad event (or the head)
    as `verify` would, every event whose body still parses is replayed, and rows whose body
    is not an event are left out and listed (`unreadable_seqs`).
    """
    policy = policy if policy is not None else ReputationPolicy()
    scan = ledger.scan(public_key)
    try:
        builder = _replay(scan, policy, max_points, progress, progress_every)
    finally:
        scan.close()  # an error mid-way releases the snapshot at once; after the end, a no-op
    return builder.finish(chain_status(scan.chain), policy, time.time() if now is None else now, scan.unreadable)


def _replay(
    events: Iterable[StoredEvent],
    policy: ReputationPolicy,
    max_points: int,
    progress: Callable[[int], None] | None,
    progress_every: int,
) -> _Builder:
    if max_points < 4:
        raise VerifyError(f"max_points must be at least 4, got {max_points}")
    builder = _Builder(book=ReputationBook(policy), max_points=max_points)
    for stored in events:
        builder.feed(stored)
        if progress is not None and builder.events % progress_every == 0:
            progress(builder.events)
    return builder
