"""The edits every Ed25519 verify must refuse, shared by the tests of its three wrappers
(secure aggregation, the ledger, the PKI): one convention, one property."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

_SEED = st.binary(min_size=32, max_size=32)

# seed, other (another key's seed), message, data: the arguments of a signature property
signature_cases = given(seed=_SEED, other=_SEED, message=st.binary(min_size=1, max_size=100), data=st.data())


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def edits(message: bytes, signature: bytes, data: st.DataObject) -> list[tuple[bytes, bytes]]:
    """(message, signature) pairs a verify must refuse: a flipped message bit, a flipped
    signature bit, a truncated signature."""
    message_bit = data.draw(st.integers(0, 8 * len(message) - 1), label="message bit")
    signature_bit = data.draw(st.integers(0, 8 * len(signature) - 1), label="signature bit")
    cut = data.draw(st.integers(0, len(signature) - 1), label="signature length")
    return [
        (flip(message, message_bit), signature),
        (message, flip(signature, signature_bit)),
        (message, signature[:cut]),
    ]
