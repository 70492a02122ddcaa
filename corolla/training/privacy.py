"""Record-level DP-SGD budgets of one site: settings, the run's noise plan, recomputation.

Pure computation, no I/O: `plan_noise` fixes the noise multiplier once for the whole run
with Opacus's `get_noise_multiplier` and the same accountant that then tracks spending
(mixing accountants is a silent failure); `recompute_epsilon` rebuilds epsilon from a logged
history with a fresh Opacus accountant. The persisted, stateful side is `privacy_ledger`.

A history entry is Opacus's own `(noise_multiplier, sample_rate, steps)` tuple.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from corolla.errors import CorollaError

Accountant = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[Accountant, ...] = ("rdp", "prv")
HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), Opacus's order

# `get_noise_multiplier`'s binary search stops once eps(sigma) is within this fraction of the
# target (Opacus's own tolerance is an absolute 0.01, i.e. 10 % of a target epsilon of 0.1).
_SEARCH_RTOL = 0.005

DP_OFF_MESSAGE = (
    "differential privacy is OFF (--dp-epsilon off): site updates are trained and shared "
    "without any DP guarantee; results are flagged dp=false"
)


class PrivacyError(CorollaError):
    """A DP setting is out of range, a run's noise plan changed, or a privacy ledger is unusable."""

    exit_code = 11


class BudgetExhaustedError(PrivacyError):
    """The next charge would take the site past its epsilon; nothing was recorded."""

    def __init__(self, spent: float, target: float, would_be: float, steps: int) -> None:
        super().__init__(
            f"privacy budget exhausted: spent epsilon {spent:.6g} of target {target:.6g}; "
            f"{steps} more steps would reach {would_be:.6g}, so this site refuses to train"
        )
        self.spent = spent
        self.target = target
        self.would_be = would_be
        self.steps = steps

    def __reduce__(self) -> tuple[type[BudgetExhaustedError], tuple[float, float, float, int]]:
        # The default reduce replays `args` (the message) into __init__; keep the fields instead.
        return (type(self), (self.spent, self.target, self.would_be, self.steps))


def _positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise PrivacyError(f"{name}={value!r} must be a positive finite number")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrivacyError(f"{name}={value!r} must be an integer of at least 1")


