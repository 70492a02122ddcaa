"""A site's privacy spending for one run, persisted in the site's own store between rounds.

Flower starts a fresh process per message, so the accountant cannot live in memory: each
round the ClientApp opens the ledger, `charge`s the steps it is about to take (before
training, so a crash mid-round still counts) and trains only if the charge succeeded.

File: `<store_dir>/privacy/<run_key>.json`, JSON (never pickle), replaced atomically (temp
file, fsync, `os.replace`, fsync of the directory). It holds the run's `DpPlan` and Opacus's
accountant `state_dict` (`{"mechanism", "history"}`); steps are added with the accountant's
own `step`, so the history has exactly the shape Opacus's optimizer hook would give it: one
`(noise_multiplier, sample_rate, steps)` entry, since the plan fixes both for the run. That
matters for PRV, whose bound for k entries of n steps differs in the last digits from one
entry of k*n. Load-check-save runs under an `fcntl.flock` on `<run_key>.lock` (the data
file itself is replaced, so it cannot carry the lock): two processes of one site cannot
both charge past the budget. A missing ledger is a new run; a corrupted one is an error,
never a reset (a reset would hand out the budget again).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Literal

from opacus.accountants import IAccountant, create_accountant
from pydantic import BaseModel, ConfigDict, ValidationError

from corolla.training.privacy import (
    Accountant,
    BudgetExhaustedError,
    DpPlan,
    HistoryEntry,
    PrivacyError,
)

logger = logging.getLogger(__name__)

_FORMAT: Literal["corolla.privacy-ledger/1"] = "corolla.privacy-ledger/1"
_RUN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A charge may land this far (relative) above the target: room for last-bit differences
# between the plan-time and charge-time evaluations of the same history; a real overspend
# from one more step is orders of magnitude larger.
BUDGET_RTOL = 1e-9


class _AccountantState(BaseModel):
    """Opacus's `IAccountant.state_dict()`, as JSON."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    mechanism: Accountant
    history: list[HistoryEntry]


class _LedgerFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    format: Literal["corolla.privacy-ledger/1"]
    run_key: str
    plan: DpPlan
    charges: list[int]  # steps of each successful charge, in order (the audit trail of rounds)
    accountant: _AccountantState


