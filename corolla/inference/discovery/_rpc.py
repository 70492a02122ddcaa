"""Kademlia requests (GET_PROVIDERS, GET_VALUE) to one peer, and record checks.

We speak the wire protocol ourselves instead of calling `KadDHT.get_value` /
`find_providers` because those answer from the local store whenever it holds anything
(`kad_dht.py` `get_value`, `provider_store.py` `find_providers`): a client that once
saw a record would keep serving it. Here nothing is cached, every answer comes from the
network, and every record is checked against its author's key.

Opening a stream (multistream-select negotiation) costs most of a request, so several
requests to one peer share one stream: py-libp2p's handler answers them in order.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Sequence

import trio
import varint
from libp2p.abc import IHost
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message, Record
from libp2p.kad_dht.utils import maybe_consume_signed_record
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.records.utils import verify_record
from libp2p.utils.varint import read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from corolla.inference.discovery._record import ServerRecord
from corolla.inference.discovery._validator import check_record
from corolla.inference.errors import DiscoveryError

MAX_RESPONSE_BYTES = 1 << 20
"""Largest DHT response we read; 20 providers + 20 peers with signed addresses is ~20 KB."""
ADDR_TTL_S = 600
"""How long peer addresses learned from responses stay in the peerstore."""
RETRY_DELAYS_S = (0.05, 0.15, 0.4)
"""Back-off before retrying a request the peer refused. py-libp2p resets inbound DHT
streams at once when 12 are being handled (`KadDHT._inbound_limiter`, whatever peers
they come from), so a busy peer is worth another try; a peer we cannot dial is not."""
PER_PEER_STREAMS = 4
"""Our requests in flight to one peer at a time, to stay well inside that limit of 12."""


class RpcError(Exception):
    """A peer gave no usable answer (reset, or a malformed response)."""


class DialError(RpcError):
    """We hold no connection to the peer and could not make one."""


class PeerSlots:
    """Caps our concurrent requests per peer; one per node, used on its trio thread."""

    def __init__(self, per_peer: int = PER_PEER_STREAMS) -> None:
        self._per_peer = per_peer
        self._slots: dict[ID, trio.Semaphore] = {}

    @contextlib.asynccontextmanager
    async def hold(self, peer: ID) -> AsyncIterator[None]:
        slot = self._slots.setdefault(peer, trio.Semaphore(self._per_peer))
        try:
            async with slot:
                yield
        finally:
            if slot.value == self._per_peer and not slot.statistics().tasks_waiting:
                self._slots.pop(peer, None)  # idle: forget the peer


ProviderAnswer = tuple[list[PeerInfo], list[ID]]
"""Providers a peer stores for a key, and the peers it knows closer to the key."""


async def get_providers(host: IHost, slots: PeerSlots, peer: ID, keys: Sequence[bytes]) -> dict[bytes, ProviderAnswer]:
    """Ask `peer`, on one stream, for the providers it stores for each of `keys`."""
    requests = [Message(type=Message.MessageType.GET_PROVIDERS, key=key) for key in keys]
    answers = {}
    for key, response in zip(keys, await _exchange(host, slots, peer, requests), strict=True):
        providers = [i for e in response.providerPeers if (i := _peer_info(host, e)) is not None]
        answers[key] = (providers, _closer_peers(host, response))
    return answers


async def get_record(host: IHost, slots: PeerSlots, peer: ID, key: bytes) -> tuple[Record | None, list[ID]]:
    """Ask `peer` for the raw record it stores under `key`, and for peers closer to `key`."""
    request = Message(type=Message.MessageType.GET_VALUE, key=key)
    (response,) = await _exchange(host, slots, peer, [request])
    record = response.record if response.HasField("record") and response.record.value else None
    return record, _closer_peers(host, response)


def verify_server_record(record: Record, key: str) -> ServerRecord:
    """The `ServerRecord` in a DHT record, if its author is the node it names.

    py-libp2p signs every PUT with the host key but verifies signatures only where it
    stores records, and lets unsigned ones through; we require the signature and bind
    the signer's peer id to the node id, so nobody can publish records for another node.
    """
    key_bytes = key.encode("utf-8")
    if record.key != key_bytes:
        raise DiscoveryError("DHT record key does not match the key asked for")
    if not record.signature or not record.author:
        raise DiscoveryError("DHT record is not signed")
    if not verify_record(record.signature, record.author, key_bytes, record.value):
        raise DiscoveryError("DHT record signature is invalid")
    server = check_record(key, record.value)
    try:
        author = ID.from_pubkey(deserialize_public_key(record.author)).to_base58()
    except Exception as exc:  # any undecodable key means an unusable record
        raise DiscoveryError(f"DHT record author key is malformed: {exc}") from None
    if author != server.node_id:
        raise DiscoveryError(f"record of node {server.node_id} signed by {author}")
    return server


async def _exchange(host: IHost, slots: PeerSlots, peer: ID, requests: list[Message]) -> list[Message]:
    """Send `requests` on one stream and read one response to each, retrying refusals."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            async with slots.hold(peer):
                return await _exchange_once(host, peer, requests)
        except DialError:
            raise
        except RpcError:
            if delay is None:
                raise
            await trio.sleep(delay * (1 + random.random()))
    raise AssertionError("unreachable")  # the loop returns or raises


