"""Fixed-point encoding of float32 updates into the ring Z_{2^32}, and back. Pure arithmetic.

An input value x is clipped to [-R, R] and rounded to the nearest multiple of 2^-f:
enc(x) = rint(clip(x, -R, R) * 2^f) mod 2^32 (two's complement). With Q = rint(R * 2^f),
every encoded value lies in [-Q, Q]; the sum of n of them lies in [-nQ, nQ], and as long as
n * Q <= 2^31 - 1 it never wraps, so the ring sum of the inputs read as a signed 32-bit
integer is their exact integer sum. `decode_sum` checks that bound (the overflow check):
a ring sum outside [-sQ, sQ] for s summands means an input was not encoded with these
parameters or a mask was not removed, and is refused rather than decoded.

Precision: each value is off by at most 2^-(f+1) (for |x| <= R); a sum of s values by at
most s * 2^-(f+1), plus float32 rounding of the result (relative 2^-24). Examples:

    f = 16: step 1.5e-5, range per value |x| <= 2^31 / (n * 2^16) = 32768 / n
    f = 25: step 3.0e-8, range per value |x| <= 64 / n

`FixedPoint.for_sites(n, clip=R)` picks the finest f for a roster of n sites, keeping one
bit of headroom (n * Q <= 2^30 - 1) so that the overflow check rejects about half of the
ring: an unremoved mask (uniform words) passes it with probability <= 2^-d.

All arithmetic runs in float32 with exact steps: clipping, scaling by a power of two and
rounding to an integer are exact in binary floating point, so encoding is deterministic
across machines. R is used as float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from corolla.secure_agg.errors import EncodingError, ParameterError, SumOutOfRange

RING_MAX = 2**31 - 1  # the largest |sum| a signed 32-bit reading of the ring holds
MAX_FRAC_BITS = 30
_MAX_BOUND = 2**30  # Q for two sites at most, so float32 holds every encoded value exactly
_DECODE_CHUNK = 1 << 16  # values per step of decode_sum (256 KiB: stays in cache)


@dataclass(frozen=True, slots=True)
class Encoded:
    ring: NDArray[np.uint32]  # (d,) encoded values, two's complement in Z_{2^32}
    clipped: int  # how many inputs lay outside [-R, R] and were clipped to it


@dataclass(frozen=True, kw_only=True, slots=True)
class FixedPoint:
    """Fixed-point parameters of one round: everyone encodes and decodes with these."""

    frac_bits: int  # f: inputs are rounded to multiples of 2^-f
    clip: float  # R: inputs are clipped to [-R, R] first (a post-processing of DP-noised values)

    def __post_init__(self) -> None:
        if isinstance(self.frac_bits, bool) or not isinstance(self.frac_bits, int):
            raise ParameterError(f"frac_bits={self.frac_bits!r} must be an integer in 0..{MAX_FRAC_BITS}")
        if not 0 <= self.frac_bits <= MAX_FRAC_BITS:
            raise ParameterError(f"frac_bits={self.frac_bits} must be in 0..{MAX_FRAC_BITS}")
        clip = float(self.clip)
        if not np.isfinite(clip) or clip <= 0:
            raise ParameterError(f"clip={self.clip!r} must be a finite number > 0")
        if not 1 <= self.bound <= _MAX_BOUND:
            raise ParameterError(
                f"clip={self.clip!r} with frac_bits={self.frac_bits} gives bound Q = rint(R * 2^f) = {self.bound}; "
                f"allowed 1..2^30 (lower frac_bits or clip)"
            )

    @classmethod
    def for_sites(cls, sites: int, *, clip: float, headroom_bits: int = 1) -> FixedPoint:
        """The finest encoding of [-clip, clip] whose sum over `sites` inputs stays within
        2^(31 - headroom_bits) - 1."""
        if sites < 1:
            raise ParameterError(f"sites={sites} must be at least 1")
        if not 0 <= headroom_bits <= 8:
            raise ParameterError(f"headroom_bits={headroom_bits} must be in 0..8")
        limit = 2 ** (31 - headroom_bits) - 1
        for frac_bits in range(MAX_FRAC_BITS, -1, -1):
            bound = _bound(clip, frac_bits)
            if 1 <= bound <= _MAX_BOUND and sites * bound <= limit:
                return cls(frac_bits=frac_bits, clip=clip)
        raise ParameterError(
            f"clip={clip!r} is too wide for {sites} sites: even frac_bits=0 overflows 2^{31 - headroom_bits}"
        )

    @property
    def bound(self) -> int:
        """Q = rint(R * 2^f): every encoded value lies in [-Q, Q]."""
        return _bound(self.clip, self.frac_bits)

    @property
    def step(self) -> float:
        """2^-f: the quantization step; each value is off by at most half of it."""
        return 2.0**-self.frac_bits

    def max_sites(self) -> int:
        """The most inputs whose sum cannot wrap."""
        return RING_MAX // self.bound

    def check_sites(self, sites: int) -> None:
        if sites * self.bound > RING_MAX:
            raise ParameterError(
                f"{sites} sites with clip={self.clip!r} and frac_bits={self.frac_bits} could overflow the ring "
                f"(n * rint(R * 2^f) = {sites * self.bound} > 2^31 - 1); at most {self.max_sites()} sites, or use "
                f"FixedPoint.for_sites({sites}, clip=...)"
            )

    def encode(self, values: ArrayLike) -> Encoded:
        """Encode a 1-D float vector; non-finite values are an error, values outside
        [-R, R] are clipped (and counted)."""
        x = np.asarray(values)
        if x.ndim != 1:
            raise EncodingError(f"expected a 1-D vector, got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise EncodingError(f"expected floating-point values, got dtype {x.dtype}")
        ring = np.empty(x.shape[0], dtype=np.uint32)
        clipped = self.encode_into(x.astype(np.float32, copy=False), ring)
        return Encoded(ring=ring, clipped=clipped)

    def encode_into(self, values: NDArray[np.float32], out: NDArray[np.uint32]) -> int:
        """Encode a float32 chunk into `out` (same length); the number of clipped values.
        The common case (every value finite and within [-R, R]) reads the chunk three
        times: min, max, and the scaling."""
        if values.shape != out.shape:
            raise EncodingError(f"cannot encode {values.shape} values into {out.shape}")
        if values.size == 0:
            return 0
        low, high = values.min(), values.max()  # NaN propagates into both
        if not (np.isfinite(low) and np.isfinite(high)):
            finite = np.isfinite(values)
            first = int(np.argmin(finite))
            raise EncodingError(f"{int((~finite).sum())} values are NaN or infinite (the first at index {first})")
        limit = np.float32(self.clip)
        scaled = values * np.float32(2.0**self.frac_bits)  # exact: a power of two
        clipped = 0
        if low < -limit or high > limit:
            clipped = int(np.count_nonzero((values > limit) | (values < -limit)))
            bound = np.float32(limit * np.float32(2.0**self.frac_bits))
            np.clip(scaled, -bound, bound, out=scaled)
        np.rint(scaled, out=scaled)
        out.view(np.int32)[:] = scaled  # exact: integers below 2^30 in magnitude
        return clipped

    def decode_sum(self, ring_sum: NDArray[np.uint32], *, summands: int) -> NDArray[np.float32]:
        """The float sum of `summands` encoded inputs from their ring sum; `SumOutOfRange`
        if any element lies outside [-summands * Q, summands * Q]."""
        if summands < 1:
            raise ParameterError(f"summands={summands} must be at least 1")
        self.check_sites(summands)
        signed = np.asarray(ring_sum, dtype=np.uint32).view(np.int32)
        limit = summands * self.bound
        if signed.size and (int(signed.min()) < -limit or int(signed.max()) > limit):  # two passes, no temporaries
            outside = (signed > limit) | (signed < -limit)
            first = int(np.argmax(outside))
            raise SumOutOfRange(
                f"{int(outside.sum())} of {signed.size} summed values lie outside +/-{limit} (the range of "
                f"{summands} inputs; the first at index {first}): an input was not encoded with this round's "
                f"parameters or a mask was not removed"
            )
        # int32 -> float32 rounds once (to nearest even) and scaling by 2^-f is exact: the same
        # float32 as going through float64, without the float64 temporary; chunk by chunk so
        # that the scaling reads the converted chunk from cache.
        flat, total = signed.reshape(-1), np.empty(signed.size, dtype=np.float32)
        step = np.float32(self.step)
        for start in range(0, flat.size, _DECODE_CHUNK):
            part = total[start : start + _DECODE_CHUNK]
            part[:] = flat[start : start + _DECODE_CHUNK]
            part *= step
        return total.reshape(signed.shape)

    def decode(self, ring: NDArray[np.uint32]) -> NDArray[np.float32]:
        """One encoded vector back to floats (its rounding is the encoding's precision)."""
        return self.decode_sum(ring, summands=1)


def _bound(clip: float, frac_bits: int) -> int:
    return int(np.rint(np.float32(clip) * np.float32(2.0**frac_bits)))
