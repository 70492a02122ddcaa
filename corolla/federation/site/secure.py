"""A site's side of secure aggregation on Flower's Message API (docs/secure_aggregation.md).

- A keys query: the site answers with its certificates and its proof that it holds the
  identity key (signed over the query's nonce, its own run key and Flower node id, from its
  context, never from the message).
- A train message with an announcement: `check` it before training (so that a round the
  site would refuse costs no privacy budget), then `upload` the masked update for the round
  `check` returned (not read and checked a second time); the round secrets go to the
  site's store (`<store>/secagg/`) before anything is sent.
- An unmask message: answered once per round from the stored secrets.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from corolla import secure_agg
from corolla.errors import CorollaError
from corolla.federation.messages import KeysQuery, KeysReply, RecordError, UnmaskOrder, UnmaskReply
from corolla.federation.site.env import SiteEnv
from corolla.pki import NodeIdentity
from corolla.secure_agg.roster import verify_members

__all__ = ["STATE_DIR", "SecureSite", "SecureSiteError"]

_log = logging.getLogger(__name__)

STATE_DIR = "secagg"  # under a site's store: its round secrets between the two stages


class SecureSiteError(CorollaError):
    """The site cannot take part in secure aggregation (no identity, no store)."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class SecureSite:
    """A site's identity, keys and round store for one run, loaded once per message."""

    identity: NodeIdentity
    keys: secure_agg.SiteKeys
    store: secure_agg.RoundStateStore
    run_key: str  # from the site's own Flower context

    @classmethod
    def for_env(cls, env: SiteEnv, *, run_key: str) -> SecureSite:
        identity = env.identity
        if identity is None:
            raise SecureSiteError(
                "secure aggregation needs the site's identity: set node config 'workspace' and 'node' to its node "
                "directory in a consortium workspace"
            )
        keys = secure_agg.SiteKeys(
            node_id=identity.node_id,
            identity_key=identity.identity_key_raw(),
            agreement_key=identity.agreement_key_raw(),
        )
        return cls(
            identity=identity, keys=keys, store=secure_agg.RoundStateStore(env.store / STATE_DIR), run_key=run_key
        )

    def keys_reply(self, query: KeysQuery, *, flower_node: int) -> KeysReply:
        """This site's certificates and the proof that it holds their identity key."""
        if query.run_id != self.run_key:
            raise secure_agg.ReplayedMessage(
                f"the keys query is for run {query.run_id!r}; this site is in run {self.run_key}"
            )
        identity = self.identity
        proof = secure_agg.sign_enrolment(
            node_id=identity.node_id,
            identity_key=identity.identity_key_raw(),
            run_id=self.run_key,
            nonce=query.nonce,
            flower_node=flower_node,
            identity_cert=identity.identity_cert_der,
            agreement_cert=identity.agreement_cert_der,
        )
        return KeysReply(
            node_id=identity.node_id,
            identity_cert=identity.identity_cert_der,
            agreement_cert=identity.agreement_cert_der,
            proof=proof,
        )

    def check(
        self, announcement: bytes, weights: Mapping[str, np.ndarray], *, server_round: int
    ) -> secure_agg.VerifiedRound:
        """Refuse, before training, a round whose announcement the upload would refuse: bad
        signatures or certificates, another run, a roster without this site or with keys that
        are not its own, a threshold below this site's policy, another length than the
        weights, another round than the message's, or a round it has already uploaded for."""
        verified = secure_agg.check_announcement(
            announcement, self.keys, self.identity.verifier(), policy=secure_agg.SitePolicy(), run_id=self.run_key
        )
        ann = verified.announcement
        if ann.round != server_round:
            raise secure_agg.RefusedRequest(
                f"the announcement is for round {ann.round}; the message is for {server_round}"
            )
        size = sum(int(np.size(w)) for w in weights.values())
        if ann.length != size:
            raise secure_agg.RefusedRequest(
                f"the announcement is for {ann.length} values; the weights sent have {size}"
            )
        last = self.store.last_round(self.run_key)
        if last is not None and ann.round <= last:
            raise secure_agg.ReplayedMessage(
                f"this site already uploaded for round {last} of this run; it will not train for round {ann.round}"
            )
        return verified

    def upload(self, verified: secure_agg.VerifiedRound, update: np.ndarray) -> tuple[bytes, int]:
        """Stage 1: the masked upload of `update` (one float32 vector) for the round `check`
        returned; its round secrets are saved first. Returns the upload and how many values
        were clipped into the encoding's range."""
        if not np.all(np.isfinite(update)):
            raise RecordError("the site's update holds NaN or infinite values")
        # Training took a while: a member revoked since `check` must not get this site's shares.
        # The certificates are checked again against the CRL as it is now (the roster is not re-read).
        verify_members(verified.announcement.members, self.identity.verifier())
        result = secure_agg.upload_round(verified, update, self.keys)
        self.store.save(result.state)  # one upload per round: a replayed announcement is refused here
        if result.clipped:
            _log.warning(
                "round %d: %d update values were clipped into the encoding range", result.round, result.clipped
            )
        return result.upload, int(result.clipped)

    def unmask(self, order: UnmaskOrder) -> UnmaskReply:
        """Stage 2: this site's answer to the round's unmask request, once per round."""
        state = self.store.take(self.run_key, order.server_round)  # deleted as it is read: one answer per round
        return UnmaskReply(reply=secure_agg.site_unmask(order.request, state, self.keys))
