"""The ledger's hash chain and head signature, byte for byte (pure functions, no I/O).

Every event row is chained to the one before it; the head names the last row and is
signed by the ledger key. The exact bytes, so that an auditor can re-implement the check:

    event_hash(seq) = SHA-256(
        prev_hash     32 bytes   event_hash(seq - 1) as raw bytes; 32 zero bytes for seq 1
        seq            8 bytes   unsigned, big-endian
        written_at     8 bytes   IEEE-754 binary64, big-endian (unix time the row was written)
        len(writer)    4 bytes   unsigned, big-endian: length of the writer's UTF-8 bytes
        writer         UTF-8     who appended the row (e.g. the coordinator's node id)
        body           the rest  `canonical_json(event)`: sorted keys, no spaces, UTF-8
    )

    head signature = Ed25519(ledger key,
        b"corolla/ledger/v1/head\\x00"   23 bytes, domain separation
        seq            8 bytes   unsigned, big-endian: the last event's seq (0: empty ledger)
        head_hash     32 bytes   that event's event_hash as raw bytes (genesis: 32 zero bytes)
    )

Hashes are stored as 64 lowercase hex characters. `written_at` and `writer` are inside
the hash, so that no column of a row can change unnoticed; the indexed columns copied out
of the body (node, model, span, ...) are checked against the body when verifying. Every
field before the body has a fixed width or a length prefix, so no two rows hash the same.

What the chain cannot show on its own: a ledger cut back to an older head that the key
did sign. A witness (`witness.py`: the latest signed head, kept by others) catches that.
"""

from __future__ import annotations

import hashlib
import struct

__all__ = ["GENESIS_HASH", "HEAD_DOMAIN", "event_hash", "head_message"]

GENESIS_HASH = "0" * 64  # prev_hash of the first event, and the head hash of an empty ledger
HEAD_DOMAIN = b"corolla/ledger/v1/head\x00"

_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")
_U32 = struct.Struct(">I")


def _raw_hash(hex_hash: str) -> bytes:
    raw = bytes.fromhex(hex_hash)
    if len(raw) != 32 or len(hex_hash) != 64:
        raise ValueError(f"a hash is 64 hex characters, got {len(hex_hash)}")
    return raw


def event_hash(prev_hash: str, seq: int, written_at: float, writer: str, body: bytes) -> str:
    """The hex SHA-256 chaining one event row to the previous one (layout in the module docstring).

    Raises ValueError for a malformed `prev_hash` (not 64 hex characters) or a `seq` outside 1..2**64-1.
    """
    if not 1 <= seq < 2**64:
        raise ValueError(f"seq is in 1..2**64-1, got {seq}")
    writer_bytes = writer.encode()
    h = hashlib.sha256()
    h.update(_raw_hash(prev_hash))
    h.update(_U64.pack(seq))
    h.update(_F64.pack(written_at))
    h.update(_U32.pack(len(writer_bytes)))
    h.update(writer_bytes)
    h.update(body)
    return h.hexdigest()


def head_message(seq: int, head_hash: str) -> bytes:
    """The bytes the ledger key signs for a head at `seq` whose last event hashes to `head_hash`."""
    if not 0 <= seq < 2**64:
        raise ValueError(f"the head seq is in 0..2**64-1, got {seq}")
    return HEAD_DOMAIN + _U64.pack(seq) + _raw_hash(head_hash)
