"""Reports of large synthetic ledgers (real SQLite): they build, stay small, and add up.

Times are printed (`-s`), not asserted: `benchmarks/` owns speed.
"""

from __future__ import annotations

import json

import pytest

from corolla.verify.report import render_json
from corolla.verify.report.build import DEFAULT_MAX_POINTS
from corolla.verify.report.synthetic import benchmark_report, synthetic_events


def _check(result: dict[str, float | int], n: int) -> None:
    print(f"\nreport of {n} events: {json.dumps(result)}")
    assert result["n_events"] == n
    assert result["quarantines"] >= 1 and result["readmits"] >= 1
    assert result["html_bytes"] < 1_000_000  # plots are downsampled: the page does not grow with the ledger


def test_report_of_10k_events() -> None:
    _check(benchmark_report(10_000), 10_000)


@pytest.mark.slow
def test_report_of_100k_events() -> None:
    _check(benchmark_report(100_000), 100_000)


def test_synthetic_ledger_adds_up() -> None:
    from corolla.verify.ledger import StoredEvent
    from corolla.verify.report import build_report

    events = list(synthetic_events(5_000, seed=3))
    assert len(events) == 5_000 and len({e.event_id for e in events}) == 5_000
    report = build_report(
        [StoredEvent(i + 1, e, "0" * 64, "0" * 64, 0.0, "") for i, e in enumerate(events)], chain=None
    )
    t = report.totals
    assert t.passed + t.failed + t.inconclusive == t.audits == sum(e.kind == "audit" for e in events)
    assert t.quarantines == sum(e.kind == "quarantine" for e in events) and report.unrecorded_decisions == []
    assert all(len(s.history) <= DEFAULT_MAX_POINTS for s in report.subjects)
    for q in report.quarantines:
        assert q.evidence and not q.missing_evidence
        assert all(e.sided_with in ("check", "primary") for e in q.evidence)
    assert json.loads(render_json(report))["totals"]["events"] == 5_000
