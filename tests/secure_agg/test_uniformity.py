"""A single masked upload looks uniform: chi-square tests on a masked zero vector.

The upload of a site whose update is all zeros is nothing but masks. If masking works, its
bytes, and the top byte of each 32-bit word, are uniform on 0..255. Pearson's chi-square
statistic with 255 degrees of freedom is compared with its 0.999 quantile (significance
level alpha = 0.001): a truly uniform stream exceeds it with probability 0.001 per
statistic, 0.002 for the two together. Every key and random byte here is fixed (an
injected random source and fixed long-term keys), so the test is deterministic: it either
always passes or always fails; alpha is the chance that a fixed seed picked blindly is a
false alarm. The negative control (the same vector unmasked) must fail it by far.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from corolla.secure_agg import (
    Aggregator,
    CoordinatorKeys,
    FixedPoint,
    Member,
    SiteKeys,
    SitePolicy,
    _crypto,
    site_upload,
)
from corolla.secure_agg.messages import Kind, unpack

CHI2_0999_255 = 330.5197  # scipy.stats.chi2.ppf(0.999, 255)
PARAMS = 1_000_000


class FixedKeys:
    """A stand-in for the PKI: a 'certificate' is b'node id:' + raw public key."""

    def check_signing_key_der(self, der: bytes, *, node_id: str, role: str) -> bytes:
        return self._key(der, node_id)

    def check_agreement_der(self, der: bytes, *, node_id: str) -> bytes:
        return self._key(der, node_id)

    @staticmethod
    def _key(der: bytes, node_id: str) -> bytes:
        owner, _, key = der.partition(b":")
        if owner.decode() != node_id:
            raise ValueError("not this node's key")
        return key


def stream(label: str) -> Callable[[int], bytes]:
    """A deterministic random source (SHAKE-256 of a label and a counter)."""
    counter = [0]

    def random(n: int) -> bytes:
        counter[0] += 1
        return hashlib.shake_256(f"{label}/{counter[0]}".encode()).digest(n)

    return random


def chi_square(values: np.ndarray) -> float:
    counts = np.bincount(values, minlength=256).astype(np.float64)
    expected = values.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


def masked_zero_upload() -> np.ndarray:
    ids = ["site-a", "site-b", "site-c"]
    secret = {i: hashlib.sha256(f"key/{i}".encode()).digest() for i in ids}
    keys = {i: SiteKeys(node_id=i, identity_key=secret[i], agreement_key=secret[i]) for i in ids}
    members = [
        Member(
            node_id=i,
            identity_cert=i.encode() + b":" + _crypto.ed25519_public(secret[i]),
            agreement_cert=i.encode() + b":" + _crypto.x25519_public(secret[i]),
        )
        for i in ids
    ]
    coordinator_key = hashlib.sha256(b"coordinator").digest()
    agg = Aggregator(
        run_id="uniformity",
        round=1,
        members=members,
        encoding=FixedPoint.for_sites(3, clip=1.0),
        length=PARAMS,
        coordinator=CoordinatorKeys(
            node_id="coord",
            identity_key=coordinator_key,
            identity_cert=b"coord:" + _crypto.ed25519_public(coordinator_key),
        ),
        verifier=FixedKeys(),
        threshold=3,
    )
    upload = site_upload(
        agg.announcement,
        np.zeros(PARAMS, np.float32),
        keys["site-b"],
        FixedKeys(),
        policy=SitePolicy(),
        random=stream("b"),
    ).upload
    payload = unpack(upload, expect=Kind.UPLOAD).payload
    assert len(payload) == 4 * PARAMS  # 4 bytes per parameter on the wire
    return np.frombuffer(payload, dtype="<u4")


def test_a_masked_upload_is_indistinguishable_from_uniform() -> None:
    words = masked_zero_upload()
    assert chi_square(words.view(np.uint8)) < CHI2_0999_255  # every byte of the upload
    assert chi_square((words >> 24).astype(np.uint8)) < CHI2_0999_255  # the top byte of each word
    unmasked = FixedPoint.for_sites(3, clip=1.0).encode(np.zeros(PARAMS, np.float32)).ring
    assert chi_square(unmasked.view(np.uint8)) > 100 * CHI2_0999_255  # the control: zeros are not uniform
