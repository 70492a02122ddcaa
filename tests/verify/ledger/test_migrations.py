"""The Alembic migrations shipped in the package, on both backends."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

import corolla.verify.ledger as ledger_package
from corolla.verify.errors import LedgerError
from corolla.verify.ledger import GENESIS_HASH, Ledger, LedgerKey
from corolla.verify.ledger.schema import SCHEMA_REVISION, VERSION_TABLE, Base

from .conftest import raw_sql


def _sa(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1) if "://" in url else f"sqlite:///{url}"


def _query(url: str, sql: str) -> list[tuple[object, ...]]:
    engine = create_engine(_sa(url))
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql))]
    finally:
        engine.dispose()


def test_schema_revision_is_the_newest_migration() -> None:
    config = Config()
    config.set_main_option("script_location", str(Path(ledger_package.__file__).parent / "migrations"))
    config.set_main_option("path_separator", "os")
    assert ScriptDirectory.from_config(config).get_heads() == [SCHEMA_REVISION]


def test_upgrade_from_empty_creates_the_schema_and_an_unsigned_genesis_head(ledger_url: str) -> None:
    Ledger.open(ledger_url).close()
    assert _query(ledger_url, f"SELECT version_num FROM {VERSION_TABLE}") == [("0001",)]
    assert _query(ledger_url, "SELECT id, seq, head_hash, key_id, signature FROM ledger_head") == [
        (1, 0, GENESIS_HASH, None, None)
    ]
    engine = create_engine(_sa(ledger_url))
    try:
        with engine.connect() as conn:
            assert {"ledger_events", "ledger_head", VERSION_TABLE} <= set(inspect(conn).get_table_names())
            # The migration's DDL and the typed models describe the same schema.
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE, "compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_opening_again_is_a_no_op(ledger_url: str, key: LedgerKey, monkeypatch: pytest.MonkeyPatch) -> None:
    Ledger.open(ledger_url, key=key).close()
    head = _query(ledger_url, "SELECT seq, head_hash, key_id, signature FROM ledger_head")

    def no_upgrade(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a current schema must not be upgraded again")

    monkeypatch.setattr(command, "upgrade", no_upgrade)
    with Ledger.open(ledger_url, key=key) as ledger:
        assert ledger.count() == 0
    with Ledger.open(ledger_url, migrate=False) as ledger:
        assert ledger.verify(key.public_key()).head_seq == 0
    assert _query(ledger_url, "SELECT seq, head_hash, key_id, signature FROM ledger_head") == head


def test_a_newer_schema_revision_is_refused(ledger_url: str) -> None:
    Ledger.open(ledger_url).close()
    raw_sql(ledger_url, f"UPDATE {VERSION_TABLE} SET version_num = '0099_from_the_future'")
    for migrate in (True, False):
        with pytest.raises(LedgerError, match="0099_from_the_future, newer than this version of Corolla"):
            Ledger.open(ledger_url, migrate=migrate)


def test_migrate_false_refuses_an_empty_database(ledger_url: str) -> None:
    with pytest.raises(LedgerError, match=r"\(empty\), this code needs 0001: open it with migrate=True"):
        Ledger.open(ledger_url, migrate=False)
    engine = create_engine(_sa(ledger_url))
    try:
        with engine.connect() as conn:
            assert inspect(conn).get_table_names() == []  # nothing was created
    finally:
        engine.dispose()


def test_the_events_table_refuses_update_and_delete(ledger_url: str, key: LedgerKey) -> None:
    from .factories import mixed

    with Ledger.open(ledger_url, key=key) as ledger:
        ledger.append(mixed(3))
    engine = create_engine(_sa(ledger_url))
    try:
        for statement in ("UPDATE ledger_events SET writer = 'x' WHERE seq = 2", "DELETE FROM ledger_events"):
            with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
                conn.execute(text(statement))
    finally:
        engine.dispose()
    with Ledger.open(ledger_url) as ledger:
        assert ledger.count() == 3


def test_unreachable_postgresql_is_a_clear_error() -> None:
    with pytest.raises(
        LedgerError, match=r"cannot connect to the ledger at postgresql\+psycopg://nobody@127.0.0.1:1/x"
    ):
        Ledger.open("postgresql://nobody@127.0.0.1:1/x")


def test_the_password_is_not_in_errors() -> None:
    with pytest.raises(LedgerError) as info:
        Ledger.open("postgresql://nobody:hunter2@127.0.0.1:1/x")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("url", ["mysql://u@h/db", "postgresql+psycopg2://u@h/db", "ftp://x/y"])
def test_unknown_schemes_are_refused(url: str) -> None:
    with pytest.raises(LedgerError, match="unknown ledger URL scheme"):
        Ledger.open(url)


def test_sqlite_url_forms(tmp_path: Path, key: LedgerKey) -> None:
    from .factories import mixed

    path = tmp_path / "sub" / "dir" / "ledger.db"  # missing directories are created, like the key's
    with Ledger.open(f"sqlite:///{path}", key=key) as ledger:
        ledger.append(mixed(2))
    with Ledger.open(str(path)) as ledger:
        assert ledger.count() == 2
    assert _query(str(path), "PRAGMA journal_mode") == [("wal",)]
    with Ledger.open("sqlite://", key=key) as memory:  # in memory: for tests of other components
        memory.append(mixed(2))
        assert memory.verify(key.public_key()).events == 2
    with pytest.raises(LedgerError, match="is a directory"):
        Ledger.open(str(tmp_path))
