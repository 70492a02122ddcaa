"""Secure aggregation on Flower's Message API: what `run_rounds` and the ClientApp add to
their messages so that the coordinator learns only the sum of the sites' updates.

The protocol is `corolla.secure_agg` (docs/secure_aggregation.md); this module carries it.
Besides the messages of `records.py`:

- once per run and node, a `query` message `{"secagg": {"ask": "keys", "run-id": str,
  "nonce": bytes}}` (a fresh 32-byte nonce per query); the site answers `{"secagg":
  {"node-id", "identity-cert", "agreement-cert", "proof"}}`: DER certificates, which the
  coordinator checks against the consortium CA and the announcement shows every site, and
  the proof that it holds the identity key (`corolla.secure_agg.sign_enrolment`: the run,
  the nonce, the Flower node it answers from and the certificates' digests, signed);
- the train message gains `{"secagg": {"announcement": bytes}}` (the round's signed roster,
  threshold and encoding); the site replies with `{"secagg": {"upload": bytes}}` (its
  masked, fixed-point update, 4 bytes per parameter) instead of `"update"`, and keeps the
  secrets it needs later in its own store (`<store>/secagg/`), never in a message;
- a `train.secagg_unmask` message to the sites whose uploads arrived, `{"secagg":
  {"request": bytes}}`; each answers once per round `{"secagg": {"reply": bytes}}`.

Two message stages per round, the first riding on training. Updates travel as one float32
vector: the arrays in sorted name order, flattened (`flatten` / `unflatten`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from corolla.errors import CorollaError
from corolla.federation.messages import (
    ROUND,
    SERVER_ROUND,
    RecordError,
    Weights,
    read_error,
    run_key,
)

_log = logging.getLogger(__name__)

SECAGG = "secagg"  # the ConfigRecord every secure-aggregation message carries
UNMASK_ACTION = "secagg_unmask"  # ClientApp action: message type "train.secagg_unmask"
UNMASK_MESSAGE_TYPE = f"{MessageType.TRAIN}.{UNMASK_ACTION}"
STATE_DIR = "secagg"  # under a site's store: its round secrets between the two stages


def flatten(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """The arrays in sorted name order as one float32 vector (what the protocol masks)."""
    return np.concatenate([np.asarray(weights[name], dtype=np.float32).ravel() for name in sorted(weights)])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> Weights:
    """`flatten`'s inverse, shaped like `like`."""
    size = sum(int(np.size(like[n])) for n in like)
    if vector.shape != (size,):
        raise RecordError(f"the aggregate has shape {vector.shape}; the weights have {size} values")
    out: Weights = {}
    at = 0
    for name in sorted(like):
        size = int(np.size(like[name]))
        out[name] = vector[at : at + size].reshape(np.shape(like[name])).astype(np.float32)
        at += size
    return out


def _bytes(record: Any, key: str) -> bytes:
    """`record[key]` when `record` is a ConfigRecord holding bytes there."""
    if not isinstance(record, ConfigRecord):
        raise RecordError(f"expected a ConfigRecord {SECAGG!r}, got {type(record).__name__}")
    value = record.get(key)
    if not isinstance(value, bytes):
        raise RecordError(f"the {SECAGG!r} record lacks bytes {key!r}")
    return value


# --- coordinator ---------------------------------------------------------------------------


