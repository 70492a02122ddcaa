"""Building the libp2p host and parsing the addresses we hand to it.

Host construction lives in `make_host` alone so that the swarm's pre-shared key (a
later issue: `psk=` of `libp2p.new_host`) is added in exactly one place.
"""

from __future__ import annotations

import ipaddress
import logging

import libp2p
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.swarm import Swarm
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.utils.address_validation import expand_wildcard_address
from multiaddr import Multiaddr

from corolla.inference.errors import DiscoveryError

DIAL_TIMEOUT_S = 5.0
"""Dial timeout; py-libp2p's default (10 s) makes a dead peer stall a whole lookup."""
DIAL_RETRIES = 1
"""Retries of a failed dial (after ~0.1 s); one covers a peer that is just starting."""

_DIALABLE = {"ip4", "ip6", "dns", "dns4", "dns6"}
# py-libp2p's DHT stream handler logs this (with an empty StreamEOF) at WARNING each
# time a peer closes a request stream normally, i.e. once per RPC served
# (`libp2p/kad_dht/kad_dht.py`, `_do_handle_stream`).
_KAD_LOGGER = "libp2p.kad_dht.kad_dht"
_KAD_EOF_MESSAGE = "Failed to read DHT message from stream: "
# Expected churn: py-libp2p logs at WARNING every request to a peer that has left (a
# client that generated and went, a restarted server) for as long as the peer stays in
# its routing table: when it replicates a value or provider record, or answers a
# lookup, or dials it. Kademlia tolerates a dead peer by design, so these go to DEBUG. Our own code
# still warns when an outcome suffers (an announce that fails or times out, a lookup
# that times out, an unreachable bootstrap peer). Keyed by logger, message prefixes.
_CHURN_MESSAGES: dict[str, tuple[str, ...]] = {
    "libp2p.kad_dht.value_store": ("Failed to store value at peer ", "Failed to get value from peer "),
    "libp2p.kad_dht.provider_store": (
        "Error sending ADD_PROVIDER to ",
        "Failed to send ADD_PROVIDER to ",
        "Failed to get providers from ",
        "Error getting providers from ",
    ),
    "libp2p.kad_dht.peer_routing": ("Failed to open stream to ",),
    _KAD_LOGGER: ("Incomplete DHT message from stream: ",),
    # Logged at ERROR before the dial error is raised to its caller, which decides.
    "libp2p.transport.tcp.tcp": ("Failed to open TCP stream: ",),
}


def make_host(key_pair: KeyPair | None = None, psk: bytes | None = None) -> IHost:
    """A TCP host with one connection per peer.

    `max_connections_per_peer=1`: py-libp2p's dialer cuts its 250 ms happy-eyeballs
    wait short only once it holds that many connections (`Swarm.dial_peer`,
    `_HAPPY_EYEBALLS_DELAY`), so with the default of 3 every dial takes 250 ms.
    """
    config = ConnectionConfig(max_connections_per_peer=1, dial_timeout=DIAL_TIMEOUT_S)
    host = libp2p.new_host(
        key_pair=key_pair,
        connection_config=config,
        addrs_factory=advertised_addrs,
        psk=psk.hex() if psk is not None else None,  # libp2p pnet: every connection encrypted with it
    )
    network = host.get_network()
    # `new_host` does not pass `retry_config` on to the swarm; the default retries a
    # refused dial 3 times over ~0.7 s, which every lookup touching a dead peer pays.
    if isinstance(network, Swarm):
        network.retry_config = RetryConfig(max_retries=DIAL_RETRIES)
    return host


def advertised_addrs(candidates: list[Multiaddr]) -> list[Multiaddr]:
    """The addresses peers are told to dial: a wildcard bind becomes the interface IPs.

    py-libp2p advertises a 0.0.0.0 listener as is (in `addrs`, provider records and
    signed peer records), which other machines cannot dial.
    """
    result: list[Multiaddr] = []
    for addr in candidates:
        expanded = [addr]
        ip = next((addr.value_for_protocol(p.name) for p in addr.protocols() if p.name in ("ip4", "ip6")), None)
        if ip is not None and ipaddress.ip_address(ip).is_unspecified:
            expanded = expand_wildcard_address(addr) or [addr]
        result.extend(a for a in expanded if a not in result)
    return result


def listen_addr(host: str, port: int) -> Multiaddr:
    """The TCP multiaddr to listen on for an IP literal and port."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise DiscoveryError(f"DHT listen host must be an IP address, got {host!r}") from None
    if not 0 <= port <= 65535:
        raise DiscoveryError(f"DHT listen port must be 0-65535, got {port}")
    proto = "ip4" if ip.version == 4 else "ip6"
    return Multiaddr(f"/{proto}/{ip}/tcp/{port}")


def parse_peer_addr(addr: str) -> PeerInfo:
    """Parse a bootstrap address like ``/ip4/127.0.0.1/tcp/4001/p2p/<peer id>``."""
    hint = "expected a multiaddr like /ip4/127.0.0.1/tcp/4001/p2p/<peer id>"
    try:
        info = info_from_p2p_addr(Multiaddr(addr))
    except (ValueError, TypeError) as exc:
        raise DiscoveryError(f"bad bootstrap address {addr!r}: {exc}; {hint}") from None
    names = [p.name for p in info.addrs[0].protocols()] if info.addrs else []
    if len(names) < 2 or names[0] not in _DIALABLE or names[1] != "tcp":
        raise DiscoveryError(f"bad bootstrap address {addr!r}: not a TCP address; {hint}")
    return info


class _StreamEofFilter(logging.Filter):
    """Drop py-libp2p's per-request "Failed to read DHT message" warning on a clean EOF."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _KAD_EOF_MESSAGE


class _ChurnFilter(logging.Filter):
    """Demote py-libp2p's warnings about requests to departed peers to DEBUG.

    A logger filter runs after the logger's level check, so the record is re-checked
    against DEBUG: it shows with `-vv` and is dropped otherwise."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self._prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not record.getMessage().startswith(self._prefixes):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_stream_eof_warnings() -> None:
    """Install `_StreamEofFilter` and the `_ChurnFilter`s on py-libp2p's DHT loggers once;
    every other warning of theirs stays a warning."""
    kad_logger = logging.getLogger(_KAD_LOGGER)
    if not any(isinstance(f, _StreamEofFilter) for f in kad_logger.filters):
        kad_logger.addFilter(_StreamEofFilter())
    for name, prefixes in _CHURN_MESSAGES.items():
        churn_logger = logging.getLogger(name)
        if not any(isinstance(f, _ChurnFilter) for f in churn_logger.filters):
            churn_logger.addFilter(_ChurnFilter(prefixes))
