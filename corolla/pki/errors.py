"""Errors of the consortium PKI. Verification failures say which check failed, not more."""

from __future__ import annotations

from corolla.errors import CorollaError


class PkiError(CorollaError):
    """Base class of PKI errors."""

    exit_code = 8


class CertificateError(PkiError):
    """A certificate, key or revocation list is malformed, untrusted, expired or revoked."""


class SignatureError(CertificateError):
    """A certificate or revocation list is not signed by the CA's key. Deliberately opaque,
    one message for every cause (another key, an edited byte, a malformed signature, another
    issuer name); callers say which certificate it concerned."""

    def __init__(self) -> None:
        super().__init__("a signature check failed")

    def __reduce__(self) -> tuple[type[SignatureError], tuple[()]]:  # pickle: no arguments to pass back
        return (type(self), ())


class WorkspaceError(PkiError):
    """The workspace lacks a CA or a node, or a name is already taken."""
