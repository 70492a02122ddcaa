"""Enrolment: a site proves that it holds the identity key of the certificates it offers.

Certificates are public. Without a proof of possession, any node answering the
coordinator's keys query could present another site's certificates and so keep that site
out of the run (its node id would be taken). So the coordinator's query carries a fresh
random nonce (`new_nonce`, 32 bytes, one per query), and the site answers with an
enrolment frame (`sign_enrolment`, kind `ENROL`) whose header names the run, the nonce, the
Flower node it answers from, its node id and the SHA-256 of the two certificates it sends,
signed by its Ed25519 identity key over PROTOCOL | kind | SHA-256(header) like every
secure-aggregation message. The coordinator (`check_enrolment`) checks the certificates
against the CA, the signature against the identity certificate's key, and that the header
names exactly this run, this query's nonce, the Flower node it asked and the certificates
delivered: another site's certificates, a reply replayed from an earlier query, or one
relayed from another Flower node are refused.
"""

from __future__ import annotations

import os

from corolla.secure_agg import _crypto
from corolla.secure_agg.errors import (
    BadSignature,
    CryptoError,
    MalformedMessage,
    ParameterError,
    ReplayedMessage,
)
from corolla.secure_agg.messages import Enrolment, Kind, pack, parse, signing_input, unpack
from corolla.secure_agg.roster import CertificateVerifier, Member, VerifiedMember, verify_member

NONCE_BYTES = 32  # the coordinator's nonce per keys query


def new_nonce(random: _crypto.RandomSource = os.urandom) -> bytes:
    """A fresh nonce for one keys query (from the OS CSPRNG unless `random` is given)."""
    nonce = random(NONCE_BYTES)
    if len(nonce) != NONCE_BYTES:
        raise ParameterError(f"the random source gave {len(nonce)} bytes; a nonce is {NONCE_BYTES}")
    return nonce


def sign_enrolment(
    *,
    node_id: str,
    identity_key: bytes,
    run_id: str,
    nonce: bytes,
    flower_node: int,
    identity_cert: bytes,
    agreement_cert: bytes,
) -> bytes:
    """The site's signed answer to the keys query carrying `nonce`: an `ENROL` frame whose
    header binds the run, the nonce, the Flower node it answers from (its own, from its
    Flower context) and the certificates (DER) it sends with it. `identity_key` is the
    32-byte Ed25519 seed of the key `identity_cert` certifies."""
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise MalformedMessage(f"the keys query's nonce must be {NONCE_BYTES} bytes")
    header = Enrolment(
        run_id=run_id,
        nonce=nonce,
        flower_node=flower_node,
        node_id=node_id,
        identity_cert_sha256=_crypto.digest(identity_cert),
        agreement_cert_sha256=_crypto.digest(agreement_cert),
    ).to_json()
    return pack(Kind.ENROL, header, _crypto.sign(identity_key, signing_input(Kind.ENROL, header)))


def check_enrolment(
    proof: bytes, member: Member, verifier: CertificateVerifier, *, run_id: str, nonce: bytes, flower_node: int
) -> VerifiedMember:
    """The keys of `member` (the node id and certificates a keys reply carried), once its
    certificates hold against the CA (`UntrustedMember`), `proof` is signed by the key of
    its identity certificate (`BadSignature`) over these certificates (`BadSignature`), and
    names `run_id`, the `nonce` of the query it answers and the Flower node `flower_node`
    the query went to (`ReplayedMessage`)."""
    frame = unpack(proof, expect=Kind.ENROL)
    header = parse(Enrolment, frame.header)
    verified = verify_member(member, verifier, named="site")
    try:
        _crypto.verify(verified.signing_key, frame.signed_bytes, frame.signature)
    except CryptoError:
        raise BadSignature(
            f"the keys reply is not signed by the identity key of {member.node_id}: its sender does not hold the "
            f"key of the certificates it presents"
        ) from None
    if not (
        header.node_id == member.node_id
        and _crypto.equal(header.identity_cert_sha256, _crypto.digest(member.identity_cert))
        and _crypto.equal(header.agreement_cert_sha256, _crypto.digest(member.agreement_cert))
    ):
        raise BadSignature(f"the keys reply of {member.node_id} is not signed over the certificates it carries")
    if header.run_id != run_id:
        raise ReplayedMessage(f"the keys reply of {member.node_id} is signed for run {header.run_id}, not {run_id}")
    if not _crypto.equal(header.nonce, nonce):
        raise ReplayedMessage(
            f"the keys reply of {member.node_id} answers another query (not this query's nonce): a replayed reply"
        )
    if header.flower_node != flower_node:
        raise ReplayedMessage(
            f"the keys reply of {member.node_id} is signed for Flower node {header.flower_node}, "
            f"but came from node {flower_node}"
        )
    return verified
