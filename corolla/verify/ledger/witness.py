"""Witnesses: a ledger's signed head as others saw it, to catch a ledger rolled back or forked.

The chain and the head signature show that a ledger is one the key signed, not that it is
the latest one: a copy restored from an older backup verifies on its own. A witness is the
signed head (seq, head hash, key id, signature) kept outside the ledger by someone who saw
it (the sites keep the newest one the coordinator hands them; an auditor keeps the one a
report printed). Its signature is the head signature itself (`chain.head_message`), so it
is checked with the ledger's public key alone and forging one needs the ledger key.

A ledger is consistent with a witness when its head seq is at least the witness's and its
event at that seq hashes to the witness's head hash (seq 0: the genesis hash). Otherwise it
was rolled back (its head is older) or forked (another history at that seq).

The file, one JSON object (UTF-8):

    {"format": "corolla/ledger-witness/v1", "seq": 80, "head_hash": "<64 hex>",
     "key_id": "<16 hex>", "signature": "<128 hex: Ed25519 over head_message(seq, head_hash)>"}
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal

import pydantic

from corolla.verify.errors import LedgerError, LedgerTamperedError
from corolla.verify.ledger.chain import head_message
from corolla.verify.ledger.signing import LedgerPublicKey, SignatureError

__all__ = ["WITNESS_FORMAT", "LedgerRolledBackError", "Witness", "WitnessError", "newer_witness"]

WITNESS_FORMAT: Literal["corolla/ledger-witness/v1"] = "corolla/ledger-witness/v1"
_MAX_BYTES = 4096  # a witness is ~330 bytes; anything far larger is not one


class WitnessError(LedgerError):
    """A witness that cannot be used: unreadable, malformed, or not signed by the given key."""


class LedgerRolledBackError(LedgerTamperedError):
    """The ledger is older than a witness of it, or holds another history at the witness's seq."""


class Witness(pydantic.BaseModel):
    """A signed ledger head as seen by someone outside the ledger."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", strict=True)

    format: Literal["corolla/ledger-witness/v1"] = WITNESS_FORMAT
    seq: int = pydantic.Field(ge=0, lt=2**64)  # the head's last event (0: an empty ledger)
    head_hash: str = pydantic.Field(pattern=r"^[0-9a-f]{64}$")  # that event's event_hash
    key_id: str = pydantic.Field(pattern=r"^[0-9a-f]{16}$")  # the signing key's id
    signature: str = pydantic.Field(pattern=r"^[0-9a-f]{128}$")  # Ed25519 over head_message(seq, head_hash)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "the witness") -> Witness:
        """Parse a witness; WitnessError naming `source` and the first bad field."""
        try:
            return cls.model_validate_json(text)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(the object)"
            raise WitnessError(f"{source} is not a ledger witness: {where}: {first['msg']}") from None

    @classmethod
    def load(cls, path: Path) -> Witness:
        try:
            with path.open("rb") as f:
                data = f.read(_MAX_BYTES + 1)
        except OSError as exc:
            raise WitnessError(f"cannot read the witness {path}: {exc.strerror}") from None
        if len(data) > _MAX_BYTES:
            raise WitnessError(f"{path} is not a ledger witness: over {_MAX_BYTES} bytes")
        return cls.from_json(data, source=str(path))

    def to_json(self) -> str:
        return self.model_dump_json()

    def save(self, path: Path) -> None:
        """Atomically (write a private temporary file, then rename): a reader never sees half a witness."""
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json() + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise WitnessError(f"cannot write the witness {path}: {exc.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def check(self, public_key: LedgerPublicKey) -> None:
        """Return if this witness is signed by `public_key`; WitnessError otherwise."""
        if self.key_id != public_key.key_id:
            raise WitnessError(
                f"the witness is signed by key {self.key_id}, not by the key given ({public_key.key_id})"
            )
        try:
            public_key.verify(head_message(self.seq, self.head_hash), bytes.fromhex(self.signature))
        except SignatureError:
            raise WitnessError(f"the witness of seq {self.seq} does not match its signature") from None

    def check_ledger(self, head_seq: int, hash_at_seq: str | None) -> None:
        """Compare a verified ledger with this witness: `head_seq` is the ledger's signed head,
        `hash_at_seq` its event_hash at `self.seq` (the genesis hash for seq 0; None: no such event).
        LedgerRolledBackError when the ledger is older than the witness or forked from it."""
        if head_seq < self.seq:
            raise LedgerRolledBackError(
                f"rolled back: the ledger's signed head is at seq {head_seq}, older than the witness's seq {self.seq}",
                seq=head_seq + 1,
            )
        if hash_at_seq != self.head_hash:
            raise LedgerRolledBackError(
                f"forked: event {self.seq} is not the one the witness saw (hash {self.head_hash[:16]}...)",
                seq=self.seq or None,
            )


def newer_witness(kept: Witness | None, offered: Witness) -> Witness | None:
    """What a keeper of witnesses does with one it is offered: the witness to keep now (None:
    keep what it has). LedgerRolledBackError when `offered` is older than `kept` or forks from
    it at the same seq; WitnessError when it names another key (another ledger, or a forgery)."""
    if kept is None:
        return offered
    if offered.key_id != kept.key_id:
        raise WitnessError(f"the ledger witness is signed by key {offered.key_id}, the one kept by key {kept.key_id}")
    if offered.seq < kept.seq:
        raise LedgerRolledBackError(
            f"rolled back: the ledger witness is at seq {offered.seq}, older than the one kept at seq {kept.seq}",
            seq=offered.seq + 1,
        )
    if offered.seq == kept.seq:
        if offered.head_hash != kept.head_hash:
            raise LedgerRolledBackError(
                f"forked: the ledger witness at seq {offered.seq} names another head than the one kept",
                seq=offered.seq or None,
            )
        return None
    return offered
