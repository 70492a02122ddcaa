"""The client's view of the swarm: where servers come from, and one stub per server.

Servers are found in the DHT (`initial_peers`, any node's multiaddr) or, without a
DHT, named directly by gRPC endpoint (each is asked for its `Info`). Round trips are
measured once per server with an `Info` call and kept; routing uses them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pydantic

from corolla.inference.client.routing import BanList, Router
from corolla.inference.client.transport import ServerStub
from corolla.inference.discovery import DhtNode, ServerRecord
from corolla.inference.errors import AccessDeniedError, InferenceError, RoutingError
from corolla.inference.grpc_tuning import tune_for_latency
from corolla.inference.security import TlsConfig

log = logging.getLogger(__name__)


class Swarm:
    """Stubs, round trips and a router for one model's servers."""

    def __init__(
        self,
        *,
        model_id: str,
        initial_peers: Sequence[str] = (),
        servers: Sequence[str] = (),
        max_message_bytes: int = 64 << 20,
        timeout: float = 60.0,
        refresh_period: float = 5.0,
        bans: BanList | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        if not initial_peers and not servers:
            raise RoutingError("give initial_peers (DHT multiaddrs) or servers (gRPC host:port endpoints)")
        tune_for_latency()
        self.model_id = model_id
        self.max_message_bytes = max_message_bytes
        self.timeout = timeout
        self._static = list(servers)
        self.tls = tls
        self._dht: DhtNode | None = None
        if initial_peers:
            self._dht = DhtNode(
                bootstrap=list(initial_peers),
                key_pair=tls.identity.libp2p_key_pair() if tls else None,
                psk=tls.identity.swarm_key if tls else None,
                record_filter=tls.record_filter if tls else None,
            )
            self._dht.start()
        self._node_ids: dict[str, str] = {}  # endpoint -> node id whose certificate it showed
        self._stubs: dict[str, ServerStub] = {}
        self._rtt: dict[str, float] = {}
        self._lock = threading.Lock()
        self.router = Router(self._fetch, rtt_ms=self.rtt_ms, bans=bans, refresh_period=refresh_period)

    def stub(self, endpoint: str) -> ServerStub:
        with self._lock:
            if endpoint not in self._stubs:
                node_id = self._node_ids.get(endpoint)
                if self.tls is not None and node_id is None:
                    raise AccessDeniedError(f"{endpoint}: the server's certificate has not been verified")
                self._stubs[endpoint] = ServerStub(
                    endpoint,
                    max_message_bytes=self.max_message_bytes,
                    timeout=self.timeout,
                    tls=self.tls,
                    node_id=node_id,
                )
            return self._stubs[endpoint]

    def _admit(self, endpoint: str, node_id: str | None = None, fingerprint: str | None = None) -> bool:
        """With TLS, check the certificate `endpoint` shows before any call goes there."""
        if self.tls is None:
            return True
        try:
            holder = self.tls.verify_server(endpoint, node_id=node_id, fingerprint=fingerprint)
        except AccessDeniedError as exc:
            log.warning("refusing server %s: %s", endpoint, exc)
            self.router.bans.ban(endpoint)
            return False
        with self._lock:
            if self._node_ids.get(endpoint) != holder.node_id:
                self._node_ids[endpoint] = holder.node_id
                stale = self._stubs.pop(endpoint, None)
                if stale is not None:
                    stale.close()
        return True

    def rtt_ms(self, record: ServerRecord) -> float:
        if record.endpoint not in self._rtt:
            self._measure([record.endpoint])
        return self._rtt.get(record.endpoint, float("inf"))

    def _measure(self, endpoints: Sequence[str]) -> None:
        """Round trips to new servers, probed concurrently: one `Info` to open the channel
        (connection and TLS handshake are not the round trip), then the best of three."""

        def probe(endpoint: str) -> None:
            try:
                stub = self.stub(endpoint)
                stub.info(timeout=5.0)
                samples = []
                for _ in range(3):
                    began = time.perf_counter()
                    stub.info(timeout=5.0)
                    samples.append((time.perf_counter() - began) * 1000)
                self._rtt[endpoint] = min(samples)
            except InferenceError:
                self.router.bans.ban(endpoint)

        fresh = [e for e in dict.fromkeys(endpoints) if e not in self._rtt]
        if fresh:
            with ThreadPoolExecutor(max_workers=min(16, len(fresh))) as pool:
                list(pool.map(probe, fresh))

    def _fetch(self) -> list[ServerRecord]:
        records: list[ServerRecord] = []
        if self._dht is not None:
            records.extend(
                r
                for r in self._dht.find_servers(self.model_id)
                if r.model_id == self.model_id and self._admit(r.endpoint, r.node_id, r.tls_fingerprint)
            )
        for endpoint in self._static:
            if not self._admit(endpoint):
                continue
            try:
                info = self.stub(endpoint).info(timeout=5.0)
            except InferenceError:
                continue  # down for now; it may come back on the next refresh
            if info.model_id != self.model_id:
                continue
            now = time.time()
            fields = {
                "node_id": info.node_id,
                "endpoint": endpoint,
                "model_id": info.model_id,
                "start": info.start,
                "end": info.end,
                "throughput": info.throughput,
                "step_ms_per_block": info.step_ms_per_block,
                "free_cache_bytes": info.free_cache_bytes,
                "dtype": info.dtype,
                "quant": info.quant or None,
                "updated_at": now,
                "expires_at": now + 3600,
            }
            try:  # a server's self-description is network input: validated like a DHT record
                records.append(ServerRecord.model_validate(fields))
            except pydantic.ValidationError as exc:
                log.warning("ignoring server %s: invalid Info reply: %s", endpoint, exc)
        self._measure([r.endpoint for r in records])
        return records

    def close(self) -> None:
        with self._lock:
            for stub in self._stubs.values():
                stub.close()
            self._stubs.clear()
        if self._dht is not None:
            self._dht.stop()