def _check_delta(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise PrivacyError(f"delta={value!r} must be in (0, 1)")


def _check_accountant(value: object) -> None:
    if value not in ACCOUNTANTS:
        raise PrivacyError(f"accountant={value!r} must be one of {', '.join(ACCOUNTANTS)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DpSettings:
    epsilon: float | None  # the site's total budget for the run; None = DP off (said loudly)
    delta: float | None = None  # None = default_delta(N); must be below 1/N either way
    max_grad_norm: float = 1.0  # per-sample clipping bound C; the noise std is noise_multiplier * C
    accountant: Accountant = "rdp"  # plans the noise and tracks spending: one accountant for both

    def __post_init__(self) -> None:
        if self.epsilon is not None:
            _positive_float("epsilon", self.epsilon)
        if self.delta is not None:
            _check_delta(self.delta)
        _positive_float("max_grad_norm", self.max_grad_norm)
        _check_accountant(self.accountant)

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None


def warn_dp_off(logger: logging.Logger) -> None:
    """Say at WARNING level that this run has no DP; call it wherever DP would have been set up."""
    logger.warning(DP_OFF_MESSAGE)


def default_delta(n_records: int) -> float:
    """The delta used when none is given: min(1e-5, 1 / (10 N)), always strictly below 1/N.

    A mechanism that publishes one random record whole is (0, 1/N)-DP, so delta must sit well
    below 1/N. 1/(10 N) keeps N * delta (the expected number of records whose guarantee may
    fail outright) at most 0.1; the 1e-5 cap (Opacus's and most papers' customary value) keeps
    small sites from a weak delta such as 1e-3 at N = 100. Epsilon grows only with
    sqrt(log(1/delta)), so the smaller delta costs little.
    """
    _positive_int("n_records", n_records)
    return min(1e-5, 1.0 / (10 * n_records))


@dataclass(frozen=True, kw_only=True, slots=True)
class DpPlan:
    """The noise of one site's whole run, fixed once; the ledger refuses a run that changes it."""

    noise_multiplier: float  # sigma: noise std / max_grad_norm
    sample_rate: float  # Poisson sampling rate q = B / N
    delta: float
    target_epsilon: float  # the site's total budget for the run
    total_steps: int  # optimizer steps the noise was planned for (rounds x steps per round)
    accountant: Accountant
    max_grad_norm: float

    def __post_init__(self) -> None:
        _positive_float("noise_multiplier", self.noise_multiplier)
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, int | float):
            raise PrivacyError(f"sample_rate={self.sample_rate!r} must be a number in (0, 1]")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate={self.sample_rate!r} must be in (0, 1]")
        _check_delta(self.delta)
        _positive_float("target_epsilon", self.target_epsilon)
        _positive_int("total_steps", self.total_steps)
        _check_accountant(self.accountant)
        _positive_float("max_grad_norm", self.max_grad_norm)


def plan_noise(settings: DpSettings, *, n_records: int, batch_size: int, total_steps: int) -> DpPlan:
    """The noise multiplier that spends at most `settings.epsilon` in `total_steps` steps at q = B/N."""
    if settings.epsilon is None:
        raise PrivacyError("epsilon=None: DP is off, there is no noise to plan")
    _positive_int("n_records", n_records)
    _positive_int("batch_size", batch_size)
    _positive_int("total_steps", total_steps)
    if batch_size > n_records:
        raise PrivacyError(
            f"batch_size={batch_size} exceeds n_records={n_records}: "
            f"the sample rate q = B/N = {batch_size / n_records:.6g} must be in (0, 1]"
        )
    delta = default_delta(n_records) if settings.delta is None else settings.delta
    if not delta < 1.0 / n_records:
        raise PrivacyError(f"delta={delta!r} must be below 1/N = {1.0 / n_records:.6g} (N = {n_records} records)")
    sample_rate = batch_size / n_records
    try:
        sigma = get_noise_multiplier(
            target_epsilon=settings.epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=settings.accountant,
            epsilon_tolerance=_SEARCH_RTOL * settings.epsilon,
        )
    except ValueError as exc:  # Opacus: "The privacy budget is too low." (sigma past 1e6)
        raise PrivacyError(
            f"epsilon={settings.epsilon!r} is unreachable with delta={delta:.6g}, q={sample_rate:.6g} "
            f"and {total_steps} steps: {exc}"
        ) from exc
    return DpPlan(
        noise_multiplier=float(sigma),  # Opacus can return the int 20 when its first guess already fits
        sample_rate=sample_rate,
        delta=delta,
        target_epsilon=settings.epsilon,
        total_steps=total_steps,
        accountant=settings.accountant,
        max_grad_norm=settings.max_grad_norm,
    )


def recompute_epsilon(history: Sequence[Sequence[float]], delta: float, accountant: Accountant = "rdp") -> float:
    """Epsilon of a logged `(noise_multiplier, sample_rate, steps)` history, by a fresh Opacus accountant."""
    _check_delta(delta)
    _check_accountant(accountant)
    entries: list[HistoryEntry] = []
    for i, entry in enumerate(history):
        if len(entry) != 3:
            raise PrivacyError(f"history[{i}]={entry!r} must be (noise_multiplier, sample_rate, steps)")
        sigma, rate, steps = entry
        _positive_float(f"history[{i}].noise_multiplier", sigma)
        if not 0 < rate <= 1:
            raise PrivacyError(f"history[{i}].sample_rate={rate!r} must be in (0, 1]")
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        _positive_int(f"history[{i}].steps", steps)
        entries.append((float(sigma), float(rate), int(steps)))
    if not entries:
        return 0.0  # Opacus's RDP returns the int 0 here and its PRV fails on an empty history
    fresh = create_accountant(mechanism=accountant)
    fresh.load_state_dict({"history": entries, "mechanism": accountant})
    return float(fresh.get_epsilon(delta=delta))
