"""Read-only verification and witnesses: `Ledger.open_readonly` writes nothing and refuses an
emptied ledger; a witness (a signed head seen earlier) catches a rollback to an older signed
copy and a fork, which the chain alone cannot."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from corolla.verify.errors import LedgerError, LedgerTamperedError
from corolla.verify.ledger import (
    GENESIS_HASH,
    Ledger,
    LedgerKey,
    LedgerRolledBackError,
    Witness,
    WitnessError,
    newer_witness,
)

from .conftest import raw_sql
from .factories import audit

N, OLD = 80, 48  # events in the ledger; events in the older signed copy it is rolled back to


def _write(url: str, key: LedgerKey, tags: range) -> Witness:
    with Ledger.open(url, key=key, writer="coordinator") as ledger:
        ledger.append([audit(str(i)) for i in tags])
        return ledger.witness()


def _files(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------------- the witness itself


def test_a_witness_is_the_signed_head_and_round_trips(tmp_path: Path, key: LedgerKey) -> None:
    witness = _write(str(tmp_path / "l.db"), key, range(3))
    assert (witness.seq, witness.key_id) == (3, key.key_id)
    witness.check(key.public_key())
    witness.save(tmp_path / "w.json")
    assert Witness.load(tmp_path / "w.json") == witness
    assert set(witness.model_dump()) == {"format", "seq", "head_hash", "key_id", "signature"}


def test_a_witness_of_another_key_or_edited_is_refused(tmp_path: Path, key: LedgerKey) -> None:
    witness = _write(str(tmp_path / "l.db"), key, range(3))
    with pytest.raises(WitnessError, match="not by the key given"):
        witness.check(LedgerKey.generate().public_key())
    with pytest.raises(WitnessError, match="does not match its signature"):
        witness.model_copy(update={"seq": 4}).check(key.public_key())


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        "[]",
        "not json",
        '{"seq": -1, "head_hash": "' + "0" * 64 + '", "key_id": "' + "0" * 16 + '", "signature": "' + "0" * 128 + '"}',
        '{"seq": "3", "head_hash": "' + "0" * 64 + '", "key_id": "' + "0" * 16 + '", "signature": "' + "0" * 128 + '"}',
        '{"seq": 3, "head_hash": "' + "0" * 63 + '", "key_id": "' + "0" * 16 + '", "signature": "' + "0" * 128 + '"}',
        '{"seq": 3, "head_hash": "' + "0" * 64 + '", "key_id": "' + "0" * 16 + '", "signature": "' + "0" * 128 + '",'
        ' "extra": 1}',
        '{"format": "v0", "seq": 3, "head_hash": "'
        + "0" * 64
        + '", "key_id": "'
        + "0" * 16
        + '", "signature": "'
        + "0" * 128
        + '"}',
    ],
)
def test_a_malformed_witness_is_refused(text: str) -> None:
    with pytest.raises(WitnessError, match="is not a ledger witness"):
        Witness.from_json(text)


def test_a_keeper_only_moves_forward(tmp_path: Path, key: LedgerKey) -> None:
    url = str(tmp_path / "l.db")
    w3 = _write(url, key, range(3))
    w5 = _write(url, key, range(3, 5))
    assert newer_witness(None, w3) == w3
    assert newer_witness(w3, w5) == w5
    assert newer_witness(w5, w5) is None
    with pytest.raises(LedgerRolledBackError, match="older than the one kept at seq 5"):
        newer_witness(w5, w3)
    fork = _write(str(tmp_path / "fork.db"), key, range(100, 105))
    with pytest.raises(LedgerRolledBackError, match="forked"):
        newer_witness(w5, fork)
    other = _write(str(tmp_path / "other.db"), LedgerKey.generate(), range(9))
    with pytest.raises(WitnessError, match="signed by key"):
        newer_witness(w5, other)


# ---------------------------------------------------------------------- read-only


def test_verify_changes_no_byte_and_creates_no_file(tmp_path: Path, key: LedgerKey) -> None:
    directory = tmp_path / "ledger"
    directory.mkdir()
    db = directory / "ledger.db"
    witness = _write(str(db), key, range(5))
    before = _files(directory)
    assert list(before) == ["ledger.db"]
    with Ledger.open_readonly(db) as ledger:
        assert ledger.verify(key.public_key(), witness=witness).head_seq == 5
        assert len(list(ledger.events())) == 5
    raw_sql(str(db), "DELETE FROM ledger_events WHERE seq = 3")
    bad = _files(directory)
    with Ledger.open_readonly(db) as ledger, pytest.raises(LedgerTamperedError, match="event 3 is missing"):
        ledger.verify(key.public_key())
    assert _files(directory) == bad
    assert before != bad


def test_open_readonly_refuses_to_append(tmp_path: Path, key: LedgerKey) -> None:
    db = tmp_path / "ledger.db"
    _write(str(db), key, range(2))
    with Ledger.open_readonly(db) as ledger, pytest.raises(LedgerError, match="needs the ledger key"):
        ledger.append([audit("x")])


def test_a_missing_file_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no ledger at") as info:
        Ledger.open_readonly(tmp_path / "nowhere" / "ledger.db")
    assert not isinstance(info.value, LedgerTamperedError)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "the database is empty"), (b"garbage" * 200, "not an SQLite database")],
    ids=["emptied", "not a database"],
)
def test_an_emptied_or_foreign_file_is_tampering(tmp_path: Path, key: LedgerKey, content: bytes, message: str) -> None:
    db = tmp_path / "ledger.db"
    _write(str(db), key, range(3))
    db.write_bytes(content)
    with pytest.raises(LedgerTamperedError, match=message) as info:
        Ledger.open_readonly(db)
    assert str(db) in str(info.value)
    assert db.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.db"]


def test_a_database_without_the_ledger_schema_is_tampering(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE other (x INTEGER)")
    engine.dispose()
    with pytest.raises(LedgerTamperedError, match="without the ledger's schema"):
        Ledger.open_readonly(db)


def test_an_empty_postgres_database_is_tampering_and_stays_empty(pg_url: str) -> None:
    with pytest.raises(LedgerTamperedError, match="the database is empty"):
        Ledger.open_readonly(pg_url)
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            assert inspect(conn).get_table_names() == []
    finally:
        engine.dispose()


def test_verify_on_postgres_writes_nothing(pg_url: str, key: LedgerKey) -> None:
    witness = _write(pg_url, key, range(4))
    with Ledger.open_readonly(pg_url) as ledger:
        assert ledger.verify(key.public_key(), witness=witness).head_seq == 4
        with ledger._engine.connect() as conn:  # every transaction is read-only
            assert conn.exec_driver_sql("SHOW transaction_read_only").scalar_one() == "on"


# ---------------------------------------------------------------------- emptied in SQL


def test_an_unsigned_genesis_head_is_refused(ledger_url: str, key: LedgerKey) -> None:
    _write(ledger_url, key, range(5))
    raw_sql(
        ledger_url,
        "DELETE FROM ledger_events",
        f"UPDATE ledger_head SET seq = 0, head_hash = '{GENESIS_HASH}', key_id = NULL, signature = NULL",
    )
    with Ledger.open_readonly(ledger_url) as ledger, pytest.raises(LedgerTamperedError, match="genesis") as info:
        ledger.verify(key.public_key())
    assert info.value.seq is None


def test_a_missing_head_row_is_refused(ledger_url: str, key: LedgerKey) -> None:
    _write(ledger_url, key, range(2))
    raw_sql(ledger_url, "DELETE FROM ledger_head")
    with Ledger.open_readonly(ledger_url) as ledger, pytest.raises(LedgerTamperedError, match="no head row"):
        ledger.verify(key.public_key())


def test_a_signed_empty_ledger_verifies(ledger_url: str, key: LedgerKey) -> None:
    Ledger.open(ledger_url, key=key).close()
    with Ledger.open_readonly(ledger_url) as ledger:
        check = ledger.verify(key.public_key(), witness=ledger.witness())
    assert (check.events, check.head_seq, check.head_hash) == (0, 0, GENESIS_HASH)


# ---------------------------------------------------------------------- rollback and fork


def _roll_back(url: str, key: LedgerKey, tmp_path: Path) -> tuple[Witness, Witness]:
    """Write OLD events, keep a copy (SQLite: the file; PostgreSQL: the signed head row), write
    up to N, then restore the copy. The witnesses at OLD and at N."""
    old = _write(url, key, range(OLD))
    if "://" not in url:
        shutil.copyfile(url, tmp_path / "backup.db")
    new = _write(url, key, range(OLD, N))
    if "://" not in url:
        shutil.copyfile(tmp_path / "backup.db", url)
    else:
        raw_sql(
            url,
            f"DELETE FROM ledger_events WHERE seq > {OLD}",
            f"UPDATE ledger_head SET seq = {old.seq}, head_hash = '{old.head_hash}', signature = '{old.signature}'",
        )
    return old, new


def test_a_rollback_verifies_alone_and_not_against_a_witness(ledger_url: str, key: LedgerKey, tmp_path: Path) -> None:
    old, new = _roll_back(ledger_url, key, tmp_path)
    with Ledger.open_readonly(ledger_url) as ledger:
        assert ledger.verify(key.public_key()).head_seq == OLD  # by design: the chain alone cannot tell
        assert ledger.verify(key.public_key(), witness=old).head_seq == OLD
        with pytest.raises(LedgerRolledBackError, match=f"seq {OLD}, older than the witness's seq {N}") as info:
            ledger.verify(key.public_key(), witness=new)
    assert isinstance(info.value, LedgerTamperedError)
    assert info.value.exit_code == 14


def test_an_older_witness_of_a_longer_ledger_verifies(ledger_url: str, key: LedgerKey) -> None:
    old = _write(ledger_url, key, range(5))
    _write(ledger_url, key, range(5, 9))
    with Ledger.open_readonly(ledger_url) as ledger:
        assert ledger.verify(key.public_key(), witness=old).head_seq == 9


def test_a_fork_is_caught(tmp_path: Path, key: LedgerKey) -> None:
    """The key holder rewrites history: another ledger, as long or longer, signed by the same key."""
    seen = _write(str(tmp_path / "a.db"), key, range(5))
    _write(str(tmp_path / "b.db"), key, range(100, 108))
    with Ledger.open_readonly(tmp_path / "b.db") as ledger, pytest.raises(LedgerRolledBackError, match="forked"):
        ledger.verify(key.public_key(), witness=seen)


def test_a_witness_of_another_key_is_not_evidence(tmp_path: Path, key: LedgerKey) -> None:
    _write(str(tmp_path / "a.db"), key, range(2))
    foreign = _write(str(tmp_path / "b.db"), LedgerKey.generate(), range(2))
    with Ledger.open_readonly(tmp_path / "a.db") as ledger, pytest.raises(WitnessError) as info:
        ledger.verify(key.public_key(), witness=foreign)
    assert not isinstance(info.value, LedgerTamperedError)


def test_a_malformed_head_gives_no_witness(tmp_path: Path, key: LedgerKey) -> None:
    db = str(tmp_path / "l.db")
    _write(db, key, range(2))
    raw_sql(db, "UPDATE ledger_head SET head_hash = 'not a hash'")
    with Ledger.open_readonly(db) as ledger, pytest.raises(LedgerTamperedError, match="malformed"):
        ledger.witness()
