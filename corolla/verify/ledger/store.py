"""The ledger: an append-only, hash-chained, head-signed store of verification events.

Spot checks, quarantines and re-admissions are appended here by the coordinator and by
verifiers, possibly from several processes at once, and read back by reputation, routing
and audit reports. Each row is chained to the previous one and the chain's head is signed
by the ledger key (byte layout in `chain.py`), so that `verify()` catches any edited,
deleted or inserted row, naming the first bad seq, and a report can be rebuilt exactly.

Concurrency: every append is one transaction that first takes the ledger's write lock,
then reads the head, writes the new rows and the new signed head, and commits; seq
numbers are handed out under the lock, so there are no gaps and no duplicates.

- PostgreSQL: the lock is the head row itself (`SELECT ... FOR UPDATE`) under READ
  COMMITTED; a writer waiting on it sees the previous writer's rows once it gets it.
- SQLite: `BEGIN IMMEDIATE` takes the database's write lock up front (pysqlite's own
  transaction handling is switched off, as SQLAlchemy's documentation describes, so that
  SQLAlchemy emits BEGIN itself), in WAL mode so readers never block, with a busy timeout.
  That plumbing, and the migrations run on open, live in `_database.py`.

Lock timeouts, deadlocks, serialization failures and dropped connections are retried a
bounded number of times with jittered backoff. An `event_id` already in the ledger is not
written again: its existing seq is returned, so resending a batch is harmless. Reading
(`events`, `verify`) pages through the table by seq (keyset pagination), so memory stays
bounded however long the ledger is; `verify` does it inside one snapshot.
"""

from __future__ import annotations

import hmac
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeAlias, TypeVar

import pydantic
from sqlalchemy import Connection, Engine, Row, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from corolla.verify.errors import LedgerError, LedgerTamperedError
from corolla.verify.events import AuditEvent, QuarantineEvent, ReadmitEvent, canonical_json, parse_event
from corolla.verify.ledger._database import (
    WRITE,
    create_ledger_engine,
    normalise_url,
    prepare_schema,
    reason,
    retryable,
)
from corolla.verify.ledger.chain import GENESIS_HASH, event_hash, head_message
from corolla.verify.ledger.schema import HEAD_ID, EventRow, HeadRow
from corolla.verify.ledger.signing import LedgerKey, LedgerPublicKey

__all__ = ["AnyEvent", "ChainCheck", "Ledger", "StoredEvent"]

AnyEvent = AuditEvent | QuarantineEvent | ReadmitEvent

_T = TypeVar("_T")
_HeadState: TypeAlias = Row[int, str, str | None, str | None]  # seq, head_hash, key_id, signature
_EventState: TypeAlias = Row[*tuple[Any, ...]]  # the columns of _EVENT_COLUMNS

_MAX_ATTEMPTS: Final = 12  # tries per write transaction on lock or serialization errors
_IN_CHUNK: Final = 500  # event_ids per `IN (...)` lookup
_WRITER_MAX: Final = 128  # the writer column's width

