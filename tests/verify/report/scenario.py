"""A small hand-counted ledger for report and CLI tests.

seq  event                                                     moves
  1  audit a-001  A[0:2] PASS, check B agrees                   A +pass
  2  audit a-002  B[0:2] PASS, check A agrees                   B +pass
  3  audit a-003  C[2:4] PASS, check D agrees                   C +pass
  4  audit a-004  X[0:2] FAIL, check A disagrees, referee B     X +fail  (referee sided with the check)
  5  quarantine   X[0:2], evidence [a-004]
  6  audit a-005  A[0:2] INCONCLUSIVE, check X, no referee      A +inconclusive
  7  audit a-006  A[0:2] PASS, check X, referee B sides with A  A +pass, X +fail and +blamed
  8  readmit      X[0:2]
  9  audit a-007  X[0:2] PASS, check B agrees                   X +pass (probation 100 -> 99)
 10  audit a-008  D[2:4] PASS, check C agrees                   D +pass
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from corolla.verify.events import AuditEvent, Comparison, QuarantineEvent, ReadmitEvent, Run, Subject, Verdict, Work
from corolla.verify.ledger import AnyEvent, Ledger, LedgerKey
from corolla.verify.reputation import ReputationPolicy

MODEL = "tiny-llama-abc123"
T0 = 1_750_000_000.0
AGREE = Comparison(rel_l2=1e-4, max_abs=1e-3, agree=True)
DISAGREE = Comparison(rel_l2=0.5, max_abs=4.0, agree=False)
HOSTILE = "<script>alert('x')</script>"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def subj(node: str, start: int = 0, end: int = 2, model: str = MODEL) -> Subject:
    return Subject(node_id=node, model_id=model, start=start, end=end)


def audit(
    n: int,
    subject: Subject,
    *,
    check: str,
    verdict: Verdict = Verdict.PASS,
    referee: str | None = None,
    sided: str | None = None,  # "primary" | "check": whom the referee agreed with
    blamed: Subject | None = None,
    agree: bool = True,
) -> AuditEvent:
    return AuditEvent(
        event_id=f"a-{n:03d}-audit",
        at=T0 + n,
        reporter="site-0",
        subject=subject,
        work=Work.INFERENCE,
        input_sha256=sha(f"in-{n}"),
        primary=Run(node_id=subject.node_id, precision="float32", output_sha256=sha(f"primary-{n}")),
        check=Run(node_id=check, precision="bfloat16", output_sha256=sha(f"check-{n}")),
        comparison=AGREE if agree else DISAGREE,
        tolerance_rel_l2=0.02,
        tolerance_max_abs=0.25,
        referee=Run(node_id=referee, precision="float32", output_sha256=sha(f"referee-{n}")) if referee else None,
        referee_vs_primary=(AGREE if sided == "primary" else DISAGREE) if referee else None,
        referee_vs_check=(AGREE if sided == "check" else DISAGREE) if referee else None,
        verdict=verdict,
        blamed=blamed,
    )


def quarantine(
    n: int, subject: Subject, evidence: list[str], *, reason: str = "", reporter: str = "coordinator"
) -> QuarantineEvent:
    policy = ReputationPolicy()
    return QuarantineEvent(
        event_id=f"q-{n:03d}-quarantine",
        at=T0 + n,
        reporter=reporter,
        subject=subject,
        evidence=evidence,
        log_likelihood_ratio=policy.fail_step,
        reason=reason or "1 refereed FAIL crossed the threshold",
    )


def readmit(n: int, subject: Subject, *, reason: str = "replaced the faulty GPU") -> ReadmitEvent:
    return ReadmitEvent(event_id=f"r-{n:03d}-readmit", at=T0 + n, reporter="operator", subject=subject, reason=reason)


A, B, C, D, X = subj("node-a"), subj("node-b"), subj("node-c", 2, 4), subj("node-d", 2, 4), subj("node-x")


def scenario(*, with_readmit: bool = True) -> list[AnyEvent]:
    events: list[AnyEvent] = [
        audit(1, A, check="node-b"),
        audit(2, B, check="node-a"),
        audit(3, C, check="node-d"),
        audit(4, X, check="node-a", verdict=Verdict.FAIL, referee="node-b", sided="check", agree=False),
        quarantine(5, X, ["a-004-audit"]),
        audit(6, A, check="node-x", verdict=Verdict.INCONCLUSIVE, agree=False),
        audit(7, A, check="node-x", referee="node-b", sided="primary", blamed=X, agree=False),
    ]
    if with_readmit:
        events += [readmit(8, X), audit(9, X, check="node-b"), audit(10, D, check="node-c")]
    return events


def hostile_scenario() -> list[AnyEvent]:
    """A node whose id, reporter and reason are HTML and Markdown injections."""
    evil = subj(HOSTILE)
    return [
        audit(1, A, check=HOSTILE),
        audit(2, evil, check="node-a", verdict=Verdict.FAIL, referee="node-b", sided="check", agree=False),
        quarantine(3, evil, ["a-002-audit"], reason=f"{HOSTILE} | `code` *bold* [link](http://x)", reporter=HOSTILE),
    ]


def write_ledger(path: Path, events: Sequence[AnyEvent], key: LedgerKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with Ledger.open(str(path), key=key, writer="coordinator") as ledger:
        ledger.append(list(events))
