"""The throughput helper benchmarks use: it runs and reports sane figures."""

from __future__ import annotations

from corolla.verify.ledger import Ledger, LedgerKey
from corolla.verify.ledger.throughput import measure_throughput

from .factories import mixed


def test_measure_throughput(ledger_url: str, key: LedgerKey) -> None:
    with Ledger.open(ledger_url, key=key) as ledger:
        result = measure_throughput(ledger, mixed(50), key.public_key(), batch=20)
        assert ledger.count() == 50
    assert (result.events, result.batch) == (50, 20)
    assert min(result.append_per_s, result.read_per_s, result.verify_per_s) > 0
