"""Enrolment proofs: a site enrols only with certificates whose identity key it holds, for
the coordinator's query (its nonce), its run and the Flower node it answers from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corolla.secure_agg import (
    BadSignature,
    MalformedMessage,
    Member,
    ParameterError,
    ReplayedMessage,
    SiteKeys,
    UntrustedMember,
    _crypto,
    check_enrolment,
    new_nonce,
    sign_enrolment,
)
from corolla.secure_agg.roster import VerifiedMember
from tests.secure_agg.kit import Consortium

VECTOR = json.loads((Path(__file__).parents[1] / "vectors" / "secure_agg_enrolment.json").read_text())
RUN = "flower-run-7"
NONCE = bytes(range(100, 132))
NODE = 4242  # the Flower node the coordinator asked


def proof(
    site: SiteKeys,
    member: Member,
    *,
    run_id: str = RUN,
    nonce: bytes = NONCE,
    flower_node: int = NODE,
    node_id: str | None = None,
    agreement_cert: bytes | None = None,
) -> bytes:
    """`site` answering a keys query with `member`'s certificates, signed with its own key."""
    return sign_enrolment(
        node_id=member.node_id if node_id is None else node_id,
        identity_key=site.identity_key,
        run_id=run_id,
        nonce=nonce,
        flower_node=flower_node,
        identity_cert=member.identity_cert,
        agreement_cert=member.agreement_cert if agreement_cert is None else agreement_cert,
    )


def check(consortium: Consortium, data: bytes, member: Member) -> VerifiedMember:
    """The coordinator's check of a reply to its query (RUN, NONCE) sent to Flower node NODE."""
    return check_enrolment(data, member, consortium.verifier, run_id=RUN, nonce=NONCE, flower_node=NODE)


def test_a_proof_by_the_certified_key_enrols(consortium: Consortium) -> None:
    site, member = consortium.sites[0], consortium.members[0]
    verified = check(consortium, proof(site, member), member)
    assert verified.node_id == site.node_id
    assert verified.signing_key == _crypto.ed25519_public(site.identity_key)
    assert verified.agreement_key == _crypto.x25519_public(site.agreement_key)


def test_another_sites_certificates_signed_with_the_wrong_key_are_refused(consortium: Consortium) -> None:
    attacker, victim = consortium.sites[1], consortium.members[0]
    with pytest.raises(BadSignature, match=f"not signed by the identity key of {victim.node_id}"):
        check(consortium, proof(attacker, victim), victim)


def test_a_reply_to_an_earlier_query_is_refused(consortium: Consortium) -> None:
    site, member = consortium.sites[0], consortium.members[0]
    earlier = proof(site, member, nonce=bytes(32))
    with pytest.raises(ReplayedMessage, match="answers another query"):
        check(consortium, earlier, member)


def test_a_reply_signed_for_another_flower_node_is_refused(consortium: Consortium) -> None:
    site, member = consortium.sites[0], consortium.members[0]
    relayed = proof(site, member, flower_node=NODE + 1)  # the site's genuine answer, relayed by node NODE
    with pytest.raises(ReplayedMessage, match=f"signed for Flower node {NODE + 1}, but came from node {NODE}"):
        check(consortium, relayed, member)


def test_a_reply_signed_for_another_run_is_refused(consortium: Consortium) -> None:
    site, member = consortium.sites[0], consortium.members[0]
    with pytest.raises(ReplayedMessage, match="signed for run flower-run-6, not flower-run-7"):
        check(consortium, proof(site, member, run_id="flower-run-6"), member)


def test_a_proof_over_other_certificates_or_another_node_id_is_refused(consortium: Consortium) -> None:
    site, member = consortium.sites[0], consortium.members[0]
    with pytest.raises(BadSignature, match="not signed over the certificates it carries"):
        check(consortium, proof(site, member, agreement_cert=consortium.members[1].agreement_cert), member)
    with pytest.raises(BadSignature, match="not signed over the certificates it carries"):
        check(consortium, proof(site, member, node_id=consortium.members[1].node_id), member)


def test_certificates_the_ca_does_not_vouch_for_are_refused(consortium: Consortium, outsiders: Consortium) -> None:
    stranger, member = outsiders.sites[0], outsiders.members[0]
    with pytest.raises(UntrustedMember, match="not issued by the consortium CA"):
        check(consortium, proof(stranger, member), member)
    mixed = Member(  # a site's identity with another site's key-agreement certificate
        node_id=consortium.members[0].node_id,
        identity_cert=consortium.members[0].identity_cert,
        agreement_cert=consortium.members[1].agreement_cert,
    )
    with pytest.raises(UntrustedMember, match="does not belong to the node"):
        check(consortium, proof(consortium.sites[0], mixed), mixed)


def test_malformed_proofs_and_nonces_are_refused(consortium: Consortium) -> None:
    site, member = consortium.sites[0], consortium.members[0]
    with pytest.raises(MalformedMessage, match="not a secure-aggregation message"):
        check(consortium, b"signed, honestly", member)
    announcement = consortium.aggregator(3).announcement
    with pytest.raises(MalformedMessage, match="expected a enrol message, got kind ANNOUNCE"):
        check(consortium, announcement, member)
    with pytest.raises(MalformedMessage, match="nonce must be 32 bytes"):
        proof(site, member, nonce=bytes(16))


def test_nonces_are_fresh_and_come_from_the_given_source() -> None:
    assert len(new_nonce()) == 32 and new_nonce() != new_nonce()
    assert new_nonce(lambda n: b"\x07" * n) == b"\x07" * 32
    with pytest.raises(ParameterError, match="gave 16 bytes"):
        new_nonce(lambda n: bytes(16))


class _Keys:
    """A verifier that vouches for the vector's key (the vector's certificates are not X.509)."""

    def check_signing_key_der(self, der: bytes, *, node_id: str, role: str) -> bytes:
        return bytes.fromhex(VECTOR["ed25519_public"])

    def check_agreement_der(self, der: bytes, *, node_id: str) -> bytes:
        return bytes(32)


def test_enrolment_known_answer() -> None:
    v = VECTOR
    member = Member(
        node_id=v["node_id"],
        identity_cert=bytes.fromhex(v["identity_cert"]),
        agreement_cert=bytes.fromhex(v["agreement_cert"]),
    )
    nonce = bytes.fromhex(v["nonce"])
    frame = sign_enrolment(
        node_id=member.node_id,
        identity_key=bytes.fromhex(v["ed25519_seed"]),
        run_id=v["run_id"],
        nonce=nonce,
        flower_node=v["flower_node"],
        identity_cert=member.identity_cert,
        agreement_cert=member.agreement_cert,
    )
    assert frame.hex() == v["frame"]
    assert frame[9 : 9 + len(v["header"])] == v["header"].encode()
    verified = check_enrolment(frame, member, _Keys(), run_id=v["run_id"], nonce=nonce, flower_node=v["flower_node"])
    assert verified.node_id == v["node_id"]
