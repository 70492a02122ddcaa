"""The coordinator's side of a round: announce, collect uploads, request unmasking, sum.

    agg = Aggregator(run_id=..., round=..., members=[...], encoding=..., length=d,
                     coordinator=CoordinatorKeys(...), verifier=...)
    agg.announcement                    -> bytes for every member's train message
    agg.add_upload(upload)              for each upload that arrives (checked, summed at once)
    agg.unmask_requests()               -> {node id: request}: closes the upload phase
    agg.add_unmask_reply(reply)         for each reply that arrives
    agg.result()                        -> AggregateResult (float32 sum, survivors, ...)

Uploads are summed as they arrive (one uint32 accumulator; an upload's vector is not kept).
A site whose upload never comes is "dropped"; a survivor whose unmask reply never comes is
fine as long as t replies arrive. Every check failure raises a `SecureAggregationError`
naming the sender; the caller records it and goes on with the other sites.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from numpy.typing import NDArray

from corolla.secure_agg import _crypto, masking, shamir
from corolla.secure_agg.encoding import FixedPoint
from corolla.secure_agg.errors import (
    BadSignature,
    CryptoError,
    MalformedMessage,
    NotEnoughSurvivors,
    ReconstructionError,
    RejectedMessage,
    ReplayedMessage,
    RoundStateError,
    UntrustedMember,
)
from corolla.secure_agg.messages import (
    Kind,
    UnmaskReply,
    UnmaskRequest,
    UploadHeader,
    pack,
    parse,
    signing_input,
    unpack,
)
from corolla.secure_agg.roster import (
    CertificateVerifier,
    Member,
    VerifiedRound,
    check_threshold,
    make_announcement,
    read_announcement,
    secure_threshold,
)

MAX_SUBSETS = 1000  # t-subsets of the replies tried per self-mask seed when a share is wrong


@dataclass(frozen=True, slots=True)
class CoordinatorKeys:
    """The coordinator's identity: it signs announcements and unmask requests."""

    node_id: str
    identity_key: bytes = field(repr=False)  # 32-byte Ed25519 seed
    identity_cert: bytes  # DER identity certificate, role coordinator


@dataclass(frozen=True, slots=True)
class AggregateResult:
    total: NDArray[np.float32]  # (d,) sum of the survivors' updates, decoded
    ring_sum: NDArray[np.uint32]  # (d,) the exact ring sum of their encoded updates
    survivors: tuple[str, ...]  # sites whose updates are in the sum
    dropped: tuple[str, ...]  # roster members whose uploads did not arrive
    answered: tuple[str, ...]  # survivors whose unmask replies were used

    @property
    def count(self) -> int:
        return len(self.survivors)


class _Phase(Enum):
    UPLOAD = "upload"
    UNMASK = "unmask"
    DONE = "done"


@dataclass(slots=True)
class _Reply:
    self_shares: dict[int, int]  # owner index -> share
    seeds: dict[int, bytes]  # dropped index -> pairwise seed with the replier
    seed_shares: dict[tuple[int, int], int]  # (owner, dropped) -> share