@dataclass
class SecureRounds:
    """The coordinator's side over a run: who the sites are (their certified keys) and one
    `corolla.secure_agg.Aggregator` per round."""

    run_key: str  # the run id every site files its state under (`client.run_key`)
    keys: Any  # corolla.secure_agg.CoordinatorKeys
    verifier: Any  # the coordinator's `Verifier` (consortium CA + CRL)
    clip: float  # encoding range: update values outside [-clip, clip] are clipped by the sites
    members: dict[int, Any] = field(default_factory=dict)  # Flower node id -> secure_agg.Member
    random: Callable[[int], bytes] = field(default=os.urandom, repr=False)  # the keys queries' nonces

    @classmethod
    def for_node(cls, node_dir: Path, *, run_key: str, clip: float) -> SecureRounds:
        """The coordinator whose identity is in `node_dir` (`<workspace>/nodes/<name>`)."""
        from corolla.pki import NodeIdentity
        from corolla.secure_agg import CoordinatorKeys

        identity = NodeIdentity.load(node_dir)
        keys = CoordinatorKeys(
            node_id=identity.node_id, identity_key=identity.identity_key_raw(), identity_cert=identity.identity_cert_der
        )
        return cls(run_key=run_key, keys=keys, verifier=identity.verifier(), clip=clip)

    def enroll(self, grid: Grid, nodes: list[int], timeout: float) -> dict[int, dict[str, Any]]:
        """Ask nodes not yet known for their certificates, each with a fresh nonce; enrol those
        whose certificates hold and whose signed reply proves they hold the identity key (for
        this run, this query and the Flower node asked). The outcomes of those that fail."""
        from corolla.secure_agg import Member, check_enrolment, new_nonce

        new = [n for n in nodes if n not in self.members]
        if not new:
            return {}
        nonces = {n: new_nonce(self.random) for n in new}
        messages = [
            Message(
                RecordDict({SECAGG: ConfigRecord({"ask": "keys", "run-id": self.run_key, "nonce": nonces[n]})}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
                ttl=timeout,
            )
            for n in new
        ]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids are set when pushed
        outcomes: dict[int, dict[str, Any]] = {}
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if node not in new or node in self.members or node in outcomes:
                continue
            if reply.has_error():
                error = read_error(reply.error)
                outcomes[node] = {"status": error.outcome, "reason": f"secure-aggregation keys: {error.reason}"}
                continue
            try:
                record = reply.content[SECAGG]
                node_id = record.get("node-id")
                if not isinstance(node_id, str):
                    raise RecordError("the keys reply lacks its node id")
                member = Member(
                    node_id=node_id,
                    identity_cert=_bytes(record, "identity-cert"),
                    agreement_cert=_bytes(record, "agreement-cert"),
                )
                # The node proves it holds the key of these certificates, for this query from this node.
                check_enrolment(
                    _bytes(record, "proof"),
                    member,
                    self.verifier,
                    run_id=self.run_key,
                    nonce=nonces[node],
                    flower_node=node,
                )
            except (CorollaError, KeyError, ValueError) as exc:
                outcomes[node] = {"status": "failed", "reason": f"secure-aggregation keys refused: {exc}"}
                _log.warning("node %d left out of secure aggregation: keys refused: %s", node, exc)
                continue
            if any(m.node_id == member.node_id for m in self.members.values()):
                outcomes[node] = {"status": "failed", "reason": f"node id {member.node_id} already in the run"}
                _log.warning(
                    "node %d left out of secure aggregation: node id %s already in the run", node, member.node_id
                )
                continue
            self.members[node] = member
        for node in new:
            if node not in self.members and node not in outcomes:
                outcomes[node] = {"status": "missing", "reason": f"no keys reply within {timeout:.0f} s"}
        return outcomes

    def prune(self, nodes: list[int]) -> dict[int, dict[str, Any]]:
        """Check the enrolled certificates again (the CRL is re-read as it changes): a site
        revoked or expired since it enrolled leaves the run instead of failing every round."""
        from corolla.secure_agg.roster import verify_member

        dropped: dict[int, dict[str, Any]] = {}
        for node in nodes:
            member = self.members.get(node)
            if member is None:
                continue
            try:
                verify_member(member, self.verifier, named="site")  # what every site checks when it reads the roster
            except CorollaError as exc:
                del self.members[node]
                dropped[node] = {"status": "failed", "reason": f"left the run: its certificate no longer holds: {exc}"}
        return dropped

    def round(self, nodes: list[int], server_round: int, weights: Mapping[str, np.ndarray]) -> SecureRound:
        """The round's aggregator over `nodes` (all enrolled)."""
        from corolla.secure_agg import Aggregator, FixedPoint

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
            like=dict(weights),
            node_ids={n: self.members[n].node_id for n in nodes},
        )