async def _exchange_once(host: IHost, peer: ID, requests: list[Message]) -> list[Message]:
    sender_record = env_to_send_in_RPC(host)[0]
    payload = b""
    for request in requests:
        request.senderRecord = sender_record
        data = request.SerializeToString()
        payload += varint.encode(len(data)) + data
    connected = bool(host.get_network().get_connections(peer))
    try:
        stream = await host.new_stream(peer, [PROTOCOL_ID])
    except Exception as exc:  # py-libp2p raises many unrelated types here
        # On a live connection this is a busy peer resetting the stream mid-negotiation.
        error = RpcError if connected else DialError
        raise error(f"cannot open a DHT stream to {peer}: {exc!r}") from exc
    raws = []
    try:
        await stream.write(payload)
        for _ in requests:
            raws.append(await read_varint_prefixed_bytes_limited(stream, MAX_RESPONSE_BYTES))
    except Exception as exc:
        raise RpcError(f"DHT request to {peer} failed: {exc!r}") from exc
    finally:
        with contextlib.suppress(Exception):  # closing a reset stream can fail; nothing to do
            await stream.close()
    responses = []
    for request, raw in zip(requests, raws, strict=True):
        response = Message()
        try:
            response.ParseFromString(raw)
        except Exception as exc:
            raise RpcError(f"malformed DHT response from {peer}: {exc}") from exc
        if response.type != request.type or response.key != request.key:
            raise RpcError(f"DHT response from {peer} does not answer the request")
        if not maybe_consume_signed_record(response, host, peer):
            raise RpcError(f"invalid signed peer record from {peer}")
        responses.append(response)
    return responses


def _peer_info(host: IHost, entry: Message.Peer) -> PeerInfo | None:
    """Peer id and addresses of one response entry; addresses go to the peerstore."""
    if not entry.id or not maybe_consume_signed_record(entry, host):
        return None
    try:
        peer = ID(entry.id)
        addrs = [Multiaddr(a) for a in entry.addrs]
    except Exception:  # a malformed entry is skipped, the rest of the answer is usable
        return None
    if addrs and peer != host.get_id():
        host.get_peerstore().add_addrs(peer, addrs, ADDR_TTL_S)
    return PeerInfo(peer, addrs)


def _closer_peers(host: IHost, response: Message) -> list[ID]:
    own = host.get_id()
    peers = []
    for entry in response.closerPeers:
        info = _peer_info(host, entry)
        if info is not None and info.peer_id != own:
            peers.append(info.peer_id)
    return peers