class PrivacyLedger:
    """Epsilon spent by one site in one run; every read goes to the file, every charge locks it."""

    def __init__(self, *, path: Path, run_key: str, plan: DpPlan) -> None:
        """Use `PrivacyLedger.open`."""
        self.path = path
        self.run_key = run_key
        self.plan = plan
        self._lock_path = path.with_suffix(".lock")

    @classmethod
    def open(cls, store_dir: str | os.PathLike[str], run_key: str, plan: DpPlan) -> PrivacyLedger:
        """Create the run's ledger, or load it and refuse if it was planned with other noise."""
        if not _RUN_KEY.fullmatch(run_key):
            raise PrivacyError(f"run_key={run_key!r} must be 1-128 of A-Z a-z 0-9 . _ - (not starting with . _ -)")
        directory = Path(store_dir) / "privacy"
        directory.mkdir(parents=True, exist_ok=True)
        ledger = cls(path=directory / f"{run_key}.json", run_key=run_key, plan=plan)
        with ledger._locked():
            if ledger.path.exists():
                ledger._read()  # checks the stored plan against `plan`
            else:
                ledger._write(charges=[], history=[])
                logger.info("privacy ledger %s created: %s", ledger.path, plan)
        return ledger

    @property
    def history(self) -> list[HistoryEntry]:
        """Opacus's accountant history: `(noise_multiplier, sample_rate, steps)` entries."""
        return list(self._read().accountant.history)

    @property
    def charges(self) -> list[int]:
        """Steps of each successful charge, oldest first."""
        return list(self._read().charges)

    @property
    def steps_charged(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def spent(self) -> float:
        """Epsilon spent so far (at the plan's delta)."""
        return _epsilon(self._accountant(self._read().accountant.history), self.plan.delta)

    def would_spend(self, steps: int) -> float:
        """Epsilon the run would have spent after `steps` more steps; records nothing."""
        _check_steps(steps)
        return _epsilon(self._extended(self._read().accountant.history, steps), self.plan.delta)

    def charge(self, steps: int) -> float:
        """Record `steps` more steps and return the epsilon spent after them.

        Raises BudgetExhaustedError, recording nothing, if that epsilon would exceed the target
        (by more than BUDGET_RTOL relative).
        """
        _check_steps(steps)
        with self._locked():
            stored = self._read()
            extended = self._extended(stored.accountant.history, steps)
            would_be = _epsilon(extended, self.plan.delta)
            target = self.plan.target_epsilon
            if would_be > target * (1 + BUDGET_RTOL):
                spent = _epsilon(self._accountant(stored.accountant.history), self.plan.delta)
                raise BudgetExhaustedError(spent, target, would_be, steps)
            self._write(charges=[*stored.charges, steps], history=extended.history)
        logger.info("privacy: charged %d steps, epsilon %.6g of %.6g spent", steps, would_be, target)
        return would_be

    # -- accountant ----------------------------------------------------------------------------

    def _accountant(self, history: list[HistoryEntry]) -> IAccountant:
        accountant = create_accountant(mechanism=self.plan.accountant)
        accountant.load_state_dict({"history": list(history), "mechanism": self.plan.accountant})
        return accountant

    def _extended(self, history: list[HistoryEntry], steps: int) -> IAccountant:
        accountant = self._accountant(history)
        for _ in range(steps):  # Opacus's own bookkeeping: merges equal (sigma, q) into one entry
            accountant.step(noise_multiplier=self.plan.noise_multiplier, sample_rate=self.plan.sample_rate)
        return accountant

    # -- file ----------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> _LedgerFile:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise PrivacyError(f"privacy ledger {self.path} is missing; the budget spent is unknown") from None
        try:
            stored = _LedgerFile.model_validate_json(raw)
        except (ValidationError, PrivacyError) as exc:
            raise PrivacyError(
                f"privacy ledger {self.path} is corrupted, so the budget spent is unknown and this site "
                f"refuses to train (restore the file; do not delete it, that would reset the budget): {exc}"
            ) from exc
        self._check(stored)
        return stored

    def _check(self, stored: _LedgerFile) -> None:
        if stored.run_key != self.run_key:
            raise PrivacyError(
                f"privacy ledger {self.path} belongs to run_key={stored.run_key!r}, not {self.run_key!r}"
            )
        if stored.plan != self.plan:
            changed = ", ".join(
                f"{f.name}={getattr(self.plan, f.name)!r} (stored {getattr(stored.plan, f.name)!r})"
                for f in fields(DpPlan)
                if getattr(self.plan, f.name) != getattr(stored.plan, f.name)
            )
            raise PrivacyError(f"run {self.run_key!r} was planned with other noise, a run cannot change it: {changed}")
        state = stored.accountant
        off_plan = [e for e in state.history if (e[0], e[1]) != (self.plan.noise_multiplier, self.plan.sample_rate)]
        if state.mechanism != self.plan.accountant or off_plan:
            raise PrivacyError(
                f"privacy ledger {self.path}: accountant {state.mechanism!r} with entries {off_plan!r} "
                f"does not match the plan ({self.plan.accountant!r}, sigma={self.plan.noise_multiplier!r}, "
                f"q={self.plan.sample_rate!r})"
            )
        if any(c < 1 for c in stored.charges) or sum(stored.charges) != sum(e[2] for e in state.history):
            raise PrivacyError(f"privacy ledger {self.path}: charges {stored.charges} do not add up to its history")

    def _write(self, *, charges: list[int], history: list[HistoryEntry]) -> None:
        document = _LedgerFile(
            format=_FORMAT,
            run_key=self.run_key,
            plan=self.plan,
            charges=charges,
            accountant=_AccountantState(mechanism=self.plan.accountant, history=[(e[0], e[1], e[2]) for e in history]),
        )
        data = document.model_dump_json(indent=2).encode()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrivacyError(f"steps={steps!r} must be an integer of at least 1")


def _epsilon(accountant: IAccountant, delta: float) -> float:
    if not accountant.history:
        return 0.0  # Opacus's RDP returns the int 0 here and its PRV fails on an empty history
    return float(accountant.get_epsilon(delta=delta))
