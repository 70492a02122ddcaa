"""The ledger's rows: the columns read, an event as stored, and the checks made on them.

`check_head`, `check_row` and `check_end` are the whole of what "the chain verifies"
means: `Ledger.verify` and `Ledger.scan` both run exactly these, in the same order, so they
name the same first bad seq. `row_values` is the one place an event becomes a row's columns.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import pydantic
from sqlalchemy import Connection, Row, select

from corolla.verify.errors import LedgerTamperedError
from corolla.verify.events import AuditEvent, QuarantineEvent, ReadmitEvent, canonical_json, parse_event
from corolla.verify.ledger.chain import event_hash, head_message
from corolla.verify.ledger.schema import HEAD_ID, EventRow, HeadRow
from corolla.verify.ledger.signing import LedgerPublicKey, SignatureError

AnyEvent = AuditEvent | QuarantineEvent | ReadmitEvent
HeadState: TypeAlias = Row[int, str, str | None, str | None]  # seq, head_hash, key_id, signature
EventState: TypeAlias = Row[*tuple[Any, ...]]  # the columns of EVENT_COLUMNS

EVENT_COLUMNS: Final = (
    EventRow.seq,
    EventRow.event_id,
    EventRow.kind,
    EventRow.node_id,
    EventRow.model_id,
    EventRow.span_start,
    EventRow.span_end,
    EventRow.blamed_node_id,
    EventRow.at,
    EventRow.body,
    EventRow.prev_hash,
    EventRow.event_hash,
    EventRow.written_at,
    EventRow.writer,
)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as the ledger holds it: its place in the chain and who wrote it when."""

    seq: int
    event: AnyEvent
    event_hash: str
    prev_hash: str
    written_at: float
    writer: str


@dataclass(frozen=True, slots=True)
class ChainCheck:
    """What `verify()` vouches for: this many events, ending at a head signed by the given key."""

    events: int
    head_seq: int
    head_hash: str


def read_head(conn: Connection) -> HeadState | None:
    return conn.execute(
        select(HeadRow.seq, HeadRow.head_hash, HeadRow.key_id, HeadRow.signature).where(HeadRow.id == HEAD_ID)
    ).one_or_none()


def stored_event(row: EventState, event: AnyEvent) -> StoredEvent:
    return StoredEvent(
        seq=row.seq,
        event=event,
        event_hash=row.event_hash,
        prev_hash=row.prev_hash,
        written_at=row.written_at,
        writer=row.writer,
    )


def row_values(
    seq: int, ev: AnyEvent, body: str, prev_hash: str, h: str, written_at: float, writer: str
) -> dict[str, Any]:
    """An events row: the indexed columns copied out of the event, and its place in the chain."""
    return {
        "seq": seq,
        "event_id": ev.event_id,
        "kind": ev.kind,
        "node_id": ev.subject.node_id,
        "model_id": ev.subject.model_id,
        "span_start": ev.subject.start,
        "span_end": ev.subject.end,
        "blamed_node_id": ev.blamed.node_id if isinstance(ev, AuditEvent) and ev.blamed is not None else None,
        "at": ev.at,
        "body": body,
        "prev_hash": prev_hash,
        "event_hash": h,
        "written_at": written_at,
        "writer": writer,
    }


def same(a: str, b: str) -> bool:
    """Constant-time equality of two hex hashes (bytes: compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def parse_body(seq: int, body: str) -> AnyEvent:
    """A row's event; LedgerTamperedError naming the row when its body is not one."""
    try:
        return parse_event(body)
    except pydantic.ValidationError:
        raise LedgerTamperedError(f"event {seq}: its body is not a valid event", seq=seq) from None


def verify_head(public_key: LedgerPublicKey, seq: int, head_hash: str, signature_hex: str) -> None:
    """Return if `signature_hex` is `public_key`'s signature on the head (seq, head_hash);
    else `SignatureError`, a malformed signature or hash included."""
    try:
        signature = bytes.fromhex(signature_hex)
        message = head_message(seq, head_hash)
    except (ValueError, TypeError, struct.error):  # not hex, or (SQLite) a value of another type (a REAL seq)
        raise SignatureError() from None
    public_key.verify(message, signature)


def check_head(head: HeadState, public_key: LedgerPublicKey) -> None:
    if head.signature is None:
        # Even at seq 0: a writer signs the genesis head when it first opens the ledger, so an
        # unsigned head is either a ledger no writer ever opened or one emptied behind its back.
        what = "genesis head (seq 0, no events)" if head.seq == 0 else f"head (seq {head.seq})"
        raise LedgerTamperedError(f"the ledger {what} is not signed", seq=None)
    if head.key_id != public_key.key_id:
        raise LedgerTamperedError(
            f"the ledger head names key {head.key_id}, not the key given ({public_key.key_id})", seq=None
        )
    try:
        verify_head(public_key, head.seq, head.head_hash, head.signature)
    except SignatureError:
        raise LedgerTamperedError(
            f"the ledger head (seq {head.seq}) does not match its signature: the head was edited or "
            "signed by another key",
            seq=None,
        ) from None


def check_row(row: EventState, expected: int, prev: str, head_seq: int, head_hash: str) -> AnyEvent:
    """One row against the chain so far: its event (parsed once, here), or raise naming the first bad seq."""
    seq = row.seq
    if not all(isinstance(v, str) for v in (row.body, row.writer, row.prev_hash, row.event_hash)) or not isinstance(
        row.written_at, float
    ):  # SQLite stores any type in any column
        raise LedgerTamperedError(f"event {seq}: a column holds a value of the wrong type", seq=seq)
    if seq != expected:  # rows come in seq order, so a jump means `expected` was deleted (or renumbered)
        raise LedgerTamperedError(f"event {expected} is missing (the next event is seq {seq})", seq=expected)
    if seq > head_seq:
        raise LedgerTamperedError(f"event {seq} is past the signed head (seq {head_seq})", seq=seq)
    if not same(row.prev_hash, prev):
        raise LedgerTamperedError(f"event {seq}: prev_hash does not match event {seq - 1}'s hash", seq=seq)
    try:
        recomputed = event_hash(prev, seq, row.written_at, row.writer, row.body.encode())
    except (ValueError, UnicodeEncodeError):  # a malformed hash, a lone surrogate in the writer or body
        raise LedgerTamperedError(f"event {seq}: its columns cannot be hashed", seq=seq) from None
    if not same(recomputed, row.event_hash):
        raise LedgerTamperedError(f"event {seq}: event_hash does not match its contents", seq=seq)
    if seq == head_seq and not same(row.event_hash, head_hash):
        raise LedgerTamperedError(f"event {seq} does not match the signed head", seq=seq)
    ev = parse_body(seq, row.body)
    if canonical_json(ev).decode() != row.body:
        raise LedgerTamperedError(f"event {seq}: its body is not in canonical form", seq=seq)
    expected_columns = row_values(seq, ev, row.body, row.prev_hash, row.event_hash, row.written_at, row.writer)
    for name, value in expected_columns.items():
        if getattr(row, name) != value:
            raise LedgerTamperedError(f"event {seq}: column {name} does not match the event's body", seq=seq)
    return ev


def check_end(expected: int, head_seq: int) -> None:
    """After the last row: the chain must reach the signed head (`expected` is the seq the next row would have)."""
    if expected - 1 != head_seq:
        raise LedgerTamperedError(
            f"event {expected} is missing: the chain ends at seq {expected - 1} but the signed head is at "
            f"seq {head_seq}",
            seq=expected,
        )
