"""A site's two steps in a round: upload (with its training reply), then unmask (once).

Stage 1, `site_upload`: check the coordinator's announcement (every certificate against the
CA, the coordinator's signature, this site's own keys in the roster, a threshold the
site's `SitePolicy` accepts), encode the update, draw the self-mask seed b_i, derive the
pairwise seeds s_ij from the long-term X25519 key, secret-share b_i and every s_ij, seal
each other member's shares to it, and sign the upload: masked vector, share boxes,
commitment to b_i, the round digest.

Stage 2, `site_unmask`: answer the coordinator's unmask request once. Check that it is
signed by the announcing coordinator, for this run, round and roster, that this site is
among the survivors S, that S and the dropped set D split the roster, |S| >= t, and that
every other survivor's share box is signed by it. Reply (signed) with a share of b_j for
every j in S, the seed s_iq for every dropped q, and a share of s_jq for every other
survivor j and dropped q (so that survivors that upload and then go silent can still be
unmasked). Never both kinds of secret for one member: a member is in S or in D, and the
site answers one request per round, because the caller hands it a round state that
`RoundStateStore.take` has already deleted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from corolla.secure_agg import _crypto, masking, shamir
from corolla.secure_agg.errors import (
    BadSignature,
    CryptoError,
    EncodingError,
    MalformedMessage,
    ParameterError,
    RefusedRequest,
    ReplayedMessage,
    RoundStateError,
    UntrustedMember,
)
from corolla.secure_agg.messages import (
    FrameWriter,
    Kind,
    MemberKeys,
    OwnerShare,
    PairShare,
    PeerSeed,
    RoundState,
    ShareBox,
    UnmaskReply,
    UnmaskRequest,
    UploadHeader,
    pack,
    parse,
    signing_input,
    unpack,
)
from corolla.secure_agg.roster import CertificateVerifier, SitePolicy, VerifiedRound, read_announcement

RandomSource = _crypto.RandomSource


@dataclass(frozen=True, slots=True)
class SiteKeys:
    """A site's long-term secrets (from its node directory) and its node id."""

    node_id: str
    identity_key: bytes = field(repr=False)  # 32-byte Ed25519 seed: signs its messages
    agreement_key: bytes = field(repr=False)  # 32-byte X25519 private key: its pairwise secrets


@dataclass(frozen=True, slots=True)
class SiteUpload:
    upload: bytes = field(repr=False)  # goes to the coordinator with the training reply
    state: bytes = field(repr=False)  # stays on the site: `RoundStateStore.save` it before sending
    run_id: str
    round: int
    clipped: int  # update values outside [-R, R], clipped before encoding


def check_announcement(
    announcement: bytes,
    keys: SiteKeys,
    verifier: CertificateVerifier,
    *,
    policy: SitePolicy | None = None,
    run_id: str | None = None,
) -> VerifiedRound:
    """Every check `site_upload` makes of an announcement before it encodes anything:
    signatures and certificates, the run (if `run_id` is given), this site in the roster
    with its own keys, a threshold this site's `policy` accepts. A site calls it before it
    trains, so that a round it would refuse costs it nothing."""
    policy = SitePolicy() if policy is None else policy
    rnd = read_announcement(announcement, verifier)
    ann = rnd.announcement
    if run_id is not None and ann.run_id != run_id:
        raise ReplayedMessage(f"the announcement is for run {ann.run_id}; this site is in run {run_id}")
    ids = rnd.ids
    n = len(ids)
    if keys.node_id not in ids:
        raise RefusedRequest(f"this site ({keys.node_id}) is not in the announced roster of round {ann.round}")
    mine = rnd.members[ids.index(keys.node_id)]
    if not (
        _crypto.equal(mine.agreement_key, _crypto.x25519_public(keys.agreement_key))
        and _crypto.equal(mine.signing_key, _crypto.ed25519_public(keys.identity_key))
    ):
        raise UntrustedMember(f"the roster's keys for this site ({keys.node_id}) are not its own (substituted)")
    least = policy.min_threshold(n)
    if ann.threshold < least:
        raise RefusedRequest(
            f"threshold {ann.threshold} for {n} sites is below this site's minimum {least}: a coordinator lying "
            f"about dropouts could unmask a single site"
        )
    return rnd


