"""Connecting to the ledger's database: URLs, engines, transactions, migrations, retries.

SQLite and PostgreSQL differ in how a writer takes the ledger's write lock, and this is
where the difference lives, so that `store.py` reads the same on both:

- SQLite: pysqlite's own transaction handling is switched off and SQLAlchemy emits BEGIN
  itself (the recipe in SQLAlchemy's SQLite dialect documentation), as `BEGIN IMMEDIATE`
  for a write transaction (execution option `WRITE`), so a writer holds the database's
  write lock from its first statement instead of failing to upgrade a read lock later.
  WAL mode keeps readers from blocking the writer; a busy timeout makes writers queue.
- PostgreSQL: plain READ COMMITTED transactions; the caller locks the head row with
  `SELECT ... FOR UPDATE`. Migrations hold a transaction-scoped advisory lock.

The schema is brought to the newest Alembic revision (shipped in `migrations/`) inside
one transaction holding that lock, so processes opening a new database at once do not
race to create it. Alembic is imported only when the schema is not current.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Connection, Engine, column, create_engine, event, inspect, select, table, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from corolla.verify.errors import LedgerError, LedgerTamperedError
from corolla.verify.ledger.schema import EVENTS_TABLE, HEAD_TABLE, SCHEMA_REVISION, VERSION_TABLE

__all__ = [
    "WRITE",
    "check_schema",
    "create_ledger_engine",
    "create_readonly_engine",
    "normalise_url",
    "prepare_schema",
    "reason",
    "retryable",
]

WRITE: Final = "corolla_ledger_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)

_MIGRATIONS: Final = Path(__file__).parent / "migrations"
_SQLITE_BUSY_TIMEOUT_S: Final = 30.0  # how long SQLite waits for another writer before "database is locked"
_PG_CONNECT_TIMEOUT_S: Final = 10  # an unreachable server fails open() within this
_MIGRATION_LOCK: Final = 0x636F726F6C6C61  # pg_advisory_xact_lock key held while migrating ("corolla")
_RETRY_SQLSTATES: Final = frozenset({"40001", "40P01", "55P03"})  # serialization failure, deadlock, lock timeout


# ---------------------------------------------------------------------- URLs and engines


def normalise_url(url: str) -> URL:
    """A SQLAlchemy URL for a path, sqlite:// or postgresql:// address; LedgerError otherwise."""
    if "://" not in url:
        return _sqlite_file_url(Path(url).expanduser())
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise LedgerError(f"not a database URL: {url!r}") from None
    scheme = parsed.drivername
    if scheme in {"postgresql", "postgres", "postgresql+psycopg"}:
        return parsed.set(drivername="postgresql+psycopg")
    if scheme in {"sqlite", "sqlite+pysqlite"}:
        if parsed.database in (None, "", ":memory:"):
            return parsed.set(drivername="sqlite+pysqlite", database=":memory:")
        return _sqlite_file_url(Path(parsed.database).expanduser())
    raise LedgerError(
        f"unknown ledger URL scheme {scheme!r}: use a file path, sqlite:///path or postgresql://user@host/db"
    )


def _sqlite_file_url(path: Path) -> URL:
    path = path.resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # like the key: <workspace>/ledger/
    except OSError as exc:
        raise LedgerError(f"cannot create the ledger's directory {path.parent}: {exc.strerror}") from None
    if path.is_dir():
        raise LedgerError(f"the ledger path {path} is a directory; give a file such as {path / 'ledger.db'}")
    return URL.create("sqlite+pysqlite", database=str(path))


def create_ledger_engine(url: URL) -> Engine:
    """An engine for `url` (from `normalise_url`), connected once to fail early; LedgerError if unreachable."""
    if url.get_backend_name() == "postgresql":
        args: dict[str, Any] = {} if "connect_timeout" in url.query else {"connect_timeout": _PG_CONNECT_TIMEOUT_S}
        engine = create_engine(url, connect_args=args, pool_pre_ping=True, pool_size=2, max_overflow=4)
    else:
        memory = url.database == ":memory:"
        engine = create_engine(
            url,
            connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
            poolclass=StaticPool if memory else None,  # in memory: one connection, or each would see its own db
        )
        _sqlite_transactions(engine, wal=not memory)
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        engine.dispose()
        raise LedgerError(
            f"cannot connect to the ledger at {url.render_as_string(hide_password=True)}: {reason(exc)}"
        ) from exc
    return engine


def create_readonly_engine(url: str) -> tuple[Engine, str]:
    """An engine that cannot write to the ledger at `url`, and how to name the ledger in errors.

    SQLite: the file must exist; nothing is created beside it (no directory, no WAL mode
    switched on). With no `-wal` file (no writer has it open) it is opened `immutable=1`,
    which reads the file alone and creates no `-wal`/`-shm`; a writer that starts meanwhile
    is not seen (verify a quiet ledger). With a `-wal` file (a writer is live, or crashed)
    it is opened `mode=ro`, which reads the WAL's committed transactions through the
    existing files. PostgreSQL: every transaction is READ ONLY (`default_transaction_read_only`).
    """
    parsed = _parse_url(url) if "://" in url else None
    if parsed is not None and parsed.get_backend_name() == "postgresql":
        parsed = normalise_url(url)
        where = parsed.render_as_string(hide_password=True)
        engine = create_engine(
            parsed,
            connect_args={"connect_timeout": _PG_CONNECT_TIMEOUT_S, "options": "-c default_transaction_read_only=on"},
            pool_pre_ping=True,
            pool_size=2,
            max_overflow=4,
        )
        _connect_once(engine, where)
        return engine, where
    if parsed is not None and parsed.get_backend_name() != "sqlite":
        normalise_url(url)  # raises, naming the schemes allowed
    if parsed is not None and parsed.database in (None, "", ":memory:"):
        raise LedgerError("an in-memory SQLite ledger cannot be verified from outside its process")
    path = Path(parsed.database if parsed is not None and parsed.database else url).expanduser()
    where = str(path)
    if not path.is_file():
        raise LedgerError(f"no ledger at {where} (nothing has been audited there yet; give --ledger URL)")
    mode = "mode=ro" if Path(f"{path}-wal").exists() else "mode=ro&immutable=1"
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?{mode}"

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, timeout=_SQLITE_BUSY_TIMEOUT_S, check_same_thread=False)
        conn.isolation_level = None  # SQLAlchemy emits BEGIN (below): one snapshot across pages
        return conn

    engine = create_engine("sqlite+pysqlite://", creator=connect)

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    _connect_once(engine, where)
    return engine, where


