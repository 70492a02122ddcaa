"""The chain's byte layout, rebuilt independently here, and a pinned known answer."""

from __future__ import annotations

import hashlib
import struct

import pytest

from corolla.verify.ledger.chain import GENESIS_HASH, HEAD_DOMAIN, event_hash, head_message


def test_event_hash_layout() -> None:
    body = b'{"kind":"readmit"}'
    expected = hashlib.sha256(
        bytes(32)
        + (1).to_bytes(8, "big")
        + struct.pack(">d", 1234.5)
        + len("writer-é".encode()).to_bytes(4, "big")
        + "writer-é".encode()
        + body
    ).hexdigest()
    assert event_hash(GENESIS_HASH, 1, 1234.5, "writer-é", body) == expected


def test_event_hash_known_answer() -> None:
    first = event_hash(GENESIS_HASH, 1, 1_700_000_000.25, "coordinator", b'{"a":1}')
    second = event_hash(first, 2, 1_700_000_000.5, "", b'{"a":2}')
    assert first == "565815ad7cc4e5095b1d1caa162adc47a0990f4f382bdc8d7abe9cdcf4670aa7"
    assert second == "fc98edae092fbbfd63dd5c312772bcdeb5c56a463a357fa88417a3b8a03f9dbe"


def test_head_message_layout() -> None:
    h = "ab" * 32
    assert HEAD_DOMAIN == b"corolla/ledger/v1/head\x00"
    assert head_message(7, h) == HEAD_DOMAIN + (7).to_bytes(8, "big") + bytes.fromhex(h)
    assert head_message(0, GENESIS_HASH) == HEAD_DOMAIN + bytes(40)


def test_writer_and_body_boundaries_do_not_collide() -> None:
    # The writer is length-prefixed: moving bytes between writer and body changes the hash.
    assert event_hash(GENESIS_HASH, 1, 0.0, "ab", b"c") != event_hash(GENESIS_HASH, 1, 0.0, "a", b"bc")


@pytest.mark.parametrize("bad", ["0" * 63, "zz" * 32, "0" * 66])
def test_malformed_hashes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        event_hash(bad, 1, 0.0, "", b"")
    with pytest.raises(ValueError):
        head_message(1, bad)


def test_seq_bounds() -> None:
    with pytest.raises(ValueError):
        event_hash(GENESIS_HASH, 0, 0.0, "", b"")
    with pytest.raises(ValueError):
        event_hash(GENESIS_HASH, 2**64, 0.0, "", b"")
    with pytest.raises(ValueError):
        head_message(-1, GENESIS_HASH)
