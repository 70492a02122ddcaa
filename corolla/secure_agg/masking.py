"""Masking arithmetic in Z_{2^32}: pure, given a keystream function.

Site i (index i in the sorted roster) uploads

    y_i = enc(x_i) + PRG(b_i) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)   (mod 2^32)

where b_i is its self-mask seed and s_ij = s_ji the pairwise seed it shares with site j.
Summed over the survivors S (sites whose uploads arrived), the pairwise terms of pairs
inside S cancel; what is left is sum enc(x_j) + sum PRG(b_j) plus the pairwise terms of
the pairs (j in S, q dropped). `unmask` removes those, given the rebuilt b_j and s_jq.

numpy's uint32 arithmetic wraps modulo 2^32, which is the ring's addition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
from numpy.typing import NDArray

U32 = NDArray[np.uint32]
Keystream = Callable[[bytes, int], U32]  # (32-byte seed, d) -> d uniform words (e.g. `_crypto.keystream`)


def pair_sign(i: int, j: int) -> int:
    """+1 if site i adds PRG(s_ij) to its upload (i < j), -1 if it subtracts it (i > j)."""
    if i == j:
        raise ValueError(f"a site has no pairwise mask with itself (index {i})")
    return 1 if i < j else -1


def add_stream(acc: U32, seed: bytes, sign: int, keystream: Keystream) -> None:
    """acc += sign * PRG(seed), in place, modulo 2^32."""
    stream = keystream(seed, acc.shape[0])
    if stream.shape != acc.shape or stream.dtype != np.uint32:
        raise ValueError(f"keystream gave {stream.dtype}{stream.shape}, expected uint32{acc.shape}")
    if sign == 1:
        np.add(acc, stream, out=acc)
    elif sign == -1:
        np.subtract(acc, stream, out=acc)
    else:
        raise ValueError(f"sign={sign} must be +1 or -1")


def mask(encoded: U32, *, index: int, self_seed: bytes, pair_seeds: Mapping[int, bytes], keystream: Keystream) -> U32:
    """y_i for site `index`: a new array; `pair_seeds` maps every other site's index to s_ij."""
    if index in pair_seeds:
        raise ValueError(f"site {index} has a pairwise seed with itself")
    masked = np.array(encoded, dtype=np.uint32, copy=True)
    add_stream(masked, self_seed, 1, keystream)
    for j, seed in pair_seeds.items():
        add_stream(masked, seed, pair_sign(index, j), keystream)
    return masked


def unmask(
    masked_sum: U32,
    *,
    self_seeds: Iterable[bytes],
    dropped_pairs: Iterable[tuple[int, int, bytes]],
    keystream: Keystream,
) -> U32:
    """The ring sum of the survivors' encoded inputs from the sum of their uploads: remove
    PRG(b_j) for every survivor j and, for every (survivor j, dropped q, s_jq), the term
    j added for q. Returns a new array."""
    total = np.array(masked_sum, dtype=np.uint32, copy=True)
    for seed in self_seeds:
        add_stream(total, seed, -1, keystream)
    for j, q, seed in dropped_pairs:
        add_stream(total, seed, -pair_sign(j, q), keystream)
    return total
