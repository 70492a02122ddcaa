"""The round's roster: certified members, the coordinator's announcement, the threshold rule.

Members are sites named by node id (the libp2p peer id of their Ed25519 identity key),
sorted by node id; a member's index in that order fixes its Shamir share position
(index + 1) and the sign of its pairwise masks. Every member is shown to every site with
its identity and key-agreement certificates, and each site checks them against its own
copy of the consortium CA (and revocation list) before using a key: the roster is only
as trustworthy as the CA, which is what keeps sybils out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from corolla.errors import CorollaError
from corolla.secure_agg import _crypto
from corolla.secure_agg.encoding import FixedPoint
from corolla.secure_agg.errors import BadSignature, CryptoError, ParameterError, UntrustedMember
from corolla.secure_agg.messages import (
    MAX_SITES,
    Announcement,
    Kind,
    MemberCerts,
    pack,
    parse,
    signing_input,
    unpack,
)

COORDINATOR_ROLE = "coordinator"
SITE_ROLE = "site"


class CertificateVerifier(Protocol):
    """What secure aggregation needs from the consortium PKI (`corolla.pki.Verifier`
    provides it). Both raise a `CorollaError` for anything wrong: not issued by the CA,
    expired, revoked, wrong role, another node's certificate."""

    def check_signing_key_der(self, der: bytes, *, node_id: str, role: str) -> bytes:
        """The raw Ed25519 public key of `node_id` from its identity certificate."""
        ...

    def check_agreement_der(self, der: bytes, *, node_id: str) -> bytes:
        """The raw X25519 public key of site `node_id` from its key-agreement certificate."""
        ...


@dataclass(frozen=True, slots=True)
class Member:
    """A site as the coordinator lists it: its node id and certificates (DER)."""

    node_id: str
    identity_cert: bytes
    agreement_cert: bytes


@dataclass(frozen=True, slots=True)
class VerifiedMember:
    node_id: str
    signing_key: bytes  # Ed25519 public key
    agreement_key: bytes  # X25519 public key


def verify_members(
    members: Sequence[Member | MemberCerts], verifier: CertificateVerifier
) -> tuple[VerifiedMember, ...]:
    """Every member's keys, from certificates checked against the CA; node ids must be
    distinct and sorted."""
    ids = [m.node_id for m in members]
    if not 2 <= len(ids) <= MAX_SITES:
        raise ParameterError(f"a roster has 2..{MAX_SITES} members, got {len(ids)}")
    if ids != sorted(set(ids)):
        raise ParameterError("roster node ids must be distinct and sorted")
    return tuple(verify_member(m, verifier) for m in members)


def verify_member(
    member: Member | MemberCerts, verifier: CertificateVerifier, *, named: str = "roster member"
) -> VerifiedMember:
    """One member's keys, from its certificates checked against the CA now: chain, role site,
    node id, validity, revocation. Raises UntrustedMember naming it as `named` and its node id."""
    try:
        signing = verifier.check_signing_key_der(member.identity_cert, node_id=member.node_id, role=SITE_ROLE)
        agreement = verifier.check_agreement_der(member.agreement_cert, node_id=member.node_id)
    except CorollaError as exc:
        raise UntrustedMember(f"{named} {member.node_id}: {exc}") from None
    return VerifiedMember(node_id=member.node_id, signing_key=signing, agreement_key=agreement)


def secure_threshold(sites: int, *, colluding_sites: int = 0) -> int:
    """The smallest threshold t at which a coordinator that lies about who dropped out,
    colluding with up to `colluding_sites` sites, cannot unmask an honest site's input:
    t = ceil((n + c) / 2) + 1, i.e. 2t >= n + c + 2 (see docs/secure_aggregation.md).
    The round tolerates n - t sites that upload nothing or never answer the unmask request."""
    if sites < 2:
        raise ParameterError(f"sites={sites}: secure aggregation needs at least 2 sites")
    if colluding_sites < 0:
        raise ParameterError(f"colluding_sites={colluding_sites} must be >= 0")
    t = math.ceil((sites + colluding_sites) / 2) + 1
    if t > sites:
        raise ParameterError(
            f"no threshold protects {sites} sites against a malicious coordinator colluding with "
            f"{colluding_sites} of them (t = {t} > n)"
        )
    return t