_EVENT_COLUMNS: Final = (
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


class Ledger:
    """The event ledger on SQLite or PostgreSQL. Open with `Ledger.open(url, key=...)`."""

    def __init__(self, engine: Engine, *, key: LedgerKey | None, writer: str, clock: Callable[[], float]) -> None:
        """Use `Ledger.open`; this wraps an engine already configured and migrated."""
        self._engine = engine
        self._key = key
        self._writer = writer
        self._clock = clock
        self._postgres = engine.dialect.name == "postgresql"

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        url: str | os.PathLike[str],
        *,
        key: LedgerKey | None = None,
        writer: str = "",
        migrate: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> Ledger:
        """Connect to the ledger at `url`, bring its schema up to date and sign an empty head.

        `url`: a filesystem path or `sqlite:///path` (SQLite; `sqlite://` in memory), or `postgresql://...`
        (`postgresql+psycopg://...`). `key` is needed to append; a reader (an auditor)
        opens without it. `writer` names who appends (stored and hashed with each row).
        With `migrate=False` a database whose schema is not current is refused instead.
        """
        if len(writer) > _WRITER_MAX or "\x00" in writer:
            raise LedgerError(f"writer must be at most {_WRITER_MAX} characters without NUL, got {writer[:40]!r}...")
        engine = create_ledger_engine(normalise_url(os.fspath(url)))
        try:
            prepare_schema(engine, migrate=migrate)
            ledger = cls(engine, key=key, writer=writer, clock=clock)
            if key is not None:
                ledger._sign_genesis()
        except BaseException:
            engine.dispose()
            raise
        return ledger

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self._engine.url.render_as_string(hide_password=True)!r}, writer={self._writer!r})"

    # ------------------------------------------------------------------ writing

    def append(self, events: Sequence[AnyEvent]) -> list[int]:
        """Append `events` in order, all or none; return each one's seq.

        An event whose `event_id` is already in the ledger (or earlier in this batch) is not
        written again and gets its existing seq. The same `event_id` with different content
        is refused (LedgerError), as is appending to a ledger whose head does not verify.
        """
        key = self._require_key()
        bodies: list[tuple[AnyEvent, str]] = [(e, canonical_json(e).decode()) for e in events]
        if not bodies:
            return []

        def work(conn: Connection) -> list[int]:
            head = self._locked_head(conn, key)
            known = self._known(conn, sorted({e.event_id for e, _ in bodies}))
            seq, prev = head.seq, head.head_hash
            written_at = self._clock()
            rows: list[dict[str, Any]] = []
            for ev, body in bodies:
                if ev.event_id in known:
                    old_seq, old_body = known[ev.event_id]
                    if old_body != body:
                        raise LedgerError(
                            f"event_id {ev.event_id!r} is already in the ledger (seq {old_seq}) with other content"
                        )
                    continue
                seq += 1
                h = event_hash(prev, seq, written_at, self._writer, body.encode())
                rows.append(_row(seq, ev, body, prev, h, written_at, self._writer))
                prev = h
                known[ev.event_id] = (seq, body)
            if rows:
                conn.execute(insert(EventRow), rows)  # executemany; psycopg pipelines it
                signature = key.sign(head_message(seq, prev)).hex()
                conn.execute(
                    update(HeadRow)
                    .where(HeadRow.id == HEAD_ID)
                    .values(seq=seq, head_hash=prev, key_id=key.key_id, signature=signature)
                )
            return [known[e.event_id][0] for e, _ in bodies]

        return self._write(work, what="append to the ledger")

    def _require_key(self) -> LedgerKey:
        if self._key is None:
            raise LedgerError("appending needs the ledger key: open the ledger with key=LedgerKey.load_or_create(...)")
        return self._key

    def _sign_genesis(self) -> None:
        """Sign an empty ledger's head, so that an auditor can check even an empty ledger's key."""
        key = self._require_key()
        try:
            with self._read() as conn:
                query = select(HeadRow.key_id, HeadRow.signature).where(HeadRow.id == HEAD_ID)
                head = conn.execute(query).one_or_none()
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read the ledger: {reason(exc)}") from exc
        if head is not None and head.signature is not None and head.key_id == key.key_id:
            return  # signed already (checked again under the lock before each append)

        def work(conn: Connection) -> None:
            head = self._locked_head(conn, key)
            if head.signature is None:  # still unsigned under the lock: another writer did not get there first
                conn.execute(
                    update(HeadRow)
                    .where(HeadRow.id == HEAD_ID)
                    .values(key_id=key.key_id, signature=key.sign(head_message(0, GENESIS_HASH)).hex())
                )

        self._write(work, what="sign the ledger's empty head")

    def _locked_head(self, conn: Connection, key: LedgerKey) -> _HeadState:
        """The head row, locked for this transaction, after checking it before building on it:
        a writer that extended a tampered head would sign over the tampering."""
        head = conn.execute(
            select(HeadRow.seq, HeadRow.head_hash, HeadRow.key_id, HeadRow.signature)
            .where(HeadRow.id == HEAD_ID)
            .with_for_update()  # PostgreSQL: the write lock; SQLite already holds it (BEGIN IMMEDIATE)
        ).one_or_none()
        if head is None:
            raise LedgerTamperedError("the ledger has no head row", seq=None)
        last = conn.execute(
            select(EventRow.seq, EventRow.event_hash).order_by(EventRow.seq.desc()).limit(1)
        ).one_or_none()
        last_seq, last_hash = (last.seq, last.event_hash) if last is not None else (0, GENESIS_HASH)
        if head.seq != last_seq or not _same(head.head_hash, last_hash):
            raise LedgerTamperedError(
                f"the ledger head (seq {head.seq}) does not match its last event (seq {last_seq}); "
                "refusing to append: run verify",
                seq=None,
            )
        if head.signature is None:
            if head.seq != 0:
                raise LedgerTamperedError(f"the ledger head at seq {head.seq} is not signed", seq=None)
            return head
        signed_by_us = _signature_ok(key.public_key(), head.signature, head.seq, head.head_hash)
        if head.key_id != key.key_id:
            if signed_by_us:
                raise LedgerTamperedError(f"the ledger head's key_id was edited (to {head.key_id})", seq=None)
            raise LedgerError(f"the ledger is signed by key {head.key_id}, not by this writer's key {key.key_id}")
        if not signed_by_us:
            raise LedgerTamperedError("the ledger head's signature does not verify; refusing to append", seq=None)
        return head

    @staticmethod
    def _known(conn: Connection, event_ids: list[str]) -> dict[str, tuple[int, str]]:
        """{event_id: (seq, body)} for those of `event_ids` already in the ledger."""
        known: dict[str, tuple[int, str]] = {}
        for i in range(0, len(event_ids), _IN_CHUNK):
            chunk = event_ids[i : i + _IN_CHUNK]
            for row in conn.execute(
                select(EventRow.event_id, EventRow.seq, EventRow.body).where(EventRow.event_id.in_(chunk))
            ):
                known[row.event_id] = (row.seq, row.body)
        return known

    def _write(self, work: Callable[[Connection], _T], *, what: str) -> _T:
        """Run `work` in one write transaction holding the ledger's write lock; retry on contention."""
        for attempt in range(_MAX_ATTEMPTS):
            try:
                with self._engine.connect() as conn:
                    conn.execution_options(**{WRITE: True})
                    with conn.begin():
                        return work(conn)
            except DBAPIError as exc:
                if not retryable(exc) or attempt == _MAX_ATTEMPTS - 1:
                    raise LedgerError(f"cannot {what}: {reason(exc)}") from exc
                time.sleep(min(1.0, 0.02 * 2**attempt) * random.uniform(0.5, 1.5))  # jitter, not crypto
            except SQLAlchemyError as exc:
                raise LedgerError(f"cannot {what}: {reason(exc)}") from exc
        raise AssertionError("unreachable")  # the loop returns or raises

    # ------------------------------------------------------------------ reading

    def _read(self) -> Connection:
        try:
            return self._engine.connect()
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read the ledger: {reason(exc)}") from exc

    def events(self, *, after_seq: int = 0, batch: int = 1000, node_id: str | None = None) -> Iterator[StoredEvent]:
        """Events with seq > `after_seq`, in seq order, read `batch` rows at a time.

        With `node_id`, only the events about that node: as the subject, or blamed by an audit.
        Raises LedgerTamperedError for a row whose body is not a valid event.
        """
        if after_seq < 0:
            raise LedgerError(f"after_seq must be >= 0, got {after_seq}")
        if batch < 1:
            raise LedgerError(f"batch must be >= 1, got {batch}")
        query = select(*_EVENT_COLUMNS).order_by(EventRow.seq).limit(batch)
        if node_id is not None:
            query = query.where(or_(EventRow.node_id == node_id, EventRow.blamed_node_id == node_id))
        last = after_seq
        while True:
            try:
                with self._read() as conn:
                    rows = conn.execute(query.where(EventRow.seq > last)).all()
            except SQLAlchemyError as exc:
                raise LedgerError(f"cannot read the ledger: {reason(exc)}") from exc
            for row in rows:
                yield StoredEvent(
                    seq=row.seq,
                    event=_parse_body(row.seq, row.body),
                    event_hash=row.event_hash,
                    prev_hash=row.prev_hash,
                    written_at=row.written_at,
                    writer=row.writer,
                )
            if len(rows) < batch:
                return
            last = rows[-1].seq

    def count(self) -> int:
        try:
            with self._read() as conn:
                return int(conn.execute(select(func.count()).select_from(EventRow)).scalar_one())
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read the ledger: {reason(exc)}") from exc

    def verify(self, public_key: LedgerPublicKey, *, batch: int = 1000) -> ChainCheck:
        """Check the whole chain and the head signature against `public_key`, in one snapshot.

        Raises LedgerTamperedError naming the first event that does not verify (a missing
        event is named by its seq), or seq=None when the head itself is wrong: unsigned,
        signed by another key, or its signature does not verify.
        """
        try:
            with self._read() as conn:
                if self._postgres:  # one snapshot for the head and every page of events
                    conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():  # SQLite: a deferred BEGIN; the snapshot starts at the first read
                    return self._verify(conn, public_key, batch)
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read the ledger: {reason(exc)}") from exc

    def _verify(self, conn: Connection, public_key: LedgerPublicKey, batch: int) -> ChainCheck:
        head = conn.execute(
            select(HeadRow.seq, HeadRow.head_hash, HeadRow.key_id, HeadRow.signature).where(HeadRow.id == HEAD_ID)
        ).one_or_none()
        if head is None:
            raise LedgerTamperedError("the ledger has no head row", seq=None)
        _check_head(head, public_key)
        expected, prev = 1, GENESIS_HASH
        query = select(*_EVENT_COLUMNS).order_by(EventRow.seq).limit(batch)
        while True:
            rows = conn.execute(query.where(EventRow.seq >= expected)).all()
            for row in rows:
                _check_row(row, expected, prev, head.seq, head.head_hash)
                expected, prev = expected + 1, row.event_hash
            if len(rows) < batch:
                break
        if expected - 1 != head.seq:
            raise LedgerTamperedError(
                f"event {expected} is missing: the chain ends at seq {expected - 1} but the signed head is at "
                f"seq {head.seq}",
                seq=expected,
            )
        return ChainCheck(events=head.seq, head_seq=head.seq, head_hash=head.head_hash)


