"""Known answers for key derivation and mask expansion, and the crypto door's failure mode."""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import settings
from hypothesis import strategies as st

import corolla
from corolla.secure_agg import _crypto
from corolla.secure_agg.errors import CryptoError
from tests.secure_agg import make_vectors
from tests.signature_edits import edits, signature_cases

VECTORS = Path(__file__).parents[1] / "vectors"
KDF = json.loads((VECTORS / "secure_agg_kdf.json").read_text())
MASK = json.loads((VECTORS / "secure_agg_mask.json").read_text())
ED25519 = json.loads((VECTORS / "ed25519_rfc8032.json").read_text())["vectors"]
OPAQUE = r"^a cryptographic check failed$"


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
    alone = _crypto.AgreementKey(sk_a).receive_key(
        bytes.fromhex(b["x25519_public"]), **ids, me=a["node_id"], peer=b["node_id"]
    )
    assert alone.hex() == vector["share_key_b_to_a"]


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


def test_aes_ctr_layout_matches_sp800_38a() -> None:
    """The CTR mode the masks use (a 16-byte initial counter block, incremented as a 128-bit
    big-endian integer) is SP 800-38A's, here and in the independent generator."""
    vector = MASK["sp800_38a_f51"]
    key, counter = bytes.fromhex(vector["key"]), bytes.fromhex(vector["initial_counter"])
    plaintext = bytes.fromhex(vector["plaintext"])
    encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
    assert encryptor.update(plaintext).hex() == vector["ciphertext"]
    stream = make_vectors.keystream_bytes(key, 0, len(plaintext), counter=int.from_bytes(counter, "big"))
    assert bytes(a ^ b for a, b in zip(stream, plaintext, strict=True)).hex() == vector["ciphertext"]


def test_mask_vectors_are_the_generated_ones() -> None:
    """tests/vectors/secure_agg_mask.json is regenerated (make_vectors.py), never hand-edited."""
    assert make_vectors.mask_vectors() == MASK


@pytest.mark.parametrize("vector", MASK["streams"], ids=lambda v: v["seed"][:8])
def test_mask_expansion_known_answers(vector: dict) -> None:
    seed = bytes.fromhex(vector["seed"])
    for start, words in vector["words"].items():
        stream = _crypto.keystream_words(seed, int(start) + len(words))
        assert stream.dtype == np.uint32
        assert stream[int(start) :].tolist() == words
    assert _crypto.keystream_words(seed, 16).tobytes().hex() == vector["first_64_bytes"]


def test_keystream_equals_an_independent_aes_ctr() -> None:
    seed = bytes(range(100, 132))
    words = 4 * 300 + 3  # past the counter's first carry, and a partial last block
    expected = make_vectors.mask_bytes(seed, 0, 4 * words)
    assert _crypto.keystream_words(seed, words).tobytes() == expected
    assert _crypto.keystream_words(seed, 0).shape == (0,)
    # read in uneven pieces, the stream goes on where it stopped (also within a block)
    read, pieces = _crypto.keystream(seed), []
    for size in (1, 15, 16, 3, 1168):
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


@pytest.mark.parametrize("vector", ED25519, ids=lambda v: v["name"])
def test_signature_known_answers(vector: dict[str, str]) -> None:
    """RFC 8032's Ed25519 vectors: the public key, the (deterministic) signature, and verify."""
    seed, public = bytes.fromhex(vector["secret"]), bytes.fromhex(vector["public"])
    message, signature = bytes.fromhex(vector["message"]), bytes.fromhex(vector["signature"])
    assert _crypto.ed25519_public(seed) == public
    assert _crypto.sign(seed, message) == signature
    _crypto.verify(public, message, signature)


@settings(max_examples=50, deadline=None)
@signature_cases
def test_verify_refuses_every_edit_with_one_opaque_error(
    seed: bytes, other: bytes, message: bytes, data: st.DataObject
) -> None:
    """Another key, a flipped message bit, a flipped signature bit, a truncated signature:
    each is the one `CryptoError`, with the one message."""
    public, signature = _crypto.ed25519_public(seed), _crypto.sign(seed, message)
    _crypto.verify(public, message, signature)
    refused = [(public, signed, sig) for signed, sig in edits(message, signature, data)]
    if other != seed:
        refused.append((_crypto.ed25519_public(other), message, signature))
    for key, signed, sig in refused:
        with pytest.raises(CryptoError, match=OPAQUE):
            _crypto.verify(key, signed, sig)


def test_vector_hash_is_blake3() -> None:
    """The upload's vector hash is BLAKE3-256 (the BLAKE3 team's test vector for the empty
    input), and hashing chunk by chunk gives the one-shot hash."""
    assert _crypto.hasher().digest().hex() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    data = np.arange(300_001, dtype=np.uint32)
    one_shot, chunked = _crypto.hasher(), _crypto.hasher()
    one_shot.update(data.tobytes())
    for start in range(0, data.size, 65536):
        chunked.update(data[start : start + 65536].data.cast("B"))
    assert chunked.digest() == one_shot.digest() and len(one_shot.digest()) == 32


def test_kdf_info_is_length_prefixed() -> None:
    # ("ab", "c") and ("a", "bc") must not collide
    one = _crypto.kdf_info("pair", run_id="r", round=1, ids=("ab", "c"))
    two = _crypto.kdf_info("pair", run_id="r", round=1, ids=("a", "bc"))
    assert one != two
    assert one.startswith(struct.pack(">I", 17) + b"corolla-secagg-v1")


def test_only_the_crypto_module_imports_hazmat() -> None:
    package = Path(_crypto.__file__).parent
    importers = sorted(p.name for p in package.glob("*.py") if "cryptography" in p.read_text())
    assert importers == ["_crypto.py"]


def _imports_hazmat(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        if any(name == "cryptography.hazmat" or name.startswith("cryptography.hazmat.") for name in names):
            return True
    return False


def test_hazmat_is_imported_behind_three_doors_only() -> None:
    """Secure aggregation's `_crypto`, the PKI's `_x509` and the ledger's `signing`: nothing
    else in corolla imports `cryptography.hazmat`."""
    root = Path(corolla.__file__).parent
    importers = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if _imports_hazmat(p.read_text()))
    assert importers == ["pki/_x509.py", "secure_agg/_crypto.py", "verify/ledger/signing.py"]
