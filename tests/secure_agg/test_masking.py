"""Masking arithmetic: masks cancel, and removing the right ones leaves the exact ring sum."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corolla.secure_agg import _crypto, masking


def fake_keystream(seed: bytes) -> masking.WordReader:
    """A cheap deterministic stand-in for the AES-CTR keystream (pure arithmetic tests only):
    the low 32 bits of PCG64's raw outputs, which come in sequence however they are read."""
    generator = np.random.PCG64(int.from_bytes(hashlib.sha256(seed).digest()[:8], "little"))

    def read(out: np.ndarray) -> None:
        out[:] = generator.random_raw(out.shape[0]).astype(np.uint32)

    return read


def words(seed: bytes, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint32)
    fake_keystream(seed)(out)
    return out


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
            with_self += words(self_seed[i], d)
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
    masked = masking.mask(
        encoded, index=0, self_seed=bytes(32), pair_seeds={1: bytes(range(32))}, keystream=_crypto.keystream
    )
    expected = _crypto.keystream_words(bytes(32), 1000) + _crypto.keystream_words(bytes(range(32)), 1000)
    assert np.array_equal(masked, expected) and not np.array_equal(encoded, masked)
    assert encoded.sum() == 0  # the input is not modified


def test_signs_and_misuse() -> None:
    assert masking.pair_sign(0, 3) == 1 and masking.pair_sign(3, 0) == -1
    with pytest.raises(ValueError, match="itself"):
        masking.pair_sign(2, 2)
    with pytest.raises(ValueError, match="itself"):
        masking.mask(
            np.zeros(2, np.uint32), index=1, self_seed=bytes(32), pair_seeds={1: bytes(32)}, keystream=fake_keystream
        )
    with pytest.raises(ValueError, match="sign=2 must be"):
        masking.apply_streams(np.zeros(4, np.uint32), [(2, bytes(32))], fake_keystream)
    with pytest.raises(ValueError, match="contiguous 1-D uint32"):
        masking.apply_streams(np.zeros(4, np.int64), [(1, bytes(32))], fake_keystream)


@pytest.mark.parametrize("chunk_words", [1, 7, 64, 1 << 15])
def test_chunking_does_not_change_the_result(chunk_words: int) -> None:
    terms = [(1, bytes(32)), (-1, bytes(range(32))), (1, bytes(range(1, 33)))]
    expected = np.zeros(1000, dtype=np.uint32)
    for sign, seed in terms:
        expected += np.uint32(sign % 2**32) * _crypto.keystream_words(seed, 1000)
    vector = np.zeros(1000, dtype=np.uint32)
    masking.apply_streams(vector, terms, _crypto.keystream, chunk_words=chunk_words)
    assert np.array_equal(vector, expected)
