"""Small text helpers shared by the Markdown and HTML renderers."""

from __future__ import annotations

import time

from corolla.verify.events import Subject
from corolla.verify.report.model import ChainStatus, EvidenceReport, QuarantineReport, SubjectReport


def utc(at: float | None) -> str:
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) + "Z"


def span(subject: Subject) -> str:
    return f"{subject.start}:{subject.end}"


def score(value: float) -> str:
    return f"{value:.3f}"


def status(s: SubjectReport) -> str:
    if s.quarantined:
        return "QUARANTINED"
    if s.probation_left:
        return f"probation ({s.probation_left} audits left)"
    return "ok"


def quarantine_end(q: QuarantineReport) -> str:
    """Whether a quarantine still holds, or which re-admission ended it."""
    if q.readmitted_seq is None:
        return "in force"
    return f"re-admitted at seq {q.readmitted_seq} ({utc(q.readmitted_at)})"


def chain_headline(chain: ChainStatus) -> str:
    if chain.state == "verified":
        return "Chain verified"
    if chain.state == "tampered":
        return "WARNING: THE LEDGER DOES NOT VERIFY"
    return "Chain not checked"


def referee_text(e: EvidenceReport) -> str:
    if e.sided_with is None:
        return "no referee"
    return {
        "primary": "referee sided with the primary",
        "check": "referee sided with the check",
        "both": "referee agreed with both",
        "neither": "referee agreed with neither",
    }[e.sided_with]


def agree(flag: bool | None) -> str:
    return "-" if flag is None else "agree" if flag else "DISAGREE"
