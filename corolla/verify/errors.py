"""Errors of the verification layer (spot checks, reputation, ledger, reports)."""

from __future__ import annotations

from corolla.errors import CorollaError


class VerifyError(CorollaError):
    """Something in verification went wrong (bad settings, a failed spot check run)."""

    exit_code = 13


class LedgerError(VerifyError):
    """The ledger cannot be opened, migrated or written."""


class LedgerTamperedError(LedgerError):
    """The ledger's hash chain or head signature does not verify; names the first bad event."""

    exit_code = 14

    def __init__(self, message: str, *, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq  # the first event that does not verify (None: the head itself)
