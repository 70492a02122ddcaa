"""Errors of the consortium PKI. Verification failures say which check failed, not more."""

from corolla.errors import CorollaError


class PkiError(CorollaError):
    """Base class of PKI errors."""

    exit_code = 8


class CertificateError(PkiError):
    """A certificate, key or revocation list is malformed, untrusted, expired or revoked."""


class WorkspaceError(PkiError):
    """The workspace lacks a CA or a node, or a name is already taken."""
