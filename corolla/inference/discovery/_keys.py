"""DHT keys for server records and for the per-model provider index. Pure functions.

Storage scheme (the protocol is in `_node.py`):

* Each server stores its own record under a per-node value key derived from
  (model id, node id). Servers never overwrite one another, and py-libp2p's value
  validator can keep the newest `updated_at` per key. The key is a hash, because
  py-libp2p's FIND_NODE handler ignores lookups for keys over 50 bytes that are not
  multihashes (`kad_dht.py`, "FIND_NODE key is not a valid PeerId"), which silently
  breaks `put_value` replication for longer keys.
* A client cannot enumerate value keys, so each server also *provides* a per-model
  content key. py-libp2p keeps at most 20 providers per key on each storing peer, for
  48 hours, with no way to withdraw one; so the key also carries a time window (a dead
  server stays listed for at most about one window) and a shard derived from the peer
  id (about 20 live servers fit per shard).
"""

from __future__ import annotations

import hashlib

NAMESPACE = "corolla"
"""Value-key namespace; py-libp2p picks the validator of `/corolla/...` keys by it."""
PROVIDER_WINDOW_S = 300.0
"""Length of a provider window; clients read only the current one."""
PREPROVIDE_S = 60.0
"""Servers also provide the next window this long before it starts, so that it is
populated when clients move to it (covers keeper period and clock skew)."""
PROVIDER_SHARDS = 4
"""Provider keys per model and window; about 20 servers fit in each."""

_KEY_HASH_BYTES = 16  # 128 bits: collision-free in practice, keeps keys under 50 bytes
_SHA2_256_MULTIHASH_PREFIX = b"\x12\x20"


def record_key(model_id: str, node_id: str) -> str:
    """Value key under which `node_id` stores its record for `model_id`."""
    digest = hashlib.sha256(f"{model_id}\0{node_id}".encode()).digest()[:_KEY_HASH_BYTES]
    return f"/{NAMESPACE}/{digest.hex()}"


def window_of(now: float) -> int:
    """Index of the provider window containing unix time `now`."""
    return int(now // PROVIDER_WINDOW_S)


def provide_windows(now: float) -> list[int]:
    """Windows a live server must be listed in at time `now`."""
    current = window_of(now)
    if now >= (current + 1) * PROVIDER_WINDOW_S - PREPROVIDE_S:
        return [current, current + 1]
    return [current]


def shard_of(node_id: str) -> int:
    """Provider shard a node announces under; stable for a given peer id."""
    return hashlib.sha256(node_id.encode("utf-8")).digest()[0] % PROVIDER_SHARDS


def provider_key(model_id: str, window: int, shard: int) -> bytes:
    """Content key (a sha2-256 multihash, like a CID's) of one provider slot."""
    material = f"{NAMESPACE}/providers/v1\0{model_id}\0{window}\0{shard}".encode()
    return _SHA2_256_MULTIHASH_PREFIX + hashlib.sha256(material).digest()


def lookup_provider_keys(model_id: str, now: float) -> list[bytes]:
    """Every provider slot a client reads to see all live servers of a model."""
    return [provider_key(model_id, window_of(now), s) for s in range(PROVIDER_SHARDS)]
