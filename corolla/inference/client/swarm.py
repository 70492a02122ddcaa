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
        self._refused: set[tuple[str, str]] = set()  # (node id, endpoint) of records whose certificate check failed
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

    def _admit(self, record: ServerRecord) -> bool:
        """With TLS, check that the certificate `record.endpoint` shows is `record`'s node's
        before any call goes there. A record naming an endpoint where another member's
        certificate answers is a lie of the record's signer: its node id is banned and
        reported (`Router.report_misrepresentation`), and the node that really serves there
        (with its own record) stays routable. An endpoint that cannot be checked (down, or
        no member's certificate) bans the record's node like any failure, unreported."""
        if self.tls is None:
            return True
        endpoint = record.endpoint
        if (record.node_id, endpoint) in self._refused and self.router.bans.is_banned(record.node_id):
            return False  # not asked again (no handshake) until its ban runs out
        try:
            holder = self.tls.verify_server(endpoint, node_id=record.node_id, fingerprint=record.tls_fingerprint)
            if holder.node_id != record.node_id:  # a cached certificate is not checked against node_id
                raise AccessDeniedError(f"{endpoint}: certificate is for node {holder.node_id}, not {record.node_id}")
        except AccessDeniedError as exc:
            log.warning("refusing server %s of node %s: %s", endpoint, record.node_id, exc)
            with self._lock:
                self._refused.add((record.node_id, endpoint))
            if self._serves_another_member(record):
                self.router.report_misrepresentation(record, exc)
            else:
                self.router.bans.ban(record.node_id)
            return False
        with self._lock:
            self._refused.discard((record.node_id, endpoint))
        self._pin(endpoint, holder.node_id)
        return True

    def _serves_another_member(self, record: ServerRecord) -> bool:
        """Whether `record.endpoint` shows a valid member certificate of a node other than
        `record`'s: then the record lied about where its node serves."""
        if self.tls is None:
            return False
        try:
            holder = self.tls.verify_server(record.endpoint)
        except AccessDeniedError:
            return False
        return holder.node_id != record.node_id

    def _admit_static(self, endpoint: str) -> str | None:
        """With TLS, the node id whose certificate a named endpoint shows (None: refused)."""
        try:
            holder = self.tls.verify_server(endpoint) if self.tls is not None else None
        except AccessDeniedError as exc:
            log.warning("refusing server %s: %s", endpoint, exc)
            return None
        if holder is None:
            return ""
        self._pin(endpoint, holder.node_id)
        return holder.node_id

    def _pin(self, endpoint: str, node_id: str) -> None:
        """Calls to `endpoint` accept only `node_id`'s certificate from now on."""
        with self._lock:
            if self._node_ids.get(endpoint) != node_id:
                self._node_ids[endpoint] = node_id
                stale = self._stubs.pop(endpoint, None)
                if stale is not None:
                    stale.close()

    def rtt_ms(self, record: ServerRecord) -> float:
        if record.endpoint not in self._rtt:
            self._measure([record])
        return self._rtt.get(record.endpoint, float("inf"))

    def _measure(self, records: Sequence[ServerRecord]) -> None:
        """Round trips to new servers, probed concurrently: one `Info` to open the channel
        (connection and TLS handshake are not the round trip), then the best of three.
        An endpoint that does not answer bans the nodes whose records name it."""

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
                for node_id in {r.node_id for r in records if r.endpoint == endpoint}:
                    self.router.bans.ban(node_id)

        fresh = [e for e in dict.fromkeys(r.endpoint for r in records) if e not in self._rtt]
        if fresh:
            with ThreadPoolExecutor(max_workers=min(16, len(fresh))) as pool:
                list(pool.map(probe, fresh))

    def _fetch(self) -> list[ServerRecord]:
        records: list[ServerRecord] = []
        if self._dht is not None:
            records.extend(
                r for r in self._dht.find_servers(self.model_id) if r.model_id == self.model_id and self._admit(r)
            )
        for endpoint in self._static:
            verified = self._admit_static(endpoint)
            if verified is None:
                continue
            try:
                info = self.stub(endpoint).info(timeout=5.0)
            except InferenceError:
                continue  # down for now; it may come back on the next refresh
            if info.model_id != self.model_id:
                continue
            if verified and info.node_id != verified:  # its Info names a node other than its certificate's
                log.warning("ignoring server %s: Info names node %s, certificate %s", endpoint, info.node_id, verified)
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
        self._measure(records)
        return records

    def close(self) -> None:
        with self._lock:
            for stub in self._stubs.values():
                stub.close()
            self._stubs.clear()
        if self._dht is not None:
            self._dht.stop()
