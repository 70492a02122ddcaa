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
bounded however long the ledger is; `verify` and `scan` (reading every event while checking
the chain, for reports) do it inside one snapshot. `Ledger.open_readonly` is for auditors:
it writes nothing at all (see `_database.create_readonly_engine`). `witness()` is the signed
head for others to keep; `verify(..., witness=)` catches a ledger rolled back behind one.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Final, TypeVar

import pydantic
from sqlalchemy import Connection, Engine, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from corolla.verify.errors import LedgerError, LedgerTamperedError
from corolla.verify.events import canonical_json
from corolla.verify.ledger._database import (
    WRITE,
    check_schema,
    create_ledger_engine,
    create_readonly_engine,
    normalise_url,
    prepare_schema,
    reason,
    retryable,
)
from corolla.verify.ledger._rows import (
    EVENT_COLUMNS,
    AnyEvent,
    ChainCheck,
    HeadState,
    StoredEvent,
    parse_body,
    read_head,
    row_values,
    same,
    stored_event,
    verify_head,
)
from corolla.verify.ledger.chain import GENESIS_HASH, event_hash, head_message
from corolla.verify.ledger.scan import LedgerScan
from corolla.verify.ledger.schema import HEAD_ID, EventRow, HeadRow
from corolla.verify.ledger.signing import LedgerKey, LedgerPublicKey, SignatureError
from corolla.verify.ledger.witness import Witness

__all__ = ["AnyEvent", "ChainCheck", "Ledger", "LedgerScan", "StoredEvent"]

_T = TypeVar("_T")

_MAX_ATTEMPTS: Final = 12  # tries per write transaction on lock or serialization errors
_IN_CHUNK: Final = 500  # event_ids per `IN (...)` lookup
_WRITER_MAX: Final = 128  # the writer column's width


