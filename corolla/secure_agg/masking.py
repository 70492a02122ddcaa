"""Masking arithmetic in Z_{2^32}: pure, given a keystream function.

Site i (index i in the sorted roster) uploads

    y_i = enc(x_i) + PRG(b_i) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)   (mod 2^32)

where b_i is its self-mask seed and s_ij = s_ji the pairwise seed it shares with site j.
Summed over the survivors S (sites whose uploads arrived), the pairwise terms of pairs
inside S cancel; what is left is sum enc(x_j) + sum PRG(b_j) plus the pairwise terms of
the pairs (j in S, q dropped). `unmask` removes those, given the rebuilt b_j and s_jq.

numpy's uint32 arithmetic wraps modulo 2^32, which is the ring's addition. The streams are
added chunk by chunk (all streams over one cache-sized chunk, then the next chunk), which
is about 1.6x faster than adding whole streams one after the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
from numpy.typing import NDArray

U32 = NDArray[np.uint32]
WordReader = Callable[[U32], None]  # fills its (1-D, contiguous) argument with the stream's next words
Keystream = Callable[[bytes], WordReader]  # opens the stream of a 32-byte seed (e.g. `_crypto.keystream`)
CHUNK_WORDS = 1 << 16  # 256 KiB per chunk: a chunk of the vector, of the input and of a stream stay in L2


def pair_sign(i: int, j: int) -> int:
    """+1 if site i adds PRG(s_ij) to its upload (i < j), -1 if it subtracts it (i > j)."""
    if i == j:
        raise ValueError(f"a site has no pairwise mask with itself (index {i})")
    return 1 if i < j else -1


def masked_chunks(
    length: int,
    terms: Iterable[tuple[int, bytes]],
    keystream: Keystream,
    *,
    source: Callable[[int, U32], None],
    chunk_words: int = CHUNK_WORDS,
) -> Iterator[U32]:
    """The vector source + sum of sign * PRG(seed) over `terms` (sign, seed), modulo 2^32,
    chunk by chunk, without ever holding the whole vector: `source(start, chunk)` writes
    the chunk's starting values (e.g. the encoded input from index `start` on), the
    streams are added in cache, and the chunk is yielded. Each yielded array is a view of
    one scratch buffer, valid until the next chunk is asked for (copy or hash it first)."""
    if length < 0 or chunk_words < 1:
        raise ValueError(f"length={length} and chunk_words={chunk_words} must be >= 0 and >= 1")
    readers = _readers(terms, keystream)
    size = min(chunk_words, length)
    buffer, words = np.empty(size, dtype=np.uint32), np.empty(size, dtype=np.uint32)
    for start in range(0, length, chunk_words):
        count = min(chunk_words, length - start)
        part, stream = buffer[:count], words[:count]
        source(start, part)
        for op, read in readers:
            read(stream)
            op(part, stream, out=part)
        yield part


def apply_streams(
    vector: U32,
    terms: Iterable[tuple[int, bytes]],
    keystream: Keystream,
    *,
    source: Callable[[int, U32], None] | None = None,
    chunk_words: int = CHUNK_WORDS,
) -> None:
    """vector += sum of sign * PRG(seed) over `terms` (sign, seed), in place, modulo 2^32.

    Chunk by chunk: `source(start, chunk)`, if given, first writes the chunk's starting
    values (e.g. the masked sum from index `start` on), so that they are read into cache
    once."""
    if vector.dtype != np.uint32 or vector.ndim != 1 or not vector.flags.c_contiguous:
        raise ValueError(f"expected a contiguous 1-D uint32 vector, got {vector.dtype}{vector.shape}")
    readers = _readers(terms, keystream)
    buffer = np.empty(min(chunk_words, vector.shape[0]), dtype=np.uint32)
    for start in range(0, vector.shape[0], chunk_words):
        part = vector[start : start + chunk_words]
        if source is not None:
            source(start, part)
        words = buffer[: part.shape[0]]
        for op, read in readers:
            read(words)
            op(part, words, out=part)


def _readers(terms: Iterable[tuple[int, bytes]], keystream: Keystream) -> list[tuple[np.ufunc, WordReader]]:
    readers: list[tuple[np.ufunc, WordReader]] = []
    for sign, seed in terms:
        if sign not in (1, -1):
            raise ValueError(f"sign={sign} must be +1 or -1")
        readers.append((np.add if sign == 1 else np.subtract, keystream(seed)))
    return readers


def mask(encoded: U32, *, index: int, self_seed: bytes, pair_seeds: Mapping[int, bytes], keystream: Keystream) -> U32:
    """y_i for site `index`: a new array; `pair_seeds` maps every other site's index to s_ij."""
    if index in pair_seeds:
        raise ValueError(f"site {index} has a pairwise seed with itself")
    masked = np.array(encoded, dtype=np.uint32, copy=True)
    terms = [(1, self_seed)] + [(pair_sign(index, j), seed) for j, seed in pair_seeds.items()]
    apply_streams(masked, terms, keystream)
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
    summed = np.asarray(masked_sum, dtype=np.uint32)
    total = np.empty(summed.shape, dtype=np.uint32)
    terms = [(-1, seed) for seed in self_seeds] + [(-pair_sign(j, q), seed) for j, q, seed in dropped_pairs]

    def copy(start: int, chunk: U32) -> None:  # the masked sum enters chunk by chunk, in cache
        chunk[:] = summed[start : start + chunk.shape[0]]

    apply_streams(total, terms, keystream, source=copy)
    return total
