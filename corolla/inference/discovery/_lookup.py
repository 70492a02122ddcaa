"""Iterative Kademlia lookup of several keys at once.

py-libp2p's own lookups cannot be reused for provider and record reads (they answer
from the local store first, see `_rpc.py`), so this is the classic algorithm: ask the
peers closest to each key, learn closer peers from the answers, and stop when the `K`
closest peers known for every key have been asked. It walks several keys together so
that one stream to a peer carries all the keys that peer is close to (in a small swarm,
every key is close to every peer), with at most `ALPHA` peers asked at a time.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.common import ALPHA, BUCKET_SIZE
from libp2p.kad_dht.routing_table import RoutingTable
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID

from corolla.inference.discovery._rpc import DialError, RpcError

K = BUCKET_SIZE
"""How many of the closest peers a lookup asks (Kademlia's k; records live on these)."""

Query = Callable[[ID, list[bytes]], Awaitable[dict[bytes, list[ID]]]]
"""Ask one peer about some keys; return the closer peers it named per key, or raise
`RpcError`. The caller's closure collects whatever else the answers hold."""


async def walk(
    host: IHost, routing_table: RoutingTable, keys: Sequence[bytes], query: Query, rpc_timeout: float
) -> None:
    """Run `query` on the `K` closest peers we can find for each of `keys`.

    A peer that fails or exceeds `rpc_timeout` is skipped. Connected peers seed the
    search too, so a node whose routing table is still empty right after joining can
    look things up.
    """
    own = host.get_id()
    seeds = set(host.get_connected_peers())
    candidates = {key: (set(routing_table.find_local_closest_peers(key, K)) | seeds) - {own} for key in keys}
    asked: dict[bytes, set[ID]] = {key: set() for key in keys}
    busy: set[ID] = set()
    send, receive = trio.open_memory_channel[tuple[ID, dict[bytes, list[ID]]]](math.inf)

    async def ask(peer: ID, peer_keys: list[bytes]) -> None:
        closer: dict[bytes, list[ID]] = {}
        with trio.move_on_after(rpc_timeout):
            try:
                closer = await query(peer, peer_keys)
            except DialError:
                # As py-libp2p's own lookups do: stop routing through a dead peer.
                routing_table.remove_peer(peer)
            except RpcError:
                pass
        send.send_nowait((peer, closer))

    async with trio.open_nursery() as nursery:
        while True:
            wanted: dict[ID, list[bytes]] = {}
            for key in keys:
                for peer in sort_peer_ids_by_distance(key, list(candidates[key]))[:K]:
                    if peer not in asked[key] and peer not in busy:
                        wanted.setdefault(peer, []).append(key)
            for peer, peer_keys in wanted.items():
                if len(busy) >= ALPHA:
                    break
                busy.add(peer)
                for key in peer_keys:
                    asked[key].add(peer)
                nursery.start_soon(ask, peer, peer_keys)
            if not busy:
                return
            peer, closer = await receive.receive()
            busy.discard(peer)
            for key, peers in closer.items():
                if key in candidates:
                    candidates[key].update(p for p in peers if p != own)
