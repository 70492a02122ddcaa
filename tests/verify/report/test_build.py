"""`build_report` from a real SQLite ledger: the numbers against hand counts (scenario.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from corolla.verify.errors import LedgerTamperedError, VerifyError
from corolla.verify.events import Verdict
from corolla.verify.ledger import AnyEvent, Ledger, LedgerKey, StoredEvent
from corolla.verify.report import Report, SubjectReport, build_report
from corolla.verify.reputation import ReputationPolicy

from .scenario import MODEL, T0, A, B, C, X, audit, scenario, sha, subj, write_ledger


def _report(tmp_path: Path, events: Sequence[AnyEvent], *, max_points: int = 256) -> Report:
    key = LedgerKey.generate()
    write_ledger(tmp_path / "ledger.db", events, key)
    with Ledger.open(str(tmp_path / "ledger.db")) as ledger:
        return build_report(ledger.events(), chain=ledger.verify(key.public_key()), now=T0 + 100, max_points=max_points)


def _by_node(report: Report) -> dict[str, SubjectReport]:
    return {s.subject.node_id: s for s in report.subjects}


def _score(passes: float, fails: float) -> float:
    return (1 + passes) / (2 + passes + fails)  # Beta(1, 1) prior, as ReputationPolicy()


def test_totals_and_subjects_match_hand_counts(tmp_path: Path) -> None:
    report = _report(tmp_path, scenario())
    t = report.totals
    assert (t.events, t.audits, t.passed, t.failed, t.inconclusive) == (10, 8, 6, 1, 1)
    assert (t.quarantines, t.readmits, t.subjects, t.quarantined_now, t.duplicates) == (1, 1, 5, 0, 0)
    assert report.models == [MODEL]
    assert [s.subject for s in report.subjects] == [A, B, X, C, subj("node-d", 2, 4)]  # by model, span, node
    s = _by_node(report)
    counts = {n: (r.audits_passed, r.audits_failed, r.audits_inconclusive, r.blamed) for n, r in s.items()}
    assert counts == {
        "node-a": (2, 0, 1, 0),
        "node-b": (1, 0, 0, 0),
        "node-c": (1, 0, 0, 0),
        "node-d": (1, 0, 0, 0),
        "node-x": (1, 2, 0, 1),  # FAIL at seq 4, blamed at seq 7 (a FAIL too), PASS at seq 9
    }
    assert s["node-a"].score == pytest.approx(_score(0.99 + 1, 0))
    assert s["node-x"].score == pytest.approx(_score(1, (0.99 + 1) * 0.99))
    assert (s["node-x"].quarantines, s["node-x"].readmits, s["node-x"].quarantined) == (1, 1, False)
    assert s["node-x"].probation_left == ReputationPolicy().probation_audits - 1
    assert s["node-x"].last_at == T0 + 9
    assert report.first_at == T0 + 1 and report.last_at == T0 + 10 and report.last_seq == 10
    assert report.unrecorded_decisions == []


def test_quarantine_carries_its_evidence(tmp_path: Path) -> None:
    report = _report(tmp_path, scenario())
    (q,) = report.quarantines
    assert (q.seq, q.subject, q.reporter, q.missing_evidence) == (5, X, "coordinator", [])
    assert (q.readmitted_seq, q.readmitted_at) == (8, T0 + 8)
    (e,) = q.evidence
    assert (e.seq, e.event_id, e.verdict, e.input_sha256) == (4, "a-004-audit", Verdict.FAIL, sha("in-4"))
    assert (e.primary.node_id, e.primary.output_sha256) == ("node-x", sha("primary-4"))
    assert (e.check.node_id, e.check.output_sha256) == ("node-a", sha("check-4"))
    assert e.referee is not None and (e.referee.node_id, e.referee.output_sha256) == ("node-b", sha("referee-4"))
    assert e.sided_with == "check" and e.disagreeing == ["node-x"]
    assert not e.comparison.agree and e.comparison.rel_l2 == 0.5
    assert e.referee_vs_check is not None and e.referee_vs_check.agree
    assert (e.tolerance_rel_l2, e.tolerance_max_abs) == (0.02, 0.25)
    (r,) = report.readmits
    assert (r.seq, r.subject, r.was_quarantined, r.reason) == (8, X, True, "replaced the faulty GPU")


def test_chain_status_in_the_report(tmp_path: Path) -> None:
    report = _report(tmp_path, scenario())
    assert report.chain.state == "verified"
    assert (report.chain.events, report.chain.head_seq, report.chain.head_hash) == (10, 10, report.last_hash)
    tampered = build_report([], chain=LedgerTamperedError("event 4: event_hash does not match", seq=4))
    assert tampered.chain.state == "tampered" and tampered.chain.first_bad_seq == 4
    assert "seq 4" in tampered.chain.message and "DOES NOT VERIFY" in tampered.chain.message
    assert build_report([], chain=None).chain.state == "unchecked"


def test_a_decision_without_a_quarantine_event_is_reported(tmp_path: Path) -> None:
    """The policy quarantines X at seq 4, but the ledger holds no quarantine event for it."""
    events = [e for e in scenario(with_readmit=False) if e.kind == "audit"]
    report = _report(tmp_path, events)
    (d,) = report.unrecorded_decisions
    assert (d.seq, d.subject, d.evidence) == (4, X, ["a-004-audit"])
    assert _by_node(report)["node-x"].quarantined and report.quarantines == []


def test_missing_evidence_and_readmit_of_a_free_node_are_flagged(tmp_path: Path) -> None:
    from .scenario import quarantine, readmit

    events: list[AnyEvent] = [
        audit(1, A, check="node-b"),
        quarantine(2, B, ["a-001-audit", "no-such-event"]),
        readmit(3, C),
    ]
    report = _report(tmp_path, events)
    assert report.quarantines[0].missing_evidence == ["a-001-audit", "no-such-event"]  # a passing audit is no evidence
    assert report.readmits[0].was_quarantined is False


def test_history_is_bounded_and_ends_at_the_current_score(tmp_path: Path) -> None:
    events = [audit(n, A, check="node-b") for n in range(1, 1001)]
    stored = [StoredEvent(n + 1, e, "0" * 64, "0" * 64, 0.0, "") for n, e in enumerate(events)]
    report = build_report(stored, chain=None, max_points=16)
    (s,) = report.subjects
    assert 8 <= len(s.history) <= 16
    assert [p.at for p in s.history] == sorted(p.at for p in s.history)
    assert s.history[-1].at == T0 + 1000 and s.history[-1].score == s.score
    assert s.history[0].score < s.history[-1].score  # passes only: the score rises
    with pytest.raises(VerifyError, match="max_points"):
        build_report([], chain=None, max_points=2)


def test_the_replay_ignores_a_resent_event_id() -> None:
    e = audit(1, A, check="node-b")
    stored = [StoredEvent(1, e, "0" * 64, "0" * 64, 0.0, ""), StoredEvent(2, e, "1" * 64, "0" * 64, 0.0, "")]
    report = build_report(stored, chain=None)
    assert (report.totals.audits, report.totals.duplicates, report.subjects[0].audits_passed) == (1, 1, 1)


def test_spans_of_one_node_are_separate_subjects() -> None:
    events = [audit(1, subj("node-a", 0, 2), check="node-b"), audit(2, subj("node-a", 2, 4), check="node-b")]
    report = build_report(
        [StoredEvent(i + 1, e, "0" * 64, "0" * 64, 0.0, "") for i, e in enumerate(events)], chain=None
    )
    assert [(s.subject.start, s.subject.end) for s in report.subjects] == [(0, 2), (2, 4)]