@dataclass
class SecureRound:
    """One round, coordinator side: the announcement out, uploads in, then the unmask stage."""

    aggregator: Any  # corolla.secure_agg.Aggregator
    server_round: int
    like: Weights
    node_ids: dict[int, str]  # Flower node id -> the site's node id in the roster
    uploads: int = 0

    def train_records(self) -> dict[str, ConfigRecord]:
        return {SECAGG: ConfigRecord({"announcement": self.aggregator.announcement})}

    def accept(self, node: int, content: RecordDict) -> None:
        """A site's upload; the signed sender must be the member this Flower node enrolled as."""
        from corolla.secure_agg import SecureAggregationError

        enrolled = self.node_ids.get(node)
        if enrolled is None:
            raise RecordError(f"node {node} is not in this round's roster")
        try:
            self.aggregator.add_upload(_bytes(content[SECAGG], "upload"), expected_sender=enrolled)
        except KeyError:
            raise RecordError("the reply carries no secure-aggregation upload") from None
        except SecureAggregationError as exc:  # incl. an upload signed by a site other than this node's
            raise RecordError(f"upload rejected: {exc}") from None
        self.uploads += 1

    def finish(self, grid: Grid, timeout: float) -> tuple[Weights, dict[str, Any]]:
        """The unmask stage; the mean update of the sites whose uploads are in the sum."""
        requests: dict[str, bytes] = self.aggregator.unmask_requests()
        flower_node = {node_id: node for node, node_id in self.node_ids.items()}
        messages = [
            Message(
                RecordDict(
                    {
                        SECAGG: ConfigRecord({"request": request}),
                        ROUND: ConfigRecord({SERVER_ROUND: self.server_round}),
                    }
                ),
                dst_node_id=flower_node[node_id],
                message_type=UNMASK_MESSAGE_TYPE,
                group_id=str(self.server_round),
                ttl=timeout,
            )
            for node_id, request in requests.items()
        ]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids are set when pushed
        unanswered = {}
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                unanswered[self.node_ids.get(node, str(node))] = read_error(reply.error).reason
                continue
            try:
                self.aggregator.add_unmask_reply(_bytes(reply.content[SECAGG], "reply"))
            except Exception as exc:  # any bad reply is one site's failure, not the round's
                unanswered[self.node_ids.get(node, str(node))] = f"{type(exc).__name__}: {exc}"
        result = self.aggregator.result()  # NotEnoughSurvivors etc. end the round without an update
        mean = result.total.astype(np.float64) / result.count
        info = {
            "survivors": len(result.survivors),
            "dropped": len(result.dropped),
            "unmask_answers": len(result.answered),
            "threshold": self.aggregator.threshold,
        }
        if unanswered:
            info["unmask_failures"] = unanswered
        return unflatten(mean.astype(np.float32), self.like), info


# --- site ----------------------------------------------------------------------------------


def _site_identity(context: Context) -> Any:
    """The site's `NodeIdentity` (node config `workspace` and `node`): its signing key, its
    key-agreement key and the CA it checks the roster against."""
    from corolla.pki import NodeIdentity

    workspace, node = context.node_config.get("workspace"), context.node_config.get("node")
    if not isinstance(workspace, str) or not workspace or not isinstance(node, str) or not node:
        raise SecureSiteError(
            "secure aggregation needs the site's identity: set node config 'workspace' and 'node' to its node "
            "directory in a consortium workspace"
        )
    return NodeIdentity.load(Path(workspace).expanduser() / "nodes" / node)


def _site_keys(identity: Any) -> Any:
    from corolla.secure_agg import SiteKeys

    return SiteKeys(
        node_id=identity.node_id, identity_key=identity.identity_key_raw(), agreement_key=identity.agreement_key_raw()
    )


def _store(context: Context) -> Any:
    from corolla.secure_agg import RoundStateStore

    store = context.node_config.get("store")
    if not isinstance(store, str) or not store:
        raise SecureSiteError("node config 'store' is empty: secure aggregation keeps the site's round secrets there")
    return RoundStateStore(Path(store).expanduser() / STATE_DIR)


class SecureSiteError(CorollaError):
    """The site cannot take part in secure aggregation (no identity, no store)."""

    exit_code = 2


