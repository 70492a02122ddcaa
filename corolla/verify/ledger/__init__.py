"""The tamper-evident ledger of verification events (audits, quarantines, re-admissions).

Append-only rows in a SHA-256 hash chain whose head is signed with an Ed25519 ledger key,
on SQLite (a file; the default) or PostgreSQL (a consortium's shared database):

    key = LedgerKey.load_or_create(workspace / "ledger.key")
    with Ledger.open(workspace / "ledger.db", key=key, writer=node_id) as ledger:
        ledger.append([event])
        check = ledger.verify(key.public_key())
        scan = ledger.scan(key.public_key())  # the events, the chain checked as they are read
        events, outcome = list(scan), scan.chain  # outcome: verify's ChainCheck, or the error it raises
        witness = ledger.witness()  # the signed head, for others to keep

    with Ledger.open_readonly(workspace / "ledger.db") as ledger:  # an auditor: writes nothing
        ledger.verify(public_key, witness=witness)  # LedgerRolledBackError: older than the witness, or forked

`chain` documents the exact bytes hashed and signed; `schema` holds the tables.
"""

from corolla.verify.ledger.chain import GENESIS_HASH
from corolla.verify.ledger.scan import LedgerScan
from corolla.verify.ledger.signing import LedgerKey, LedgerPublicKey, SignatureError
from corolla.verify.ledger.store import AnyEvent, ChainCheck, Ledger, StoredEvent
from corolla.verify.ledger.witness import LedgerRolledBackError, Witness, WitnessError, newer_witness

__all__ = [
    "GENESIS_HASH",
    "AnyEvent",
    "ChainCheck",
    "Ledger",
    "LedgerKey",
    "LedgerPublicKey",
    "LedgerRolledBackError",
    "LedgerScan",
    "SignatureError",
    "StoredEvent",
    "Witness",
    "WitnessError",
    "newer_witness",
]
