"""Secure aggregation of the sites' updates: the coordinator learns only their sum.

A SecAgg-family protocol (Bonawitz et al. 2017) for a consortium whose members hold
certified long-term keys, in two message stages that ride on Flower's train message and a
second message (see docs/secure_aggregation.md):

- once per run, each site proves that it holds the identity key of the certificates it
  enrols with (`sign_enrolment` on the coordinator's fresh nonce, `check_enrolment`);
- the coordinator's `Aggregator` makes the round's signed `announcement` (roster with
  certificates, threshold, encoding); each site answers with `site_upload` (masked vector,
  encrypted shares) and keeps its `state` in a `RoundStateStore`;
- the coordinator sends each survivor its `unmask_requests()` entry; each answers once with
  `site_unmask`; the `Aggregator` removes the masks and decodes the sum (`result()`).

Pure arithmetic lives in `encoding`, `masking` and `shamir`; every cryptographic primitive
in `_crypto`.
"""

from corolla.secure_agg.aggregator import AggregateResult, Aggregator, CoordinatorKeys
from corolla.secure_agg.encoding import Encoded, FixedPoint
from corolla.secure_agg.enrolment import check_enrolment, new_nonce, sign_enrolment
from corolla.secure_agg.errors import (
    BadSignature,
    CryptoError,
    EncodingError,
    MalformedMessage,
    NotEnoughSurvivors,
    ParameterError,
    ReconstructionError,
    RefusedRequest,
    RejectedMessage,
    ReplayedMessage,
    RoundStateError,
    SecureAggregationError,
    SumOutOfRange,
    UntrustedMember,
)
from corolla.secure_agg.roster import CertificateVerifier, Member, SitePolicy, VerifiedRound, secure_threshold
from corolla.secure_agg.site import (
    SiteKeys,
    SiteUpload,
    check_announcement,
    site_unmask,
    site_upload,
    upload_round,
)
from corolla.secure_agg.store import RoundStateStore

__all__ = [
    "AggregateResult",
    "Aggregator",
    "BadSignature",
    "CertificateVerifier",
    "CoordinatorKeys",
    "CryptoError",
    "Encoded",
    "EncodingError",
    "FixedPoint",
    "MalformedMessage",
    "Member",
    "NotEnoughSurvivors",
    "ParameterError",
    "ReconstructionError",
    "RefusedRequest",
    "RejectedMessage",
    "ReplayedMessage",
    "RoundStateError",
    "RoundStateStore",
    "SecureAggregationError",
    "SiteKeys",
    "SitePolicy",
    "SiteUpload",
    "SumOutOfRange",
    "UntrustedMember",
    "VerifiedRound",
    "check_announcement",
    "check_enrolment",
    "new_nonce",
    "secure_threshold",
    "sign_enrolment",
    "site_unmask",
    "site_upload",
    "upload_round",
]
