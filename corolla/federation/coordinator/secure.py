"""The coordinator's side of secure aggregation on Flower's Message API: it learns only the
sum of the sites' updates (the protocol is `corolla.secure_agg`; docs/secure_aggregation.md).

- Once per run and node, a keys query (`KeysQuery`, a fresh 32-byte nonce each): a site
  answers with its certificates, checked against the consortium CA, and its signed proof
  that it holds the identity key for this run, this query and this Flower node.
- The train message carries the round's signed announcement (roster, threshold, encoding);
  a site replies with its masked upload instead of its update.
- A `train.secagg_unmask` message (`UnmaskOrder`) to the sites whose uploads arrived; each
  answers once per round, and the aggregator removes the masks.

Two message stages per round, the first riding on training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Message, MessageType

from corolla.errors import CorollaError
from corolla.federation.coordinator.mean import mean_of_sum
from corolla.federation.grid import Exchange
from corolla.federation.messages import (
    UNMASK_MESSAGE_TYPE,
    KeysQuery,
    KeysReply,
    RecordError,
    UnmaskOrder,
    UnmaskReply,
    Weights,
    read_error,
    unflatten,
)
from corolla.federation.outcomes import SecureAggInfo, SiteOutcome, Status
from corolla.pki import NodeIdentity, Verifier
from corolla.secure_agg import (
    Aggregator,
    CoordinatorKeys,
    FixedPoint,
    Member,
    SecureAggregationError,
    check_enrolment,
    new_nonce,
)
from corolla.secure_agg.roster import verify_member
from corolla.training.config import TrainConfig

__all__ = ["SecureRound", "SecureRounds", "SecureSetupError"]

_log = logging.getLogger(__name__)


class SecureSetupError(CorollaError):
    """The coordinator cannot run secure aggregation (no identity given)."""

    exit_code = 2


@dataclass
class SecureRounds:
    """The coordinator's side over a run: who the sites are (their certified keys) and one
    `Aggregator` per round."""

    run_key: str  # the run id every site files its state under (`messages.run_key`)
    keys: CoordinatorKeys
    verifier: Verifier  # the coordinator's (consortium CA + CRL)
    clip: float  # encoding range: update values outside [-clip, clip] are clipped by the sites
    members: dict[int, Member] = field(default_factory=dict)  # Flower node id -> its enrolled member
    random: Callable[[int], bytes] = field(default=os.urandom, repr=False)  # the keys queries' nonces

    @classmethod
    def for_node(cls, node_dir: Path, *, run_key: str, clip: float) -> SecureRounds:
        """The coordinator whose identity is in `node_dir` (`<workspace>/nodes/<name>`)."""
        identity = NodeIdentity.load(node_dir)
        keys = CoordinatorKeys(
            node_id=identity.node_id, identity_key=identity.identity_key_raw(), identity_cert=identity.identity_cert_der
        )
        return cls(run_key=run_key, keys=keys, verifier=identity.verifier(), clip=clip)

    @classmethod
    def for_config(cls, config: TrainConfig, *, run_key: str) -> SecureRounds | None:
        """The coordinator's `SecureRounds` for a run (None with `--no-secure-agg`)."""
        if not config.secure_agg:
            return None
        if not config.workspace or not config.node:
            raise SecureSetupError(
                "secure aggregation needs the coordinator's identity: give the run config a workspace and node "
                "(or run with --no-secure-agg)"
            )
        return cls.for_node(
            Path(config.workspace) / "nodes" / config.node, run_key=run_key, clip=config.secure_agg_clip
        )

    def enroll(self, grid: Exchange, nodes: list[int], timeout: float) -> dict[int, SiteOutcome]:
        """Ask nodes not yet known for their certificates, each with a fresh nonce; enrol those
        whose certificates hold and whose signed reply proves they hold the identity key (for
        this run, this query and the Flower node asked). The outcomes of those that fail."""
        new = [n for n in nodes if n not in self.members]
        if not new:
            return {}
        nonces = {n: new_nonce(self.random) for n in new}
        messages = [
            Message(
                KeysQuery(run_id=self.run_key, nonce=nonces[n]).to_content(),
                dst_node_id=n,
                message_type=MessageType.QUERY,
                ttl=timeout,
            )
            for n in new
        ]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids are set when pushed
        outcomes: dict[int, SiteOutcome] = {}
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if node not in new or node in self.members or node in outcomes:
                continue
            if reply.has_error():
                error = read_error(reply.error)
                outcomes[node] = SiteOutcome.absent(error.outcome, f"secure-aggregation keys: {error.reason}")
                continue
            try:
                answer = KeysReply.from_content(reply.content)
                member = Member(
                    node_id=answer.node_id, identity_cert=answer.identity_cert, agreement_cert=answer.agreement_cert
                )
                # The node proves it holds the key of these certificates, for this query from this node.
                check_enrolment(
                    answer.proof, member, self.verifier, run_id=self.run_key, nonce=nonces[node], flower_node=node
                )
            except (CorollaError, ValueError) as exc:
                outcomes[node] = SiteOutcome.absent(Status.FAILED, f"secure-aggregation keys refused: {exc}")
                _log.warning("node %d left out of secure aggregation: keys refused: %s", node, exc)
                continue
            if any(m.node_id == member.node_id for m in self.members.values()):
                outcomes[node] = SiteOutcome.absent(Status.FAILED, f"node id {member.node_id} already in the run")
                _log.warning(
                    "node %d left out of secure aggregation: node id %s already in the run", node, member.node_id
                )
                continue
            self.members[node] = member
        for node in new:
            if node not in self.members and node not in outcomes:
                outcomes[node] = SiteOutcome.absent(Status.MISSING, f"no keys reply within {timeout:.0f} s")
        return outcomes

    def prune(self, nodes: list[int]) -> dict[int, SiteOutcome]:
        """Check the enrolled certificates again (the CRL is re-read as it changes): a site
        revoked or expired since it enrolled leaves the run instead of failing every round."""
        dropped: dict[int, SiteOutcome] = {}
        for node in nodes:
            member = self.members.get(node)
            if member is None:
                continue
            try:
                verify_member(member, self.verifier, named="site")  # what every site checks when it reads the roster
            except CorollaError as exc:
                del self.members[node]
                dropped[node] = SiteOutcome.absent(
                    Status.FAILED, f"left the run: its certificate no longer holds: {exc}"
                )
        return dropped

    def round(self, nodes: list[int], server_round: int, weights: Mapping[str, np.ndarray]) -> SecureRound:
        """The round's aggregator over `nodes` (all enrolled)."""
        members = [self.members[n] for n in nodes]
        aggregator = Aggregator(
            run_id=self.run_key,
            round=server_round,
            members=members,
            encoding=FixedPoint.for_sites(len(members), clip=self.clip),
            length=sum(int(np.size(w)) for w in weights.values()),
            coordinator=self.keys,
            verifier=self.verifier,
        )
        return SecureRound(
            aggregator=aggregator,
            server_round=server_round,
            like={name: np.asarray(w, dtype=np.float32) for name, w in weights.items()},
            node_ids={n: self.members[n].node_id for n in nodes},
        )


