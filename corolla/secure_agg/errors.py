"""Errors of secure aggregation: one small hierarchy under `CorollaError`.

A site that raises any of them for a round has refused the round: it sends nothing more
for it (its round state is gone). Messages name the check that failed and the ids
involved, never key material or data.
"""

from corolla.errors import CorollaError


class SecureAggregationError(CorollaError):
    """Base class of secure-aggregation errors."""

    exit_code = 12


class ParameterError(SecureAggregationError):
    """A round parameter is out of its allowed range (threshold, encoding, roster size, length)."""


class EncodingError(SecureAggregationError):
    """An input cannot be encoded (not finite, wrong shape) or a decoded sum is out of range."""


class SumOutOfRange(EncodingError):
    """The unmasked sum lies outside what the survivors' inputs could add up to: some
    input was not encoded with this round's parameters, or a mask was not removed."""


class MalformedMessage(SecureAggregationError):
    """Bytes that are not a well-formed secure-aggregation message of the expected kind."""


class CryptoError(SecureAggregationError):
    """A cryptographic check failed (signature, authenticated decryption, key agreement).
    Deliberately opaque: it never says which byte or key was wrong."""


class RejectedMessage(SecureAggregationError):
    """A well-formed message that must not be acted on."""


class BadSignature(RejectedMessage):
    """The message is not signed by the member it claims to come from, or its content
    does not match what was signed."""


class UntrustedMember(RejectedMessage):
    """A sender or roster entry that is not a certified member of this round: not in the
    roster, a certificate the consortium CA did not issue (or expired, revoked, wrong
    role), or a key that is not the one its certificate names (a substituted key)."""


class ReplayedMessage(RejectedMessage):
    """A message for another run, round, roster or recipient, or a second message of a
    kind a sender may send once per round."""


class RefusedRequest(RejectedMessage):
    """A site refuses what the coordinator asks: an unsafe threshold, an inconsistent
    survivor/dropout split, or a second unmask request in one round."""


class NotEnoughSurvivors(SecureAggregationError):
    """Fewer sites than the threshold uploaded or answered the unmask request: the
    round cannot be unmasked (and no site's input is revealed)."""


class ReconstructionError(SecureAggregationError):
    """A self-mask seed rebuilt from the shares does not match its sender's commitment:
    some site sent a wrong share."""


class RoundStateError(SecureAggregationError):
    """The site has no state for this round (never uploaded, already answered), or an
    operation was called out of order."""
