"""What an audit report says, as typed pydantic models (so the JSON render is their dump).

A report is rebuilt from the ledger alone: every number here can be recomputed by
replaying the same events through the same reputation policy.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from corolla.verify.events import Comparison, Run, Subject, Verdict, Work

Side = Literal["primary", "check", "both", "neither"]  # whom a referee's output agreed with


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ChainStatus(_Frozen):
    """Whether the ledger's hash chain and signed head verified when the report was built."""

    state: Literal["verified", "tampered", "unchecked"]
    events: int | None = None  # events the check covered (verified only)
    head_seq: int | None = None
    head_hash: str | None = None
    first_bad_seq: int | None = None  # tampered: the first event that does not verify (None: the head)
    message: str  # one line for people


class ScorePoint(_Frozen):
    at: float  # unix time of the event after which the score was taken
    score: float


class SubjectReport(_Frozen):
    """One (node, model, span): where its reputation stands and how it got there."""

    subject: Subject
    score: float  # the policy's reputation score now
    log_likelihood_ratio: float  # the quarantine test's statistic now
    audits_passed: int
    audits_failed: int
    audits_inconclusive: int
    blamed: int  # audits where it was the check server and the referee sided against it
    quarantined: bool
    quarantines: int  # recorded quarantine events
    readmits: int  # recorded re-admission events
    probation_left: int  # audits left on probation after a re-admission
    last_at: float | None  # time of its last event
    history: list[ScorePoint]  # score over time, downsampled to a bounded number of points

    @property
    def audits(self) -> int:
        return self.audits_passed + self.audits_failed + self.audits_inconclusive


class EvidenceReport(_Frozen):
    """One audit a quarantine cites: who computed what, how the outputs compared, who the
    referee sided with."""

    seq: int
    event_id: str
    at: float
    reporter: str
    subject: Subject
    work: Work
    input_sha256: str
    primary: Run
    check: Run
    referee: Run | None
    comparison: Comparison  # primary vs check
    referee_vs_primary: Comparison | None
    referee_vs_check: Comparison | None
    tolerance_rel_l2: float
    tolerance_max_abs: float
    verdict: Verdict  # about the subject (the primary)
    blamed: Subject | None
    sided_with: Side | None  # the referee's side; None: no referee
    disagreeing: list[str]  # node ids whose output the audit found wrong (or could not settle)


class QuarantineReport(_Frozen):
    seq: int
    event_id: str
    at: float
    reporter: str
    subject: Subject
    log_likelihood_ratio: float
    reason: str
    evidence: list[EvidenceReport]  # the cited audits found in the ledger, in the order cited
    missing_evidence: list[str]  # cited event ids that are not (failing or disputed) audits in the ledger
    readmitted_seq: int | None  # the re-admission that ended it, if any
    readmitted_at: float | None


class ReadmitReport(_Frozen):
    seq: int
    event_id: str
    at: float
    reporter: str
    subject: Subject
    reason: str
    was_quarantined: bool  # False: a re-admission of a subject that was not quarantined


class PolicyDecision(_Frozen):
    """A quarantine the replayed policy decided with no `QuarantineEvent` recorded after it
    (the coordinator did not act on it, or the ledger ends before it did)."""

    seq: int  # the audit that crossed the threshold
    subject: Subject
    log_likelihood_ratio: float
    reason: str
    evidence: list[str]  # event ids of the FAIL audits behind it


class Totals(_Frozen):
    events: int  # events replayed
    audits: int  # distinct audit events (a resent event_id counts once)
    passed: int
    failed: int
    inconclusive: int
    duplicates: int  # events whose event_id was seen before (not counted again)
    quarantines: int
    readmits: int
    subjects: int
    quarantined_now: int


class Report(_Frozen):
    """The whole audit report; `render_json/markdown/html` turn it into text."""

    generated_at: float
    chain: ChainStatus
    policy: dict[str, float | int | str | bool | None]  # the reputation policy replayed
    first_at: float | None
    last_at: float | None
    last_seq: int | None  # last event replayed
    last_hash: str | None
    totals: Totals
    models: list[str]
    subjects: list[SubjectReport]  # by model, span, node
    quarantines: list[QuarantineReport]  # in ledger order
    readmits: list[ReadmitReport]  # in ledger order
    unrecorded_decisions: list[PolicyDecision]  # quarantines the policy decided that the ledger lacks
    unreadable_seqs: list[int] = []  # rows whose body is not a valid event (tampering): left out of the replay


def render_json(report: Report) -> str:
    """The report as JSON: indented, exactly the fields of `Report`."""
    return report.model_dump_json(indent=2) + "\n"
