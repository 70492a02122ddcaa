"""Errors of the federated deployment: Flower processes, the Control API, runs."""

from __future__ import annotations

from pathlib import Path

from corolla.errors import CorollaError


class FederationError(CorollaError):
    """Base class of errors raised while deploying or driving a Flower federation."""

    exit_code = 10


class ProcessFailed(FederationError):
    """A Flower process (SuperLink or SuperNode) exited before it was ready, or could not start.

    `flower_exit_code` is Flower's own code from the log's `Exit Code: N` line (Flower exits
    with status 1 for every error and prints the real code), e.g. 305 when a SuperNode
    cannot connect: refused activation (key not enrolled) or an untrusted certificate.
    """

    def __init__(self, message: str, *, name: str, log_path: Path, flower_exit_code: int | None) -> None:
        super().__init__(message)
        self.name = name
        self.log_path = log_path
        self.flower_exit_code = flower_exit_code


class FederationTimeout(FederationError):
    """A bounded wait ran out: a process did not become ready, a run did not finish."""


class ControlError(FederationError):
    """A Control API call (through the `flwr` CLI) failed or was refused."""


class RunFailed(FederationError):
    """A run finished without completing (`failed` or `stopped`)."""
