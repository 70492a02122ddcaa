"""The ledger's first schema: the append-only events table and the signed head.

Revision ID: 0001
Revises:
Create Date: 2025-11-26

Besides the tables, triggers refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL) on
`ledger_events`, so that no code path of Corolla can rewrite history by mistake. Someone
with DDL rights can drop them; the hash chain and the head signature are what catch that.
The head starts at seq 0 with the genesis hash and no signature: the first writer to open
the ledger signs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_GENESIS_HASH = "0" * 64

_SQLITE_TRIGGERS = (
    "CREATE TRIGGER ledger_events_no_update BEFORE UPDATE ON ledger_events "
    "BEGIN SELECT RAISE(ABORT, 'ledger_events is append-only'); END",
    "CREATE TRIGGER ledger_events_no_delete BEFORE DELETE ON ledger_events "
    "BEGIN SELECT RAISE(ABORT, 'ledger_events is append-only'); END",
)
_POSTGRESQL_TRIGGERS = (
    "CREATE FUNCTION ledger_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN RAISE EXCEPTION 'ledger_events is append-only'; END $$",
    "CREATE TRIGGER ledger_events_append_only BEFORE UPDATE OR DELETE ON ledger_events "
    "FOR EACH ROW EXECUTE FUNCTION ledger_events_append_only()",
    "CREATE TRIGGER ledger_events_no_truncate BEFORE TRUNCATE ON ledger_events "
    "FOR EACH STATEMENT EXECUTE FUNCTION ledger_events_append_only()",
)


def upgrade() -> None:
    op.create_table(
        "ledger_events",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("node_id", sa.String(128), nullable=False),
        sa.Column("model_id", sa.String(256), nullable=False),
        sa.Column("span_start", sa.Integer(), nullable=False),
        sa.Column("span_end", sa.Integer(), nullable=False),
        sa.Column("blamed_node_id", sa.String(128), nullable=True),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("event_hash", sa.String(64), nullable=False),
        sa.Column("written_at", sa.Double(), nullable=False),
        sa.Column("writer", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_ledger_events"),
        sa.UniqueConstraint("event_id", name="uq_ledger_events_event_id"),
    )
    op.create_index("ix_ledger_events_kind", "ledger_events", ["kind"])
    op.create_index("ix_ledger_events_blamed_node_id", "ledger_events", ["blamed_node_id"])
    op.create_index(
        "ix_ledger_events_node_id_model_id_span_start_span_end",
        "ledger_events",
        ["node_id", "model_id", "span_start", "span_end"],
    )
    head = op.create_table(
        "ledger_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=True),
        sa.Column("signature", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_head"),
        sa.CheckConstraint("id = 1", name="ck_ledger_head_single_row"),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "head_hash": _GENESIS_HASH, "key_id": None, "signature": None}])
    dialect = op.get_bind().dialect.name
    for statement in _SQLITE_TRIGGERS if dialect == "sqlite" else _POSTGRESQL_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TRIGGER ledger_events_no_update")
        op.execute("DROP TRIGGER ledger_events_no_delete")
    op.drop_table("ledger_head")
    op.drop_table("ledger_events")  # drops its triggers on PostgreSQL
    if dialect != "sqlite":
        op.execute("DROP FUNCTION ledger_events_append_only()")
