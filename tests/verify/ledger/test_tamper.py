"""Tampering with the database directly: every edit, deletion and insertion is caught, naming
the first bad seq (or seq=None when the head itself is wrong). Every case also checks that
`Ledger.scan` (one pass, for reports) reaches the same verdict, and reads the same events,
as `verify` followed by `events` did."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corolla.verify.errors import LedgerTamperedError
from corolla.verify.events import canonical_json
from corolla.verify.ledger import Ledger, LedgerKey, StoredEvent
from corolla.verify.ledger.chain import event_hash

from .conftest import raw_sql
from .factories import mixed, readmit
from .two_pass import assert_scan_matches_two_pass

N = 10  # events in the ledger under attack, appended in three batches


def _build(url: str, key: LedgerKey) -> list[StoredEvent]:
    events = mixed(N)
    with Ledger.open(url, key=key, writer="coordinator") as ledger:
        ledger.append(events[:4])
        ledger.append(events[4:7])
        ledger.append(events[7:])
        assert ledger.verify(key.public_key()).head_seq == N
        return list(ledger.events())


def _verify(url: str, key: LedgerKey) -> LedgerTamperedError:
    """`verify`'s error, after checking that a scan names the same one and reads the same events."""
    with Ledger.open(url) as ledger:
        with pytest.raises(LedgerTamperedError) as info:
            ledger.verify(key.public_key())
        assert_scan_matches_two_pass(ledger, key.public_key())
    return info.value


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


ROW_EDITS = {
    "body of a middle row": (
        """UPDATE ledger_events SET body = replace(body, '"reason":"ok"', '"reason":"OK"') WHERE seq = 5""",
        5,
    ),
    "body of the first row": ("UPDATE ledger_events SET body = body || ' ' WHERE seq = 1", 1),
    "body that is not JSON": ("UPDATE ledger_events SET body = 'nonsense' WHERE seq = 5", 5),
    "event_hash": (f"UPDATE ledger_events SET event_hash = '{'f' * 64}' WHERE seq = 5", 5),
    "prev_hash": (f"UPDATE ledger_events SET prev_hash = '{'0' * 64}' WHERE seq = 5", 5),
    "written_at": ("UPDATE ledger_events SET written_at = written_at + 1 WHERE seq = 5", 5),
    "writer": ("UPDATE ledger_events SET writer = 'mallory' WHERE seq = 5", 5),
    "indexed node_id": ("UPDATE ledger_events SET node_id = 'node-x' WHERE seq = 5", 5),
    "indexed span": ("UPDATE ledger_events SET span_end = 99 WHERE seq = 5", 5),
    "indexed blamed node": ("UPDATE ledger_events SET blamed_node_id = NULL WHERE seq = 1", 1),
    "event_id": ("UPDATE ledger_events SET event_id = 'renamed-event' WHERE seq = 5", 5),
    "kind": ("UPDATE ledger_events SET kind = 'audit' WHERE seq = 5", 5),
    "event time": ("UPDATE ledger_events SET at = at + 1 WHERE seq = 5", 5),
    "seq renumbered": ("UPDATE ledger_events SET seq = 50 WHERE seq = 5", 5),
    "last row's body": ("UPDATE ledger_events SET body = body || ' ' WHERE seq = 10", 10),
    "delete the first row": ("DELETE FROM ledger_events WHERE seq = 1", 1),
    "delete a middle row": ("DELETE FROM ledger_events WHERE seq = 5", 5),
    "delete the last row": ("DELETE FROM ledger_events WHERE seq = 10", 10),
    "delete all rows": ("DELETE FROM ledger_events", 1),
}


ROW_EDITS_SQLITE = {  # SQLite keeps whatever type it is given
    "written_at as text": ("UPDATE ledger_events SET written_at = 'yesterday' WHERE seq = 5", 5),
    "body as a blob": ("UPDATE ledger_events SET body = CAST(body AS BLOB) WHERE seq = 5", 5),
    "non-ASCII prev_hash": (f"UPDATE ledger_events SET prev_hash = '{'é' * 64}' WHERE seq = 5", 5),
    "head seq as text": ("UPDATE ledger_head SET seq = 'ten'", None),
    "head seq as a real": ("UPDATE ledger_head SET seq = 9.5", None),
    "head signature as a blob": ("UPDATE ledger_head SET signature = X'00'", None),
}


@pytest.mark.parametrize("edit", ROW_EDITS_SQLITE, ids=list(ROW_EDITS_SQLITE))
def test_values_of_the_wrong_type_are_caught(tmp_path: Path, key: LedgerKey, edit: str) -> None:
    url = str(tmp_path / "ledger.db")
    _build(url, key)
    statement, bad_seq = ROW_EDITS_SQLITE[edit]
    raw_sql(url, statement)
    assert _verify(url, key).seq == bad_seq


@pytest.mark.parametrize("edit", ROW_EDITS, ids=list(ROW_EDITS))
def test_row_tampering_names_the_first_bad_seq(ledger_url: str, key: LedgerKey, edit: str) -> None:
    _build(ledger_url, key)
    statement, bad_seq = ROW_EDITS[edit]
    raw_sql(ledger_url, statement)
    assert _verify(ledger_url, key).seq == bad_seq


