"""Wire formats: a binary frame around a JSON header, and the pydantic models of the headers.

Every message is one frame:

    offset 0   b"CSA1"                        magic and format version
    4          kind                           1 byte: 1 announce, 2 upload, 3 unmask request, 4 unmask reply,
                                              5 enrolment
    5          header length h                4 bytes, big-endian
    9          header                         h bytes of UTF-8 JSON (one of the models below)
    9 + h      signature                      64 bytes, Ed25519 over PROTOCOL | kind | SHA-256(header)
    73 + h     payload                        uploads only: the masked vector, 4 bytes per
                                              parameter, little-endian uint32; its BLAKE3 hash
                                              is in the (signed) header

Bytes inside headers are standard base64 (RFC 4648, with padding). The masked vector is raw,
so an upload costs 4 bytes per parameter plus a header of about n * (n - 1) * 90 bytes
(the encrypted shares) for n sites. An unmask request forwards the survivors' signed upload
headers ("bundles": upload frames without payload) so that the recipient can check each
sender's signature on the share box addressed to it.

The site's round state (between its two messages) is a JSON object of its own, `RoundState`.

Everything read is validated (`parse`); validation errors never echo the input (shares and
boxes must not end up in logs).
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError

from corolla.secure_agg import _crypto
from corolla.secure_agg.errors import MalformedMessage

MAGIC = b"CSA1"
SIGNATURE_BYTES = 64
MAX_HEADER_BYTES = 64 * 2**20
MAX_SITES = 64  # all-pairs masking costs O(n) streams per site and O(n^2) share bytes per upload
MAX_LENGTH = 2**28  # parameters per vector (1 GiB uploads)
_PREFIX = struct.Struct(">4sBI")


class Kind(IntEnum):
    ANNOUNCE = 1  # coordinator -> sites, with the train message: the round's roster and parameters
    UPLOAD = 2  # site -> coordinator, with the training reply: masked vector and encrypted shares
    UNMASK_REQUEST = 3  # coordinator -> each survivor: survivors, dropped, the shares addressed to it
    UNMASK_REPLY = 4  # survivor -> coordinator: shares of survivors' self-masks, dropped pairs' seeds
    ENROL = 5  # site -> coordinator, once per run: proof that it holds the identity key it enrols with


# -- field types ------------------------------------------------------------------------------


def _b64decode(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError("not base64") from None
    raise ValueError("expected base64 text")


def _b64encode(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _length(n: int) -> AfterValidator:
    def check(value: bytes) -> bytes:
        if len(value) != n:
            raise ValueError(f"expected {n} bytes, got {len(value)}")
        return value

    return AfterValidator(check)


Bytes = Annotated[bytes, PlainValidator(_b64decode), PlainSerializer(_b64encode, return_type=str)]
Bytes32 = Annotated[Bytes, _length(32)]  # keys, seeds, digests, enrolment nonces
Share = Annotated[Bytes, _length(66)]  # an element of GF(2^521 - 1)
NodeId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
RunId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")]
Round = Annotated[int, Field(ge=0, lt=2**63)]
Length = Annotated[int, Field(ge=1, le=MAX_LENGTH)]
FlowerNodeId = Annotated[int, Field(ge=0, lt=2**64)]  # Flower's node ids are uint64


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


# -- headers ----------------------------------------------------------------------------------


class MemberCerts(_Model):
    node_id: NodeId
    identity_cert: Bytes  # DER, Ed25519 identity certificate (role site)
    agreement_cert: Bytes  # DER, X25519 key-agreement certificate


class Announcement(_Model):
    """The round: who takes part, with what parameters. Its SHA-256 (of the header bytes)
    is the round digest every later message carries."""

    version: Literal[1] = 1
    run_id: RunId
    round: Round
    threshold: int  # t: shares needed to rebuild a self-mask seed; unmask replies needed
    length: Length  # parameters per vector
    frac_bits: int  # fixed-point f
    clip: float  # fixed-point R
    coordinator_id: NodeId
    coordinator_cert: Bytes  # DER, Ed25519 identity certificate (role coordinator)
    members: list[MemberCerts] = Field(min_length=2, max_length=MAX_SITES)  # sorted by node id


class ShareBox(_Model):
    recipient: NodeId
    box: Bytes  # nonce | ChaCha20-Poly1305(shares for the recipient)


class UploadHeader(_Model):
    version: Literal[1] = 1
    run_id: RunId
    round: Round
    digest: Bytes32  # the round digest
    sender: NodeId
    length: Length
    vector_blake3: Bytes32  # BLAKE3 of the payload (the masked vector)
    commitment: Bytes32  # to the sender's self-mask seed
    boxes: list[ShareBox] = Field(max_length=MAX_SITES)  # one per other member, sorted by recipient


class UnmaskRequest(_Model):
    version: Literal[1] = 1
    run_id: RunId
    round: Round
    digest: Bytes32
    recipient: NodeId
    survivors: list[NodeId] = Field(max_length=MAX_SITES)  # S: sorted
    dropped: list[NodeId] = Field(max_length=MAX_SITES)  # D = roster - S: sorted
    bundles: list[Bytes] = Field(max_length=MAX_SITES)  # signed upload headers of S - {recipient}


class OwnerShare(_Model):
    owner: NodeId
    share: Share  # the replier's share of owner's self-mask seed


class PeerSeed(_Model):
    peer: NodeId
    seed: Bytes32  # the pairwise seed between the replier and a dropped peer


class PairShare(_Model):
    owner: NodeId
    peer: NodeId
    share: Share  # the replier's share of owner's pairwise seed with dropped peer


class UnmaskReply(_Model):
    version: Literal[1] = 1
    run_id: RunId
    round: Round
    digest: Bytes32
    sender: NodeId
    self_shares: list[OwnerShare] = Field(max_length=MAX_SITES)  # for every survivor, itself included
    seeds: list[PeerSeed] = Field(max_length=MAX_SITES)  # for every dropped member
    seed_shares: list[PairShare] = Field(max_length=MAX_SITES**2)  # for every (other survivor, dropped)


class Enrolment(_Model):
    """A site's answer to the coordinator's keys query, signed with its identity key: it
    holds the key of the identity certificate it sends, it answers this query (the nonce)
    of this run, from this Flower node, with these certificates (their SHA-256)."""

    version: Literal[1] = 1
    run_id: RunId
    nonce: Bytes32  # the coordinator's, fresh for every query
    flower_node: FlowerNodeId  # the Flower node id the site answers from (its SuperNode's)
    node_id: NodeId
    identity_cert_sha256: Bytes32
    agreement_cert_sha256: Bytes32


class MemberKeys(_Model):
    node_id: NodeId
    signing_key: Bytes32  # Ed25519 public key, from the verified identity certificate
    agreement_key: Bytes32  # X25519 public key, from the verified agreement certificate


class RoundState(_Model):
    """What a site keeps between its upload and its unmask reply (in its private store).
    No secret from which its input could be unmasked: only its own share of its self-mask
    seed (one share of t) and the round's verified public facts. Its pairwise seeds are
    derived again from its long-term agreement key."""

    version: Literal[1] = 1
    run_id: RunId
    round: Round
    digest: Bytes32
    node_id: NodeId
    threshold: int
    coordinator_key: Bytes32
    members: list[MemberKeys] = Field(min_length=2, max_length=MAX_SITES)
    own_share: Share


Header = TypeVar("Header", bound=_Model)


def parse(model: type[Header], data: bytes | memoryview) -> Header:
    """Validate JSON against `model`; `MalformedMessage` names the fields, never the input."""
    try:
        return model.model_validate_json(bytes(data))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)[:5]
        )
        raise MalformedMessage(f"invalid {model.__name__}: {problems}") from None


# -- frames -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    header: bytes
    signature: bytes
    payload: memoryview  # empty but for uploads

    @property
    def signed_bytes(self) -> bytes:
        return signing_input(self.kind, self.header)


def signing_input(kind: Kind, header: bytes) -> bytes:
    """What a sender's Ed25519 key signs: PROTOCOL | kind | SHA-256(header). Signing the
    header's digest, domain-separated by the protocol label and the kind, rather than the
    header itself spares Ed25519's two SHA-512 passes over large headers (an unmask request
    forwards every other survivor's upload header: about 100 KB for 10 sites)."""
    return _crypto.PROTOCOL + bytes([kind]) + _crypto.digest(header)


