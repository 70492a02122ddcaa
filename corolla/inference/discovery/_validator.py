"""py-libp2p record validator for the `/corolla/` value namespace.

Every Corolla node registers it, so a peer storing replicas refuses malformed records
and records filed under another node's or model's key, and, when it already holds a
record, keeps whichever has the newest `updated_at` (py-libp2p calls `select` with the
existing value first). It cannot check who signed the record (py-libp2p does not pass
the signature to validators); readers do that in `_rpc.py`.
"""

from __future__ import annotations

import math

from libp2p.records.validator import Validator

from corolla.inference.discovery import _keys
from corolla.inference.discovery._record import ServerRecord
from corolla.inference.errors import DiscoveryError


def check_record(key: str, value: bytes) -> ServerRecord:
    """Parse `value` and check that it belongs under `key`; DiscoveryError if not."""
    record = ServerRecord.from_bytes(value)
    if _keys.record_key(record.model_id, record.node_id) != key:
        raise DiscoveryError(
            f"record of node {record.node_id} for model {record.model_id!r} is filed under another key"
        )
    return record


class RecordValidator(Validator):
    """Validate server records and prefer the newest one of a key."""

    def validate(self, key: str, value: bytes) -> None:
        check_record(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        # Ties go to the later value, which in py-libp2p's PUT_VALUE path is the one
        # arriving: a re-sent record (py-libp2p republishes a fresh put on its own, see
        # `ValueStore._republish_records`) is then acknowledged, not refused with a reset.
        best, best_time = 0, -math.inf
        for i, value in enumerate(values):
            try:
                updated_at = check_record(key, value).updated_at
            except DiscoveryError:
                continue
            if updated_at >= best_time:
                best, best_time = i, updated_at
        return best
