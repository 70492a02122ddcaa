"""`Ledger.scan`: every event read once while the chain is checked, for audit reports.

A report needs all the events and whether the chain verifies. `verify` and then `events`
would read and parse every row twice; a scan does both in one pass, in one snapshot, with
the chain checks (`_rows.check_head`, `check_row`, `check_end`). `Ledger.verify` is a scan
read to the end that raises its outcome: the checks exist once.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager

from sqlalchemy import Connection, select
from sqlalchemy.exc import SQLAlchemyError

from corolla.verify.errors import LedgerError, LedgerTamperedError
from corolla.verify.ledger._database import reason
from corolla.verify.ledger._rows import (
    EVENT_COLUMNS,
    AnyEvent,
    ChainCheck,
    HeadState,
    StoredEvent,
    check_end,
    check_head,
    check_row,
    parse_body,
    read_head,
    stored_event,
)
from corolla.verify.ledger.chain import GENESIS_HASH
from corolla.verify.ledger.schema import EventRow
from corolla.verify.ledger.signing import LedgerPublicKey

__all__ = ["LedgerScan"]


class LedgerScan(Iterator[StoredEvent]):
    """The ledger's events read once, in seq order and in one snapshot, while the hash chain
    and the signed head are checked: what an audit report needs.

    `chain` is what `verify` returns, or the LedgerTamperedError it raises (naming the first
    bad event, or the head): `verify` is this scan read to the end. A scan does not stop
    there: it reads on, so that a report of a tampered ledger still shows what is left, and
    steps over rows whose body is not an event (where `events` would raise), listing their
    seqs in `unreadable`. Iterate it once to the end, then read `chain`; the snapshot is
    released at the end, or by `close()`.
    """

    def __init__(
        self,
        snapshot: Callable[[], AbstractContextManager[Connection]],
        public_key: LedgerPublicKey | None,
        batch: int,
    ) -> None:
        """Use `Ledger.scan`."""
        self.unreadable: list[int] = []  # seqs of rows whose body is not a valid event, left out
        self._public_key = public_key
        self._batch = batch
        self._outcome: ChainCheck | LedgerTamperedError | None = None
        self._finished = False
        self._events = self._read(snapshot)

    def __iter__(self) -> LedgerScan:
        return self

    def __next__(self) -> StoredEvent:
        return next(self._events)

    def close(self) -> None:
        """Stop early and release the snapshot (`chain` stays unknown)."""
        self._events.close()

    @property
    def chain(self) -> ChainCheck | LedgerTamperedError | None:
        """`verify`'s outcome: its ChainCheck, or the error it would have raised; None without a public key."""
        if not self._finished:
            raise LedgerError("the scan has not read the whole ledger yet: iterate it to the end first")
        return self._outcome

    def _read(self, snapshot: Callable[[], AbstractContextManager[Connection]]) -> Generator[StoredEvent]:
        try:
            with snapshot() as conn:
                yield from self._walk(conn)
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read the ledger: {reason(exc)}") from exc
        self._finished = True

    def _walk(self, conn: Connection) -> Iterator[StoredEvent]:
        failure: LedgerTamperedError | None = None
        head: HeadState | None = None  # the head the rows are checked against; None once they are not
        if self._public_key is not None:
            head = read_head(conn)
            try:
                if head is None:
                    raise LedgerTamperedError("the ledger has no head row", seq=None)
                check_head(head, self._public_key)
            except LedgerTamperedError as exc:
                failure, head = exc, None
        signed = head
        expected, prev, last = 1, GENESIS_HASH, 0
        query = select(*EVENT_COLUMNS).order_by(EventRow.seq).limit(self._batch)
        while True:
            rows = conn.execute(query.where(EventRow.seq > last)).all()
            for row in rows:
                event: AnyEvent | None = None
                if head is not None:
                    try:
                        event = check_row(row, expected, prev, head.seq, head.head_hash)
                        expected, prev = expected + 1, row.event_hash
                    except LedgerTamperedError as exc:  # the first bad event: from here on, only read
                        failure, head = exc, None
                if event is None:
                    try:
                        event = parse_body(row.seq, row.body)
                    except LedgerTamperedError:
                        self.unreadable.append(row.seq)
                        continue
                yield stored_event(row, event)
            if len(rows) < self._batch:
                break
            last = rows[-1].seq
        if head is not None:
            try:
                check_end(expected, head.seq)
            except LedgerTamperedError as exc:
                failure = exc
        if self._public_key is not None:
            if failure is None and signed is not None:
                self._outcome = ChainCheck(events=signed.seq, head_seq=signed.seq, head_hash=signed.head_hash)
            else:
                self._outcome = failure
