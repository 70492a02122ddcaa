"""Ledger events for tests: deterministic in their arguments, so resends are byte-identical."""

from __future__ import annotations

import hashlib

from corolla.verify.events import AuditEvent, Comparison, QuarantineEvent, ReadmitEvent, Run, Subject, Verdict, Work
from corolla.verify.ledger import AnyEvent


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def subject(node: str = "node-a", model: str = "tiny-llama", start: int = 0, end: int = 2) -> Subject:
    return Subject(node_id=node, model_id=model, start=start, end=end)


def audit(tag: str, *, node: str = "node-a", blamed: str | None = None, at: float = 1_700_000_000.0) -> AuditEvent:
    """An audit of `node`; with `blamed`, the referee sided with `node` against the check server."""
    agree = blamed is None
    return AuditEvent(
        event_id=f"audit-{tag:0>4}",
        at=at,
        reporter="verifier-1",
        subject=subject(node),
        work=Work.FORWARD,
        input_sha256=_sha(f"in-{tag}"),
        primary=Run(node_id=node, precision="float32", output_sha256=_sha(f"p-{tag}")),
        check=Run(node_id=blamed or "node-b", precision="float32", output_sha256=_sha(f"c-{tag}")),
        comparison=Comparison(rel_l2=0.0 if agree else 0.5, max_abs=0.0 if agree else 1.0, agree=agree),
        tolerance_rel_l2=1e-3,
        tolerance_max_abs=1e-2,
        verdict=Verdict.PASS,
        blamed=subject(blamed) if blamed else None,
    )


def quarantine(tag: str, *, node: str = "node-c", at: float = 1_700_000_100.0) -> QuarantineEvent:
    return QuarantineEvent(
        event_id=f"quarantine-{tag:0>4}",
        at=at,
        reporter="coordinator",
        subject=subject(node),
        evidence=[f"audit-{tag}"],
        log_likelihood_ratio=4.6,
        reason="ok",
    )


def readmit(tag: str, *, node: str = "node-c", at: float = 1_700_000_200.0) -> ReadmitEvent:
    return ReadmitEvent(event_id=f"readmit-{tag:0>4}", at=at, reporter="operator", subject=subject(node), reason="ok")


def mixed(n: int, prefix: str = "e") -> list[AnyEvent]:
    """`n` events cycling through the three kinds, every fifth audit blaming its check server."""
    out: list[AnyEvent] = []
    for i in range(n):
        tag = f"{prefix}{i:05d}"
        if i % 3 == 0:
            out.append(audit(tag, node=f"node-{i % 4}", blamed="node-x" if i % 5 == 0 else None, at=1.7e9 + i))
        elif i % 3 == 1:
            out.append(quarantine(tag, node=f"node-{i % 4}", at=1.7e9 + i))
        else:
            out.append(readmit(tag, node=f"node-{i % 4}", at=1.7e9 + i))
    return out