def pack(kind: Kind, header: bytes, signature: bytes, payload: bytes | memoryview = b"") -> bytes:
    if len(signature) != SIGNATURE_BYTES:
        raise ValueError(f"a signature is {SIGNATURE_BYTES} bytes")
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    return b"".join([_PREFIX.pack(MAGIC, kind, len(header)), header, signature, payload])


class FrameWriter:
    """One frame whose payload is written chunk by chunk before its header is final (an
    upload: its header holds the payload's hash). The header's length must be known first;
    an upload header's does not depend on its digests (fixed-size fields in base64).

    The frame is built in an `io.BytesIO` grown once to its final size, whose `getvalue()`
    hands over that buffer as the bytes object (CPython does not copy it): each chunk is
    copied once, from cache, and the site never holds the whole masked vector besides the
    frame (half the peak memory of the upload; no measurable change in time)."""

    def __init__(self, kind: Kind, *, header_length: int, payload_length: int) -> None:
        if not 0 <= header_length <= MAX_HEADER_BYTES or payload_length < 0:
            raise ValueError(f"header_length={header_length}, payload_length={payload_length} out of range")
        self._kind, self._header_length = kind, header_length
        self._end = _PREFIX.size + header_length + SIGNATURE_BYTES + payload_length
        self._buffer = io.BytesIO()
        self._buffer.seek(self._end - 1)
        self._buffer.write(b"\0")  # one allocation of the whole frame
        self._buffer.seek(self._end - payload_length)

    def write(self, chunk: memoryview) -> None:
        """Append `chunk`'s bytes to the payload."""
        if self._buffer.tell() + chunk.nbytes > self._end:
            raise ValueError("the payload is longer than announced")
        self._buffer.write(chunk)

    def finish(self, header: bytes, signature: bytes) -> bytes:
        """The frame, once the whole payload is written."""
        if self._buffer.tell() != self._end:
            raise ValueError("the payload is shorter than announced")
        if len(header) != self._header_length or len(signature) != SIGNATURE_BYTES:
            raise ValueError(f"expected a header of {self._header_length} bytes and a {SIGNATURE_BYTES}-byte signature")
        self._buffer.seek(0)
        self._buffer.write(b"".join([_PREFIX.pack(MAGIC, self._kind, len(header)), header, signature]))
        return self._buffer.getvalue()


def unpack(data: bytes | memoryview, *, expect: Kind) -> Frame:
    """The frame in `data`, which must be of kind `expect`; `MalformedMessage` otherwise."""
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX.size + SIGNATURE_BYTES:
        raise MalformedMessage(f"not a secure-aggregation message ({len(view)} bytes)")
    magic, kind, length = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise MalformedMessage("not a secure-aggregation message (bad magic or version)")
    if kind != expect:
        name = Kind(kind).name if kind in Kind._value2member_map_ else str(kind)
        raise MalformedMessage(f"expected a {expect.name.lower()} message, got kind {name}")
    end = _PREFIX.size + length
    if length > MAX_HEADER_BYTES or end + SIGNATURE_BYTES > len(view):
        raise MalformedMessage("truncated message")
    return Frame(
        kind=Kind(kind),
        header=bytes(view[_PREFIX.size : end]),
        signature=bytes(view[end : end + SIGNATURE_BYTES]),
        payload=view[end + SIGNATURE_BYTES :],
    )