def site_upload(
    announcement: bytes,
    update: ArrayLike,
    keys: SiteKeys,
    verifier: CertificateVerifier,
    *,
    policy: SitePolicy | None = None,
    run_id: str | None = None,
    random: RandomSource = os.urandom,
) -> SiteUpload:
    """Stage 1: the masked upload for `update` (a 1-D float vector of the announced length).

    `policy` defaults to `SitePolicy()`: thresholds safe against a lying coordinator.
    `run_id`, if given, is the run this site knows it is in (from its own context, not from
    the message): an announcement for another run is refused, so that the round store's
    one-upload-per-round rule cannot be sidestepped with fresh run ids."""
    rnd = check_announcement(announcement, keys, verifier, policy=policy, run_id=run_id)
    return upload_round(rnd, update, keys, random=random)


def upload_round(
    rnd: VerifiedRound, update: ArrayLike, keys: SiteKeys, *, random: RandomSource = os.urandom
) -> SiteUpload:
    """`site_upload` for an announcement this site has already checked (`check_announcement`
    before training): the round it returned is used as it is, not read and checked again."""
    ann = rnd.announcement
    encoding = rnd.encoding
    ids = rnd.ids
    me = ids.index(keys.node_id)
    values = _as_vector(update)
    if values.shape != (ann.length,):
        raise ParameterError(f"the update has {values.shape[0]} values; the round announced {ann.length}")

    agreement = _crypto.AgreementKey(keys.agreement_key)
    pairs = {
        j: agreement.pair_keys(m.agreement_key, run_id=ann.run_id, round=ann.round, me=ids[me], peer=m.node_id)
        for j, m in enumerate(rnd.members)
        if j != me
    }
    self_seed = random(_crypto.KEY_BYTES)
    if len(self_seed) != _crypto.KEY_BYTES:
        raise ParameterError("the random source returned too few bytes")
    boxes, own_share = _seal_shares(rnd, me, self_seed, pairs, random)

    # Encode, mask, hash and write into the frame chunk by chunk (in cache):
    # y_i = enc(x_i) + PRG(b_i) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij).
    commitment = _crypto.self_mask_commitment(self_seed, run_id=ann.run_id, round=ann.round, node_id=ids[me])

    def header(vector_blake3: bytes) -> bytes:
        return UploadHeader(
            run_id=ann.run_id,
            round=ann.round,
            digest=rnd.digest,
            sender=ids[me],
            length=ann.length,
            vector_blake3=vector_blake3,
            commitment=commitment,
            boxes=boxes,
        ).to_json()

    frame = FrameWriter(Kind.UPLOAD, header_length=len(header(bytes(32))), payload_length=4 * ann.length)
    digest = _crypto.hasher()
    clipped = 0

    def encode_chunk(start: int, chunk: NDArray[np.uint32]) -> None:
        nonlocal clipped
        clipped += encoding.encode_into(values[start : start + chunk.shape[0]], chunk)

    terms = [(1, self_seed)] + [(masking.pair_sign(me, j), pair.mask_seed) for j, pair in pairs.items()]
    for chunk in masking.masked_chunks(ann.length, terms, _crypto.keystream, source=encode_chunk):
        data = chunk.data.cast("B")  # little-endian uint32 (the keystream reader insists on it)
        digest.update(data)
        frame.write(data)
    signed = header(digest.digest())
    upload = frame.finish(signed, _crypto.sign(keys.identity_key, signing_input(Kind.UPLOAD, signed)))
    state = RoundState(
        run_id=ann.run_id,
        round=ann.round,
        digest=rnd.digest,
        node_id=ids[me],
        threshold=ann.threshold,
        coordinator_key=rnd.coordinator_key,
        members=[
            MemberKeys(node_id=m.node_id, signing_key=m.signing_key, agreement_key=m.agreement_key) for m in rnd.members
        ],
        own_share=own_share,
    )
    return SiteUpload(upload=upload, state=state.to_json(), run_id=ann.run_id, round=ann.round, clipped=clipped)


