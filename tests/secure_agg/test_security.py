"""Rejections: bad signatures, non-members, replays, substituted keys, at both ends."""

from __future__ import annotations

import numpy as np
import pytest

from corolla.secure_agg import (
    Aggregator,
    BadSignature,
    FixedPoint,
    MalformedMessage,
    Member,
    ReconstructionError,
    ReplayedMessage,
    SiteKeys,
    UntrustedMember,
    _crypto,
    site_unmask,
    site_upload,
)
from corolla.secure_agg.messages import (
    Announcement,
    Kind,
    UnmaskReply,
    UnmaskRequest,
    UploadHeader,
    pack,
    parse,
    signing_input,
    unpack,
)
from corolla.secure_agg.roster import make_announcement
from tests.secure_agg import forge
from tests.secure_agg.kit import TRUSTING, Consortium, upload_all


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def signature_offset(message: bytes) -> int:
    return 9 + int.from_bytes(message[5:9], "big")  # prefix (9 bytes) + header


def tamper_last_box(upload: bytes) -> bytes:
    """The upload with one bit of its last share box flipped, still well-formed (flipping a
    byte of the JSON text instead can make invalid base64, refused before the signature)."""
    frame = unpack(upload, expect=Kind.UPLOAD)
    header = parse(UploadHeader, frame.header)
    last = header.boxes[-1]
    boxes = [*header.boxes[:-1], last.model_copy(update={"box": flip(last.box, 20)})]
    body = header.model_copy(update={"boxes": boxes}).to_json()
    return pack(Kind.UPLOAD, body, frame.signature, frame.payload)


# -- bad signatures ---------------------------------------------------------------------------


def test_upload_with_a_bad_signature_or_a_tampered_body_is_rejected(consortium: Consortium) -> None:
    agg = consortium.aggregator(4, threshold=3, length=32)
    round_ = upload_all(consortium, consortium.aggregator(4, threshold=3, length=32))
    upload = round_.uploads[agg.roster[0]]
    sig = signature_offset(upload)
    with pytest.raises(BadSignature, match="not signed by it"):
        agg.add_upload(flip(upload, sig + 3))  # the signature itself
    with pytest.raises(BadSignature, match="not signed by it"):
        agg.add_upload(tamper_last_box(upload))  # inside the header (a share box)
    with pytest.raises(BadSignature, match="is not the one it signed"):
        agg.add_upload(flip(upload, len(upload) - 1))  # the masked vector
    assert agg.survivors == ()  # nothing was added to the sum
    agg.add_upload(upload)  # the genuine one still goes in


def test_an_upload_signed_by_another_member_is_rejected(consortium: Consortium) -> None:
    round_ = upload_all(consortium, consortium.aggregator(4, threshold=3, length=8))
    victim, forger = round_.agg.roster[0], consortium.site(round_.agg.roster[1])
    frame = unpack(round_.uploads[victim], expect=Kind.UPLOAD)
    forged = pack(Kind.UPLOAD, frame.header, _crypto.sign(forger.identity_key, frame.signed_bytes), frame.payload)
    agg = consortium.aggregator(4, threshold=3, length=8)
    with pytest.raises(BadSignature, match=f"claiming to come from {victim} is not signed by it"):
        agg.add_upload(forged)


def test_announcement_and_unmask_messages_with_bad_signatures_are_refused(consortium: Consortium) -> None:
    agg = consortium.aggregator(3, threshold=2, length=4)
    site = consortium.site(agg.roster[0])
    announcement = agg.announcement
    with pytest.raises(BadSignature, match="not signed by coordinator"):
        site_upload(
            flip(announcement, signature_offset(announcement) + 1),
            np.zeros(4, np.float32),
            site,
            consortium.verifier,
            policy=TRUSTING,
        )
    round_ = upload_all(consortium, agg)
    requests = agg.unmask_requests()
    request = requests[site.node_id]
    with pytest.raises(BadSignature, match="not signed by the coordinator that announced the round"):
        site_unmask(flip(request, signature_offset(request) + 1), round_.states[site.node_id], site)
    reply = site_unmask(request, round_.states[site.node_id], site)
    with pytest.raises(BadSignature, match="unmask reply claiming to come from"):
        agg.add_unmask_reply(flip(reply, signature_offset(reply) + 1))
    agg.add_unmask_reply(reply)


