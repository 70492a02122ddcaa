"""The ledger's tables, as SQLAlchemy 2 typed models.

`ledger_events` is append-only: one row per event, numbered 1, 2, 3, ... without gaps,
each chained to the previous row by `prev_hash`/`event_hash` (see `chain.py`). `body` is
the canonical JSON exactly as hashed; the subject columns beside it are copies taken out
of the body so that reports and routing can find a node's events through an index
(`verify()` checks them against the body). Database triggers, created by the migration,
refuse UPDATE and DELETE on it.

`ledger_head` has one row (id 1): the last seq, its hash, and the ledger key's signature
over both. Appends lock this row, which is what serialises concurrent writers.

These models describe the schema at the newest migration; the migrations themselves
(`migrations/versions/`) spell out their DDL and never import this module, so that an
old migration keeps meaning what it meant when it was written.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, Double, Index, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["EVENTS_TABLE", "HEAD_ID", "HEAD_TABLE", "SCHEMA_REVISION", "VERSION_TABLE", "Base", "EventRow", "HeadRow"]

EVENTS_TABLE = "ledger_events"
HEAD_TABLE = "ledger_head"
SCHEMA_REVISION = "0001"  # the newest migration, which these models describe
VERSION_TABLE = "ledger_alembic_version"  # not `alembic_version`: the ledger may share a database
HEAD_ID = 1

# On SQLite an INTEGER primary key is the rowid itself (64-bit there): rows are stored in seq order.
_SEQ = BigInteger().with_variant(Integer(), "sqlite")

# Deterministic constraint names, so that migrations can refer to them on every backend.
_NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=_NAMING)


class EventRow(Base):
    """One ledger event and its link in the hash chain."""

    __tablename__ = EVENTS_TABLE

    seq: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=False)  # 1, 2, 3, ... no gaps
    event_id: Mapped[str] = mapped_column(String(64), unique=True)  # the event's own id: resends are not rewritten
    kind: Mapped[str] = mapped_column(String(16), index=True)  # "audit" | "quarantine" | "readmit"
    node_id: Mapped[str] = mapped_column(String(128))  # subject.node_id
    model_id: Mapped[str] = mapped_column(String(256))  # subject.model_id
    span_start: Mapped[int] = mapped_column(Integer)  # subject.start
    span_end: Mapped[int] = mapped_column(Integer)  # subject.end (exclusive)
    blamed_node_id: Mapped[str | None] = mapped_column(String(128), index=True)  # audit.blamed.node_id, if any
    at: Mapped[float] = mapped_column(Double)  # the event's own time (unix seconds)
    body: Mapped[str] = mapped_column(Text)  # canonical JSON, exactly the bytes hashed
    prev_hash: Mapped[str] = mapped_column(String(64))  # hex; event_hash of seq - 1 (64 zeros for seq 1)
    event_hash: Mapped[str] = mapped_column(String(64))  # hex; see chain.event_hash
    written_at: Mapped[float] = mapped_column(Double)  # unix seconds the row was appended
    writer: Mapped[str] = mapped_column(String(128))  # who appended it

    __table_args__ = (Index(None, "node_id", "model_id", "span_start", "span_end"),)


class HeadRow(Base):
    """The signed head of the chain: exactly one row, id 1."""

    __tablename__ = HEAD_TABLE

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)  # last event's seq; 0 while the ledger is empty
    head_hash: Mapped[str] = mapped_column(String(64))  # last event's event_hash; 64 zeros while empty
    key_id: Mapped[str | None] = mapped_column(String(16))  # the signing key (None until a writer opens it)
    signature: Mapped[str | None] = mapped_column(String(128))  # hex Ed25519 over chain.head_message(seq, head_hash)

    __table_args__ = (CheckConstraint(f"id = {HEAD_ID}", name="single_row"),)
