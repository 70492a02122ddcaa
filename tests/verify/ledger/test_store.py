"""Appending and reading back: round trips, idempotent resends, all-or-nothing batches, paging."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import event

from corolla.verify.errors import LedgerError, LedgerTamperedError
from corolla.verify.events import canonical_json
from corolla.verify.ledger import GENESIS_HASH, AnyEvent, Ledger, LedgerKey, StoredEvent
from corolla.verify.ledger.chain import event_hash
from corolla.verify.ledger.signing import LedgerKey as _LedgerKey

from .factories import audit, mixed, readmit


def test_round_trip(ledger_url: str, key: LedgerKey) -> None:
    events = mixed(7)
    clock = itertools.count(1_800_000_000.0, 0.5)
    with Ledger.open(ledger_url, key=key, writer="coordinator", clock=lambda: next(clock)) as ledger:
        assert ledger.append(events[:4]) == [1, 2, 3, 4]
        assert ledger.append(events[4:]) == [5, 6, 7]
        assert ledger.count() == 7
        stored = list(ledger.events())
    assert [s.event for s in stored] == events
    assert [s.seq for s in stored] == list(range(1, 8))
    assert {s.writer for s in stored} == {"coordinator"}
    # one written_at per append call, from the injected clock
    assert [s.written_at for s in stored] == [1_800_000_000.0] * 4 + [1_800_000_000.5] * 3
    prev = GENESIS_HASH
    for s in stored:
        assert s.prev_hash == prev
        assert s.event_hash == event_hash(prev, s.seq, s.written_at, s.writer, canonical_json(s.event))
        prev = s.event_hash
    with Ledger.open(ledger_url) as reader:
        check = reader.verify(key.public_key())
    assert (check.events, check.head_seq, check.head_hash) == (7, 7, prev)


def test_resends_are_not_written_again(ledger_url: str, key: LedgerKey) -> None:
    a, b, c = mixed(3)
    with Ledger.open(ledger_url, key=key) as ledger:
        assert ledger.append([a, b]) == [1, 2]
        assert ledger.append([b, c, a, c]) == [2, 3, 1, 3]  # old ones keep their seq; c once
        assert ledger.append([a, b, c]) == [1, 2, 3]  # a full resend writes nothing
        assert ledger.append([]) == []
        assert ledger.count() == 3
        assert ledger.verify(key.public_key()).head_seq == 3


def test_same_event_id_with_other_content_is_refused_and_nothing_is_written(ledger_url: str, key: LedgerKey) -> None:
    with Ledger.open(ledger_url, key=key) as ledger:
        ledger.append([readmit("r1")])
        forged = readmit("r1").model_copy(update={"reason": "changed"})
        with pytest.raises(LedgerError, match=r"'readmit-00r1' is already in the ledger \(seq 1\) with other content"):
            ledger.append([readmit("r2"), forged])
        with pytest.raises(LedgerError, match="'readmit-00r3' is already in the ledger"):  # twice in one batch
            ledger.append([readmit("r3"), readmit("r3").model_copy(update={"reason": "changed"})])
        assert ledger.count() == 1
        assert ledger.verify(key.public_key()).head_seq == 1


def test_a_batch_failing_midway_leaves_no_trace(
    ledger_url: str, key: LedgerKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows are inserted before the head is signed: a failure there rolls them back."""
    with Ledger.open(ledger_url, key=key) as ledger:
        ledger.append(mixed(2, "first"))

        def broken_sign(self: _LedgerKey, data: bytes) -> bytes:
            raise RuntimeError("signer unavailable")

        monkeypatch.setattr(_LedgerKey, "sign", broken_sign)
        with pytest.raises(RuntimeError, match="signer unavailable"):
            ledger.append(mixed(5, "second"))
        monkeypatch.undo()
        assert ledger.count() == 2
        assert ledger.verify(key.public_key()).head_seq == 2
        assert ledger.append(mixed(5, "second")) == [3, 4, 5, 6, 7]


def test_appending_needs_the_key(ledger_url: str, key: LedgerKey) -> None:
    with Ledger.open(ledger_url) as reader, pytest.raises(LedgerError, match="appending needs the ledger key"):
        reader.append(mixed(1))


def test_another_writer_key_is_refused(ledger_url: str, key: LedgerKey) -> None:
    with Ledger.open(ledger_url, key=key) as ledger:
        ledger.append(mixed(1))
    with pytest.raises(LedgerError, match=f"signed by key {key.key_id}, not by this writer's key"):
        Ledger.open(ledger_url, key=LedgerKey.generate())


def test_the_empty_head_is_signed_by_the_first_writer(ledger_url: str, key: LedgerKey) -> None:
    with Ledger.open(ledger_url) as reader, pytest.raises(LedgerTamperedError, match=r"genesis head .* not signed"):
        reader.verify(key.public_key())  # never opened by a writer: nothing vouches for it (nor for an emptied one)
    Ledger.open(ledger_url, key=key).close()
    with Ledger.open(ledger_url) as reader:
        check = reader.verify(key.public_key())
        assert (check.events, check.head_seq, check.head_hash) == (0, 0, GENESIS_HASH)


def test_events_pages_through_the_table(ledger_url: str, key: LedgerKey) -> None:
    events = mixed(250)
    with Ledger.open(ledger_url, key=key) as ledger:
        ledger.append(events)
        selects: list[str] = []
        event.listen(ledger._engine, "before_cursor_execute", lambda *a: selects.append(a[2]))
        stored = list(ledger.events(batch=100))
        assert [s.seq for s in stored] == list(range(1, 251))
        assert sum("FROM ledger_events" in s for s in selects) == 3  # 100 + 100 + 50 rows, never all at once
        assert [s.seq for s in ledger.events(after_seq=240, batch=3)] == list(range(241, 251))
        assert list(ledger.events(after_seq=250)) == []
        with pytest.raises(LedgerError, match="batch must be >= 1"):
            next(ledger.events(batch=0))


def test_events_about_one_node(ledger_url: str, key: LedgerKey) -> None:
    events: list[AnyEvent] = [
        audit("1", node="n1"),
        audit("2", node="n2", blamed="n1"),
        readmit("3", node="n3"),
        audit("4", node="n1"),
    ]
    with Ledger.open(ledger_url, key=key) as ledger:
        ledger.append(events)
        about_n1: list[StoredEvent] = list(ledger.events(node_id="n1", batch=1))
        assert [s.seq for s in about_n1] == [1, 2, 4]  # subject of 1 and 4, blamed by 2
        assert [s.seq for s in ledger.events(node_id="n3")] == [3]
        assert list(ledger.events(node_id="nobody")) == []


def test_long_writer_names_are_refused() -> None:
    with pytest.raises(LedgerError, match="writer must be at most 128 characters"):
        Ledger.open("sqlite://", writer="w" * 129)
