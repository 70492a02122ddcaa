"""Reputation: Beta counts with decay, the CUSUM quarantine rule, probation, replay.

The detection Monte Carlo checks the issue's bounds on the decision rule alone: every
corrupted output that is audited yields a refereed FAIL (whether the real check path
achieves that is measured with real servers elsewhere).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corolla.verify.errors import VerifyError
from corolla.verify.events import AuditEvent, Comparison, QuarantineEvent, ReadmitEvent, Run, Subject, Verdict, Work
from corolla.verify.reputation import QuarantineDecision, ReputationBook, ReputationPolicy, severity

NODE = Subject(node_id="node-a", model_id="tiny-llama", start=0, end=2)
CHECKER = Subject(node_id="node-b", model_id="tiny-llama", start=0, end=2)
OTHER_SPAN = Subject(node_id="node-a", model_id="tiny-llama", start=2, end=4)
HASH = "0" * 64
_ids: Iterator[int] = iter(range(10**12))


def audit(
    subject: Subject, verdict: Verdict, *, at: float = 0.0, blamed: Subject | None = None, severity: float = 1000.0
) -> AuditEvent:
    """A validated audit event with a fresh id; primary and check disagree (by `severity` times
    the tolerance: gross by default) unless it is a PASS without a blamed check server."""
    run = Run(node_id=subject.node_id, precision="float32", output_sha256=HASH)
    agree = verdict == Verdict.PASS and blamed is None
    return AuditEvent(
        event_id=f"audit-{next(_ids):08d}",
        at=at,
        reporter="site-1",
        subject=subject,
        work=Work.FORWARD,
        input_sha256=HASH,
        primary=run,
        check=run.model_copy(update={"node_id": "checker"}),
        comparison=Comparison(rel_l2=0.0 if agree else severity * 1e-3, max_abs=0.0, agree=agree),
        tolerance_rel_l2=1e-3,
        tolerance_max_abs=1e-3,
        verdict=verdict,
        blamed=blamed,
    )


def quick_audit(subject: Subject, verdict: Verdict) -> AuditEvent:
    """The same without validation: for the Monte Carlo, where validation would dominate the time."""
    agree = verdict == Verdict.PASS
    return AuditEvent.model_construct(
        event_id=f"mc-{next(_ids)}",
        at=0.0,
        subject=subject,
        verdict=verdict,
        blamed=None,
        comparison=_AGREE if agree else _GROSS,
        tolerance_rel_l2=1e-3,
        tolerance_max_abs=1e-3,
    )


_AGREE = Comparison(rel_l2=0.0, max_abs=0.0, agree=True)
_GROSS = Comparison(rel_l2=1.0, max_abs=1.0, agree=False)


def readmit(subject: Subject, *, at: float = 0.0) -> ReadmitEvent:
    return ReadmitEvent(event_id=f"readmit-{next(_ids):08d}", at=at, reporter="operator", subject=subject, reason="ok")


def quarantine_event(decision: QuarantineDecision, *, at: float = 0.0) -> QuarantineEvent:
    return decision.event(event_id=f"quar-{next(_ids):08d}", at=at, reporter="site-1")


# -- the policy -------------------------------------------------------------------------------


def test_default_policy_arithmetic() -> None:
    """The module docstring's numbers: one FAIL (+9.21) crosses log(1/alpha) = 6.91."""
    policy = ReputationPolicy()
    assert policy.fail_step == pytest.approx(math.log(1e4))
    assert policy.pass_step == pytest.approx(math.log(0.99 / 0.999999))
    assert policy.threshold == pytest.approx(math.log(1e3))
    assert policy.fail_step > policy.threshold
    assert policy.fails_to_quarantine == 1
    # A looser policy needs several FAILs: log(0.01/1e-3) = 2.30 per FAIL against 6.91.
    assert ReputationPolicy(honest_fail_rate=1e-3).fails_to_quarantine == 3


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("decay", 0.0, "(0, 1]"),
        ("decay", 1.5, "(0, 1]"),
        ("decay", math.nan, "(0, 1]"),
        ("prior_pass", 0.0, "(0, inf)"),
        ("prior_fail", -1.0, "(0, inf)"),
        ("honest_fail_rate", 0.0, "(0, 1)"),
        ("dishonest_fail_rate", 1e-7, "(1e-06, 1)"),
        ("dishonest_fail_rate", 1.0, "(1e-06, 1)"),
        ("false_quarantine", 1.0, "(0, 1)"),
        ("probation_audit_rate", 0.0, "(0, 1]"),
        ("probation_audits", -1, ">= 0"),
        ("probation_audits", 2.5, ">= 0"),
    ],
)
def test_policy_validation_names_field_value_and_range(field: str, value: float, allowed: str) -> None:
    with pytest.raises(VerifyError) as caught:
        ReputationPolicy(**{field: value})  # type: ignore[arg-type]
    message = str(caught.value)
    assert field in message and repr(value) in message and allowed in message