def test_a_consistently_rehashed_last_row_does_not_match_the_head(ledger_url: str, key: LedgerKey) -> None:
    stored = _build(ledger_url, key)
    last = stored[-1]
    body = canonical_json(readmit("forged", node="node-0", at=last.event.at)).decode()
    h = event_hash(last.prev_hash, N, last.written_at, last.writer, body.encode())
    raw_sql(
        ledger_url,
        f"UPDATE ledger_events SET body = {_sql_str(body)}, event_hash = '{h}', event_id = 'readmit-forged', "
        f"kind = 'readmit', node_id = 'node-0', blamed_node_id = NULL WHERE seq = {N}",
    )
    error = _verify(ledger_url, key)
    assert error.seq == N
    assert "does not match the signed head" in str(error)


def test_a_forged_row_past_the_head_is_caught(ledger_url: str, key: LedgerKey) -> None:
    stored = _build(ledger_url, key)
    ev = readmit("forged")
    body = canonical_json(ev).decode()
    written_at = stored[-1].written_at + 1
    h = event_hash(stored[-1].event_hash, N + 1, written_at, "coordinator", body.encode())
    raw_sql(
        ledger_url,
        "INSERT INTO ledger_events (seq, event_id, kind, node_id, model_id, span_start, span_end, blamed_node_id, "
        "at, body, prev_hash, event_hash, written_at, writer) VALUES "
        f"({N + 1}, '{ev.event_id}', 'readmit', 'node-c', 'tiny-llama', 0, 2, NULL, {ev.at}, {_sql_str(body)}, "
        f"'{stored[-1].event_hash}', '{h}', {written_at}, 'coordinator')",
    )
    error = _verify(ledger_url, key)
    assert error.seq == N + 1
    assert "past the signed head" in str(error)


HEAD_EDITS = {
    "head hash": f"UPDATE ledger_head SET head_hash = '{'a' * 64}'",
    "head seq": "UPDATE ledger_head SET seq = 9",
    "head signature": "UPDATE ledger_head SET signature = '00' || substr(signature, 3)",
    "head signature removed": "UPDATE ledger_head SET signature = NULL",
    "head key id": "UPDATE ledger_head SET key_id = '0123456789abcdef'",
    "head row deleted": "DELETE FROM ledger_head",
}


@pytest.mark.parametrize("edit", HEAD_EDITS, ids=list(HEAD_EDITS))
def test_head_tampering_is_caught(ledger_url: str, key: LedgerKey, edit: str) -> None:
    _build(ledger_url, key)
    raw_sql(ledger_url, HEAD_EDITS[edit])
    assert _verify(ledger_url, key).seq is None
    with pytest.raises(LedgerTamperedError), Ledger.open(ledger_url, key=key) as writer:
        writer.append([readmit("after")])  # a writer never signs over a bad head (refused at open or append)


def test_truncation_to_an_unsigned_head_is_caught(ledger_url: str, key: LedgerKey) -> None:
    stored = _build(ledger_url, key)
    raw_sql(
        ledger_url,
        f"DELETE FROM ledger_events WHERE seq = {N}",
        f"UPDATE ledger_head SET seq = {N - 1}, head_hash = '{stored[N - 2].event_hash}'",
    )
    error = _verify(ledger_url, key)
    assert error.seq is None
    assert "does not match its signature" in str(error)


def test_a_wrong_public_key_is_caught(ledger_url: str, key: LedgerKey) -> None:
    _build(ledger_url, key)
    error = _verify(ledger_url, LedgerKey.generate())
    assert error.seq is None
    assert f"names key {key.key_id}" in str(error)


def test_a_middle_row_edit_survives_later_appends(ledger_url: str, key: LedgerKey) -> None:
    """Appends check the head, not the whole chain; the edit stays visible to verify()."""
    _build(ledger_url, key)
    raw_sql(ledger_url, ROW_EDITS["writer"][0])
    with Ledger.open(ledger_url, key=key) as ledger:
        assert ledger.append([readmit("later")]) == [N + 1]
    assert _verify(ledger_url, key).seq == 5


# ---------------------------------------------------------------------- property

_MUTATIONS = {
    "body": "UPDATE ledger_events SET body = body || ' ' WHERE seq = {seq}",
    "event_hash": "UPDATE ledger_events SET event_hash = '{ff}' WHERE seq = {seq}",
    "prev_hash": "UPDATE ledger_events SET prev_hash = '{ff}' WHERE seq = {seq}",
    "written_at": "UPDATE ledger_events SET written_at = written_at - 0.5 WHERE seq = {seq}",
    "writer": "UPDATE ledger_events SET writer = writer || 'x' WHERE seq = {seq}",
    "model_id": "UPDATE ledger_events SET model_id = 'other' WHERE seq = {seq}",
    "delete": "DELETE FROM ledger_events WHERE seq = {seq}",
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LedgerKey]:
    key = LedgerKey.generate()
    path = tmp_path_factory.mktemp("pristine") / "ledger.db"
    _build(str(path), key)
    return path, key


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=st.integers(min_value=1, max_value=N), mutation=st.sampled_from(sorted(_MUTATIONS)), n=st.integers(0, 10**9))
def test_any_single_edit_is_named_by_its_seq(
    pristine: tuple[Path, LedgerKey], tmp_path: Path, seq: int, mutation: str, n: int
) -> None:
    source, key = pristine
    copy = tmp_path / f"copy-{n}.db"
    with sqlite3.connect(source) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    raw_sql(str(copy), _MUTATIONS[mutation].format(seq=seq, ff="f" * 64))
    assert _verify(str(copy), key).seq == seq