@dataclass
class SecureRound:
    """One round, coordinator side: the announcement out, uploads in, then the unmask stage."""

    aggregator: Aggregator
    server_round: int
    like: Weights
    node_ids: dict[int, str]  # Flower node id -> the site's node id in the roster
    uploads: int = 0

    @property
    def announcement(self) -> bytes:
        return self.aggregator.announcement

    def accept(self, node: int, upload: bytes | None) -> None:
        """A site's upload; the signed sender must be the member this Flower node enrolled as."""
        enrolled = self.node_ids.get(node)
        if enrolled is None:
            raise RecordError(f"node {node} is not in this round's roster")
        if upload is None:
            raise RecordError("the reply carries no secure-aggregation upload")
        try:
            self.aggregator.add_upload(upload, expected_sender=enrolled)
        except SecureAggregationError as exc:  # incl. an upload signed by a site other than this node's
            raise RecordError(f"upload rejected: {exc}") from None
        self.uploads += 1

    def finish(self, grid: Exchange, timeout: float) -> tuple[Weights, SecureAggInfo]:
        """The unmask stage; the mean update of the sites whose uploads are in the sum."""
        requests: dict[str, bytes] = self.aggregator.unmask_requests()
        flower_node = {node_id: node for node, node_id in self.node_ids.items()}
        messages = [
            Message(
                UnmaskOrder(request=request, server_round=self.server_round).to_content(),
                dst_node_id=flower_node[node_id],
                message_type=UNMASK_MESSAGE_TYPE,
                group_id=str(self.server_round),
                ttl=timeout,
            )
            for node_id, request in requests.items()
        ]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids are set when pushed
        unanswered: dict[str, str] = {}
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                unanswered[self.node_ids.get(node, str(node))] = read_error(reply.error).reason
                continue
            try:
                self.aggregator.add_unmask_reply(UnmaskReply.from_content(reply.content).reply)
            except Exception as exc:  # any bad reply is one site's failure, not the round's
                unanswered[self.node_ids.get(node, str(node))] = f"{type(exc).__name__}: {exc}"
        result = self.aggregator.result()  # NotEnoughSurvivors etc. end the round without an update
        info = SecureAggInfo(
            uploads=self.uploads,
            survivors=len(result.survivors),
            dropped=len(result.dropped),
            unmask_answers=len(result.answered),
            threshold=self.aggregator.threshold,
            unmask_failures=unanswered or None,
        )
        return unflatten(mean_of_sum(result.total, result.count), self.like), info
