"""`DhtNode`: a py-libp2p Kademlia node in its own trio thread, with a blocking API.

The rest of Corolla runs on grpc threads, so the DHT gets a private trio event loop in
a background thread and every public method hops onto it with `trio.from_thread`.

How servers are found (keys and the reasons for them in `_keys.py`):

* `announce` stores the signed record locally under the node's own value key, puts it
  at the k closest peers (replicas), and provides the model's provider slot for the
  current time window. A background task re-provides while the record is unexpired,
  including the next window shortly before it starts, so the caller only refreshes
  the record itself.
* `find_servers` reads the current window's provider slots from the network, then
  asks each provider *directly* for its record: the announcing node holds its newest
  record by construction, whereas a local copy may be stale. Only if it cannot be
  reached do we read the replicas (newest `updated_at` wins). Records are verified
  against their signer and expired ones are dropped, so a server that stops
  refreshing disappears when its `expires_at` passes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self

import libp2p
import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from corolla.inference.discovery import _host, _keys, _lookup, _rpc
from corolla.inference.discovery._record import ServerRecord
from corolla.inference.discovery._validator import RecordValidator
from corolla.inference.errors import DiscoveryError

logger = logging.getLogger(__name__)

RPC_TIMEOUT_S = 2.0
"""Budget of one DHT request inside a lookup; a slower peer is skipped."""
DIRECT_FETCH_TIMEOUT_S = 1.0
"""Budget for asking a provider for its own record before falling back to replicas."""
ANNOUNCE_TIMEOUT_S = 10.0
"""Budget of one announce or withdraw (replication and provider announcement)."""
REPROVIDE_S = 60.0
"""Re-provide a slot this often, so peers that joined near its key learn of us."""
KEEPER_PERIOD_S = 10.0
"""How often the background task checks for due provider announcements."""
STOP_TIMEOUT_S = 10.0
"""How long `stop` waits for the DHT thread to finish."""
LEAVE_GRACE_S = 1.0
"""On `stop`, operations still in flight are cancelled after this long (then connections
close at once), so stopping never waits for an announce's or a lookup's timeouts."""
_START_GRACE_S = 5.0  # start() waits this much past start_timeout for the thread to report


class DhtNode:
    """One member of the discovery DHT; a server announces on it, a client reads from it.

    Blocking and thread-safe; do not call it from inside a trio event loop's thread.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bootstrap: Sequence[str] = (),
        start_timeout: float = 20.0,
        key_pair: KeyPair | None = None,
        psk: bytes | None = None,
        record_filter: Callable[[ServerRecord], str | None] | None = None,
    ) -> None:
        """`key_pair`: the node's identity (default: a fresh one, so a new peer id each
        start). `psk`: the consortium's 32-byte pre-shared key, making the DHT a private
        network that peers without it cannot even connect to. `record_filter`: returns why
        a server record must be ignored (e.g. its certificate does not check), or None."""
        if isinstance(bootstrap, str):
            raise DiscoveryError("bootstrap must be a sequence of multiaddrs, not one string")
        if not start_timeout > 0:
            raise DiscoveryError(f"start_timeout must be > 0 seconds, got {start_timeout}")
        self._listen_host = host
        self._listen_port = port
        self._bootstrap = tuple(bootstrap)
        self._start_timeout = float(start_timeout)
        if psk is not None and len(psk) != 32:
            raise DiscoveryError(f"the DHT pre-shared key must be 32 bytes, got {len(psk)}")
        self._psk = psk
        self._record_filter = record_filter
        self._key_pair = key_pair or libp2p.generate_new_ed25519_identity()
        self._peer_id = ID.from_pubkey(self._key_pair.public_key).to_base58()
        self._shard = _keys.shard_of(self._peer_id)

        self._lock = threading.Lock()  # guards the lifecycle fields below
        self._state = "new"  # new -> starting -> running -> stopped
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop_requested = threading.Event()
        self._failure: BaseException | None = None

        # Set by the trio thread before `_ready`; read-only for other threads after.
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._stop_event: trio.Event | None = None
        self._host: IHost | None = None
        self._dht: KadDHT | None = None
        self._addrs: list[str] = []

        # Touched only on the trio thread.
        self._slots = _rpc.PeerSlots()
        self._announced: dict[str, ServerRecord] = {}  # model id -> last record announced
        self._provided: dict[tuple[str, int], float] = {}  # (model id, window) -> last provide

    # ----- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Listen, join the swarm through the bootstrap peers, and fill the routing table.

        Raises `DiscoveryError` on a bad address, when no bootstrap peer can be reached,
        or when joining takes longer than `start_timeout`.
        """
        with self._lock:
            if self._state != "new":
                raise DiscoveryError(f"DhtNode cannot be started: it is {self._state}")
            listen = _host.listen_addr(self._listen_host, self._listen_port)
            peers = [_host.parse_peer_addr(addr) for addr in self._bootstrap]
            _host.quiet_stream_eof_warnings()
            self._state = "starting"
            self._thread = threading.Thread(
                target=self._thread_main, args=(listen, peers), name=f"corolla-dht-{self._peer_id[-6:]}"
            )
            self._thread.daemon = True  # never keep the interpreter alive for discovery
            self._thread.start()
        if not self._ready.wait(self._start_timeout + _START_GRACE_S):
            self.stop()
            raise DiscoveryError(f"DHT node did not start within {self._start_timeout} s")
        with self._lock:
            state = self._state
            started = state == "starting" and self._failure is None and self._host is not None
            if started:
                self._state = "running"
        if state == "stopped":
            raise DiscoveryError("DHT node was stopped while starting")
        if not started:
            failure = self._failure
            self.stop()
            if isinstance(failure, DiscoveryError):
                raise DiscoveryError(str(failure)) from None
            raise DiscoveryError(f"DHT node failed to start: {failure!r}") from failure

    def stop(self) -> None:
        """Leave the swarm, close the host and join the thread. Idempotent."""
        with self._lock:
            if self._state in ("new", "stopped"):
                self._state = "stopped"
                return
            self._state = "stopped"
            thread = self._thread
            # Order matters: the trio thread reads the flag after publishing its token.
            self._stop_requested.set()
            token = self._token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._request_stop, trio_token=token)
        if thread is not None:
            thread.join(STOP_TIMEOUT_S)
            if thread.is_alive():
                logger.warning("DHT thread %s did not stop within %s s", thread.name, STOP_TIMEOUT_S)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----- public API ------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        """This node's libp2p peer id (base58); fixed when the object is created."""
        return self._peer_id

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<peer id>) other nodes can bootstrap from."""
        self._require_running()
        return list(self._addrs)

    def announce(self, record: ServerRecord) -> None:
        """Publish or refresh this node's record for `record.model_id`.

        The caller refreshes periodically, well before `expires_at`: a record that is
        not refreshed disappears from `find_servers` when it expires.
        """
        if not isinstance(record, ServerRecord):
            raise DiscoveryError(f"announce needs a ServerRecord, got {type(record).__name__}")
        if record.node_id != self._peer_id:
            raise DiscoveryError(f"record node_id {record.node_id!r} is not this node's peer id {self._peer_id!r}")
        if record.expires_at <= time.time():
            raise DiscoveryError(f"record for {record.model_id!r} has already expired")
        record.to_bytes()  # size check before crossing threads
        self._call(self._announce, record)

    def withdraw(self, model_id: str) -> None:
        """Stop announcing `model_id`, best effort.

        Publishes an already-expired copy of the last record, which replaces the
        replicas' copies (it is newer) and which every reader drops; the provider entry
        lingers until its window ends but leads nowhere.
        """
        self._call(self._withdraw, model_id)

    def find_servers(self, model_id: str, timeout: float = 5.0) -> list[ServerRecord]:
        """Every unexpired record for `model_id`, the newest per node, sorted by span.

        Returns what was found within `timeout` seconds (possibly nothing).
        """
        if not timeout > 0:
            raise DiscoveryError(f"timeout must be > 0 seconds, got {timeout}")
        result: list[ServerRecord] = self._call(self._find_servers, model_id, float(timeout))
        return result

    # ----- thread plumbing -------------------------------------------------------

    def _require_running(self) -> None:
        if self._state != "running":
            raise DiscoveryError(f"DHT node is {self._state}; call start() first")

    def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run `fn(*args)` on the DHT thread and wait for it; errors become DiscoveryError."""
        self._require_running()
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled):
            raise DiscoveryError("DHT node stopped during the call") from None
        except DiscoveryError:
            raise
        except Exception as exc:
            found = _find_discovery_error(exc)
            if found is not None:
                raise DiscoveryError(str(found)) from exc
            raise DiscoveryError(f"DHT operation failed: {exc!r}") from exc

    def _thread_main(self, listen: Multiaddr, peers: list[PeerInfo]) -> None:
        try:
            trio.run(self._main, listen, peers)
        except BaseException as exc:  # the thread's last word: report, never lose it
            self._failure = _find_discovery_error(exc) or exc
            if self._ready.is_set():
                logger.error("DHT thread failed: %r", exc, exc_info=exc)
        finally:
            self._ready.set()

    def _request_stop(self) -> None:
        """On the trio thread: leave gracefully if running, abort if still starting."""
        if self._stop_event is not None and self._ready.is_set():
            self._stop_event.set()
            if self._scope is not None:  # an operation in flight (an announce) gets this long
                self._scope.deadline = min(self._scope.deadline, trio.current_time() + LEAVE_GRACE_S)
        elif self._scope is not None:
            self._scope.cancel()

    async def _main(self, listen: Multiaddr, peers: list[PeerInfo]) -> None:
        stop_event = self._stop_event = trio.Event()
        scope = trio.CancelScope(deadline=trio.current_time() + self._start_timeout)
        self._scope = scope
        self._token = trio.lowlevel.current_trio_token()
        if self._stop_requested.is_set():
            return
        host = _host.make_host(self._key_pair, psk=self._psk)
        try:
            with scope:
                async with host.run(listen_addrs=[listen]):
                    try:
                        await self._serve(host, listen, peers, scope, stop_event)
                    finally:
                        # Inside run(): py-libp2p closes connections promptly only while
                        # the swarm's service is alive (after it, ~0.2 s per connection).
                        await _close_host(host)
        finally:
            await _close_host(host)  # no-op unless run() itself failed
        if scope.cancelled_caught and not self._stop_requested.is_set():
            raise DiscoveryError(f"DHT node did not join the swarm within {self._start_timeout} s")

    async def _serve(
        self,
        host: IHost,
        listen: Multiaddr,
        peers: list[PeerInfo],
        scope: trio.CancelScope,
        stop_event: trio.Event,
    ) -> None:
        """Join, report ready, and serve until `stop_event` (set by `stop()`)."""
        if not host.get_transport_addrs():
            raise DiscoveryError(f"cannot listen on {listen}")
        dht = KadDHT(host, DHTMode.SERVER)
        dht.register_validator(_keys.NAMESPACE, RecordValidator())
        await self._connect_bootstrap(host, dht, peers)
        async with background_trio_service(dht):
            if peers:
                # A lookup of our own id tells the bootstrap peers about us and fills
                # our routing table with the peers nearest to us.
                await dht.peer_routing.find_closest_peers_network(host.get_id().to_bytes())
            self._host, self._dht = host, dht
            self._addrs = [str(a) for a in host.get_addrs()]
            scope.deadline = math.inf
            self._ready.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_providing)
                await stop_event.wait()
                nursery.cancel_scope.cancel()

    async def _connect_bootstrap(self, host: IHost, dht: KadDHT, peers: list[PeerInfo]) -> None:
        """Dial every bootstrap peer; fail only if none answers."""
        failures: dict[str, str] = {}

        async def dial(info: PeerInfo) -> None:
            addr = f"{info.addrs[0]}/p2p/{info.peer_id}"
            try:
                with trio.fail_after(_host.DIAL_TIMEOUT_S):
                    await host.connect(info)
            except Exception as exc:  # dial errors come in many types
                failures[addr] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                return
            await dht.routing_table.add_peer(info)

        async with trio.open_nursery() as nursery:
            for info in peers:
                nursery.start_soon(dial, info)
        if peers and len(failures) == len(peers):
            detail = "; ".join(f"{addr} ({why})" for addr, why in failures.items())
            raise DiscoveryError(f"cannot reach any DHT bootstrap peer: {detail}")
        for addr, why in failures.items():
            logger.warning("DHT bootstrap peer %s unreachable: %s", addr, why)

    # ----- operations (run on the trio thread) ----------------------------------

    def _dht_or_fail(self) -> tuple[IHost, KadDHT]:
        if self._host is None or self._dht is None:
            raise DiscoveryError("DHT node is not running")
        return self._host, self._dht

    async def _store(self, record: ServerRecord) -> None:
        """Store `record` locally first (we answer for it), then at the replicas."""
        _, dht = self._dht_or_fail()
        key = _keys.record_key(record.model_id, self._peer_id)
        key_bytes, value = key.encode("utf-8"), record.to_bytes()
        # We are the authority for our own key: replace the local copy outright, so a
        # clock step backwards cannot trip put_value's "older than stored" refusal.
        dht.value_store.remove(key_bytes)
        dht.value_store.put(key_bytes, value)
        await dht.put_value(key, value)

    async def _announce(self, record: ServerRecord) -> None:
        self._announced[record.model_id] = record
        try:
            with trio.fail_after(ANNOUNCE_TIMEOUT_S):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._store, record)
                    nursery.start_soon(self._provide_due)
        except trio.TooSlowError:
            raise DiscoveryError(
                f"announce of {record.model_id!r} took over {ANNOUNCE_TIMEOUT_S} s; the record is "
                "served locally and the next announce retries replication"
            ) from None

    async def _withdraw(self, model_id: str) -> None:
        _, dht = self._dht_or_fail()
        record = self._announced.pop(model_id, None)
        for model, window in [k for k in self._provided if k[0] == model_id]:
            del self._provided[model, window]
            dht.provider_store.providing_keys.discard(_keys.provider_key(model, window, self._shard))
        if record is None:
            return
        at = max(time.time(), record.updated_at + 1e-3)
        tombstone = ServerRecord.model_validate({**record.model_dump(), "updated_at": at, "expires_at": at})
        with trio.move_on_after(ANNOUNCE_TIMEOUT_S):
            await self._store(tombstone)

    async def _keep_providing(self) -> None:
        while True:
            await trio.sleep(KEEPER_PERIOD_S)
            await self._prune_departed()
            await self._provide_due()

    async def _prune_departed(self) -> None:
        """Drop routing-table peers that have left: no connection to them, and a dial fails.

        Otherwise py-libp2p keeps replicating records and provider entries to them (and
        routing lookups through them) until its hourly refresh, each attempt a failed
        dial. A live peer whose connection merely closed is dialled again and stays.
        """
        host, dht = self._dht_or_fail()
        network, peerstore = host.get_network(), host.get_peerstore()

        async def check(peer: ID) -> None:
            if network.get_connections(peer):
                return
            try:
                with trio.fail_after(_host.DIAL_TIMEOUT_S):
                    await host.connect(PeerInfo(peer, peerstore.addrs(peer)))
            except Exception as exc:  # dial errors come in many types, the peerstore's too
                dht.routing_table.remove_peer(peer)
                logger.debug("dropped departed DHT peer %s: %r", peer, exc)

        async with trio.open_nursery() as nursery:
            for peer in dht.routing_table.get_peer_ids():
                if peer != host.get_id():
                    nursery.start_soon(check, peer)

    async def _provide_due(self) -> None:
        """Provide the slots of every unexpired announced model that are due.

        That is the current window's slot and, shortly before a window ends, the next
        one's, each re-provided every `REPROVIDE_S` for peers that joined near its key.
        """
        _, dht = self._dht_or_fail()
        now = time.time()
        windows = _keys.provide_windows(now)
        for model_id, window in [slot for slot in self._provided if slot[1] < windows[0]]:
            del self._provided[model_id, window]
            # Stops py-libp2p's own 22-hour republishing of a slot nobody reads any more.
            dht.provider_store.providing_keys.discard(_keys.provider_key(model_id, window, self._shard))
        for model_id, record in list(self._announced.items()):
            for window in windows:
                last = self._provided.get((model_id, window), -math.inf)
                if record.expires_at <= now or now - last < REPROVIDE_S:
                    continue
                self._provided[model_id, window] = now
                try:
                    await dht.provider_store.provide(_keys.provider_key(model_id, window, self._shard))
                except Exception as exc:  # the keeper retries; the record itself is stored
                    logger.warning("providing %r failed: %r", model_id, exc)

    async def _find_servers(self, model_id: str, timeout: float) -> list[ServerRecord]:
        host, dht = self._dht_or_fail()
        found: dict[str, ServerRecord] = {}
        seen: set[ID] = set()
        keys = _keys.lookup_provider_keys(model_id, time.time())
        with trio.move_on_after(timeout) as scope:
            async with trio.open_nursery() as nursery:

                def on_provider(info: PeerInfo) -> None:
                    # Each record fetch starts as soon as its provider is known.
                    if info.peer_id not in seen:
                        seen.add(info.peer_id)
                        nursery.start_soon(self._fetch_record, model_id, info, found)

                async def query(peer: ID, peer_keys: list[bytes]) -> dict[bytes, list[ID]]:
                    answers = await _rpc.get_providers(host, self._slots, peer, peer_keys)
                    for providers, _ in answers.values():
                        for info in providers:
                            on_provider(info)
                    return {key: closer for key, (_, closer) in answers.items()}

                # Providers this node stores itself add to the network's answer.
                for key in keys:
                    for info in dht.provider_store.get_providers(key):
                        on_provider(info)
                nursery.start_soon(_lookup.walk, host, dht.routing_table, keys, query, RPC_TIMEOUT_S)
        if scope.cancelled_caught:
            logger.warning("find_servers(%r) timed out after %s s; partial results", model_id, timeout)
        now = time.time()
        live = [r for r in found.values() if r.expires_at > now and r.model_id == model_id]
        if self._record_filter is not None:
            accepted = []
            for record in live:
                reason = self._record_filter(record)
                if reason is None:
                    accepted.append(record)
                else:
                    logger.warning("ignoring the record of %s (%s): %s", record.node_id, record.endpoint, reason)
            live = accepted
        return sorted(live, key=lambda r: (r.start, r.end, r.node_id))

    async def _fetch_record(self, model_id: str, provider: PeerInfo, found: dict[str, ServerRecord]) -> None:
        """The provider's own record, from itself or, if it is unreachable, its replicas.

        The provider holds its newest record by construction, and when it answers
        without one (withdrawn, restarted) there is nothing newer elsewhere; replicas
        only stand in for a provider we cannot reach.
        """
        host, dht = self._dht_or_fail()
        node_id = provider.peer_id.to_base58()
        key = _keys.record_key(model_id, node_id)
        key_bytes = key.encode("utf-8")
        candidates: list[ServerRecord] = []

        def consider(raw: Record) -> None:
            try:
                candidates.append(_rpc.verify_server_record(raw, key))
            except DiscoveryError as exc:
                logger.debug("ignoring DHT record for %s: %s", node_id, exc)

        local = dht.value_store.get(key_bytes)
        reached = provider.peer_id == host.get_id()
        if not reached:
            with trio.move_on_after(DIRECT_FETCH_TIMEOUT_S):
                try:
                    raw, _ = await _rpc.get_record(host, self._slots, provider.peer_id, key_bytes)
                    reached = True
                    if raw is not None:
                        consider(raw)
                except _rpc.RpcError as exc:
                    logger.debug("provider %s unreachable, reading replicas: %s", node_id, exc)
        if local is not None and (provider.peer_id == host.get_id() or not reached):
            consider(local)
        if not reached:

            async def query(peer: ID, peer_keys: list[bytes]) -> dict[bytes, list[ID]]:
                raw, closer = await _rpc.get_record(host, self._slots, peer, key_bytes)
                if raw is not None and peer != provider.peer_id:
                    consider(raw)
                return {key_bytes: closer}

            await _lookup.walk(host, dht.routing_table, [key_bytes], query, RPC_TIMEOUT_S)
        for record in candidates:
            known = found.get(node_id)
            if record.node_id == node_id and (known is None or record.updated_at > known.updated_at):
                found[node_id] = record


async def _close_host(host: IHost) -> None:
    """Close all connections at once, then the host; shielded, so it runs when cancelled.

    py-libp2p closes connections one by one with two fixed 0.1 s sleeps in each
    (`SwarmConn.close`, `Yamux.close`): 0.2 s per peer, which would make `stop` in a
    large swarm outlast `STOP_TIMEOUT_S`.
    """
    with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for conn in host.get_network().get_connections():
                nursery.start_soon(_close_quietly, conn.close)
        await host.close()


async def _close_quietly(close: Callable[[], Awaitable[None]]) -> None:
    try:
        await close()
    except Exception as exc:  # a connection already torn down by the peer
        logger.debug("closing a DHT connection failed: %r", exc)


def _find_discovery_error(exc: BaseException) -> DiscoveryError | None:
    """The first DiscoveryError in `exc`, looking inside trio's exception groups."""
    if isinstance(exc, DiscoveryError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find_discovery_error(inner)
            if found is not None:
                return found
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc and isinstance(cause, DiscoveryError):
        return cause
    return None