class Aggregator:
    """One round of secure aggregation, coordinator side (see the module docstring)."""

    def __init__(
        self,
        *,
        run_id: str,
        round: int,
        members: Sequence[Member],
        encoding: FixedPoint,
        length: int,
        coordinator: CoordinatorKeys,
        verifier: CertificateVerifier,
        threshold: int | None = None,
    ) -> None:
        members = sorted(members, key=lambda m: m.node_id)
        n = len(members)
        threshold = secure_threshold(n) if threshold is None else threshold
        check_threshold(threshold, n)
        encoding.check_sites(n)
        self.announcement: bytes = make_announcement(
            run_id=run_id,
            round=round,
            members=members,
            threshold=threshold,
            encoding=encoding,
            length=length,
            coordinator_id=coordinator.node_id,
            coordinator_cert=coordinator.identity_cert,
            coordinator_key=coordinator.identity_key,
        )
        # The same checks every site makes, so that a roster the sites would refuse fails here.
        self._round: VerifiedRound = read_announcement(self.announcement, verifier)
        self._key = coordinator.identity_key
        self._ids = self._round.ids
        self._index = {node_id: k for k, node_id in enumerate(self._ids)}
        self._sum = np.zeros(length, dtype=np.uint32)
        self._uploads: dict[int, tuple[bytes, bytes]] = {}  # index -> (upload frame without payload, commitment)
        self._replies: dict[int, _Reply] = {}
        self._requests: dict[str, bytes] = {}
        self._result: AggregateResult | None = None
        self._phase = _Phase.UPLOAD

    # -- what the round is ----------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self._round.announcement.run_id

    @property
    def round(self) -> int:
        return self._round.announcement.round

    @property
    def threshold(self) -> int:
        return self._round.announcement.threshold

    @property
    def length(self) -> int:
        return self._round.announcement.length

    @property
    def digest(self) -> bytes:
        """SHA-256 of the announcement header: every message of the round carries it."""
        return self._round.digest

    @property
    def roster(self) -> tuple[str, ...]:
        return self._ids

    @property
    def survivors(self) -> tuple[str, ...]:
        """Members whose uploads were accepted so far, in roster order."""
        return tuple(self._ids[k] for k in sorted(self._uploads))

    @property
    def dropped(self) -> tuple[str, ...]:
        return tuple(i for k, i in enumerate(self._ids) if k not in self._uploads)

    # -- stage 1 --------------------------------------------------------------------------

    def add_upload(self, upload: bytes, *, expected_sender: str | None = None) -> str:
        """Check an upload and add its masked vector to the sum; the sender's node id.
        With `expected_sender` (who the transport says delivered it), an upload signed by
        anyone else is rejected before it counts, so the genuine one is not refused later."""
        self._expect(_Phase.UPLOAD, "add_upload")
        frame = unpack(upload, expect=Kind.UPLOAD)
        header = parse(UploadHeader, frame.header)
        if expected_sender is not None and header.sender != expected_sender:
            raise RejectedMessage(f"an upload from {header.sender} delivered as {expected_sender}'s")
        sender = self._member(header.sender)
        self._verify(sender, frame.signed_bytes, frame.signature, "upload")
        self._check_ids(header.run_id, header.round, header.digest, f"the upload of {header.sender}")
        if sender in self._uploads:
            raise ReplayedMessage(f"a second upload from {header.sender} in round {self.round}")
        d = self._sum.shape[0]
        if header.length != d or len(frame.payload) != 4 * d:
            raise MalformedMessage(
                f"the upload of {header.sender} holds {len(frame.payload) // 4} values; the round has {d}"
            )
        recipients = [b.recipient for b in header.boxes]
        if recipients != [i for i in self._ids if i != header.sender]:
            raise MalformedMessage(f"the upload of {header.sender} does not hold one share box per other member")
        # Hash and add chunk by chunk (in cache); take the addition back if the hash is wrong.
        vector = np.frombuffer(frame.payload, dtype="<u4")
        digest = _crypto.hasher()
        for start in range(0, d, masking.CHUNK_WORDS):
            chunk = vector[start : start + masking.CHUNK_WORDS]
            digest.update(chunk.data.cast("B"))
            part = self._sum[start : start + masking.CHUNK_WORDS]
            np.add(part, chunk, out=part)
        if not _crypto.equal(digest.digest(), header.vector_blake3):
            np.subtract(self._sum, vector, out=self._sum)
            raise BadSignature(f"the vector uploaded by {header.sender} is not the one it signed")
        self._uploads[sender] = (pack(Kind.UPLOAD, frame.header, frame.signature), header.commitment)
        return header.sender

    # -- stage 2 --------------------------------------------------------------------------

    def unmask_requests(self) -> dict[str, bytes]:
        """Close the upload phase; the signed unmask request for each survivor."""
        if self._phase is _Phase.UPLOAD:
            survivors = sorted(self._uploads)
            if len(survivors) < self.threshold:
                raise NotEnoughSurvivors(
                    f"round {self.round}: {len(survivors)} of {len(self._ids)} sites uploaded; "
                    f"the threshold is {self.threshold}"
                )
            self._phase = _Phase.UNMASK
            for k in survivors:
                header = UnmaskRequest(
                    run_id=self.run_id,
                    round=self.round,
                    digest=self._round.digest,
                    recipient=self._ids[k],
                    survivors=list(self.survivors),
                    dropped=list(self.dropped),
                    bundles=[self._uploads[j][0] for j in survivors if j != k],
                ).to_json()
                signature = _crypto.sign(self._key, signing_input(Kind.UNMASK_REQUEST, header))
                self._requests[self._ids[k]] = pack(Kind.UNMASK_REQUEST, header, signature)
        return dict(self._requests)

    def add_unmask_reply(self, reply: bytes) -> str:
        """Check a survivor's unmask reply and keep it; the sender's node id."""
        self._expect(_Phase.UNMASK, "add_unmask_reply")
        frame = unpack(reply, expect=Kind.UNMASK_REPLY)
        header = parse(UnmaskReply, frame.header)
        sender = self._member(header.sender)
        self._verify(sender, frame.signed_bytes, frame.signature, "unmask reply")
        self._check_ids(header.run_id, header.round, header.digest, f"the unmask reply of {header.sender}")
        if sender not in self._uploads:
            raise ReplayedMessage(f"{header.sender} answered an unmask request it was not sent (it did not upload)")
        if sender in self._replies:
            raise ReplayedMessage(f"a second unmask reply from {header.sender} in round {self.round}")
        survivors, dropped = sorted(self._uploads), [k for k in range(len(self._ids)) if k not in self._uploads]
        try:
            parsed = _Reply(
                self_shares={self._index[s.owner]: shamir.from_bytes(s.share) for s in header.self_shares},
                seeds={self._index[s.peer]: s.seed for s in header.seeds},
                seed_shares={
                    (self._index[s.owner], self._index[s.peer]): shamir.from_bytes(s.share) for s in header.seed_shares
                },
            )
        except (KeyError, ValueError):
            raise MalformedMessage(f"the unmask reply of {header.sender} names non-members or bad shares") from None
        wanted_pairs = {(j, q) for j in survivors if j != sender for q in dropped}
        if (
            sorted(parsed.self_shares) != survivors
            or len(parsed.self_shares) != len(header.self_shares)
            or sorted(parsed.seeds) != dropped
            or len(parsed.seeds) != len(header.seeds)
            or set(parsed.seed_shares) != wanted_pairs
            or len(parsed.seed_shares) != len(header.seed_shares)
        ):
            raise MalformedMessage(f"the unmask reply of {header.sender} does not answer the request it was sent")
        self._replies[sender] = parsed
        return header.sender

    def result(self) -> AggregateResult:
        """Remove the masks and decode: the survivors' sum. `NotEnoughSurvivors` if fewer
        than t survivors answered (ask again later: more replies may still come)."""
        if self._result is not None:
            return self._result
        self._expect(_Phase.UNMASK, "result")
        t = self.threshold
        if len(self._replies) < t:
            raise NotEnoughSurvivors(
                f"round {self.round}: {len(self._replies)} of {len(self._uploads)} survivors answered the unmask "
                f"request; the threshold is {t}"
            )
        survivors = sorted(self._uploads)
        dropped = [k for k in range(len(self._ids)) if k not in self._uploads]
        answered = sorted(self._replies)
        self_seeds = [self._self_seed(j, answered) for j in survivors]
        dropped_pairs = []
        for j in survivors:
            for q in dropped:
                if j in self._replies:
                    seed = self._replies[j].seeds[q]
                else:  # j uploaded, then went silent: rebuild s_jq from t others' shares
                    used = answered[:t]
                    rebuilt = _seed_bytes(shamir.combine([(r + 1, self._replies[r].seed_shares[(j, q)]) for r in used]))
                    if rebuilt is None:
                        raise ReconstructionError(
                            f"the pairwise seed of {self._ids[j]} and {self._ids[q]} rebuilt from the shares of "
                            f"{', '.join(self._ids[r] for r in used)} is not a seed"
                        )
                    seed = rebuilt
                dropped_pairs.append((j, q, seed))
        ring_sum = masking.unmask(
            self._sum, self_seeds=self_seeds, dropped_pairs=dropped_pairs, keystream=_crypto.keystream
        )
        total = self._round.encoding.decode_sum(ring_sum, summands=len(survivors))
        self._phase = _Phase.DONE
        self._result = AggregateResult(
            total=total,
            ring_sum=ring_sum,
            survivors=tuple(self._ids[k] for k in survivors),
            dropped=tuple(self._ids[k] for k in dropped),
            answered=tuple(self._ids[k] for k in sorted(self._replies)),
        )
        return self._result

    def _self_seed(self, j: int, answered: list[int]) -> bytes:
        """b_j from t of the replies' shares, checked against j's commitment. If a replier
        sent a wrong share, other t-subsets are tried (up to MAX_SUBSETS) when more than t
        replies came."""
        t = self.threshold
        for k, used in enumerate(itertools.combinations(answered, t)):
            if k == MAX_SUBSETS:
                break
            seed = _seed_bytes(shamir.combine([(r + 1, self._replies[r].self_shares[j]) for r in used]))
            commitment = _crypto.self_mask_commitment(
                seed or bytes(_crypto.KEY_BYTES), run_id=self.run_id, round=self.round, node_id=self._ids[j]
            )
            if seed is not None and _crypto.equal(commitment, self._uploads[j][1]):
                return seed
        raise ReconstructionError(
            f"no {t} of the shares of {', '.join(self._ids[r] for r in answered)} rebuild the self-mask seed "
            f"that {self._ids[j]} committed to: some site sent a wrong share"
        )

    # -- checks ---------------------------------------------------------------------------

    def _expect(self, phase: _Phase, what: str) -> None:
        if self._phase is not phase:
            raise RoundStateError(
                f"{what} is for the {phase.value} phase; the round is in the {self._phase.value} phase"
            )

    def _member(self, node_id: str) -> int:
        if node_id not in self._index:
            raise UntrustedMember(f"{node_id} is not a member of round {self.round}'s roster")
        return self._index[node_id]

    def _verify(self, sender: int, signed: bytes, signature: bytes, what: str) -> None:
        try:
            _crypto.verify(self._round.members[sender].signing_key, signed, signature)
        except CryptoError:
            raise BadSignature(f"the {what} claiming to come from {self._ids[sender]} is not signed by it") from None

    def _check_ids(self, run_id: str, round: int, digest: bytes, what: str) -> None:
        if run_id != self.run_id or round != self.round or not _crypto.equal(digest, self._round.digest):
            raise ReplayedMessage(
                f"{what} is for run {run_id} round {round} (or another roster); this is run {self.run_id} "
                f"round {self.round}"
            )


def _seed_bytes(value: int) -> bytes | None:
    """A rebuilt 256-bit seed, or None if the shares gave a value that is not one."""
    if value >= 2 ** (8 * _crypto.KEY_BYTES):
        return None
    return value.to_bytes(_crypto.KEY_BYTES, "big")
