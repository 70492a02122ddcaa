"""What the ledger records: audit verdicts, quarantines and re-admissions.

These are the only event kinds. Every event is a pydantic model, because events arrive
from sites over Flower and from files; its canonical JSON (sorted keys, no spaces,
UTF-8) is what the ledger hashes and chains, so a report can be rebuilt exactly.

A node is always named with its model and span (`Subject`): reputation is kept per
(node, model, span), since a node serving two spans can be honest on one.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Subject(_Frozen):
    """Whose reputation an event moves: a node serving blocks [start, end) of a model."""

    node_id: str = Field(min_length=1, max_length=128)
    model_id: str = Field(min_length=1, max_length=256)
    start: int = Field(ge=0)
    end: int = Field(gt=0)


class Work(StrEnum):
    """Which span computation was audited."""

    INFERENCE = "inference"  # one generation step (checked by a parallel forward of the prefix)
    FORWARD = "forward"  # a parallel forward
    BACKWARD = "backward"  # a training backward (input and adapter gradients)


class Verdict(StrEnum):
    PASS = "pass"  # the check run agreed within tolerance
    FAIL = "fail"  # a referee sided against the subject
    INCONCLUSIVE = "inconclusive"  # no referee available, or the referee agreed with nobody


class Comparison(_Frozen):
    """Two outputs of the same work compared, row by row (`corolla.verify.tolerance`): the largest
    per-row relative L2 error, and the largest per-row |difference| in units of the row's RMS
    (`max_abs`: the name is kept from format-1 tables, whose bound was absolute)."""

    rel_l2: float = Field(ge=0)
    max_abs: float = Field(ge=0)
    agree: bool


class Run(_Frozen):
    """One server's answer to the audited work: who computed it and a hash of its output."""

    node_id: str = Field(min_length=1, max_length=128)
    precision: str = Field(min_length=1, max_length=32)  # "float32", "bfloat16", "int8", "nf4"
    output_sha256: Sha256Hex


class AuditEvent(_Frozen):
    """One spot check of one span computation and its verdict on the subject."""

    kind: Literal["audit"] = "audit"
    event_id: str = Field(min_length=8, max_length=64)  # unique: a resent event is not counted twice
    at: float = Field(ge=0)  # unix time the check finished
    reporter: str = Field(min_length=1, max_length=128)  # node id of the site/client/verifier that ran it
    subject: Subject
    work: Work
    input_sha256: Sha256Hex  # hash of the span's input tensors (canonical wire encoding)
    primary: Run  # the subject's answer
    check: Run  # the re-run on another server holding the same blocks
    comparison: Comparison  # primary vs check
    tolerance_rel_l2: float = Field(gt=0)
    tolerance_max_abs: float = Field(gt=0)
    referee: Run | None = None  # third run, only when primary and check disagreed
    referee_vs_primary: Comparison | None = None
    referee_vs_check: Comparison | None = None
    verdict: Verdict  # about the subject (the primary)
    # When the referee sides with the primary, the check server was the wrong one:
    # the same event then carries a FAIL about it (`blamed`), so one event can fail the auditor.
    blamed: Subject | None = None


class QuarantineEvent(_Frozen):
    """A node taken out of routing for a (model, span), with the audits that convicted it."""

    kind: Literal["quarantine"] = "quarantine"
    event_id: str = Field(min_length=8, max_length=64)
    at: float = Field(ge=0)
    reporter: str = Field(min_length=1, max_length=128)
    subject: Subject
    evidence: list[str] = Field(min_length=1, max_length=1000)  # event_ids of the failing audits
    log_likelihood_ratio: float  # the SPRT statistic when it crossed the threshold
    reason: str = Field(max_length=1000)


class ReadmitEvent(_Frozen):
    """A quarantined node allowed back (operator decision or the re-admission policy)."""

    kind: Literal["readmit"] = "readmit"
    event_id: str = Field(min_length=8, max_length=64)
    at: float = Field(ge=0)
    reporter: str = Field(min_length=1, max_length=128)
    subject: Subject
    reason: str = Field(max_length=1000)


LedgerEvent = Annotated[AuditEvent | QuarantineEvent | ReadmitEvent, Field(discriminator="kind")]


class _Envelope(_Frozen):
    event: LedgerEvent


def canonical_json(event: AuditEvent | QuarantineEvent | ReadmitEvent) -> bytes:
    """The bytes the ledger hashes: sorted keys, no whitespace, UTF-8, floats as JSON numbers."""
    return json.dumps(event.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def parse_event(data: bytes | str) -> AuditEvent | QuarantineEvent | ReadmitEvent:
    """An event from its JSON (from a peer or from the ledger); raises pydantic's ValidationError."""
    text = data.decode() if isinstance(data, bytes) else data
    return _Envelope.model_validate_json('{"event":' + text + "}").event
