"""Ledger fixtures: one URL per backend, each test on its own fresh database.

SQLite gets a file under tmp_path. PostgreSQL gets a database created for the test on the
server in COROLLA_TEST_PG (default postgres@127.0.0.1:5432, trust auth) and dropped after;
when that server is unreachable the PostgreSQL cases are skipped, saying why.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, text

from corolla.verify.ledger import LedgerKey

PG_SERVER = os.environ.get("COROLLA_TEST_PG", "postgresql://postgres@127.0.0.1:5432")

BACKENDS = ["sqlite", "postgresql"]


def _pg_admin() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        why = f"PostgreSQL at {PG_SERVER} is unreachable ({str(exc).strip().splitlines()[0]})"
        if os.environ.get("COROLLA_REQUIRE_PG"):  # CI, where PostgreSQL is part of the machine: never skip
            pytest.fail(why + "; COROLLA_REQUIRE_PG is set")
        pytest.skip(why)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test."""
    admin = _pg_admin()
    name = f"corolla_ledger_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL (or a plain path, for SQLite) of an empty database on each backend."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(scope="session")
def key() -> LedgerKey:
    return LedgerKey.generate()


def raw_sql(url: str, *statements: str) -> None:
    """Run statements as someone with direct database access: the append-only triggers are
    switched off first, as an attacker with DDL rights would."""
    sa_url = url.replace("postgresql://", "postgresql+psycopg://", 1) if "://" in url else f"sqlite:///{url}"
    engine = create_engine(sa_url)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                conn.execute(text("DROP TRIGGER IF EXISTS ledger_events_no_update"))
                conn.execute(text("DROP TRIGGER IF EXISTS ledger_events_no_delete"))
            else:
                conn.execute(text("ALTER TABLE ledger_events DISABLE TRIGGER USER"))
            for statement in statements:
                conn.exec_driver_sql(statement)
            if engine.dialect.name != "sqlite":
                conn.execute(text("ALTER TABLE ledger_events ENABLE TRIGGER USER"))
    finally:
        engine.dispose()
