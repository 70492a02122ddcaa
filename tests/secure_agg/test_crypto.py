"""Known answers for key derivation and mask expansion, and the crypto door's failure mode."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from corolla.secure_agg import _crypto
from corolla.secure_agg.errors import CryptoError

VECTORS = Path(__file__).parents[1] / "vectors"
KDF = json.loads((VECTORS / "secure_agg_kdf.json").read_text())
MASK = json.loads((VECTORS / "secure_agg_mask.json").read_text())


@pytest.mark.parametrize("vector", KDF["pairs"], ids=lambda v: f"{v['run_id']}-{v['round']}-{v['a']['node_id']}")
def test_pair_keys_known_answers(vector: dict) -> None:
    a, b = vector["a"], vector["b"]
    sk_a, sk_b = bytes.fromhex(a["x25519_private"]), bytes.fromhex(b["x25519_private"])
    assert _crypto.x25519_public(sk_a).hex() == a["x25519_public"]
    assert _crypto.x25519_shared(sk_a, bytes.fromhex(b["x25519_public"])).hex() == vector["x25519_shared"]
    low, high = sorted((a["node_id"], b["node_id"]))
    ids = {"run_id": vector["run_id"], "round": vector["round"]}
    assert _crypto.kdf_info("pair", **ids, ids=(low, high)).hex() == vector["pair_info"]
    assert _crypto.kdf_info("share", **ids, ids=(a["node_id"], b["node_id"])).hex() == vector["share_info_a_to_b"]
    at_a = _crypto.pair_keys(sk_a, bytes.fromhex(b["x25519_public"]), **ids, me=a["node_id"], peer=b["node_id"])
    at_b = _crypto.pair_keys(sk_b, bytes.fromhex(a["x25519_public"]), **ids, me=b["node_id"], peer=a["node_id"])
    assert at_a.mask_seed.hex() == at_b.mask_seed.hex() == vector["mask_seed"]
    assert at_a.send_key.hex() == at_b.receive_key.hex() == vector["share_key_a_to_b"]
    assert at_b.send_key.hex() == at_a.receive_key.hex() == vector["share_key_b_to_a"]


def test_derivations_differ_by_round_run_and_direction() -> None:
    first = KDF["pairs"][0]
    seeds = {v["mask_seed"] for v in KDF["pairs"]} | {v["share_key_a_to_b"] for v in KDF["pairs"]}
    seeds |= {v["share_key_b_to_a"] for v in KDF["pairs"]}
    assert len(seeds) == 3 * len(KDF["pairs"])  # every key and seed distinct
    assert first["share_key_a_to_b"] != first["share_key_b_to_a"]


@pytest.mark.parametrize("vector", KDF["commitments"], ids=lambda v: v["node_id"])
def test_self_mask_commitment_known_answers(vector: dict) -> None:
    got = _crypto.self_mask_commitment(
        bytes.fromhex(vector["self_mask_seed"]),
        run_id=vector["run_id"],
        round=vector["round"],
        node_id=vector["node_id"],
    )
    assert got.hex() == vector["commitment"]


def test_chacha20_layout_matches_rfc8439_block_vector() -> None:
    """cryptography's 16-byte ChaCha20 nonce is the 4-byte little-endian block counter then
    the 96-bit nonce: RFC 8439 section 2.3.2 through it (and through the reference below)."""
    block = MASK["rfc8439_block"]
    key, nonce = bytes.fromhex(block["key"]), bytes.fromhex(block["nonce"])
    encryptor = Cipher(algorithms.ChaCha20(key, struct.pack("<I", block["counter"]) + nonce), mode=None).encryptor()
    assert encryptor.update(bytes(64)).hex() == block["output"]
    assert reference_block(key, block["counter"], nonce).hex() == block["output"]


@pytest.mark.parametrize("vector", MASK["streams"], ids=lambda v: v["seed"][:8])
def test_mask_expansion_known_answers(vector: dict) -> None:
    seed = bytes.fromhex(vector["seed"])
    for start, words in vector["words"].items():
        stream = _crypto.keystream_words(seed, int(start) + len(words))
        assert stream.dtype == np.uint32
        assert stream[int(start) :].tolist() == words
    assert _crypto.keystream_words(seed, 16).tobytes().hex() == vector["first_64_bytes"]


def test_keystream_equals_an_independent_chacha20() -> None:
    seed = bytes(range(100, 132))
    words = 16 * 5 + 7  # a partial last block
    expected = b"".join(reference_block(seed, counter, bytes(12)) for counter in range(6))[: 4 * words]
    assert _crypto.keystream_words(seed, words).tobytes() == expected
    assert _crypto.keystream_words(seed, 0).shape == (0,)
    # read in uneven pieces, the stream goes on where it stopped
    read, pieces = _crypto.keystream(seed), []
    for size in (1, 15, 16, 3, 52):
        piece = np.empty(size, dtype=np.uint32)
        read(piece)
        pieces.append(piece)
    assert np.concatenate(pieces).tobytes() == expected


def test_x25519_low_order_point_is_an_opaque_error() -> None:
    with pytest.raises(CryptoError, match=r"^a cryptographic check failed$"):
        _crypto.x25519_shared(bytes(range(32)), bytes(32))  # the all-zero point: shared secret 0
    with pytest.raises(CryptoError):
        _crypto.pair_keys(bytes(range(32)), bytes(31), run_id="r", round=1, me="a", peer="b")


def test_boxes_and_signatures_fail_opaquely() -> None:
    key, aad = bytes(range(32)), b"aad"
    box = _crypto.seal(key, b"shares", aad, lambda n: bytes(n))
    assert _crypto.open_box(key, box, aad) == b"shares"
    for bad_key, bad_box, bad_aad in [
        (bytes(32), box, aad),
        (key, box[:-1] + bytes([box[-1] ^ 1]), aad),
        (key, box, b"other"),
        (key, box[:20], aad),
    ]:
        with pytest.raises(CryptoError, match=r"^a cryptographic check failed$"):
            _crypto.open_box(bad_key, bad_box, bad_aad)
    seed = bytes(range(32))
    signature = _crypto.sign(seed, b"message")
    _crypto.verify(_crypto.ed25519_public(seed), b"message", signature)
    with pytest.raises(CryptoError, match=r"^a cryptographic check failed$"):
        _crypto.verify(_crypto.ed25519_public(seed), b"messagE", signature)
    with pytest.raises(CryptoError):
        _crypto.verify(_crypto.ed25519_public(bytes(32)), b"message", signature)


def test_kdf_info_is_length_prefixed() -> None:
    # ("ab", "c") and ("a", "bc") must not collide
    one = _crypto.kdf_info("pair", run_id="r", round=1, ids=("ab", "c"))
    two = _crypto.kdf_info("pair", run_id="r", round=1, ids=("a", "bc"))
    assert one != two
    assert one.startswith(struct.pack(">I", 17) + b"corolla-secagg-v1")


# -- an independent ChaCha20 block function (RFC 8439 section 2.3), for the tests only ----------


def _rotl(v: int, c: int) -> int:
    return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))


def _quarter(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF
    s[b] = _rotl(s[b] ^ s[c], 7)


def reference_block(key: bytes, counter: int, nonce: bytes) -> bytes:
    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *struct.unpack("<8I", key), counter]
    state += list(struct.unpack("<3I", nonce))
    w = list(state)
    for _ in range(10):
        _quarter(w, 0, 4, 8, 12)
        _quarter(w, 1, 5, 9, 13)
        _quarter(w, 2, 6, 10, 14)
        _quarter(w, 3, 7, 11, 15)
        _quarter(w, 0, 5, 10, 15)
        _quarter(w, 1, 6, 11, 12)
        _quarter(w, 2, 7, 8, 13)
        _quarter(w, 3, 4, 9, 14)
    return struct.pack("<16I", *((a + b) & 0xFFFFFFFF for a, b in zip(w, state, strict=True)))


def test_only_the_crypto_module_imports_hazmat() -> None:
    package = Path(_crypto.__file__).parent
    importers = sorted(p.name for p in package.glob("*.py") if "cryptography" in p.read_text())
    assert importers == ["_crypto.py"]