def test_audit_rate_rejects_a_bad_base_rate() -> None:
    with pytest.raises(VerifyError, match=r"base_rate=1\.5"):
        ReputationBook().audit_rate(NODE, 1.5)


# -- scores and quarantine --------------------------------------------------------------------


def test_always_wrong_node_never_gains_and_is_quarantined_at_its_first_fail() -> None:
    book = ReputationBook()
    prior = book.state(NODE).score
    first = audit(NODE, Verdict.FAIL)
    decision = book.observe(first)
    assert decision is not None and decision.subject == NODE
    assert decision.evidence == (first.event_id,)
    assert decision.llr == pytest.approx(ReputationPolicy().fail_step)
    assert "threshold" in decision.reason
    assert book.is_quarantined(NODE) and book.quarantined() == {NODE}
    assert book.quarantined_nodes("tiny-llama") == {"node-a"}
    assert book.quarantined_nodes("other-model") == frozenset()
    scores = [book.state(NODE).score]
    for _ in range(200):
        assert book.observe(audit(NODE, Verdict.FAIL)) is None  # already quarantined: no second decision
        scores.append(book.state(NODE).score)
    assert all(s < prior for s in scores)
    assert all(b <= a for a, b in itertools.pairwise(scores))
    state = book.state(NODE)
    assert state.audits_failed == 201 and state.audits_passed == 0 and len(state.evidence) == 201


def test_inconclusive_and_unaudited_work_move_nothing() -> None:
    book = ReputationBook()
    before = book.state(NODE)
    for _ in range(1000):
        assert book.observe(audit(NODE, Verdict.INCONCLUSIVE)) is None
    after = book.state(NODE)
    assert after.inconclusive == 1000
    assert (after.passes, after.fails, after.llr, after.score) == (before.passes, before.fails, 0.0, before.score)
    assert not book.is_quarantined(NODE)


def test_honest_node_is_never_quarantined_over_ten_thousand_audits() -> None:
    rng = random.Random(0)
    book = ReputationBook()
    subjects = [NODE, CHECKER, OTHER_SPAN]
    for i in range(12_000):
        verdict = Verdict.INCONCLUSIVE if rng.random() < 0.1 else Verdict.PASS
        assert book.observe(audit(subjects[i % 3], verdict, at=float(i))) is None
    assert book.quarantined() == frozenset()
    for subject in subjects:
        state = book.state(subject)
        assert state.llr == 0.0 and state.fails == 0.0
        assert state.score > 0.99
        assert state.passes < 1 / (1 - book.policy.decay)  # bounded by the decay


def test_clamped_statistic_banks_no_credit() -> None:
    """10,000 PASSes leave the statistic at 0, so a later FAIL counts in full."""
    policy = ReputationPolicy(honest_fail_rate=1e-3)  # three FAILs needed
    book = ReputationBook(policy)
    for _ in range(10_000):
        book.observe(audit(NODE, Verdict.PASS))
    assert book.state(NODE).llr == 0.0
    assert book.observe(audit(NODE, Verdict.FAIL)) is None
    assert book.observe(audit(NODE, Verdict.FAIL)) is None
    decision = book.observe(audit(NODE, Verdict.FAIL))
    assert decision is not None and len(decision.evidence) == 3


def test_fails_far_apart_are_forgotten_under_a_loose_policy() -> None:
    policy = ReputationPolicy(honest_fail_rate=1e-3)
    book = ReputationBook(policy)
    for _ in range(10):
        book.observe(audit(NODE, Verdict.FAIL))
        for _ in range(300):  # 300 * 0.0091 = 2.7 > log(10) = 2.30: back to 0
            book.observe(audit(NODE, Verdict.PASS))
    assert not book.is_quarantined(NODE)
    assert book.state(NODE).run == []


def test_decay_multiplies_old_counts_per_audit() -> None:
    book = ReputationBook(ReputationPolicy(decay=0.5))
    book.observe(audit(NODE, Verdict.PASS))
    book.observe(audit(NODE, Verdict.PASS))
    book.observe(audit(NODE, Verdict.INCONCLUSIVE))  # not an audit for decay
    state = book.state(NODE)
    assert state.passes == pytest.approx(1.5) and state.fails == 0.0
    book.observe(audit(NODE, Verdict.FAIL))
    state = book.state(NODE)
    assert state.passes == pytest.approx(0.75) and state.fails == pytest.approx(1.0)
    assert state.score == pytest.approx((1 + 0.75) / (1 + 0.75 + 1 + 1))
    assert (state.audits_passed, state.audits_failed, state.inconclusive) == (2, 1, 1)


def test_blamed_check_server_gets_the_fail() -> None:
    book = ReputationBook()
    event = audit(NODE, Verdict.PASS, blamed=CHECKER)
    decisions = book.observe_all(event)
    assert [d.subject for d in decisions] == [CHECKER]
    assert decisions[0].evidence == (event.event_id,)
    assert book.state(NODE).audits_passed == 1 and not book.is_quarantined(NODE)
    assert book.state(CHECKER).audits_failed == 1 and book.state(CHECKER).evidence == [event.event_id]
    assert book.quarantined() == {CHECKER}


def test_observe_returns_the_blamed_decision_too() -> None:
    book = ReputationBook()
    decision = book.observe(audit(NODE, Verdict.PASS, blamed=CHECKER))
    assert decision is not None and decision.subject == CHECKER


def test_a_resent_event_counts_once() -> None:
    book = ReputationBook(ReputationPolicy(honest_fail_rate=1e-3))
    event = audit(NODE, Verdict.FAIL)
    for _ in range(5):
        book.observe(event)
    assert book.state(NODE).audits_failed == 1 and not book.is_quarantined(NODE)


def test_spans_and_models_are_separate_subjects() -> None:
    book = ReputationBook()
    book.observe(audit(NODE, Verdict.FAIL))
    assert book.is_quarantined(NODE) and not book.is_quarantined(OTHER_SPAN)
    assert book.subjects() == [NODE]
    assert book.state(OTHER_SPAN).score == 0.5  # unknown subject: the prior


def test_quarantine_event_marks_and_replays_idempotently() -> None:
    book = ReputationBook()
    decision = book.observe(audit(NODE, Verdict.FAIL))
    assert decision is not None
    book.observe(quarantine_event(decision))
    assert book.quarantined() == {NODE}
    operator = QuarantineEvent(
        event_id="quar-operator-1",
        at=5.0,
        reporter="operator",
        subject=OTHER_SPAN,
        evidence=["manual-review"],
        log_likelihood_ratio=0.0,
        reason="operator",
    )
    book.observe(operator)
    assert book.quarantined() == {NODE, OTHER_SPAN}
    assert book.state(OTHER_SPAN).last_at == 5.0


# -- probation --------------------------------------------------------------------------------


def test_readmission_starts_probation_and_a_fail_quarantines_again() -> None:
    policy = ReputationPolicy(probation_audits=3, probation_audit_rate=0.5, honest_fail_rate=1e-3)
    book = ReputationBook(policy)
    for _ in range(3):
        book.observe(audit(NODE, Verdict.FAIL))
    assert book.is_quarantined(NODE)
    fails_before = book.state(NODE).fails
    book.observe(readmit(NODE, at=10.0))
    state = book.state(NODE)
    assert not state.quarantined and state.llr == 0.0 and state.probation_left == 3
    assert state.fails == fails_before  # the Beta history stays
    assert book.audit_rate(NODE, 0.05) == 0.5
    assert book.audit_rate(NODE, 0.8) == 0.8  # never lowered
    assert book.audit_rate(CHECKER, 0.05) == 0.05
    book.observe(audit(NODE, Verdict.PASS))
    book.observe(audit(NODE, Verdict.INCONCLUSIVE))  # not an audit for probation
    assert book.state(NODE).probation_left == 2
    # One FAIL would not cross the threshold of this loose policy, but on probation it quarantines.
    decision = book.observe(audit(NODE, Verdict.FAIL))
    assert decision is not None and "probation" in decision.reason
    assert book.is_quarantined(NODE) and book.state(NODE).probation_left == 0


def test_probation_ends_after_its_audits() -> None:
    book = ReputationBook(ReputationPolicy(probation_audits=2))
    book.observe(audit(NODE, Verdict.FAIL))
    book.observe(readmit(NODE))
    book.observe(audit(NODE, Verdict.PASS))
    book.observe(audit(NODE, Verdict.PASS))
    assert book.state(NODE).probation_left == 0
    assert book.audit_rate(NODE, 0.05) == 0.05


# -- replay -----------------------------------------------------------------------------------


def test_replay_equals_incremental() -> None:
    rng = random.Random(3)
    policy = ReputationPolicy(honest_fail_rate=1e-4, probation_audits=5)
    live = ReputationBook(policy)
    events: list[AuditEvent | QuarantineEvent | ReadmitEvent] = []
    subjects = [NODE, CHECKER, OTHER_SPAN]
    for i in range(2000):
        subject = rng.choice(subjects)
        if live.is_quarantined(subject) and rng.random() < 0.05:
            event: AuditEvent | QuarantineEvent | ReadmitEvent = readmit(subject, at=float(i))
        else:
            verdict = rng.choices(list(Verdict), weights=[90, 5, 5])[0]
            blamed = CHECKER if subject != CHECKER and rng.random() < 0.02 else None
            event = audit(subject, verdict, at=float(i), blamed=blamed)
        events.append(event)
        for decision in live.observe_all(event):
            q = quarantine_event(decision, at=float(i))
            events.append(q)
            live.observe(q)
    replayed = ReputationBook.replay(events, policy)
    assert replayed.subjects() == live.subjects()
    assert replayed.quarantined() == live.quarantined()
    for subject in subjects:
        assert replayed.state(subject) == live.state(subject)


# -- properties -------------------------------------------------------------------------------

verdicts = st.lists(st.sampled_from(list(Verdict)), max_size=300)


@settings(max_examples=200, deadline=None)
@given(
    steps=verdicts,
    decay=st.floats(0.5, 1.0),
    honest=st.sampled_from([1e-6, 1e-4, 1e-3]),
)
def test_score_moves_the_right_way_and_quarantine_needs_a_fail(
    steps: list[Verdict], decay: float, honest: float
) -> None:
    book = ReputationBook(ReputationPolicy(decay=decay, honest_fail_rate=honest))
    for verdict in steps:
        before = book.state(NODE)
        event = quick_audit(NODE, verdict)
        decision = book.observe(event)
        after = book.state(NODE)
        if verdict == Verdict.PASS:
            assert after.score >= before.score - 1e-12
        elif verdict == Verdict.FAIL:
            assert after.score <= before.score + 1e-12
        else:
            assert after.score == before.score
        assert after.llr >= 0.0
        if decision is not None:
            assert verdict == Verdict.FAIL and event.event_id in decision.evidence
            assert set(decision.evidence) <= set(after.evidence)
        if after.quarantined:
            assert after.evidence
    if Verdict.FAIL not in steps:
        assert not book.is_quarantined(NODE)


# -- detection (the decision rule; Monte Carlo) -------------------------------------------------


def audits_until_quarantine(rng: random.Random, f: float, limit: int) -> int:
    """Audits of a node corrupting a fraction `f` of outputs until a fresh book quarantines it (limit + 1: never).

    Audit n of every run uses the same prebuilt event (ids are unique within a run), so the time
    goes into the rule rather than into building events."""
    book = ReputationBook()
    for n in range(1, limit + 1):
        pool = _FAILS if rng.random() < f else _PASSES
        if book.observe(pool[n]) is not None:
            return n
    return limit + 1


_PASSES = [quick_audit(NODE, Verdict.PASS) for _ in range(602)]
_FAILS = [quick_audit(NODE, Verdict.FAIL) for _ in range(602)]


def test_detection_bounds_of_the_rule() -> None:
    """f = 100%: quarantined within 10 audits (always); f = 1%: within 600 with P >= 0.99.

    One FAIL quarantines, so P(caught within 600) = 1 - 0.99^600 = 0.9976; over 2,000 runs the
    observed fraction has standard deviation 0.0011, so the 0.99 bound sits 7 deviations below.
    """
    rng = random.Random(2024)
    always = [audits_until_quarantine(rng, 1.0, 10) for _ in range(200)]
    assert max(always) == 1
    runs = 2000
    rare = [audits_until_quarantine(rng, 0.01, 600) for _ in range(runs)]
    caught = sum(n <= 600 for n in rare) / runs
    assert caught >= 0.99, f"only {caught:.4f} caught within 600 audits"
    # the floor: 1-(0.99)^n >= 0.99 needs n >= 459, so at 300 audits only about 95% are caught
    assert sum(n <= 300 for n in rare) / runs < 0.99


# -- gross and borderline FAILs -----------------------------------------------------------------


def test_one_borderline_fail_does_not_quarantine_but_a_gross_one_does() -> None:
    book = ReputationBook()
    assert book.observe(audit(NODE, Verdict.FAIL, severity=1.5)) is None  # 1.5x the tolerance: borderline
    assert not book.is_quarantined(NODE) and book.state(NODE).borderline == 1
    other = ReputationBook()
    decision = other.observe(audit(NODE, Verdict.FAIL, severity=4.0))  # gross_factor x the tolerance
    assert decision is not None and "gross" in decision.reason


def test_repeated_borderline_fails_quarantine() -> None:
    policy = ReputationPolicy()
    assert (policy.fails_to_quarantine, policy.borderline_fails_to_quarantine) == (1, 2)
    book = ReputationBook(policy)
    book.observe(audit(NODE, Verdict.FAIL, severity=2.0))
    for _ in range(200):  # fewer PASSes than the 229 that would wash one borderline FAIL out
        book.observe(audit(NODE, Verdict.PASS))
    decision = book.observe(audit(NODE, Verdict.FAIL, severity=2.0))
    assert decision is not None and len(decision.evidence) == 2 and "borderline" in decision.reason


def test_borderline_fails_far_apart_do_not_quarantine() -> None:
    book = ReputationBook()
    for _ in range(3):
        book.observe(audit(NODE, Verdict.FAIL, severity=3.9))
        for _ in range(500):  # the statistic returns to 0 between them
            book.observe(audit(NODE, Verdict.PASS))
    assert not book.is_quarantined(NODE) and book.state(NODE).audits_failed == 3


def test_severity_is_the_larger_ratio_to_the_tolerance() -> None:
    event = audit(NODE, Verdict.FAIL, severity=2.5)
    assert severity(event) == pytest.approx(2.5, rel=1e-12)
    assert severity(event.model_copy(update={"comparison": Comparison(rel_l2=0.0, max_abs=5e-3, agree=False)})) == (
        pytest.approx(5.0, rel=1e-12)
    )


def test_a_blamed_check_server_is_judged_by_the_same_distance() -> None:
    book = ReputationBook()
    assert book.observe_all(audit(NODE, Verdict.PASS, blamed=CHECKER, severity=1.2)) == []
    assert book.state(CHECKER).audits_failed == 1 and not book.is_quarantined(CHECKER)
