"""DP budgets: the run's noise plan, the persisted ledger, refusals, concurrency, file format."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corolla.training.privacy import (
    DP_OFF_MESSAGE,
    BudgetExhaustedError,
    DpPlan,
    DpSettings,
    PrivacyError,
    default_delta,
    plan_noise,
    recompute_epsilon,
    warn_dp_off,
)
from corolla.training.privacy_ledger import PrivacyLedger

pytestmark = pytest.mark.filterwarnings(
    # Opacus's RDP search visits sigmas whose best order is at the edge of its alphas.
    "ignore:Optimal order is the:UserWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
)

ROUNDS, STEPS_PER_ROUND = 5, 20


@pytest.fixture(scope="module")
def plan() -> DpPlan:
    """Epsilon 3 over 5 rounds of 20 steps, q = 32/1000, RDP."""
    return plan_noise(DpSettings(epsilon=3.0), n_records=1000, batch_size=32, total_steps=ROUNDS * STEPS_PER_ROUND)


def _entry(plan: DpPlan, steps: int) -> tuple[float, float, int]:
    return (plan.noise_multiplier, plan.sample_rate, steps)


# -- the plan ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epsilon", "n_records", "batch_size", "total_steps", "accountant"),
    [
        (3.0, 1000, 32, 100, "rdp"),
        (0.5, 50_000, 256, 2000, "rdp"),
        (8.0, 200, 200, 5, "rdp"),  # q = 1: full batches
        (1.0, 10_000, 64, 1, "rdp"),
        (3.0, 1000, 32, 100, "prv"),
    ],
)
def test_plan_spends_at_most_and_close_to_the_target(
    epsilon: float, n_records: int, batch_size: int, total_steps: int, accountant: Any
) -> None:
    dp = DpSettings(epsilon=epsilon, accountant=accountant)
    plan = plan_noise(dp, n_records=n_records, batch_size=batch_size, total_steps=total_steps)
    assert plan.sample_rate == batch_size / n_records
    assert plan.delta == default_delta(n_records) < 1 / n_records
    assert (plan.total_steps, plan.accountant, plan.target_epsilon) == (total_steps, accountant, epsilon)
    spent = recompute_epsilon([_entry(plan, total_steps)], plan.delta, accountant)
    assert 0.99 * epsilon <= spent <= epsilon


def test_plan_uses_the_accountant_that_tracks_spending() -> None:
    """Mixing accountants is a silent failure: a PRV plan judged by RDP overspends."""
    args: dict[str, Any] = {"n_records": 1000, "batch_size": 32, "total_steps": 100}
    prv = plan_noise(DpSettings(epsilon=3.0, accountant="prv"), **args)
    rdp = plan_noise(DpSettings(epsilon=3.0, accountant="rdp"), **args)
    assert prv.noise_multiplier < rdp.noise_multiplier  # PRV's bound is tighter
    assert recompute_epsilon([_entry(prv, 100)], prv.delta, "prv") <= 3.0
    assert recompute_epsilon([_entry(prv, 100)], prv.delta, "rdp") > 3.0


@given(n=st.integers(min_value=1, max_value=10**15))
def test_default_delta_is_strictly_below_one_over_n(n: int) -> None:
    delta = default_delta(n)
    assert 0 < delta < 1 / n
    assert delta == min(1e-5, 1 / (10 * n))


@settings(max_examples=40, deadline=None)
@given(
    sigma=st.floats(min_value=0.3, max_value=20),
    q=st.floats(min_value=1e-4, max_value=1.0),
    steps=st.integers(min_value=1, max_value=10_000),
    more=st.integers(min_value=0, max_value=10_000),
)
def test_spent_is_monotone_in_steps(sigma: float, q: float, steps: int, more: int) -> None:
    before = recompute_epsilon([(sigma, q, steps)], 1e-5)
    after = recompute_epsilon([(sigma, q, steps + more)], 1e-5)
    assert 0 < before <= after


# -- settings and inputs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"epsilon": 0.0}, "epsilon=0.0"),
        ({"epsilon": -1.0}, "epsilon=-1.0"),
        ({"epsilon": float("nan")}, "epsilon=nan"),
        ({"epsilon": float("inf")}, "epsilon=inf"),
        ({"epsilon": 1.0, "delta": 0.0}, "delta=0.0"),
        ({"epsilon": 1.0, "delta": 1.0}, "delta=1.0"),
        ({"epsilon": 1.0, "delta": -1e-5}, "delta=-1e-05"),
        ({"epsilon": 1.0, "max_grad_norm": 0.0}, "max_grad_norm=0.0"),
        ({"epsilon": 1.0, "accountant": "gdp"}, "accountant='gdp'"),
    ],
)
def test_bad_settings_name_the_value(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(PrivacyError, match=re.escape(named)):
        DpSettings(**kwargs)


@pytest.mark.parametrize(
    ("settings_", "args", "named"),
    [
        (DpSettings(epsilon=1.0, delta=0.01), {"n_records": 100}, r"delta=0\.01 must be below 1/N"),
        (DpSettings(epsilon=1.0, delta=0.02), {"n_records": 100}, r"delta=0\.02 must be below 1/N"),
        (DpSettings(epsilon=1.0), {"batch_size": 101}, r"batch_size=101 exceeds n_records=100.*sample rate"),
        (DpSettings(epsilon=1.0), {"n_records": 0}, r"n_records=0"),
        (DpSettings(epsilon=1.0), {"batch_size": 0}, r"batch_size=0"),
        (DpSettings(epsilon=1.0), {"total_steps": 0}, r"total_steps=0"),
        (DpSettings(epsilon=None), {}, r"epsilon=None: DP is off"),
        (DpSettings(epsilon=1e-9), {}, r"epsilon=1e-09 is unreachable"),
    ],
)
def test_bad_plan_inputs_name_the_value(settings_: DpSettings, args: dict[str, int], named: str) -> None:
    full = {"n_records": 100, "batch_size": 10, "total_steps": 10} | args
    with pytest.raises(PrivacyError, match=named):
        plan_noise(settings_, **full)


def test_plan_and_history_values_are_checked(plan: DpPlan) -> None:
    for rate in (0.0, 1.5, float("nan")):
        with pytest.raises(PrivacyError, match=f"sample_rate={rate}"):
            dataclasses.replace(plan, sample_rate=rate)
    with pytest.raises(PrivacyError, match=r"history\[0\].sample_rate=2.0"):
        recompute_epsilon([(1.0, 2.0, 3)], 1e-5)
    with pytest.raises(PrivacyError, match=r"history\[0\].steps=0"):
        recompute_epsilon([(1.0, 0.1, 0)], 1e-5)
    with pytest.raises(PrivacyError, match="delta=0"):
        recompute_epsilon([(1.0, 0.1, 3)], 0)
    assert recompute_epsilon([], 1e-5) == 0.0
    assert recompute_epsilon([], 1e-5, "prv") == 0.0


def test_dp_off_says_so_loudly(caplog: pytest.LogCaptureFixture) -> None:
    assert not DpSettings(epsilon=None).enabled
    assert DpSettings(epsilon=1.0).enabled
    with caplog.at_level(logging.WARNING):
        warn_dp_off(logging.getLogger("corolla.test"))
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, DP_OFF_MESSAGE)]
    assert "OFF" in DP_OFF_MESSAGE


# -- the ledger ----------------------------------------------------------------------------------


def test_ledger_persists_across_processes_and_matches_a_recomputation(tmp_path: Path, plan: DpPlan) -> None:
    spent = []
    for k in range(1, ROUNDS + 1):
        ledger = PrivacyLedger.open(tmp_path, "run-1", plan)  # a fresh object each round, as Flower does
        predicted = ledger.would_spend(STEPS_PER_ROUND)
        assert ledger.charge(STEPS_PER_ROUND) == predicted
        reopened = PrivacyLedger.open(tmp_path, "run-1", plan)
        assert reopened.history == [_entry(plan, k * STEPS_PER_ROUND)]
        assert reopened.charges == [STEPS_PER_ROUND] * k
        assert reopened.spent() == recompute_epsilon(reopened.history, plan.delta) == predicted  # exact
        spent.append(reopened.spent())
    assert spent == sorted(spent)
    assert spent[-1] <= plan.target_epsilon
    assert PrivacyLedger.open(tmp_path, "run-2", plan).spent() == 0.0  # runs are apart


def test_charging_past_the_budget_is_refused_and_records_nothing(tmp_path: Path, plan: DpPlan) -> None:
    ledger = PrivacyLedger.open(tmp_path, "run-1", plan)
    for _ in range(ROUNDS):
        ledger.charge(STEPS_PER_ROUND)
    before = ledger.path.read_bytes()
    with pytest.raises(BudgetExhaustedError) as refused:
        ledger.charge(STEPS_PER_ROUND)
    error = refused.value
    assert error.spent == ledger.spent() <= error.target == plan.target_epsilon < error.would_be
    assert error.would_be == ledger.would_spend(STEPS_PER_ROUND)
    assert f"{error.would_be:.6g}" in str(error) and f"{error.spent:.6g}" in str(error)
    assert isinstance(error, PrivacyError) and error.exit_code == 11
    assert ledger.path.read_bytes() == before
    copy = pickle.loads(pickle.dumps(error))  # crosses process boundaries intact
    assert (copy.spent, copy.target, copy.would_be, copy.steps, str(copy)) == (
        error.spent,
        error.target,
        error.would_be,
        error.steps,
        str(error),
    )


@settings(max_examples=15, deadline=None)
@given(charges=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8))
def test_any_split_of_charges_spends_like_one(charges: list[int], plan: DpPlan) -> None:
    with tempfile.TemporaryDirectory() as store:
        ledger = PrivacyLedger.open(store, "run", plan)
        done = []
        for steps in charges:
            try:
                ledger.charge(steps)
                done.append(steps)
            except BudgetExhaustedError:
                pass
        assert ledger.charges == done
        expected = recompute_epsilon([_entry(plan, sum(done))], plan.delta) if done else 0.0
        assert ledger.spent() == expected
        assert ledger.spent() <= plan.target_epsilon


def test_prv_ledger_matches_a_prv_recomputation(tmp_path: Path) -> None:
    plan = plan_noise(DpSettings(epsilon=2.0, accountant="prv"), n_records=1000, batch_size=50, total_steps=30)
    ledger = PrivacyLedger.open(tmp_path, "run-prv", plan)
    for _ in range(3):
        ledger.charge(10)
    assert ledger.spent() == recompute_epsilon(ledger.history, plan.delta, "prv") <= 2.0
    with pytest.raises(BudgetExhaustedError):
        ledger.charge(10)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"noise_multiplier": 0.5}, "noise_multiplier=0.5"),
        ({"target_epsilon": 4.0}, "target_epsilon=4.0"),
        ({"accountant": "prv"}, "accountant='prv'"),
        ({"max_grad_norm": 2.0}, "max_grad_norm=2.0"),
    ],
)
def test_a_changed_plan_is_refused(tmp_path: Path, plan: DpPlan, change: dict[str, Any], named: str) -> None:
    PrivacyLedger.open(tmp_path, "run-1", plan).charge(STEPS_PER_ROUND)
    with pytest.raises(PrivacyError, match=f"cannot change it: {named}"):
        PrivacyLedger.open(tmp_path, "run-1", dataclasses.replace(plan, **change))


@pytest.mark.parametrize("run_key", ["", "../escape", "a/b", ".hidden", "x" * 129])
def test_a_bad_run_key_is_named(tmp_path: Path, plan: DpPlan, run_key: str) -> None:
    with pytest.raises(PrivacyError, match=f"run_key={run_key!r}"):
        PrivacyLedger.open(tmp_path, run_key, plan)


def test_bad_step_counts_are_named(tmp_path: Path, plan: DpPlan) -> None:
    ledger = PrivacyLedger.open(tmp_path, "run-1", plan)
    for steps in (0, -1, True, 2.0):
        with pytest.raises(PrivacyError, match=f"steps={steps!r}"):
            ledger.charge(steps)  # type: ignore[arg-type]


def test_the_file_is_json_not_pickle(tmp_path: Path, plan: DpPlan) -> None:
    ledger = PrivacyLedger.open(tmp_path, "run-1", plan)
    ledger.charge(STEPS_PER_ROUND)
    raw = ledger.path.read_bytes()
    assert not raw.startswith(b"\x80")  # every pickle protocol >= 2 starts so
    document = json.loads(raw)
    assert document["plan"] == dataclasses.asdict(plan)
    assert document["accountant"] == {"mechanism": "rdp", "history": [list(_entry(plan, STEPS_PER_ROUND))]}
    assert ledger.path == tmp_path / "privacy" / "run-1.json"
    assert sorted(p.name for p in ledger.path.parent.iterdir()) == ["run-1.json", "run-1.lock"]  # no temp left


def _tamper(document: dict[str, Any], how: str) -> None:
    if how == "sigma":
        document["accountant"]["history"][0][0] = 99.0
    elif how == "mechanism":
        document["accountant"]["mechanism"] = "prv"
    elif how == "charges":
        document["charges"] = [1]
    elif how == "extra":
        document["note"] = "x"
    elif how == "plan":
        document["plan"]["sample_rate"] = 2.0


@pytest.mark.parametrize(
    "corruption", ["garbage", "truncated", "empty", "sigma", "mechanism", "charges", "extra", "plan"]
)
def test_a_corrupted_ledger_is_a_clear_error_not_a_reset(tmp_path: Path, plan: DpPlan, corruption: str) -> None:
    ledger = PrivacyLedger.open(tmp_path, "run-1", plan)
    ledger.charge(STEPS_PER_ROUND)
    raw = ledger.path.read_bytes()
    if corruption == "garbage":
        bad = b"\x80\x04not json"
    elif corruption == "truncated":
        bad = raw[: len(raw) // 2]
    elif corruption == "empty":
        bad = b""
    else:
        document = json.loads(raw)
        _tamper(document, corruption)
        bad = json.dumps(document).encode()
    ledger.path.write_bytes(bad)
    for attempt in (ledger.spent, lambda: ledger.charge(1), lambda: PrivacyLedger.open(tmp_path, "run-1", plan)):
        with pytest.raises(PrivacyError, match=str(ledger.path)):
            attempt()
    assert ledger.path.read_bytes() == bad


def test_a_deleted_ledger_is_missing_not_empty(tmp_path: Path, plan: DpPlan) -> None:
    ledger = PrivacyLedger.open(tmp_path, "run-1", plan)
    ledger.path.unlink()
    with pytest.raises(PrivacyError, match="missing"):
        ledger.charge(1)


# -- concurrency ---------------------------------------------------------------------------------


def _race(store: str, plan: DpPlan, steps: int, barrier: Any, results: Any) -> None:
    ledger = PrivacyLedger.open(store, "run-1", plan)
    barrier.wait()
    try:
        ledger.charge(steps)
        results.put("charged")
    except BudgetExhaustedError:
        results.put("refused")


def test_concurrent_charges_of_the_last_round_let_exactly_one_through(tmp_path: Path) -> None:
    # PRV: each epsilon takes ~0.1 s, a wide window between load and save for the race to hit.
    plan = plan_noise(DpSettings(epsilon=2.0, accountant="prv"), n_records=1000, batch_size=50, total_steps=10)
    ledger = PrivacyLedger.open(tmp_path, "run-1", plan)
    for _ in range(4):
        ledger.charge(2)
    assert ledger.would_spend(4) > plan.target_epsilon  # one more round fits, two do not
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    workers = [ctx.Process(target=_race, args=(str(tmp_path), plan, 2, barrier, results)) for _ in range(3)]
    for w in workers:
        w.start()
    outcomes = sorted(results.get(timeout=120) for _ in workers)
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    assert outcomes == ["charged", "refused", "refused"]
    assert ledger.charges == [2] * 5
    assert ledger.spent() <= plan.target_epsilon