def site_unmask(request: bytes, state: bytes, keys: SiteKeys) -> bytes:
    """Stage 2: the signed unmask reply, or a `SecureAggregationError` (a refusal). Call it
    with the state `RoundStateStore.take` returned, so that the site answers once."""
    try:
        st = parse(RoundState, state)
    except MalformedMessage as exc:
        raise RoundStateError(f"the stored round state is unreadable: {exc}") from None
    if st.node_id != keys.node_id:
        raise RoundStateError(f"the round state belongs to {st.node_id}, not to this site ({keys.node_id})")
    frame = unpack(request, expect=Kind.UNMASK_REQUEST)
    try:
        _crypto.verify(st.coordinator_key, frame.signed_bytes, frame.signature)
    except CryptoError:
        raise BadSignature("the unmask request is not signed by the coordinator that announced the round") from None
    req = parse(UnmaskRequest, frame.header)
    if req.run_id != st.run_id or req.round != st.round or not _crypto.equal(req.digest, st.digest):
        raise ReplayedMessage(
            f"the unmask request is for run {req.run_id} round {req.round}; this site uploaded for run "
            f"{st.run_id} round {st.round} (or another roster)"
        )
    if req.recipient != st.node_id:
        raise ReplayedMessage(f"the unmask request is addressed to {req.recipient}, not to {st.node_id}")

    ids = [m.node_id for m in st.members]
    me = ids.index(st.node_id)
    survivors, dropped = _check_split(req.survivors, req.dropped, ids, me=st.node_id, threshold=st.threshold)

    # The shares each other survivor sealed to this site, from its signed upload header.
    agreement = _crypto.AgreementKey(keys.agreement_key)
    opened: dict[int, list[int]] = {}
    for bundle in req.bundles:
        sender, shares = _open_bundle(bundle, st, agreement, ids, me)
        if sender not in survivors or sender == me or sender in opened:
            raise RefusedRequest(f"the request forwards an unexpected or repeated upload from {ids[sender]}")
        opened[sender] = shares
    missing = sorted(set(survivors) - {me} - set(opened))
    if missing:
        names = ", ".join(ids[j] for j in missing)
        raise RefusedRequest(f"the request lists survivors whose signed uploads it does not forward: {names}")

    others = [k for k in range(len(ids)) if k != me]
    self_shares = [OwnerShare(owner=st.node_id, share=st.own_share)]
    self_shares += [OwnerShare(owner=ids[j], share=shamir.to_bytes(opened[j][0])) for j in survivors if j != me]
    self_shares.sort(key=lambda s: s.owner)
    seeds = []
    for q in dropped:
        peer = st.members[q]
        pair = agreement.pair_keys(peer.agreement_key, run_id=st.run_id, round=st.round, me=ids[me], peer=peer.node_id)
        seeds.append(PeerSeed(peer=peer.node_id, seed=pair.mask_seed))
    seed_shares = []
    for j in survivors:
        if j == me:
            continue
        # j's box holds, after its self-mask share, one share per member other than j and this site
        positions = [k for k in others if k != j]
        for q in dropped:
            share = opened[j][1 + positions.index(q)]
            seed_shares.append(PairShare(owner=ids[j], peer=ids[q], share=shamir.to_bytes(share)))
    header = UnmaskReply(
        run_id=st.run_id,
        round=st.round,
        digest=st.digest,
        sender=st.node_id,
        self_shares=self_shares,
        seeds=seeds,
        seed_shares=seed_shares,
    ).to_json()
    return pack(Kind.UNMASK_REPLY, header, _crypto.sign(keys.identity_key, signing_input(Kind.UNMASK_REPLY, header)))


def _seal_shares(
    rnd: VerifiedRound, me: int, self_seed: bytes, pairs: dict[int, _crypto.PairKeys], random: RandomSource
) -> tuple[list[ShareBox], bytes]:
    """Shamir-share b_i and every s_iq (threshold t, share k at x = k + 1) and seal, for each
    other member h, its share of b_i then its shares of s_iq for q not in {i, h}, in roster
    order. Also this site's own share of b_i (kept in its round state)."""
    ann, ids = rnd.announcement, rnd.ids
    xs = [k + 1 for k in range(len(ids))]
    self_shares = shamir.split(_int(self_seed), threshold=ann.threshold, xs=xs, random=random)
    seed_shares = {
        q: shamir.split(_int(pair.mask_seed), threshold=ann.threshold, xs=xs, random=random)
        for q, pair in pairs.items()
    }
    boxes = []
    for h, pair in pairs.items():
        plaintext = shamir.to_bytes(self_shares[h]) + b"".join(
            shamir.to_bytes(seed_shares[q][h]) for q in sorted(pairs) if q != h
        )
        aad = box_aad(ann.run_id, ann.round, rnd.digest, sender=ids[me], recipient=ids[h])
        boxes.append(ShareBox(recipient=ids[h], box=_crypto.seal(pair.send_key, plaintext, aad, random)))
    return boxes, shamir.to_bytes(self_shares[me])


