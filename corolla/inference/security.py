"""Mutual TLS on the data plane, and certificate checks on DHT records.

- A server serves only clients whose TLS certificate chains to the consortium CA (the
  handshake checks that), is not revoked and has an allowed role (checked per call by
  `server_interceptor`, since gRPC has no CRL hook, and again during a long call by
  `watch_client`, so a revocation also ends the streams a peer already holds).
- A client accepts a server only if the certificate it presents is the one the server's
  DHT record names (SHA-256 fingerprint), for the node id the record names, of role
  `server`, unrevoked (`verify_server`, a TLS handshake of its own before the channel
  is used), and the gRPC channel then checks the CA chain and the node's TLS name.
- A DHT record counts only if its identity certificate checks and its Ed25519 key is
  the key of the node id that signed the record (`record_filter`).
"""

from __future__ import annotations

import base64
import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from corolla.inference.discovery import ServerRecord
from corolla.inference.errors import AccessDeniedError
from corolla.pki import CertificateError, NodeIdentity, PeerCertificate, Role, Verifier, tls_server_name

CLIENT_ROLES = frozenset({Role.SITE, Role.VERIFIER, Role.COORDINATOR, Role.SERVER})
"""Roles a block server serves by default: sites, verifiers, the coordinator, and other
servers (spot checks re-run work on peers)."""
SERVER_ROLES = frozenset({Role.SERVER})


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    identity: NodeIdentity
    verifier: Verifier
    allowed_client_roles: frozenset[Role] = CLIENT_ROLES
    _verified: dict[tuple[str, str], PeerCertificate] = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def for_node(cls, identity: NodeIdentity, *, allowed_client_roles: frozenset[Role] = CLIENT_ROLES) -> TlsConfig:
        return cls(identity=identity, verifier=identity.verifier(), allowed_client_roles=allowed_client_roles)

    # -- server side ------------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.identity.tls_key_pem, self.identity.tls_cert_pem)],
            root_certificates=self.identity.ca_pem,
            require_client_auth=True,
        )

    def server_interceptor(self) -> grpc.ServerInterceptor:
        return _ClientCheck(self)

    def check_client(self, context: grpc.ServicerContext) -> PeerCertificate:
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            raise AccessDeniedError("no client certificate")
        try:
            return self.verifier.check_pem(pems[0], roles=self.allowed_client_roles)
        except CertificateError as exc:
            raise AccessDeniedError(str(exc)) from None

    def watch_client(self, context: grpc.ServicerContext, *, interval: float) -> PeerWatch:
        """The call's client, checked now and re-checkable during the call (`PeerWatch.check`)."""
        holder = self.check_client(context)
        return PeerWatch(holder=holder, verifier=self.verifier, interval=interval)

    def record(self, record: ServerRecord) -> ServerRecord:
        """`record` with this node's TLS fingerprint and identity certificate added."""
        return record.model_copy(
            update={
                "tls_fingerprint": self.identity.tls_fingerprint,
                "certificate": base64.b64encode(self.identity.identity_cert_der).decode("ascii"),
            }
        )

    # -- client side ------------------------------------------------------------------------

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.identity.ca_pem,
            private_key=self.identity.tls_key_pem,
            certificate_chain=self.identity.tls_cert_pem,
        )

    @staticmethod
    def channel_options(node_id: str) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", tls_server_name(node_id))]

    def record_filter(self, record: ServerRecord) -> str | None:
        """Why the DHT record must be ignored, or None if it checks."""
        if record.certificate is None or record.tls_fingerprint is None:
            return "unsigned by the consortium: no certificate or TLS fingerprint"
        try:
            der = base64.b64decode(record.certificate, validate=True)
            self.verifier.check_identity_der(der, node_id=record.node_id, roles=SERVER_ROLES)
        except (CertificateError, ValueError) as exc:
            return str(exc)
        return None

    def verify_server(
        self, endpoint: str, *, node_id: str | None = None, fingerprint: str | None = None, timeout: float = 5.0
    ) -> PeerCertificate:
        """Handshake with `endpoint` and check the certificate it shows: consortium CA,
        role `server`, unrevoked, and (when given) the node id and fingerprint its DHT
        record names. Cached per (endpoint, fingerprint) until the CRL changes."""
        key = (endpoint, fingerprint or "")
        with self._lock:
            cached = self._verified.get(key)
        if cached is not None and not self.verifier.is_revoked(cached.serial):
            return cached
        der = _peer_certificate(endpoint, self.identity, timeout)
        try:
            holder = self.verifier.check_der(der, roles=SERVER_ROLES)
        except CertificateError as exc:
            raise AccessDeniedError(f"{endpoint}: {exc}") from None
        if node_id is not None and holder.node_id != node_id:
            raise AccessDeniedError(f"{endpoint}: certificate is for node {holder.node_id}, not {node_id}")
        if fingerprint is not None and holder.fingerprint != fingerprint:
            raise AccessDeniedError(f"{endpoint}: certificate fingerprint differs from the DHT record's")
        with self._lock:
            self._verified[key] = holder
        return holder


class PeerWatch:
    """A call's client, re-checked against the current CRL while the call lasts.

    `check` is cheap enough for every step or block: it looks at the CRL at most every
    `interval` seconds, and the verifier re-reads the file only when it has changed."""

    def __init__(self, *, holder: PeerCertificate, verifier: Verifier, interval: float) -> None:
        self.holder = holder
        self._verifier = verifier
        self._interval = interval
        self._next = time.monotonic() + interval

    def check(self) -> None:
        """Return if the client is still a member; else `AccessDeniedError`."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._interval
        try:  # fails closed, as the check when a call starts does
            revoked = self._verifier.is_revoked(self.holder.serial)
        except CertificateError as exc:
            raise AccessDeniedError(f"the revocation list could not be read: {exc}") from None
        if revoked:
            raise AccessDeniedError(
                f"certificate of {self.holder.name!r} was revoked during the call; the server ended it"
            )


def peer_key(context: grpc.ServicerContext) -> str:
    """Who a call comes from, for per-peer limits: the SHA-256 of the client's TLS
    certificate (one member, however many connections it opens), or, on a plaintext
    server (development only), the connection's address."""
    pems = context.auth_context().get("x509_pem_cert")
    if pems:
        return "cert:" + hashlib.sha256(pems[0]).hexdigest()
    return "addr:" + context.peer()


def _peer_certificate(endpoint: str, identity: NodeIdentity, timeout: float) -> bytes:
    host, _, port = endpoint.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the node id is checked on the certificate itself
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=identity.ca_pem.decode("ascii"))
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(identity.directory / "tls.pem", identity.directory / "tls.key")
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=None) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise AccessDeniedError(f"{endpoint}: TLS handshake failed: {exc}") from None
    if not der:
        raise AccessDeniedError(f"{endpoint}: the server showed no certificate")
    return der


class _ClientCheck(grpc.ServerInterceptor):
    """Checks the client's certificate (revocation, role) before every call."""

    def __init__(self, tls: TlsConfig) -> None:
        self.tls = tls

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None

        def guarded(behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    self.tls.check_client(context)
                except AccessDeniedError as exc:
                    context.abort(exc.grpc_code, f"{type(exc).__name__}: {exc}")
                return behaviour(request, context)

            return call

        kinds = {
            "unary_unary": grpc.unary_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "stream_stream": grpc.stream_stream_rpc_method_handler,
        }
        for kind, make in kinds.items():
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return make(
                    guarded(behaviour),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler
