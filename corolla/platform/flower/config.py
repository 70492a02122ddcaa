"""Settings of a Flower deployment: where the SuperLink listens, which files hold its keys.

Keys and certificates are inputs (the consortium PKI issues them); these classes only check
that the files exist. What each file must contain, as flwr 1.42 reads it:

- SuperLink TLS: `ca_cert` is the PEM CA certificate that signed `cert`; `cert` is the PEM
  server certificate (a chain file is fine), valid for every address it is dialled at:
  the address SuperNodes and the `flwr` CLI use, and the SuperLink's own `host`
  (its SuperExec dials `host:port`, with 0.0.0.0 read as 127.0.0.1). Python's `ssl`
  matches IP addresses against IP SANs only. `key` is the PEM private key of `cert`.
- SuperNode authentication: an ECDSA key on a NIST curve (P-256, P-384 or P-521), the
  private key in unencrypted OpenSSH format (`-----BEGIN OPENSSH PRIVATE KEY-----`), the
  public key in OpenSSH one-line format (`ecdsa-sha2-nistp384 AAAA...`). Ed25519 and RSA
  keys are refused by both `flower-supernode` and `flwr supernode register`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from corolla.platform.flower._user_config import UserConfigValue, format_user_config
from corolla.platform.flower.errors import FederationError

_HOSTNAME = r"[A-Za-z0-9.-]+"  # a DNS name or an IPv4 address
_IPV6 = r"[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*"
_BIND_HOST = re.compile(rf"{_HOSTNAME}|{_IPV6}")  # as uvicorn takes it: IPv6 without brackets
_DIAL_HOST = re.compile(rf"{_HOSTNAME}|\[{_IPV6}\]")  # as it appears in host:port
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _require_file(owner: str, name: str, path: Path) -> None:
    if not Path(path).is_file():
        raise FederationError(f"{owner}.{name} = {str(path)!r}: no such file")


def _require_port(owner: str, name: str, port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise FederationError(f"{owner}.{name} = {port!r}: must be an int in 1..65535")


def _require_host(owner: str, name: str, host: str) -> None:
    if not isinstance(host, str) or not _BIND_HOST.fullmatch(host):
        raise FederationError(f"{owner}.{name} = {host!r}: must be a hostname, an IPv4 or an IPv6 address")


def _require_positive(owner: str, name: str, value: float | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise FederationError(f"{owner}.{name} = {value!r}: must be a positive number of seconds")


def _require_name(owner: str, name: str) -> None:
    if not _NAME.fullmatch(name):
        raise FederationError(f"{owner}.name = {name!r}: use letters, digits, '_', '.' and '-' (it names log files)")


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) as its parts; raises `FederationError` naming the address."""
    host, sep, port = address.rpartition(":")
    if not sep or not _DIAL_HOST.fullmatch(host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise FederationError(f"address {address!r}: expected host:port, e.g. 127.0.0.1:9200 or [::1]:9200")
    return host, int(port)


def dial_host(bind_host: str) -> str:
    """The host part of `host:port` a local client dials for a server bound to `bind_host`.

    Flower's own rule for its SuperExec: the wildcard addresses become loopback.
    """
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind_host, bind_host)
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerTls:
    """The SuperLink's TLS files (PEM)."""

    ca_cert: Path  # the CA that signed `cert`; handed to the SuperLink's own SuperExec as its trust root
    cert: Path  # server certificate (or chain), SANs covering every address it is dialled at
    key: Path  # private key of `cert`

    def __post_init__(self) -> None:
        for name in ("ca_cert", "cert", "key"):
            _require_file("ServerTls", name, getattr(self, name))


@dataclass(frozen=True, kw_only=True, slots=True)
class SuperLinkConfig:
    """A `flower-superlink` with TLS and SuperNode authentication (always on)."""

    tls: ServerTls
    port: int  # one HTTPS port serves Fleet (SuperNodes), Control (`flwr` CLI) and Runtime (ServerApp) APIs
    host: str = "127.0.0.1"  # bind address; 0.0.0.0 for all interfaces
    database: Path | None = None  # SQLite file keeping enrolled nodes and runs; None = in memory
    name: str = "superlink"  # names the log file and the Flower home in the work directory
    start_timeout: float = 60.0  # seconds until /health answers over TLS
    stop_grace: float = 10.0  # seconds between SIGTERM and SIGKILL

    def __post_init__(self) -> None:
        _require_port("SuperLinkConfig", "port", self.port)
        _require_host("SuperLinkConfig", "host", self.host)
        _require_name("SuperLinkConfig", self.name)
        _require_positive("SuperLinkConfig", "start_timeout", self.start_timeout)
        _require_positive("SuperLinkConfig", "stop_grace", self.stop_grace)
        if self.database is not None and not Path(self.database).parent.is_dir():
            raise FederationError(f"SuperLinkConfig.database = {str(self.database)!r}: its directory does not exist")


@dataclass(frozen=True, kw_only=True, slots=True)
class SuperLinkConnection:
    """How clients reach a SuperLink: its address and the CA its certificate must chain to."""

    address: str  # host:port as it appears in the SuperLink certificate's SANs
    root_certificates: Path  # PEM CA certificate(s) trusted for the SuperLink's certificate

    def __post_init__(self) -> None:
        split_address(self.address)
        _require_file("SuperLinkConnection", "root_certificates", self.root_certificates)


@dataclass(frozen=True, kw_only=True, slots=True)
class SuperNodeConfig:
    """A `flower-supernode` that authenticates to the SuperLink with its enrolled key."""

    superlink: SuperLinkConnection
    auth_private_key: Path  # OpenSSH-format ECDSA (NIST curve) private key, enrolled at the SuperLink
    runtime_port: int  # the node's local Runtime API (its ClientApps connect here); unique per machine
    node_config: Mapping[str, UserConfigValue] = field(default_factory=dict)  # e.g. {"partition-id": 0}
    name: str = "supernode"  # names the log file and the Flower home in the work directory
    start_timeout: float = 60.0  # seconds until the SuperLink has activated this node
    max_wait_time: float | None = 30.0  # Flower gives up reconnecting after this many seconds; None = never
    stop_grace: float = 10.0  # seconds between SIGTERM and SIGKILL

    def __post_init__(self) -> None:
        _require_file("SuperNodeConfig", "auth_private_key", self.auth_private_key)
        _require_port("SuperNodeConfig", "runtime_port", self.runtime_port)
        _require_name("SuperNodeConfig", self.name)
        _require_positive("SuperNodeConfig", "start_timeout", self.start_timeout)
        _require_positive("SuperNodeConfig", "max_wait_time", self.max_wait_time, optional=True)
        _require_positive("SuperNodeConfig", "stop_grace", self.stop_grace)
        format_user_config(self.node_config, field="SuperNodeConfig.node_config")  # validates keys and values
        object.__setattr__(self, "node_config", MappingProxyType(dict(self.node_config)))