# ---------------------------------------------------------------------- rows and checks


def _row(seq: int, ev: AnyEvent, body: str, prev_hash: str, h: str, written_at: float, writer: str) -> dict[str, Any]:
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


def _same(a: str, b: str) -> bool:
    """Constant-time equality of two hex hashes (bytes: compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def _parse_body(seq: int, body: str) -> AnyEvent:
    try:
        return parse_event(body)
    except pydantic.ValidationError:
        raise LedgerTamperedError(f"event {seq}: its body is not a valid event", seq=seq) from None


def _signature_ok(public_key: LedgerPublicKey, signature_hex: str, seq: int, head_hash: str) -> bool:
    try:
        signature = bytes.fromhex(signature_hex)
        message = head_message(seq, head_hash)
    except (ValueError, TypeError):  # not hex, or (SQLite) a value of another type
        return False
    return public_key.verify(signature, message)


def _check_head(head: _HeadState, public_key: LedgerPublicKey) -> None:
    if head.signature is None:
        if head.seq == 0 and head.head_hash == GENESIS_HASH:
            return  # never opened by a writer: nothing was ever signed, and there must be no events
        raise LedgerTamperedError(f"the ledger head (seq {head.seq}) is not signed", seq=None)
    if head.key_id != public_key.key_id:
        raise LedgerTamperedError(
            f"the ledger head names key {head.key_id}, not the key given ({public_key.key_id})", seq=None
        )
    if not _signature_ok(public_key, head.signature, head.seq, head.head_hash):
        raise LedgerTamperedError(
            f"the ledger head (seq {head.seq}) does not match its signature: the head was edited or "
            "signed by another key",
            seq=None,
        )


def _check_row(row: _EventState, expected: int, prev: str, head_seq: int, head_hash: str) -> None:
    """One row against the chain so far; raise naming the first bad seq."""
    seq = row.seq
    if not all(isinstance(v, str) for v in (row.body, row.writer, row.prev_hash, row.event_hash)) or not isinstance(
        row.written_at, float
    ):  # SQLite stores any type in any column
        raise LedgerTamperedError(f"event {seq}: a column holds a value of the wrong type", seq=seq)
    if seq != expected:  # rows come in seq order, so a jump means `expected` was deleted (or renumbered)
        raise LedgerTamperedError(f"event {expected} is missing (the next event is seq {seq})", seq=expected)
    if seq > head_seq:
        raise LedgerTamperedError(f"event {seq} is past the signed head (seq {head_seq})", seq=seq)
    if not _same(row.prev_hash, prev):
        raise LedgerTamperedError(f"event {seq}: prev_hash does not match event {seq - 1}'s hash", seq=seq)
    try:
        recomputed = event_hash(prev, seq, row.written_at, row.writer, row.body.encode())
    except (ValueError, UnicodeEncodeError):  # a malformed hash, a lone surrogate in the writer or body
        raise LedgerTamperedError(f"event {seq}: its columns cannot be hashed", seq=seq) from None
    if not _same(recomputed, row.event_hash):
        raise LedgerTamperedError(f"event {seq}: event_hash does not match its contents", seq=seq)
    if seq == head_seq and not _same(row.event_hash, head_hash):
        raise LedgerTamperedError(f"event {seq} does not match the signed head", seq=seq)
    ev = _parse_body(seq, row.body)
    if canonical_json(ev).decode() != row.body:
        raise LedgerTamperedError(f"event {seq}: its body is not in canonical form", seq=seq)
    expected_columns = _row(seq, ev, row.body, row.prev_hash, row.event_hash, row.written_at, row.writer)
    for name, value in expected_columns.items():
        if getattr(row, name) != value:
            raise LedgerTamperedError(f"event {seq}: column {name} does not match the event's body", seq=seq)