class Ledger:
    """The event ledger on SQLite or PostgreSQL. Open with `Ledger.open(url, key=...)`."""

    def __init__(
        self,
        engine: Engine,
        *,
        key: LedgerKey | None,
        writer: str,
        clock: Callable[[], float],
        where: str | None = None,
    ) -> None:
        """Use `Ledger.open`; this wraps an engine already configured and migrated."""
        self.where = where or engine.url.render_as_string(hide_password=True)  # the ledger, for messages
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

    @classmethod
    def open_readonly(cls, url: str | os.PathLike[str]) -> Ledger:
        """Open an existing ledger to read and verify it, without writing anything: no schema
        created or migrated, no head signed, and for SQLite no file created beside it.

        LedgerError when there is no ledger at `url` (a missing file, an unreachable server)
        or its schema is at another revision; LedgerTamperedError when the database is empty
        or holds no ledger (an emptied file). Appending to it raises LedgerError.
        """
        engine, where = create_readonly_engine(os.fspath(url))
        try:
            check_schema(engine, where)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, key=None, writer="", clock=time.time, where=where)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self.where!r}, writer={self._writer!r})"

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
                rows.append(row_values(seq, ev, body, prev, h, written_at, self._writer))
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

    def _locked_head(self, conn: Connection, key: LedgerKey) -> HeadState:
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
        if head.seq != last_seq or not same(head.head_hash, last_hash):
            raise LedgerTamperedError(
                f"the ledger head (seq {head.seq}) does not match its last event (seq {last_seq}); "
                "refusing to append: run verify",
                seq=None,
            )
        if head.signature is None:
            if head.seq != 0:
                raise LedgerTamperedError(f"the ledger head at seq {head.seq} is not signed", seq=None)
            return head
        try:
            verify_head(key.public_key(), head.seq, head.head_hash, head.signature)
        except SignatureError:
            if head.key_id != key.key_id:
                raise LedgerError(
                    f"the ledger is signed by key {head.key_id}, not by this writer's key {key.key_id}"
                ) from None
            raise LedgerTamperedError(
                "the ledger head's signature does not verify; refusing to append", seq=None
            ) from None
        if head.key_id != key.key_id:  # signed by us, yet naming another key
            raise LedgerTamperedError(f"the ledger head's key_id was edited (to {head.key_id})", seq=None)
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

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        """A read transaction that sees one state of the ledger throughout: the head and every page."""
        with self._read() as conn:
            if self._postgres:
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():  # SQLite: a deferred BEGIN; the snapshot starts at the first read
                yield conn

    def events(self, *, after_seq: int = 0, batch: int = 1000, node_id: str | None = None) -> Iterator[StoredEvent]:
        """Events with seq > `after_seq`, in seq order, read `batch` rows at a time.

        With `node_id`, only the events about that node: as the subject, or blamed by an audit.
        Raises LedgerTamperedError for a row whose body is not a valid event.
        """
        if after_seq < 0:
            raise LedgerError(f"after_seq must be >= 0, got {after_seq}")
        _check_batch(batch)
        query = select(*EVENT_COLUMNS).order_by(EventRow.seq).limit(batch)
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
                yield stored_event(row, parse_body(row.seq, row.body))
            if len(rows) < batch:
                return
            last = rows[-1].seq

    def count(self) -> int:
        try:
            with self._read() as conn:
                return int(conn.execute(select(func.count()).select_from(EventRow)).scalar_one())
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read the ledger: {reason(exc)}") from exc

    def verify(self, public_key: LedgerPublicKey, *, witness: Witness | None = None, batch: int = 1000) -> ChainCheck:
        """Check the whole chain and the head signature against `public_key`, in one snapshot,
        and, given a `witness` (a signed head seen earlier), that the ledger still holds it.

        Raises LedgerTamperedError naming the first event that does not verify (a missing
        event is named by its seq), or seq=None when the head itself is wrong: unsigned (the
        genesis head included), signed by another key, or its signature does not verify;
        LedgerRolledBackError when the ledger is older than the witness or forked from it;
        WitnessError when the witness is not signed by `public_key`.
        """
        if witness is not None:
            witness.check(public_key)
        scan = self.scan(public_key, batch=batch)
        for _ in scan:  # the same walk as a report's: one implementation of the checks
            pass
        outcome = scan.chain
        if isinstance(outcome, LedgerTamperedError):
            raise outcome
        if outcome is None:  # cannot happen: a scan with a public key always has an outcome
            raise LedgerError("the chain check gave no outcome")
        if witness is not None:
            self.check_witness(outcome, witness)
        return outcome

    def check_witness(self, check: ChainCheck, witness: Witness) -> None:
        """After `check` (a verified chain): LedgerRolledBackError if the ledger is older than
        `witness` or holds another event at its seq. Rows are append-only, so the event at the
        witness's seq read now is the one the verified chain held. Check the witness's
        signature first (`witness.check`)."""
        if witness.seq > check.head_seq:
            witness.check_ledger(check.head_seq, None)
            return
        witness.check_ledger(check.head_seq, self.hash_at(witness.seq))

    def hash_at(self, seq: int) -> str | None:
        """The event_hash of event `seq` (seq 0: the genesis hash); None if there is no such event."""
        if seq == 0:
            return GENESIS_HASH
        try:
            with self._read() as conn:
                value = conn.execute(select(EventRow.event_hash).where(EventRow.seq == seq)).scalar_one_or_none()
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read the ledger: {reason(exc)}") from exc
        return value if isinstance(value, str) else None

    def witness(self) -> Witness:
        """The ledger's current signed head as a witness, for others to keep. Its signature is
        not checked here (an auditor checks it with the public key); LedgerTamperedError when
        the head is missing or unsigned."""
        try:
            with self._read() as conn:
                head = read_head(conn)
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read the ledger: {reason(exc)}") from exc
        if head is None:
            raise LedgerTamperedError("the ledger has no head row", seq=None)
        if head.signature is None or head.key_id is None:
            raise LedgerTamperedError(f"the ledger head (seq {head.seq}) is not signed", seq=None)
        try:
            return Witness(seq=head.seq, head_hash=head.head_hash, key_id=head.key_id, signature=head.signature)
        except pydantic.ValidationError:  # SQLite stores any type in any column
            raise LedgerTamperedError(f"the ledger head (seq {head.seq!r}) is malformed", seq=None) from None

    def scan(self, public_key: LedgerPublicKey | None, *, batch: int = 1000) -> LedgerScan:
        """Every event, in seq order, with the chain checked as it is read: one pass instead of
        `verify` and then `events` (each row is read and parsed once). See `LedgerScan`.

        `public_key` None reads without checking (`chain` is then None).
        """
        _check_batch(batch)
        return LedgerScan(self._snapshot, public_key, batch)


def _check_batch(batch: int) -> None:
    if batch < 1:
        raise LedgerError(f"batch must be >= 1, got {batch}")
