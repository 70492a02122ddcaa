"""A coordinator that deviates: inconsistent splits, repeated requests, low thresholds.

The property that matters: for a site X that uploaded, the coordinator must never hold both
X's self-mask seed b_X and all of X's pairwise seeds. Each honest site reveals, for a
member, either its share of that member's self-mask (member listed as survivor) or its
pairwise seed with it (member listed as dropped), in one reply per round. These tests act
as the coordinator and try to get both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from corolla.secure_agg import (
    FixedPoint,
    RefusedRequest,
    RoundStateError,
    RoundStateStore,
    SitePolicy,
    _crypto,
    masking,
    shamir,
    site_unmask,
    site_upload,
)
from corolla.secure_agg.messages import Kind, UnmaskReply, UploadHeader, parse, unpack
from tests.secure_agg import forge
from tests.secure_agg.kit import Consortium, Uploaded, upload_all


@pytest.fixture
def round4(consortium: Consortium) -> Uploaded:
    """Four sites, threshold 3 (the secure one for n = 4), everyone uploaded."""
    agg = consortium.aggregator(4, threshold=3, length=16)
    return upload_all(consortium, agg, policy=SitePolicy())


def reply_of(data: bytes) -> UnmaskReply:
    return parse(UnmaskReply, unpack(data, expect=Kind.UNMASK_REPLY).header)


def test_one_request_asking_for_both_secrets_of_one_member_is_refused(consortium: Consortium, round4: Uploaded) -> None:
    a, b, c, x = round4.agg.roster
    site = consortium.site(a)
    both = forge.request(consortium, round4, a, survivors=[a, b, c, x], dropped=[x])
    with pytest.raises(RefusedRequest, match=f"lists {x} both as survivor and as dropped"):
        site_unmask(both, round4.states[a], site)


@pytest.mark.parametrize(
    ("survivors", "dropped", "message"),
    [
        ([1, 2, 3], [0], "this site .* is not listed among the survivors"),
        ([0, 1], [2, 3], "2 survivors is below the threshold 3"),
        ([0, 1, 2], [], "do not make up the round's roster"),
        ([0, 1, 2, 3], [3], "both as survivor and as dropped"),
        ([1, 0, 2, 3], [], "sorted and free of repeats"),
        ([0, 1, 1, 2], [3], "sorted and free of repeats"),
    ],
)
def test_inconsistent_splits_are_refused(
    consortium: Consortium, round4: Uploaded, survivors: list[int], dropped: list[int], message: str
) -> None:
    ids = round4.agg.roster
    me = ids[0]
    request = forge.request(
        consortium,
        round4,
        me,
        survivors=[ids[k] for k in survivors],
        dropped=[ids[k] for k in dropped],
        bundles_from=[i for i in ids[1:3]],
    )
    with pytest.raises(RefusedRequest, match=message):
        site_unmask(request, round4.states[me], consortium.site(me))


def test_a_survivor_without_its_signed_upload_is_refused(consortium: Consortium, round4: Uploaded) -> None:
    a, b, c, x = round4.agg.roster
    # x is claimed as a survivor (so a would reveal its share of b_x) without proof that x uploaded
    request = forge.request(consortium, round4, a, survivors=[a, b, c, x], dropped=[], bundles_from=[b, c])
    with pytest.raises(RefusedRequest, match=f"does not forward: {x}"):
        site_unmask(request, round4.states[a], consortium.site(a))
    extra = forge.request(consortium, round4, a, survivors=[a, b, c], dropped=[x], bundles_from=[b, c, x])
    with pytest.raises(RefusedRequest, match=f"unexpected or repeated upload from {x}"):
        site_unmask(extra, round4.states[a], consortium.site(a))


@pytest.mark.parametrize("first", ["survivor", "dropped"])
def test_the_coordinator_cannot_obtain_a_survivors_self_mask_share_and_pairwise_seed_in_one_round(
    consortium: Consortium, round4: Uploaded, tmp_path: Path, first: str
) -> None:
    """Site a is asked twice about x: once with x among the survivors (a reveals its share
    of b_x), once with x dropped (a would reveal s_ax). Whatever the order, the second
    request finds no round state: a answered once and its state is gone."""
    a, b, c, x = round4.agg.roster
    store = RoundStateStore(tmp_path / "a-store")
    store.save(round4.states[a])
    as_survivor = forge.request(consortium, round4, a, survivors=[a, b, c, x], dropped=[])
    as_dropped = forge.request(consortium, round4, a, survivors=[a, b, c], dropped=[x])
    requests = [as_survivor, as_dropped] if first == "survivor" else [as_dropped, as_survivor]

    reply = reply_of(site_unmask(requests[0], store.take("run-1", 1), consortium.site(a)))
    if first == "survivor":
        assert x in {s.owner for s in reply.self_shares} and x not in {s.peer for s in reply.seeds}
    else:
        assert x in {s.peer for s in reply.seeds} and x not in {s.owner for s in reply.self_shares}
    with pytest.raises(RoundStateError, match="already answered that round's unmask request"):
        site_unmask(requests[1], store.take("run-1", 1), consortium.site(a))
    assert not list((tmp_path / "a-store").rglob("round-*"))  # nothing left on disk


def test_a_refused_request_spends_the_round_too(consortium: Consortium, round4: Uploaded, tmp_path: Path) -> None:
    a, b, c, x = round4.agg.roster
    store = RoundStateStore(tmp_path / "store")
    store.save(round4.states[a])
    bad = forge.request(consortium, round4, a, survivors=[a, b, c, x], dropped=[x])
    with pytest.raises(RefusedRequest):
        site_unmask(bad, store.take("run-1", 1), consortium.site(a))
    good = forge.request(consortium, round4, a, survivors=[a, b, c, x], dropped=[])
    with pytest.raises(RoundStateError):
        site_unmask(good, store.take("run-1", 1), consortium.site(a))


def test_a_site_refuses_a_threshold_below_its_policy(consortium: Consortium) -> None:
    agg = consortium.aggregator(5, threshold=3, length=4)  # 2t = 6 < n + 2 = 7: unsafe
    with pytest.raises(RefusedRequest, match="threshold 3 for 5 sites is below this site's minimum 4"):
        site_upload(agg.announcement, np.zeros(4, np.float32), consortium.site(agg.roster[0]), consortium.verifier)
    cautious = SitePolicy(colluding_sites=2)  # t >= ceil(7 / 2) + 1 = 5
    agg = consortium.aggregator(5, threshold=4, length=4)
    with pytest.raises(RefusedRequest, match="below this site's minimum 5"):
        site_upload(
            agg.announcement,
            np.zeros(4, np.float32),
            consortium.site(agg.roster[0]),
            consortium.verifier,
            policy=cautious,
        )


def test_why_three_sites_need_threshold_three(consortium: Consortium) -> None:
    """With t = 2 of 3 (accepted only by a site that trusts the coordinator), a coordinator
    that tells each site a different story about who dropped unmasks site a's input:
    a is told b dropped, b is told c dropped, c is told a dropped. The default policy
    refuses t = 2 for three sites for exactly this reason."""
    agg = consortium.aggregator(3, threshold=2, length=64)
    with pytest.raises(RefusedRequest, match="below this site's minimum 3"):
        site_upload(agg.announcement, np.zeros(64, np.float32), consortium.site(agg.roster[0]), consortium.verifier)
    round_ = upload_all(consortium, agg)  # sites that accept t = 2
    a, b, c = agg.roster
    reply_a = reply_of(
        site_unmask(
            forge.request(consortium, round_, a, survivors=[a, c], dropped=[b]), round_.states[a], consortium.site(a)
        )
    )
    reply_b = reply_of(
        site_unmask(
            forge.request(consortium, round_, b, survivors=[a, b], dropped=[c]), round_.states[b], consortium.site(b)
        )
    )
    reply_c = reply_of(
        site_unmask(
            forge.request(consortium, round_, c, survivors=[b, c], dropped=[a]), round_.states[c], consortium.site(c)
        )
    )
    share = {r.sender: {s.owner: shamir.from_bytes(s.share) for s in r.self_shares} for r in (reply_a, reply_b)}
    b_a = shamir.combine([(1, share[a][a]), (2, share[b][a])]).to_bytes(32, "big")  # x = index + 1
    s_ab = next(s.seed for s in reply_a.seeds if s.peer == b)
    s_ac = next(s.seed for s in reply_c.seeds if s.peer == a)
    frame = unpack(round_.uploads[a], expect=Kind.UPLOAD)
    assert parse(UploadHeader, frame.header).commitment == _crypto.self_mask_commitment(
        b_a, run_id="run-1", round=1, node_id=a
    )
    y_a = np.frombuffer(frame.payload, dtype="<u4")
    x_a = masking.unmask(y_a, self_seeds=[b_a], dropped_pairs=[(0, 1, s_ab), (0, 2, s_ac)], keystream=_crypto.keystream)
    assert np.array_equal(x_a, FixedPoint.for_sites(3, clip=1.0).encode(round_.inputs[a]).ring)  # unmasked