def test_a_forwarded_upload_with_a_bad_signature_is_refused(consortium: Consortium) -> None:
    round_ = upload_all(consortium, consortium.aggregator(3, threshold=2, length=4))
    me, other, third = round_.agg.roster
    request = forge.request(consortium, round_, me, survivors=[me, other, third], dropped=[])
    header = parse(UnmaskRequest, unpack(request, expect=Kind.UNMASK_REQUEST).header)
    tampered = header.model_copy(update={"bundles": [flip(header.bundles[0], -5), header.bundles[1]]})
    bad = forge.signed(consortium, Kind.UNMASK_REQUEST, tampered.to_json())
    with pytest.raises(BadSignature, match=f"forwarded upload of {other} is not signed by it"):
        site_unmask(bad, round_.states[me], consortium.site(me))


# -- non-members ------------------------------------------------------------------------------


def test_uploads_from_outside_the_roster_are_rejected(consortium: Consortium, outsiders: Consortium) -> None:
    # a member of the consortium, but not of this round's roster (5 of 10 sites)
    agg = consortium.aggregator(5, threshold=3, length=4)
    bigger = consortium.aggregator(6, threshold=3, length=4)  # same run and round, one more site
    stranger = consortium.site(bigger.roster[5])
    up = site_upload(bigger.announcement, np.zeros(4, np.float32), stranger, consortium.verifier, policy=TRUSTING)
    with pytest.raises(UntrustedMember, match=f"{stranger.node_id} is not a member of round 1's roster"):
        agg.add_upload(up.upload)
    # another consortium's site, running its own round
    theirs = outsiders.aggregator(2, threshold=2, length=4)
    intruder = outsiders.site(theirs.roster[0])
    up = site_upload(theirs.announcement, np.zeros(4, np.float32), intruder, outsiders.verifier, policy=TRUSTING)
    with pytest.raises(UntrustedMember, match="is not a member"):
        agg.add_upload(up.upload)


def test_a_roster_with_an_uncertified_member_is_refused(consortium: Consortium, outsiders: Consortium) -> None:
    members = [*consortium.members[:3], outsiders.members[0]]
    with pytest.raises(
        UntrustedMember, match=f"roster member {outsiders.members[0].node_id}: .*not issued by the consortium CA"
    ):
        Aggregator(
            run_id="r",
            round=1,
            members=members,
            encoding=FixedPoint.for_sites(4, clip=1.0),
            length=4,
            coordinator=consortium.coordinator,
            verifier=consortium.verifier,
            threshold=3,
        )
    # a coordinator that signs such a roster anyway: every site refuses it
    announcement = crafted_announcement(consortium, sorted(members, key=lambda m: m.node_id))
    with pytest.raises(UntrustedMember, match="not issued by the consortium CA"):
        site_upload(announcement, np.zeros(4, np.float32), consortium.sites[0], consortium.verifier, policy=TRUSTING)


def test_an_announcement_from_an_uncertified_coordinator_is_refused(
    consortium: Consortium, outsiders: Consortium
) -> None:
    announcement = make_announcement(
        run_id="r",
        round=1,
        members=consortium.members[:3],
        threshold=2,
        encoding=FixedPoint.for_sites(3, clip=1.0),
        length=4,
        coordinator_id=outsiders.coordinator.node_id,
        coordinator_cert=outsiders.coordinator.identity_cert,
        coordinator_key=outsiders.coordinator.identity_key,
    )
    with pytest.raises(UntrustedMember, match=r"announcing coordinator .*not issued by the consortium CA"):
        site_upload(announcement, np.zeros(4, np.float32), consortium.sites[0], consortium.verifier, policy=TRUSTING)


def test_a_site_that_did_not_upload_cannot_answer(consortium: Consortium) -> None:
    agg = consortium.aggregator(4, threshold=2, length=4)
    late = agg.roster[3]
    round_ = upload_all(consortium, agg, skip={late})
    agg.unmask_requests()
    # the late site uploads anyway to another aggregator of the same round, then answers a forged request
    twin = upload_all(consortium, consortium.aggregator(4, threshold=2, length=4))
    request = forge.request(consortium, twin, late, survivors=list(agg.roster), dropped=[])
    reply = site_unmask(request, twin.states[late], consortium.site(late))
    with pytest.raises(ReplayedMessage, match="answered an unmask request it was not sent"):
        agg.add_unmask_reply(reply)
    assert round_.uploads.keys() == set(agg.survivors)


# -- replays ----------------------------------------------------------------------------------


