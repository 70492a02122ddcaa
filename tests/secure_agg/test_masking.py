"""Masking arithmetic: masks cancel, and removing the right ones leaves the exact ring sum."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corolla.secure_agg import _crypto, masking


def fake_keystream(seed: bytes, words: int) -> np.ndarray:
    """A cheap deterministic stand-in for the ChaCha20 keystream (pure arithmetic tests only)."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed).digest()[:8], "little"))
    return rng.integers(0, 2**32, size=words, dtype=np.uint64).astype(np.uint32)


def seed_of(*parts: object) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 12), d=st.integers(1, 64), data=st.data())
def test_pairwise_masks_cancel_and_unmask_gives_the_exact_ring_sum(n: int, d: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    encoded = [rng.integers(0, 2**32, size=d, dtype=np.uint64).astype(np.uint32) for _ in range(n)]
    pair = {(i, j): seed_of("pair", min(i, j), max(i, j)) for i in range(n) for j in range(n) if i != j}
    self_seed = [seed_of("self", i) for i in range(n)]
    uploads = [
        masking.mask(
            encoded[i],
            index=i,
            self_seed=self_seed[i],
            pair_seeds={j: pair[(i, j)] for j in range(n) if j != i},
            keystream=fake_keystream,
        )
        for i in range(n)
    ]
    dropped = set(data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n - 1)))
    survivors = [i for i in range(n) if i not in dropped]
    masked_sum = np.zeros(d, dtype=np.uint32)
    for i in survivors:
        masked_sum += uploads[i]
    exact = np.zeros(d, dtype=np.uint32)
    for i in survivors:
        exact += encoded[i]
    if not dropped:  # all pairwise masks cancel: only the self-masks remain
        with_self = exact.copy()
        for i in survivors:
            with_self += fake_keystream(self_seed[i], d)
        assert np.array_equal(masked_sum, with_self)
    result = masking.unmask(
        masked_sum,
        self_seeds=[self_seed[i] for i in survivors],
        dropped_pairs=[(j, q, pair[(j, q)]) for j in survivors for q in sorted(dropped)],
        keystream=fake_keystream,
    )
    assert np.array_equal(result, exact)


def test_a_masked_upload_differs_from_its_input_everywhere_it_should() -> None:
    encoded = np.zeros(1000, dtype=np.uint32)
    masked = masking.mask(encoded, index=0, self_seed=bytes(32), pair_seeds={1: bytes(range(32))}, keystream=_crypto.keystream)
    expected = _crypto.keystream(bytes(32), 1000) + _crypto.keystream(bytes(range(32)), 1000)
    assert np.array_equal(masked, expected) and not np.array_equal(encoded, masked)
    assert encoded.sum() == 0  # the input is not modified


def test_signs_and_misuse() -> None:
    assert masking.pair_sign(0, 3) == 1 and masking.pair_sign(3, 0) == -1
    with pytest.raises(ValueError, match="itself"):
        masking.pair_sign(2, 2)
    with pytest.raises(ValueError, match="itself"):
        masking.mask(np.zeros(2, np.uint32), index=1, self_seed=bytes(32), pair_seeds={1: bytes(32)}, keystream=fake_keystream)
    with pytest.raises(ValueError, match="keystream gave"):
        masking.add_stream(np.zeros(4, np.uint32), bytes(32), 1, lambda seed, n: np.zeros(n + 1, np.uint32))
