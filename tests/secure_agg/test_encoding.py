"""Fixed-point encoding: known answers, round trips within the stated precision, overflow."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from corolla.secure_agg import EncodingError, FixedPoint, ParameterError, SumOutOfRange


def test_known_answers() -> None:
    fp = FixedPoint(frac_bits=2, clip=3.0)  # step 0.25, Q = 12
    encoded = fp.encode(np.array([0.0, 0.25, -0.25, 1.1, 2.9, 3.0, 7.0, -9.0, 0.125, 0.375], dtype=np.float32))
    # rint rounds half to even: 0.125 * 4 = 0.5 -> 0, 0.375 * 4 = 1.5 -> 2
    assert encoded.ring.view(np.int32).tolist() == [0, 1, -1, 4, 12, 12, 12, -12, 0, 2]
    assert encoded.ring.tolist()[2] == 2**32 - 1  # two's complement
    assert encoded.clipped == 2
    assert fp.bound == 12 and fp.step == 0.25 and fp.max_sites() == (2**31 - 1) // 12


def test_documented_example_f16() -> None:
    fp = FixedPoint(frac_bits=16, clip=1.0)
    assert fp.step == pytest.approx(1.5e-5, rel=0.02)
    assert fp.max_sites() == (2**31 - 1) // 2**16  # range per value 2^31 / (n 2^16)


@settings(max_examples=200, deadline=None)
@given(
    frac_bits=st.integers(0, 24),
    clip=st.floats(1.0, 100.0),
    data=st.data(),
)
def test_round_trip_within_half_a_step(frac_bits: int, clip: float, data: st.DataObject) -> None:
    assume(np.float32(clip) * 2.0**frac_bits <= 2**30)  # Q within what two sites can sum
    fp = FixedPoint(frac_bits=frac_bits, clip=clip)
    limit = float(np.float32(clip))
    x = data.draw(hnp.arrays(np.float32, st.integers(1, 50), elements=st.floats(-limit, limit, width=32)))
    back = fp.decode(fp.encode(x).ring)
    assert np.all(np.abs(back.astype(np.float64) - x.astype(np.float64)) <= fp.step / 2 * (1 + 2**-20) + 1e-30)


@settings(max_examples=100, deadline=None)
@given(sites=st.integers(1, 20), clip=st.floats(0.01, 1000.0), data=st.data())
def test_sum_of_sites_decodes_within_the_documented_error(sites: int, clip: float, data: st.DataObject) -> None:
    fp = FixedPoint.for_sites(sites, clip=clip)
    assert sites * fp.bound <= 2**30 - 1  # one bit of headroom
    finer = int(np.rint(np.float32(clip) * np.float32(2.0 ** (fp.frac_bits + 1))))
    assert fp.frac_bits == 30 or sites * finer > 2**30 - 1  # the finest that fits
    limit = float(np.float32(clip))
    d = data.draw(st.integers(1, 20))
    xs = [data.draw(hnp.arrays(np.float32, d, elements=st.floats(-limit, limit, width=32))) for _ in range(sites)]
    ring = np.zeros(d, dtype=np.uint32)
    for x in xs:
        ring += fp.encode(x).ring  # wraps mod 2^32
    total = fp.decode_sum(ring, summands=sites)
    exact = np.sum([x.astype(np.float64) for x in xs], axis=0)
    tolerance = sites * fp.step / 2 + np.abs(exact) * 2**-23 + 1e-30
    assert np.all(np.abs(total.astype(np.float64) - exact) <= tolerance)


def test_ring_sum_of_extremes_does_not_wrap() -> None:
    fp = FixedPoint(frac_bits=20, clip=1.0)
    n = fp.max_sites()
    ring = np.zeros(3, dtype=np.uint32)
    top = fp.encode(np.array([1.0, -1.0, 1.0], dtype=np.float32)).ring
    for _ in range(n):
        ring += top
    assert fp.decode_sum(ring, summands=n).tolist() == [n * 1.0, -n * 1.0, n * 1.0]
    with pytest.raises(ParameterError, match=f"could overflow the ring.*at most {n} sites"):
        fp.check_sites(n + 1)


def test_overflow_check_rejects_sums_out_of_range() -> None:
    fp = FixedPoint(frac_bits=16, clip=1.0)
    good = fp.encode(np.array([1.0, -1.0], dtype=np.float32)).ring * np.uint32(3)
    fp.decode_sum(good, summands=3)
    with pytest.raises(SumOutOfRange, match="1 of 2 summed values lie outside"):
        fp.decode_sum(good + np.array([1, 0], dtype=np.uint32), summands=3)
    # an unremoved mask: uniform words are refused (about half of the ring is out of range)
    noise = np.random.default_rng(0).integers(0, 2**32, size=1000, dtype=np.uint64).astype(np.uint32)
    with pytest.raises(SumOutOfRange):
        FixedPoint.for_sites(5, clip=1.0).decode_sum(noise, summands=5)


@pytest.mark.parametrize("frac_bits", [0, 16, 25, 30])
def test_decoding_equals_the_float64_reference(frac_bits: int) -> None:
    """Decoding goes int32 -> float32 -> times 2^-f: one rounding, the same float32 as the
    exact float64 value rounded once, also beyond 2^24 where float32 cannot hold every integer."""
    fp = FixedPoint(frac_bits=frac_bits, clip=1.0)
    summands = fp.max_sites()
    limit = summands * fp.bound
    rng = np.random.default_rng(frac_bits)
    signed = rng.integers(-limit, limit + 1, size=100_000).astype(np.int32)
    signed[:4] = [limit, -limit, 2**24 + 1, -(2**24) - 3]
    reference = (signed.astype(np.float64) * 2.0**-frac_bits).astype(np.float32)
    decoded = fp.decode_sum(signed.view(np.uint32), summands=summands)
    assert decoded.dtype == np.float32
    assert np.array_equal(decoded, reference)


def test_bad_inputs_and_parameters_are_named() -> None:
    fp = FixedPoint(frac_bits=16, clip=1.0)
    with pytest.raises(EncodingError, match=r"2 values are NaN or infinite \(the first at index 1\)"):
        fp.encode(np.array([0.0, np.nan, np.inf], dtype=np.float32))
    with pytest.raises(EncodingError, match="1-D"):
        fp.encode(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(EncodingError, match="floating-point"):
        fp.encode(np.zeros(3, dtype=np.int64))
    with pytest.raises(ParameterError, match=r"frac_bits=31 must be in 0..30"):
        FixedPoint(frac_bits=31, clip=1.0)
    with pytest.raises(ParameterError, match=r"clip=-1.0 must be a finite number > 0"):
        FixedPoint(frac_bits=1, clip=-1.0)
    with pytest.raises(ParameterError, match=r"allowed 1..2\^30"):
        FixedPoint(frac_bits=30, clip=4.0)
    with pytest.raises(ParameterError, match="too wide for 3 sites"):
        FixedPoint.for_sites(3, clip=2.0**30)
