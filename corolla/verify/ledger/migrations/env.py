"""Alembic's entry point for the ledger's migrations.

`Ledger.open` runs `command.upgrade` with its own connection, already inside a
transaction that holds the migration lock, in `config.attributes["connection"]`: the
upgrade then commits or rolls back with that transaction, and two processes opening a new
database at once cannot both create the tables. Without a connection (a developer running
`alembic` by hand to write a new revision), `sqlalchemy.url` from the config is used.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from corolla.verify.ledger.schema import VERSION_TABLE, Base


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE)
    with context.begin_transaction():  # a no-op inside the caller's transaction
        context.run_migrations()


def _main() -> None:
    config = context.config
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        _run(given)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("the ledger migrations need a connection or a sqlalchemy.url")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=Base.metadata, version_table=VERSION_TABLE, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.begin() as connection:
        _run(connection)


_main()