def box_aad(run_id: str, round: int, digest: bytes, *, sender: str, recipient: str) -> bytes:
    """What a share box is bound to: run, round, roster (digest), sender and recipient."""
    return _crypto.kdf_info("box", run_id=run_id, round=round, ids=(digest.hex(), sender, recipient))


def _check_split(
    survivors: list[str], dropped: list[str], ids: list[str], *, me: str, threshold: int
) -> tuple[list[int], list[int]]:
    """Indices of S and D after the checks that keep a survivor's two kinds of secret apart."""
    if survivors != sorted(set(survivors)) or dropped != sorted(set(dropped)):
        raise RefusedRequest("the survivor and dropped lists must be sorted and free of repeats")
    if set(survivors) & set(dropped):
        both = ", ".join(sorted(set(survivors) & set(dropped)))
        raise RefusedRequest(f"the request lists {both} both as survivor and as dropped")
    if set(survivors) | set(dropped) != set(ids) or len(survivors) + len(dropped) != len(ids):
        raise RefusedRequest("survivors and dropped sites do not make up the round's roster")
    if me not in survivors:
        raise RefusedRequest(f"this site ({me}) is not listed among the survivors")
    if len(survivors) < threshold:
        raise RefusedRequest(f"{len(survivors)} survivors is below the threshold {threshold}")
    return [ids.index(s) for s in survivors], [ids.index(d) for d in dropped]


def _open_bundle(
    bundle: bytes, st: RoundState, agreement: _crypto.AgreementKey, ids: list[str], me: int
) -> tuple[int, list[int]]:
    """(sender index, [share of its b, shares of its seeds...]) from a forwarded upload header."""
    frame = unpack(bundle, expect=Kind.UPLOAD)
    header = parse(UploadHeader, frame.header)
    if header.sender not in ids:
        raise UntrustedMember(f"a forwarded upload comes from {header.sender}, who is not in the roster")
    sender = ids.index(header.sender)
    member = st.members[sender]
    try:
        _crypto.verify(member.signing_key, frame.signed_bytes, frame.signature)
    except CryptoError:
        raise BadSignature(f"the forwarded upload of {header.sender} is not signed by it") from None
    if header.run_id != st.run_id or header.round != st.round or not _crypto.equal(header.digest, st.digest):
        raise ReplayedMessage(f"the forwarded upload of {header.sender} is from another run, round or roster")
    boxes = [b for b in header.boxes if b.recipient == st.node_id]
    if len(boxes) != 1:
        raise MalformedMessage(f"the upload of {header.sender} holds {len(boxes)} share boxes for this site")
    key = agreement.receive_key(member.agreement_key, run_id=st.run_id, round=st.round, me=ids[me], peer=header.sender)
    aad = box_aad(st.run_id, st.round, st.digest, sender=header.sender, recipient=st.node_id)
    try:
        plaintext = _crypto.open_box(key, boxes[0].box, aad)
    except CryptoError:
        raise BadSignature(f"the share box {header.sender} sealed to this site does not open") from None
    count = len(ids) - 1  # its self-mask share, then one share per member other than the sender and this site
    if len(plaintext) != count * shamir.SHARE_BYTES:
        raise MalformedMessage(f"the share box of {header.sender} holds {len(plaintext)} bytes")
    try:
        shares = [
            shamir.from_bytes(plaintext[k * shamir.SHARE_BYTES : (k + 1) * shamir.SHARE_BYTES]) for k in range(count)
        ]
    except ValueError:
        raise MalformedMessage(f"the share box of {header.sender} holds a value outside the field") from None
    return sender, shares


def _as_vector(update: ArrayLike) -> NDArray[np.float32]:
    x = np.asarray(update)
    if x.ndim != 1:
        raise EncodingError(f"the update must be a 1-D vector, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise EncodingError(f"the update must hold floating-point values, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _int(secret: bytes) -> int:
    return int.from_bytes(secret, "big")
