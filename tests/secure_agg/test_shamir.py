"""Shamir sharing: known answers, any t of n rebuild, t - 1 reveal nothing."""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corolla.secure_agg import shamir


def counter_random(start: int = 0) -> Callable[[int], bytes]:
    """A deterministic byte source for reproducible shares."""
    state = [start]

    def random(n: int) -> bytes:
        out = bytes((state[0] + k) % 256 for k in range(n))
        state[0] += n
        return out

    return random


def test_known_answers_small_field() -> None:
    # f(x) = 7 + 3x + 5x^2 mod 11: f(1) = 4, f(2) = 0, f(3) = 6, f(4) = 99 mod 11 = 0
    assert [shamir.evaluate(7, [3, 5], x, 11) for x in (1, 2, 3, 4)] == [4, 0, 6, 0]
    assert shamir.combine([(1, 4), (2, 0), (3, 6)], 11) == 7
    assert shamir.combine([(2, 0), (4, 0), (3, 6)], 11) == 7


def test_known_answers_p521() -> None:
    secret = int.from_bytes(bytes(range(32)), "big")
    coefficients = [2**520, 12345]  # f(x) = s + 2^520 x + 12345 x^2 mod 2^521 - 1
    shares = [shamir.evaluate(secret, coefficients, x) for x in (1, 2, 3)]
    assert shares[0] == (secret + 2**520 + 12345) % shamir.P521
    assert shares[1] == (secret + 2**521 + 4 * 12345) % shamir.P521 == secret + 1 + 4 * 12345  # 2^521 = 1 mod p
    assert shamir.combine(list(zip((1, 2, 3), shares, strict=True))) == secret
    assert shamir.to_bytes(shares[1]).hex() == (secret + 1 + 4 * 12345).to_bytes(66, "big").hex()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 20), data=st.data())
def test_any_t_of_n_shares_rebuild(n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    secret = data.draw(st.integers(0, 2**256 - 1))
    xs = list(range(1, n + 1))
    shares = shamir.split(secret, threshold=t, xs=xs, random=os.urandom)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=n, unique=True))
    assert shamir.combine([(x, shares[x - 1]) for x in subset]) == secret
    assert all(shamir.from_bytes(shamir.to_bytes(s)) == s for s in shares)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 12), data=st.data())
def test_t_minus_one_shares_do_not_rebuild(n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(2, n))
    secret = data.draw(st.integers(0, 2**256 - 1))
    xs = list(range(1, n + 1))
    shares = shamir.split(secret, threshold=t, xs=xs, random=os.urandom)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t - 1, max_size=t - 1, unique=True))
    # interpolating t - 1 points gives a polynomial of lower degree, whose value at 0 is not
    # the secret (but for a 2^-521 chance)
    assert shamir.combine([(x, shares[x - 1]) for x in subset]) != secret


@pytest.mark.parametrize(("prime", "t", "n"), [(11, 2, 3), (11, 3, 4), (7, 3, 5), (5, 4, 4)])
def test_t_minus_one_shares_are_consistent_with_every_secret_equally(prime: int, t: int, n: int) -> None:
    """Information-theoretic secrecy, by enumeration in a small field: for every set of
    t - 1 positions, each tuple of share values arises from exactly the same number of
    polynomials for every secret (p^0 = 1 each), so the shares say nothing about it."""
    for positions in itertools.combinations(range(1, n + 1), t - 1):
        per_secret = []
        for secret in range(prime):
            seen = Counter(
                tuple(shamir.evaluate(secret, coefficients, x, prime) for x in positions)
                for coefficients in itertools.product(range(prime), repeat=t - 1)
            )
            assert set(seen.values()) == {1} and len(seen) == prime ** (t - 1)
            per_secret.append(seen)
        assert all(s == per_secret[0] for s in per_secret)


def test_split_is_reproducible_with_injected_randomness() -> None:
    one = shamir.split(42, threshold=3, xs=[1, 2, 3, 4], random=counter_random())
    two = shamir.split(42, threshold=3, xs=[1, 2, 3, 4], random=counter_random())
    assert one == two and shamir.combine([(1, one[0]), (3, one[2]), (4, one[3])]) == 42


def test_random_element_is_uniform_by_rejection() -> None:
    # p = 11 needs 4 bits: values 11..15 are rejected, 0..10 kept
    values = bytes(range(256))
    position = [0]

    def random(n: int) -> bytes:
        out = values[position[0] : position[0] + n]
        position[0] += n
        return out

    drawn = [shamir.random_element(random, 11) for _ in range(176)]  # 256 draws, 176 accepted
    assert Counter(drawn) == Counter({v: 16 for v in range(11)})


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(1, threshold=2, xs=[1, 1, 2], random=os.urandom)
    with pytest.raises(ValueError, match=r"1..prime-1"):
        shamir.split(1, threshold=2, xs=[0, 1], random=os.urandom)
    with pytest.raises(ValueError, match=r"threshold=4 must be in 1..3"):
        shamir.split(1, threshold=4, xs=[1, 2, 3], random=os.urandom)
    with pytest.raises(ValueError, match="66 bytes"):
        shamir.from_bytes(bytes(65))
    with pytest.raises(ValueError, match="not an element"):
        shamir.from_bytes(b"\xff" * 66)
    with pytest.raises(ValueError, match="no shares"):
        shamir.combine([])