def _parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError:
        raise LedgerError(f"not a database URL: {url!r}") from None


def _connect_once(engine: Engine, where: str) -> None:
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        engine.dispose()
        raise LedgerError(f"cannot connect to the ledger at {where}: {reason(exc)}") from exc


def check_schema(engine: Engine, where: str) -> None:
    """Without writing: the database holds the ledger's schema at this code's revision.

    LedgerTamperedError for an empty or schema-less database (an emptied file, or not a
    database at all): a ledger once written always has its schema. LedgerError for a
    schema at another revision (open it with a writer to migrate).
    """
    try:
        with engine.connect() as conn:
            current = _stamped(conn)
            tables = set(inspect(conn).get_table_names())
    except DBAPIError as exc:
        if isinstance(exc.orig, sqlite3.DatabaseError) and "not a database" in str(exc.orig):
            raise LedgerTamperedError(f"{where}: not a ledger (not an SQLite database)", seq=None) from None
        raise LedgerError(f"cannot read the ledger at {where}: {reason(exc)}") from exc
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot read the ledger at {where}: {reason(exc)}") from exc
    if not current:
        what = "empty" if not tables else "without the ledger's schema"
        raise LedgerTamperedError(f"{where}: the database is {what}: no ledger, not even a signed head", seq=None)
    if current != (SCHEMA_REVISION,):
        raise LedgerError(
            f"{where}: the ledger's schema is at revision {', '.join(current)}, this code reads {SCHEMA_REVISION}: "
            "open it with a writer to migrate, or use the matching version of Corolla"
        )
    missing = {EVENTS_TABLE, HEAD_TABLE} - tables
    if missing:
        raise LedgerTamperedError(f"{where}: the ledger has no table {', '.join(sorted(missing))}", seq=None)


def _sqlite_transactions(engine: Engine, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None  # pysqlite emits no BEGIN of its own
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(_SQLITE_BUSY_TIMEOUT_S * 1000)}")
            if wal:
                cursor.execute("PRAGMA journal_mode = WAL")  # persistent: readers never block the writer
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")


# ---------------------------------------------------------------------- schema


def _stamped(conn: Connection) -> tuple[str, ...]:
    """The revisions the database is stamped with; () for a database without the ledger."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return ()
    version = table(VERSION_TABLE, column("version_num"))
    return tuple(str(v) for v in conn.execute(select(version.c.version_num)).scalars())


def prepare_schema(engine: Engine, *, migrate: bool) -> None:
    """Check the schema revision; upgrade to the newest one under the migration lock if allowed."""
    try:
        with engine.connect() as conn:
            current = _stamped(conn)
        if current == (SCHEMA_REVISION,):
            return  # the usual case, without importing Alembic
        _migrate(engine, current, migrate=migrate)
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot migrate the ledger's schema: {reason(exc)}") from exc


def _migrate(engine: Engine, current: tuple[str, ...], *, migrate: bool) -> None:
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.set_main_option("path_separator", "os")
    script = ScriptDirectory.from_config(config)
    heads = tuple(script.get_heads())
    known = {rev.revision for rev in script.walk_revisions()}

    def is_current(revisions: tuple[str, ...]) -> bool:
        """True when at the newest revision; LedgerError for a revision this code does not know."""
        unknown = [rev for rev in revisions if rev not in known]
        if unknown:
            raise LedgerError(
                f"the ledger's schema is at revision {', '.join(unknown)}, newer than this version of Corolla "
                f"knows (newest: {', '.join(heads)}): upgrade Corolla"
            )
        return set(revisions) == set(heads)

    if is_current(current):
        return
    if not migrate:
        raise LedgerError(
            f"the ledger's schema is at revision {', '.join(current) or '(empty)'}, this code needs "
            f"{', '.join(heads)}: open it with migrate=True"
        )
    with engine.connect() as conn:
        conn.execution_options(**{WRITE: True})  # SQLite: BEGIN IMMEDIATE serialises migrations
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            if is_current(_stamped(conn)):
                return  # another process migrated while we waited for the lock
            config.attributes["connection"] = conn  # env.py runs the upgrade inside this transaction
            command.upgrade(config, "head")


# ---------------------------------------------------------------------- errors


def retryable(exc: DBAPIError) -> bool:
    """Contention or a dropped connection: a fresh transaction may well succeed."""
    if exc.connection_invalidated:
        return True
    if isinstance(exc, IntegrityError):
        return True  # a duplicate seq/event_id from a writer that raced us: the retry sees its rows
    if getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES:
        return True
    message = str(exc.orig).lower()
    return "database is locked" in message or "database is busy" in message


def reason(exc: SQLAlchemyError) -> str:
    """The driver's message, first line only (SQLAlchemy appends the SQL and a link)."""
    source: BaseException = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(source).strip().splitlines()
    return lines[0] if lines else type(source).__name__
