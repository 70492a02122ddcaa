"""The protocol end to end in one process: exact sums under every dropout pattern up to n - t."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corolla.secure_agg import FixedPoint, NotEnoughSurvivors, RoundStateError, site_unmask, site_upload
from tests.secure_agg.kit import TRUSTING, Consortium, run_round


def inputs_for(ids: tuple[str, ...], d: int, seed: int, scale: float = 0.3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.normal(0, scale, d).astype(np.float32) for i in ids}


def exact_ring_sum(encoding: FixedPoint, inputs: dict[str, np.ndarray], ids: list[str]) -> np.ndarray:
    total = np.zeros(next(iter(inputs.values())).shape[0], dtype=np.uint32)
    for i in ids:
        total += encoding.encode(inputs[i]).ring
    return total


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_unmasked_sum_is_the_exact_ring_sum_under_dropouts(consortium: Consortium, data: st.DataObject) -> None:
    n = data.draw(st.integers(3, 8), label="n")
    t = data.draw(st.integers(2, n), label="t")
    d = data.draw(st.integers(1, 40), label="d")
    agg = consortium.aggregator(n, threshold=t, length=d)
    ids = agg.roster
    # each site: stays (0), drops before its upload (1), or uploads and never answers the unmask request (2)
    fate = data.draw(st.lists(st.sampled_from([0, 1, 2]), min_size=n, max_size=n), label="fate")
    if sum(f != 0 for f in fate) > n - t:  # keep at most n - t dropouts, in the order drawn
        kept = 0
        for k, f in enumerate(fate):
            if f != 0:
                kept += 1
                if kept > n - t:
                    fate[k] = 0
    before = {i for i, f in zip(ids, fate, strict=True) if f == 1}
    after = {i for i, f in zip(ids, fate, strict=True) if f == 2}
    inputs = inputs_for(ids, d, data.draw(st.integers(0, 2**32), label="seed"))
    result = run_round(consortium, agg, inputs, before=before, after=after)
    survivors = [i for i in ids if i not in before]
    encoding = FixedPoint.for_sites(n, clip=1.0)
    assert result.survivors == tuple(survivors) and result.dropped == tuple(sorted(before))
    assert np.array_equal(result.ring_sum, exact_ring_sum(encoding, inputs, survivors))  # bit for bit
    floats = np.sum([np.clip(inputs[i], -1.0, 1.0).astype(np.float64) for i in survivors], axis=0)  # R = 1
    assert np.allclose(result.total, floats, rtol=0, atol=len(survivors) * encoding.step / 2 + 1e-6)


def test_every_dropout_pattern_of_five_sites_with_threshold_three(consortium: Consortium) -> None:
    """Exhaustively: each of 5 sites stays, drops before uploading, or drops after; every
    pattern with at most n - t = 2 dropouts gives the exact ring sum."""
    n, t, d = 5, 3, 8
    ids = consortium.aggregator(n, threshold=t, length=d).roster
    inputs = inputs_for(ids, d, seed=5)
    encoding = FixedPoint.for_sites(n, clip=1.0)
    patterns = 0
    for fate in itertools.product((0, 1, 2), repeat=n):
        if sum(f != 0 for f in fate) > n - t:
            continue
        before = {i for i, f in zip(ids, fate, strict=True) if f == 1}
        after = {i for i, f in zip(ids, fate, strict=True) if f == 2}
        result = run_round(
            consortium, consortium.aggregator(n, threshold=t, length=d), inputs, before=before, after=after
        )
        survivors = [i for i in ids if i not in before]
        assert np.array_equal(result.ring_sum, exact_ring_sum(encoding, inputs, survivors)), fate
        patterns += 1
    assert patterns == 1 + 5 * 2 + 10 * 4  # no dropout, one (2 ways), two (2 x 2 ways)


def test_fewer_than_t_uploads_fail_clearly(consortium: Consortium) -> None:
    agg = consortium.aggregator(5, threshold=4, length=4)
    inputs = inputs_for(agg.roster, 4, seed=1)
    for node_id in agg.roster[:3]:
        agg.add_upload(
            site_upload(agg.announcement, inputs[node_id], consortium.site(node_id), consortium.verifier).upload
        )
    with pytest.raises(NotEnoughSurvivors, match="3 of 5 sites uploaded; the threshold is 4"):
        agg.unmask_requests()


def test_fewer_than_t_unmask_replies_fail_clearly_and_late_replies_still_count(consortium: Consortium) -> None:
    agg = consortium.aggregator(5, threshold=4, length=4)
    inputs = inputs_for(agg.roster, 4, seed=2)
    states = {}
    for node_id in agg.roster:
        up = site_upload(agg.announcement, inputs[node_id], consortium.site(node_id), consortium.verifier)
        states[node_id] = up.state
        agg.add_upload(up.upload)
    requests = agg.unmask_requests()
    replies = [site_unmask(requests[i], states[i], consortium.site(i)) for i in agg.roster]
    for reply in replies[:3]:
        agg.add_unmask_reply(reply)
    with pytest.raises(NotEnoughSurvivors, match="3 of 5 survivors answered the unmask request; the threshold is 4"):
        agg.result()
    agg.add_unmask_reply(replies[3])  # a late reply: now there are enough
    result = agg.result()
    assert result.count == 5 and result.answered == agg.roster[:4]
    with pytest.raises(RoundStateError, match="unmask phase; the round is in the done phase"):
        agg.add_unmask_reply(replies[4])


def test_a_16k_round_with_the_default_threshold(consortium: Consortium) -> None:
    """The default (secure) threshold: n = 10 gives t = 6, so 4 sites may drop."""
    agg = consortium.aggregator(10, length=16_384)
    assert agg.threshold == 6
    inputs = inputs_for(agg.roster, 16_384, seed=3, scale=0.05)
    before, after = set(agg.roster[:2]), set(agg.roster[5:7])
    result = run_round(consortium, agg, inputs, before=before, after=after)
    survivors = [i for i in agg.roster if i not in before]
    assert np.array_equal(result.ring_sum, exact_ring_sum(FixedPoint.for_sites(10, clip=1.0), inputs, survivors))
    assert result.count == 8 and len(result.answered) == 6


def test_out_of_range_values_are_clipped_and_counted(consortium: Consortium) -> None:
    agg = consortium.aggregator(3, threshold=2, length=4, encoding=FixedPoint(frac_bits=10, clip=0.5))
    inputs = {i: np.array([0.25, 2.0, -3.0, 0.0], dtype=np.float32) for i in agg.roster}
    site = consortium.site(agg.roster[0])
    up = site_upload(agg.announcement, inputs[site.node_id], site, consortium.verifier, policy=TRUSTING)
    assert up.clipped == 2 and up.round == 1 and up.run_id == "run-1"
    result = run_round(
        consortium, consortium.aggregator(3, threshold=2, length=4, encoding=FixedPoint(frac_bits=10, clip=0.5)), inputs
    )
    assert result.total.tolist() == [0.75, 1.5, -1.5, 0.0]