def test_uploads_replayed_from_another_round_or_run_are_rejected(consortium: Consortium) -> None:
    old = upload_all(consortium, consortium.aggregator(4, threshold=3, length=8, round=1))
    other_run = upload_all(consortium, consortium.aggregator(4, threshold=3, length=8, run_id="run-2", round=2))
    agg = consortium.aggregator(4, threshold=3, length=8, round=2)
    sender = agg.roster[0]
    with pytest.raises(ReplayedMessage, match=r"is for run run-1 round 1 .*this is run run-1 round 2"):
        agg.add_upload(old.uploads[sender])
    with pytest.raises(ReplayedMessage, match=r"is for run run-2 round 2 .*this is run run-1 round 2"):
        agg.add_upload(other_run.uploads[sender])
    fresh = upload_all(consortium, agg)
    with pytest.raises(ReplayedMessage, match=f"a second upload from {sender}"):
        agg.add_upload(fresh.uploads[sender])


def test_an_announcement_for_another_run_is_refused(consortium: Consortium) -> None:
    agg = consortium.aggregator(3, threshold=2, length=4, run_id="flower-run-7")
    site = consortium.site(agg.roster[0])
    with pytest.raises(ReplayedMessage, match="announcement is for run flower-run-7; this site is in run flower-run-8"):
        site_upload(
            agg.announcement, np.zeros(4, np.float32), site, consortium.verifier, policy=TRUSTING, run_id="flower-run-8"
        )
    up = site_upload(
        agg.announcement, np.zeros(4, np.float32), site, consortium.verifier, policy=TRUSTING, run_id="flower-run-7"
    )
    assert up.run_id == "flower-run-7"


def test_unmask_messages_replayed_from_an_earlier_round_are_refused(consortium: Consortium) -> None:
    first = upload_all(consortium, consortium.aggregator(3, threshold=2, length=4, round=1))
    second = upload_all(consortium, consortium.aggregator(3, threshold=2, length=4, round=2))
    me = first.agg.roster[0]
    old_request = first.agg.unmask_requests()[me]
    with pytest.raises(ReplayedMessage, match="for run run-1 round 1; this site uploaded for run run-1 round 2"):
        site_unmask(old_request, second.states[me], consortium.site(me))
    old_reply = site_unmask(old_request, first.states[me], consortium.site(me))
    second.agg.unmask_requests()
    with pytest.raises(ReplayedMessage, match=r"unmask reply of .* is for run run-1 round 1"):
        second.agg.add_unmask_reply(old_reply)
    second.agg.add_unmask_reply(site_unmask(second.agg.unmask_requests()[me], second.states[me], consortium.site(me)))
    with pytest.raises(ReplayedMessage, match="a second unmask reply"):
        second.agg.add_unmask_reply(
            site_unmask(second.agg.unmask_requests()[me], second.states[me], consortium.site(me))
        )


def test_a_request_addressed_to_another_site_is_refused(consortium: Consortium) -> None:
    round_ = upload_all(consortium, consortium.aggregator(3, threshold=2, length=4))
    a, b, _ = round_.agg.roster
    with pytest.raises(ReplayedMessage, match=f"addressed to {b}, not to {a}"):
        site_unmask(round_.agg.unmask_requests()[b], round_.states[a], consortium.site(a))


# -- substituted keys -------------------------------------------------------------------------


def crafted_announcement(
    consortium: Consortium, members: list[Member], *, threshold: int = 2, length: int = 4
) -> bytes:
    return make_announcement(
        run_id="run-1",
        round=1,
        members=members,
        threshold=threshold,
        encoding=FixedPoint.for_sites(len(members), clip=1.0),
        length=length,
        coordinator_id=consortium.coordinator.node_id,
        coordinator_cert=consortium.coordinator.identity_cert,
        coordinator_key=consortium.coordinator.identity_key,
    )


@pytest.mark.parametrize("which", ["agreement", "identity"])
def test_a_substituted_member_certificate_is_refused(consortium: Consortium, which: str) -> None:
    a, b, c = consortium.members[:3]
    # the coordinator shows b's certificate under a's node id (a key it could have chosen to sit in the middle)
    if which == "agreement":
        swapped = Member(node_id=a.node_id, identity_cert=a.identity_cert, agreement_cert=b.agreement_cert)
    else:
        swapped = Member(node_id=a.node_id, identity_cert=b.identity_cert, agreement_cert=a.agreement_cert)
    with pytest.raises(UntrustedMember, match=f"roster member {a.node_id}: .*does not belong to the node"):
        Aggregator(
            run_id="r",
            round=1,
            members=[swapped, b, c],
            encoding=FixedPoint.for_sites(3, clip=1.0),
            length=4,
            coordinator=consortium.coordinator,
            verifier=consortium.verifier,
            threshold=2,
        )
    announcement = crafted_announcement(consortium, [swapped, b, c])
    for site in consortium.sites[:3]:
        with pytest.raises(UntrustedMember, match="does not belong to the node"):
            site_upload(announcement, np.zeros(4, np.float32), site, consortium.verifier, policy=TRUSTING)


