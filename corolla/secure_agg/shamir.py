"""Shamir secret sharing over a prime field. Pure arithmetic.

A secret s in Z_p is hidden as the constant term of a random polynomial of degree t - 1,
f(x) = s + a_1 x + ... + a_{t-1} x^{t-1} mod p, and member k gets the share f(x_k) with
x_k = k + 1 (its position in the sorted roster, plus one). Any t shares give s back by
Lagrange interpolation at 0; any t - 1 shares are consistent with every secret, each with
exactly the same number of polynomials, so they say nothing about it.

The field is p = 2^521 - 1 (a Mersenne prime, larger than every 256-bit secret); a share
is 66 bytes, big-endian. Small primes work too (the tests use them to check secrecy by
enumeration).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

P521 = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)

RandomSource = Callable[[int], bytes]  # n -> n random bytes (os.urandom)


def random_element(random: RandomSource, prime: int = P521) -> int:
    """A uniform element of Z_prime, by rejection sampling on `random`'s bytes."""
    bits = (prime - 1).bit_length()
    nbytes = (bits + 7) // 8
    while True:
        value = int.from_bytes(random(nbytes), "big") & ((1 << bits) - 1)
        if value < prime:
            return value


def evaluate(secret: int, coefficients: Sequence[int], x: int, prime: int = P521) -> int:
    """f(x) for f = secret + c_1 x + c_2 x^2 + ... (Horner)."""
    acc = 0
    for c in reversed(coefficients):
        acc = (acc + c) * x % prime
    return (acc + secret) % prime


def split(secret: int, *, threshold: int, xs: Sequence[int], random: RandomSource, prime: int = P521) -> list[int]:
    """Shares f(x) for each x in `xs`, any `threshold` of which rebuild `secret`."""
    _check_xs(xs, prime)
    if not 0 <= secret < prime:
        raise ValueError("the secret must lie in [0, prime)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold={threshold} must be in 1..{len(xs)} (the number of shares)")
    coefficients = [random_element(random, prime) for _ in range(threshold - 1)]
    return [evaluate(secret, coefficients, x, prime) for x in xs]


def combine(points: Sequence[tuple[int, int]], prime: int = P521) -> int:
    """f(0) of the polynomial of degree < len(points) through `points` (x, y): the secret,
    given at least `threshold` shares of it."""
    if not points:
        raise ValueError("no shares to combine")
    xs = [x for x, _ in points]
    _check_xs(xs, prime)
    secret = 0
    for i, (x_i, y_i) in enumerate(points):
        num, den = 1, 1
        for j, x_j in enumerate(xs):
            if j != i:
                num = num * x_j % prime
                den = den * (x_j - x_i) % prime
        secret = (secret + y_i * num * pow(den, -1, prime)) % prime
    return secret


def to_bytes(value: int) -> bytes:
    """A share (or secret) of the 521-bit field, 66 bytes big-endian."""
    if not 0 <= value < P521:
        raise ValueError("not an element of the field")
    return value.to_bytes(SHARE_BYTES, "big")


def from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= P521:
        raise ValueError("not an element of the field")
    return value


def _check_xs(xs: Sequence[int], prime: int) -> None:
    if len(set(xs)) != len(xs):
        raise ValueError("share positions must be distinct")
    if any(not 0 < x < prime for x in xs):
        raise ValueError("share positions must lie in 1..prime-1")