@dataclass(frozen=True, kw_only=True, slots=True)
class SitePolicy:
    """What a site accepts from the coordinator: the site, not the coordinator, decides
    how low a threshold it tolerates (the coordinator is the party it guards against)."""

    malicious_coordinator: bool = True  # guard against a coordinator lying about dropouts
    colluding_sites: int = 0  # other sites that may collude with the coordinator

    def __post_init__(self) -> None:
        if self.colluding_sites < 0:
            raise ParameterError(f"colluding_sites={self.colluding_sites} must be >= 0")

    def min_threshold(self, sites: int) -> int:
        if self.malicious_coordinator:
            return secure_threshold(sites, colluding_sites=self.colluding_sites)
        return max(2, self.colluding_sites + 1)  # an honest-but-curious coordinator with c colluders


def check_threshold(threshold: int, sites: int) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 2 <= threshold <= sites:
        raise ParameterError(f"threshold={threshold!r} must be an integer in 2..{sites} (the roster size)")


@dataclass(frozen=True, slots=True)
class VerifiedRound:
    """A verified announcement: what both sides hold about the round."""

    announcement: Announcement
    digest: bytes  # SHA-256 of the announcement header: binds run, round, roster, parameters
    members: tuple[VerifiedMember, ...]
    coordinator_key: bytes  # Ed25519 public key

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.node_id for m in self.members)

    @property
    def encoding(self) -> FixedPoint:
        return FixedPoint(frac_bits=self.announcement.frac_bits, clip=self.announcement.clip)


def make_announcement(
    *,
    run_id: str,
    round: int,
    members: Sequence[Member],
    threshold: int,
    encoding: FixedPoint,
    length: int,
    coordinator_id: str,
    coordinator_cert: bytes,
    coordinator_key: bytes,
) -> bytes:
    """The signed announcement frame (the coordinator's identity key signs it)."""
    header = Announcement(
        run_id=run_id,
        round=round,
        threshold=threshold,
        length=length,
        frac_bits=encoding.frac_bits,
        clip=float(encoding.clip),
        coordinator_id=coordinator_id,
        coordinator_cert=coordinator_cert,
        members=[
            MemberCerts(node_id=m.node_id, identity_cert=m.identity_cert, agreement_cert=m.agreement_cert)
            for m in members
        ],
    ).to_json()
    return pack(Kind.ANNOUNCE, header, _crypto.sign(coordinator_key, signing_input(Kind.ANNOUNCE, header)))


def read_announcement(data: bytes, verifier: CertificateVerifier) -> VerifiedRound:
    """Check an announcement: the coordinator's certificate and signature, every member's
    certificates, the parameters' ranges."""
    frame = unpack(data, expect=Kind.ANNOUNCE)
    header = parse(Announcement, frame.header)
    try:
        coordinator_key = verifier.check_signing_key_der(
            header.coordinator_cert, node_id=header.coordinator_id, role=COORDINATOR_ROLE
        )
    except CorollaError as exc:
        raise UntrustedMember(f"the announcing coordinator {header.coordinator_id}: {exc}") from None
    try:
        _crypto.verify(coordinator_key, frame.signed_bytes, frame.signature)
    except CryptoError:
        raise BadSignature(f"the announcement is not signed by coordinator {header.coordinator_id}") from None
    members = verify_members(header.members, verifier)
    check_threshold(header.threshold, len(members))
    encoding = FixedPoint(frac_bits=header.frac_bits, clip=header.clip)
    encoding.check_sites(len(members))
    return VerifiedRound(
        announcement=header, digest=_crypto.digest(frame.header), members=members, coordinator_key=coordinator_key
    )