def test_a_site_refuses_a_roster_whose_entry_for_it_is_not_its_own_key(consortium: Consortium) -> None:
    agg = consortium.aggregator(3, threshold=2, length=4)
    real = consortium.site(agg.roster[0])
    # the site's own key is not the one its (valid) certificate in the roster names
    other_key = SiteKeys(node_id=real.node_id, identity_key=real.identity_key, agreement_key=bytes(range(32)))
    with pytest.raises(UntrustedMember, match="are not its own \\(substituted\\)"):
        site_upload(agg.announcement, np.zeros(4, np.float32), other_key, consortium.verifier, policy=TRUSTING)


def test_a_site_certificate_cannot_stand_in_for_the_coordinator(consortium: Consortium) -> None:
    site = consortium.sites[1]
    member = consortium.members[1]
    announcement = make_announcement(
        run_id="r",
        round=1,
        members=consortium.members[:3],
        threshold=2,
        encoding=FixedPoint.for_sites(3, clip=1.0),
        length=4,
        coordinator_id=site.node_id,
        coordinator_cert=member.identity_cert,
        coordinator_key=site.identity_key,
    )
    with pytest.raises(UntrustedMember, match="has role site; allowed here: coordinator"):
        site_upload(announcement, np.zeros(4, np.float32), consortium.sites[0], consortium.verifier, policy=TRUSTING)


def test_malformed_messages_are_named_without_echoing_them(consortium: Consortium) -> None:
    agg = consortium.aggregator(3, threshold=2, length=4)
    with pytest.raises(MalformedMessage, match="not a secure-aggregation message"):
        agg.add_upload(b"hello")
    with pytest.raises(MalformedMessage, match="expected a upload message, got kind ANNOUNCE"):
        agg.add_upload(agg.announcement)
    header = parse(Announcement, unpack(agg.announcement, expect=Kind.ANNOUNCE).header)
    assert header.threshold == 2
    bogus = b'{"sender": "SECRET-VALUE", "boxes": "SECRET-VALUE"}'
    with pytest.raises(MalformedMessage, match="invalid UploadHeader") as info:
        agg.add_upload(pack(Kind.UPLOAD, bogus, bytes(64)))
    assert "SECRET-VALUE" not in str(info.value)  # names the fields, never echoes the input


# -- a site that lies in its unmask reply -------------------------------------------------------


def lying_reply(consortium: Consortium, reply: bytes, owner: str) -> bytes:
    """The reply with its share of `owner`'s self-mask seed changed, signed again by its sender."""
    header = parse(UnmaskReply, unpack(reply, expect=Kind.UNMASK_REPLY).header)
    shares = [
        s.model_copy(update={"share": (int.from_bytes(s.share, "big") + 1).to_bytes(66, "big")})
        if s.owner == owner
        else s
        for s in header.self_shares
    ]
    body = header.model_copy(update={"self_shares": shares}).to_json()
    key = consortium.site(header.sender).identity_key
    return pack(Kind.UNMASK_REPLY, body, _crypto.sign(key, signing_input(Kind.UNMASK_REPLY, body)))


def test_a_wrong_share_is_caught_by_the_commitment_and_outvoted_when_possible(consortium: Consortium) -> None:
    def replies_for(agg: Aggregator) -> tuple[list[bytes], np.ndarray]:
        round_ = upload_all(consortium, agg)
        requests = agg.unmask_requests()
        replies = [site_unmask(requests[i], round_.states[i], consortium.site(i)) for i in agg.roster]
        expected = np.zeros(agg.length, dtype=np.uint32)
        for x in round_.inputs.values():
            expected += FixedPoint.for_sites(4, clip=1.0).encode(x).ring
        return replies, expected

    agg = consortium.aggregator(4, threshold=3, length=16)
    replies, expected = replies_for(agg)
    victim = agg.roster[3]
    agg.add_unmask_reply(lying_reply(consortium, replies[0], victim))
    for reply in replies[1:]:
        agg.add_unmask_reply(reply)
    assert np.array_equal(agg.result().ring_sum, expected)  # 4 replies, t = 3: the liar is outvoted

    agg = consortium.aggregator(4, threshold=3, length=16)
    replies, _ = replies_for(agg)
    agg.add_unmask_reply(lying_reply(consortium, replies[0], victim))
    for reply in replies[1:3]:
        agg.add_unmask_reply(reply)
    with pytest.raises(ReconstructionError, match=f"rebuild the self-mask seed that {victim} committed to"):
        agg.result()  # exactly t replies, one wrong: detected, not decoded into garbage
