"""The reference for `Ledger.scan`: how `platform audit report` read a ledger before it,
in two passes. First `verify` (its ChainCheck, or the LedgerTamperedError it raised), then
`events` again, stepping over rows whose body is not an event and noting their seqs."""

from __future__ import annotations

from dataclasses import dataclass

from corolla.verify.errors import LedgerTamperedError
from corolla.verify.ledger import ChainCheck, Ledger, LedgerPublicKey, LedgerScan, StoredEvent


@dataclass(frozen=True)
class Reading:
    events: list[StoredEvent]
    unreadable: list[int]
    chain: ChainCheck | LedgerTamperedError | None


def two_pass(ledger: Ledger, public_key: LedgerPublicKey | None) -> Reading:
    chain: ChainCheck | LedgerTamperedError | None = None
    if public_key is not None:
        try:
            chain = ledger.verify(public_key)
        except LedgerTamperedError as exc:
            chain = exc
    events: list[StoredEvent] = []
    unreadable: list[int] = []
    after = 0
    while True:
        try:
            for stored in ledger.events(after_seq=after):
                after = stored.seq
                events.append(stored)
            return Reading(events, unreadable, chain)
        except LedgerTamperedError as exc:
            if exc.seq is None or exc.seq <= after:
                raise
            unreadable.append(exc.seq)
            after = exc.seq


def one_pass(ledger: Ledger, public_key: LedgerPublicKey | None) -> Reading:
    scan: LedgerScan = ledger.scan(public_key)
    events = list(scan)
    return Reading(events, scan.unreadable, scan.chain)


def same_outcome(a: ChainCheck | LedgerTamperedError | None, b: ChainCheck | LedgerTamperedError | None) -> bool:
    """Equal ChainChecks, or errors of one class naming the same seq with the same message."""
    if isinstance(a, LedgerTamperedError) and isinstance(b, LedgerTamperedError):
        return type(a) is type(b) and a.seq == b.seq and str(a) == str(b)
    return a == b


def assert_scan_matches_two_pass(ledger: Ledger, public_key: LedgerPublicKey | None) -> Reading:
    """The scan gives the same events, unreadable rows and chain outcome as the two passes."""
    reference, scanned = two_pass(ledger, public_key), one_pass(ledger, public_key)
    assert scanned.events == reference.events
    assert scanned.unreadable == reference.unreadable
    assert same_outcome(scanned.chain, reference.chain), (scanned.chain, reference.chain)
    return scanned