def keys_reply(msg: Message, context: Context) -> Message:
    """The answer to the coordinator's keys query: this site's certificates, and the proof
    that it holds their identity key, signed over the query's nonce, this site's own run key
    and Flower node id (from its Flower context, not from the message) and the certificates."""
    from corolla.secure_agg import ReplayedMessage, sign_enrolment

    query = msg.content.config_records.get(SECAGG, ConfigRecord())
    if query.get("ask") != "keys":
        raise RecordError("unknown query: this site answers only the secure-aggregation keys query")
    nonce = query.get("nonce")
    if not isinstance(nonce, bytes):
        raise RecordError("the keys query carries no nonce: this site signs its keys only over a fresh one")
    run_id = run_key(context)
    if query.get("run-id") != run_id:
        raise ReplayedMessage(f"the keys query is for run {query.get('run-id')!r}; this site is in run {run_id}")
    identity = _site_identity(context)
    identity_cert, agreement_cert = identity.identity_cert_der, identity.agreement_cert_der
    proof = sign_enrolment(
        node_id=identity.node_id,
        identity_key=identity.identity_key_raw(),
        run_id=run_id,
        nonce=nonce,
        flower_node=int(context.node_id),
        identity_cert=identity_cert,
        agreement_cert=agreement_cert,
    )
    record = ConfigRecord(
        {"node-id": identity.node_id, "identity-cert": identity_cert, "agreement-cert": agreement_cert, "proof": proof}
    )
    return Message(RecordDict({SECAGG: record}), reply_to=msg)


def check_announcement(content: RecordDict, context: Context, weights: Mapping[str, np.ndarray]) -> None:
    """Refuse, before training (so that no privacy budget is spent on it), a round whose
    announcement `masked_upload` would refuse: bad signatures or certificates, another run,
    a roster without this site or with keys that are not its own, a threshold below this
    site's policy, another length than the weights, or a round it has already uploaded for."""
    from corolla.secure_agg import RefusedRequest, ReplayedMessage, SitePolicy
    from corolla.secure_agg import check_announcement as check

    identity = _site_identity(context)
    announced = check(
        _bytes(content[SECAGG], "announcement"),
        _site_keys(identity),
        identity.verifier(),
        policy=SitePolicy(),
        run_id=run_key(context),
    )
    ann = announced.announcement
    size = sum(int(np.size(w)) for w in weights.values())
    if ann.length != size:
        raise RefusedRequest(f"the announcement is for {ann.length} values; the weights sent have {size}")
    last = _store(context).last_round(run_key(context))
    if last is not None and ann.round <= last:
        raise ReplayedMessage(
            f"this site already uploaded for round {last} of this run; it will not train for round {ann.round}"
        )


def masked_upload(content: RecordDict, context: Context, update: np.ndarray) -> tuple[ConfigRecord, int]:
    """Stage 1: this site's masked update for the round announced in `content`; its round
    secrets go to the site's store before anything is sent. Returns the record and how many
    values were clipped into the encoding's range."""
    from corolla.secure_agg import SitePolicy, site_upload

    if not np.all(np.isfinite(update)):
        raise RecordError("the site's update holds NaN or infinite values")
    identity = _site_identity(context)
    result = site_upload(
        _bytes(content[SECAGG], "announcement"),
        update,
        _site_keys(identity),
        identity.verifier(),
        policy=SitePolicy(),  # thresholds safe against a coordinator lying about dropouts
        run_id=run_key(context),
    )
    _store(context).save(result.state)  # one upload per round: a replayed announcement is refused here
    if result.clipped:
        _log.warning("round %d: %d update values were clipped into the encoding range", result.round, result.clipped)
    return ConfigRecord({"upload": result.upload}), int(result.clipped)


def unmask_reply(msg: Message, context: Context) -> Message:
    """Stage 2: this site's answer to the round's unmask request, once per round."""
    from corolla.secure_agg import site_unmask

    try:
        request = _bytes(msg.content[SECAGG], "request")
        server_round = int(msg.content[ROUND][SERVER_ROUND])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"malformed unmask message: {type(exc).__name__}: {exc}") from None
    state = _store(context).take(run_key(context), server_round)  # deleted as it is read: one answer per round
    reply = site_unmask(request, state, _site_keys(_site_identity(context)))
    return Message(RecordDict({SECAGG: ConfigRecord({"reply": reply})}), reply_to=msg)


def rounds_for(config: Any, context: Context) -> SecureRounds | None:
    """The coordinator's `SecureRounds` for a run (None with `--no-secure-agg`)."""
    if not config.secure_agg:
        return None
    if not config.workspace or not config.node:
        raise SecureSiteError(
            "secure aggregation needs the coordinator's identity: give the run config a workspace and node "
            "(or run with --no-secure-agg)"
        )
    return SecureRounds.for_node(
        Path(config.workspace) / "nodes" / config.node, run_key=run_key(context), clip=config.secure_agg_clip
    )
