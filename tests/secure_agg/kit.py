"""A consortium with real certificates, and a round driven in-process, for the protocol tests."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from corolla.pki import ConsortiumCA, NodeIdentity, Verifier
from corolla.secure_agg import (
    AggregateResult,
    Aggregator,
    CoordinatorKeys,
    FixedPoint,
    Member,
    SiteKeys,
    SitePolicy,
    site_unmask,
    site_upload,
)

TRUSTING = SitePolicy(malicious_coordinator=False)  # accepts any threshold >= 2 (dropout tests)


@dataclass(frozen=True)
class Consortium:
    ca: ConsortiumCA
    sites: tuple[SiteKeys, ...]  # sorted by node id
    members: tuple[Member, ...]  # the same order
    coordinator: CoordinatorKeys
    verifier: Verifier

    @classmethod
    def create(cls, root: Path, *, sites: int, name: str = "test") -> Consortium:
        ca = ConsortiumCA.init(root, consortium=name)
        nodes = sorted((ca.issue(f"site-{i}", "site") for i in range(sites)), key=lambda n: n.node_id)
        coordinator = ca.issue("coordinator", "coordinator")
        return cls(
            ca=ca,
            sites=tuple(site_keys(n) for n in nodes),
            members=tuple(member(n) for n in nodes),
            coordinator=CoordinatorKeys(
                node_id=coordinator.node_id,
                identity_key=coordinator.identity_key_raw(),
                identity_cert=coordinator.identity_cert_der,
            ),
            verifier=coordinator.verifier(),
        )

    def site(self, node_id: str) -> SiteKeys:
        return next(s for s in self.sites if s.node_id == node_id)

    def aggregator(
        self,
        n: int,
        *,
        threshold: int | None = None,
        length: int = 16,
        run_id: str = "run-1",
        round: int = 1,
        encoding: FixedPoint | None = None,
    ) -> Aggregator:
        return Aggregator(
            run_id=run_id,
            round=round,
            members=self.members[:n],
            encoding=encoding or FixedPoint.for_sites(n, clip=1.0),
            length=length,
            coordinator=self.coordinator,
            verifier=self.verifier,
            threshold=threshold,
        )


def site_keys(node: NodeIdentity) -> SiteKeys:
    return SiteKeys(node_id=node.node_id, identity_key=node.identity_key_raw(), agreement_key=node.agreement_key_raw())


def member(node: NodeIdentity) -> Member:
    return Member(node_id=node.node_id, identity_cert=node.identity_cert_der, agreement_cert=node.agreement_cert_der)


def run_round(
    consortium: Consortium,
    agg: Aggregator,
    inputs: Mapping[str, np.ndarray],
    *,
    before: Collection[str] = (),
    after: Collection[str] = (),
    policy: SitePolicy = TRUSTING,
) -> AggregateResult:
    """Every roster member uploads but those in `before`; every survivor answers the unmask
    request but those in `after`."""
    states = {}
    for node_id in agg.roster:
        if node_id in before:
            continue
        up = site_upload(
            agg.announcement, inputs[node_id], consortium.site(node_id), consortium.verifier, policy=policy
        )
        states[node_id] = up.state
        assert agg.add_upload(up.upload) == node_id
    for node_id, request in agg.unmask_requests().items():
        if node_id in after:
            continue
        agg.add_unmask_reply(site_unmask(request, states[node_id], consortium.site(node_id)))
    return agg.result()


@dataclass
class Uploaded:
    """A round after every listed site uploaded: the aggregator, the uploads and the states."""

    agg: Aggregator
    inputs: dict[str, np.ndarray]
    uploads: dict[str, bytes]
    states: dict[str, bytes]


def upload_all(
    consortium: Consortium, agg: Aggregator, *, skip: Collection[str] = (), policy: SitePolicy = TRUSTING, seed: int = 0
) -> Uploaded:
    rng = np.random.default_rng(seed)
    d = agg.length
    inputs = {i: rng.normal(0, 0.2, d).astype(np.float32) for i in agg.roster}
    uploads, states = {}, {}
    for node_id in agg.roster:
        if node_id in skip:
            continue
        up = site_upload(
            agg.announcement, inputs[node_id], consortium.site(node_id), consortium.verifier, policy=policy
        )
        agg.add_upload(up.upload)
        uploads[node_id], states[node_id] = up.upload, up.state
    return Uploaded(agg=agg, inputs=inputs, uploads=uploads, states=states)
