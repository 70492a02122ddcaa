"""The consortium CA in a workspace: `platform keys init-ca|issue|revoke|list`.

Layout (private keys are written 0600):

    <workspace>/ca/ca.key  ca.pem  crl.pem  consortium.secret  registry.json  swarm.epoch
    <workspace>/nodes/<name>/node.key node.pem tls.key tls.pem ca.pem crl.pem swarm.key swarm.epoch
    <workspace>/nodes/<name>/agreement.key agreement.pem     (sites: secure aggregation)

A node directory is everything a node needs; copy it to the node's machine (and copy
`ca/crl.pem` over its `crl.pem` after a revocation; running nodes re-read it).

Revocation also rotates the DHT's pre-shared key: the swarm key epoch (`ca/swarm.epoch`,
absent = 0) goes up by one and every node that is not revoked gets the new epoch's
`swarm.key` and `swarm.epoch`; copy both to those nodes and restart them. A revoked node
keeps the old key, with which it can no longer connect to members that hold the new one.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from pydantic import TypeAdapter, ValidationError

from corolla.pki import _x509
from corolla.pki.errors import WorkspaceError
from corolla.pki.identity import NodeIdentity, Role, node_id_from_public

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True, kw_only=True, slots=True)
class IssuedNode:
    name: str
    role: Role
    node_id: str
    serials: tuple[int, ...]  # every certificate's serial: identity, TLS and (sites) agreement
    issued_at: str
    expires_at: str
    revoked_at: str | None = None
    agreement_serial: int | None = None  # the X25519 key-agreement certificate (sites only)


# `ca/registry.json`: node name -> IssuedNode (tuples as lists, the role as its value)
_REGISTRY = TypeAdapter(dict[str, IssuedNode])


class ConsortiumCA:
    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.dir = workspace / "ca"

    # -- creation ---------------------------------------------------------------------------

    @classmethod
    def init(cls, workspace: Path, *, consortium: str = "corolla", days: int = 3650) -> ConsortiumCA:
        _check_days(days)
        ca = cls(workspace)
        if (ca.dir / "ca.key").exists():
            raise WorkspaceError(f"{str(ca.dir)!r} already holds a CA; refusing to overwrite it")
        ca.dir.mkdir(parents=True, exist_ok=True)
        key = _x509.new_identity_key()
        now = _now()
        cert = _x509.build_ca(key, consortium=consortium, now=now, days=days)
        _write_private(ca.dir / "ca.key", _x509.key_to_pem(key))
        (ca.dir / "ca.pem").write_bytes(_x509.cert_to_pem(cert))
        _write_private(ca.dir / "consortium.secret", _x509.random_secret().hex().encode())
        ca._save_registry({})
        ca._write_crl(number=0)
        return ca

    @classmethod
    def open(cls, workspace: Path) -> ConsortiumCA:
        ca = cls(workspace)
        if not (ca.dir / "ca.key").is_file():
            raise WorkspaceError(f"no consortium CA in {str(workspace)!r}; run `platform keys init-ca` first")
        return ca

    # -- issuing ----------------------------------------------------------------------------

    def issue(
        self, name: str, role: Role | str, *, days: int = 365, hosts: Sequence[str] = (), now: dt.datetime | None = None
    ) -> NodeIdentity:
        """Keys and certificates for a new node, in `<workspace>/nodes/<name>/`."""
        _check_days(days)
        if not _NAME.match(name):
            raise WorkspaceError(f"node name {name!r} must be 1-63 letters, digits, '.', '_' or '-'")
        try:
            role = Role(role)
        except ValueError:
            raise WorkspaceError(f"role {role!r} is not one of {', '.join(r.value for r in Role)}") from None
        registry = self._registry()
        if name in registry:
            raise WorkspaceError(f"a node named {name!r} was already issued; revoke it and use a new name")
        now = now or _now()
        ca_key, ca_cert = self._ca()
        identity_key, tls_key = _x509.new_identity_key(), _x509.new_tls_key()
        node_id = node_id_from_public(_x509.ed25519_raw(identity_key)[1])
        flower: tuple[bytes, bytes] | None = None
        extra_uris: list[str] = []
        if role is Role.SITE:  # a site is also a Flower SuperNode: certify its node-auth key
            flower = _x509.new_flower_auth_key()
            extra_uris.append(_x509.URI_FLOWER_KEY + _x509.public_line_digest(flower[1]))
        identity = _x509.build_leaf(
            ca_key,
            ca_cert,
            identity_key.public_key(),
            name=name,
            node_id=node_id,
            role=role.value,
            now=now,
            days=days,
            tls=False,
            extra_uris=extra_uris,
        )
        tls = _x509.build_leaf(
            ca_key,
            ca_cert,
            tls_key.public_key(),
            name=name,
            node_id=node_id,
            role=role.value,
            now=now,
            days=days,
            tls=True,
            hosts=hosts,
        )
        node_dir = self.workspace / "nodes" / name
        node_dir.mkdir(parents=True, exist_ok=True)
        agreement_serial = None
        if role is Role.SITE:  # a site takes part in secure aggregation: certify its X25519 key
            agreement_serial = self._write_agreement(node_dir, name=name, node_id=node_id, now=now, days=days)
        _write_private(node_dir / "node.key", _x509.key_to_pem(identity_key))
        _write_private(node_dir / "tls.key", _x509.key_to_pem(tls_key))
        if flower is not None:
            _write_private(node_dir / "flower-auth.key", flower[0])
            (node_dir / "flower-auth.pub").write_bytes(flower[1] + b"\n")
        (node_dir / "node.pem").write_bytes(_x509.cert_to_pem(identity))
        (node_dir / "tls.pem").write_bytes(_x509.cert_to_pem(tls))
        shutil.copyfile(self.dir / "ca.pem", node_dir / "ca.pem")
        shutil.copyfile(self.dir / "crl.pem", node_dir / "crl.pem")
        self._write_swarm_key(node_dir, self.swarm_epoch)
        registry[name] = IssuedNode(
            name=name,
            role=role,
            node_id=node_id,
            serials=(_x509.serial(identity), _x509.serial(tls))
            + (() if agreement_serial is None else (agreement_serial,)),
            issued_at=now.isoformat(),
            expires_at=_x509.not_valid_after(tls).isoformat(),
            agreement_serial=agreement_serial,
        )
        self._save_registry(registry)
        return NodeIdentity.load(node_dir)

    def issue_agreement(self, name: str, *, days: int = 365, now: dt.datetime | None = None) -> NodeIdentity:
        """Certify a key-agreement key for a site issued before sites had one (its identity
        and TLS keys stay), into `<workspace>/nodes/<name>/`; copy `agreement.key` and
        `agreement.pem` from there to the site's node directory."""
        _check_days(days)
        registry = self._registry()
        node = registry.get(name)
        if node is None:
            raise WorkspaceError(f"no node named {name!r} was issued here; known: {', '.join(sorted(registry))}")
        if node.role is not Role.SITE:
            raise WorkspaceError(f"{name!r} has role {node.role}; only sites hold a key-agreement key")
        if node.revoked_at is not None:
            raise WorkspaceError(f"{name!r} is revoked; issue a new site instead")
        if node.agreement_serial is not None:
            raise WorkspaceError(
                f"{name!r} already has a key-agreement certificate; to replace it, revoke the node and issue a new one"
            )
        node_dir = self.workspace / "nodes" / name
        node_dir.mkdir(parents=True, exist_ok=True)
        serial = self._write_agreement(node_dir, name=name, node_id=node.node_id, now=now or _now(), days=days)
        registry[name] = replace(node, serials=(*node.serials, serial), agreement_serial=serial)
        self._save_registry(registry)
        return NodeIdentity.load(node_dir)

    def revoke(self, name: str) -> IssuedNode:
        """Add the node's certificates to the CA-signed revocation list, and copy the new
        list into every node directory of this workspace."""
        registry = self._registry()
        if name not in registry:
            raise WorkspaceError(f"no node named {name!r} was issued here; known: {', '.join(sorted(registry))}")
        node = registry[name]
        newly_revoked = node.revoked_at is None
        if newly_revoked:
            registry[name] = node = replace(node, revoked_at=_now().isoformat())
            self._save_registry(registry)
        number = self._crl_number() + 1
        self._write_crl(number=number)
        nodes = self.workspace / "nodes"
        for node_dir in nodes.iterdir() if nodes.is_dir() else ():
            if (node_dir / "crl.pem").exists():
                shutil.copyfile(self.dir / "crl.pem", node_dir / "crl.pem")
        if newly_revoked:
            self.rotate_swarm_key()
        return node

    @property
    def swarm_epoch(self) -> int:
        """The current swarm key epoch: how many times the DHT key was rotated."""
        return _read_epoch(self.dir / "swarm.epoch")

    def rotate_swarm_key(self) -> int:
        """Move the DHT to the next swarm key epoch and write its key into the directory of
        every node that is not revoked (revoked nodes keep the old one); the new epoch."""
        epoch = self.swarm_epoch + 1
        registry = self._registry()
        tmp = self.dir / "swarm.epoch.tmp"
        tmp.write_text(f"{epoch}\n")
        tmp.replace(self.dir / "swarm.epoch")
        for name, node in registry.items():
            node_dir = self.workspace / "nodes" / name
            if node.revoked_at is None and node_dir.is_dir():
                self._write_swarm_key(node_dir, epoch)
        return epoch

    def list(self) -> list[IssuedNode]:
        return sorted(self._registry().values(), key=lambda n: n.name)

    def node(self, name: str) -> NodeIdentity:
        return NodeIdentity.load(self.workspace / "nodes" / name)

    @property
    def ca_pem(self) -> bytes:
        return (self.dir / "ca.pem").read_bytes()

    # -- internals --------------------------------------------------------------------------

    def _write_agreement(self, node_dir: Path, *, name: str, node_id: str, now: dt.datetime, days: int) -> int:
        """Write `agreement.key` (0600) and `agreement.pem` for a site; the certificate's serial."""
        ca_key, ca_cert = self._ca()
        key = _x509.new_agreement_key()
        cert = _x509.build_leaf(
            ca_key,
            ca_cert,
            key.public_key(),
            name=name,
            node_id=node_id,
            role=Role.SITE.value,
            now=now,
            days=days,
            tls=False,
            agreement=True,
        )
        _write_private(node_dir / "agreement.key", _x509.key_to_pem(key))
        (node_dir / "agreement.pem").write_bytes(_x509.cert_to_pem(cert))
        return _x509.serial(cert)

    def _write_swarm_key(self, node_dir: Path, epoch: int) -> None:
        secret = bytes.fromhex((self.dir / "consortium.secret").read_text().strip())
        _write_private(node_dir / "swarm.key", _x509.derive_swarm_key(secret, epoch).hex().encode())
        (node_dir / "swarm.epoch").write_text(f"{epoch}\n")

    def _ca(self) -> tuple[_x509.IdentityKey, x509.Certificate]:
        key = _x509.identity_key_from_pem((self.dir / "ca.key").read_bytes())
        return key, _x509.cert_from_pem(self.ca_pem)

    def _registry(self) -> dict[str, IssuedNode]:
        path = self.dir / "registry.json"
        if not path.is_file():
            return {}
        try:
            return _REGISTRY.validate_json(path.read_bytes())
        except ValidationError as exc:
            raise WorkspaceError(f"{str(path)!r} is not a valid node registry: {exc}") from None

    def _save_registry(self, registry: dict[str, IssuedNode]) -> None:
        path = self.dir / "registry.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(_REGISTRY.dump_json(registry, indent=2))
        tmp.replace(path)

    def _crl_number(self) -> int:
        _, number = _x509.crl_from_pem((self.dir / "crl.pem").read_bytes(), _x509.cert_from_pem(self.ca_pem))
        return number

    def _write_crl(self, *, number: int) -> None:
        key, cert = self._ca()
        revoked = [
            (serial, dt.datetime.fromisoformat(node.revoked_at))
            for node in self._registry().values()
            if node.revoked_at is not None
            for serial in node.serials
        ]
        crl = _x509.build_crl(key, cert, revoked, number=number, now=_now(), days=3650)
        tmp = self.dir / "crl.pem.tmp"
        tmp.write_bytes(_x509.crl_to_pem(crl))
        tmp.replace(self.dir / "crl.pem")


def _read_epoch(path: Path) -> int:
    """A swarm key epoch file; absent means epoch 0 (workspaces made before rotation)."""
    if not path.is_file():
        return 0
    text = path.read_text().strip()
    if not text.isdigit():
        raise WorkspaceError(f"{str(path)!r} must hold a swarm key epoch (an integer >= 0), got {text[:20]!r}")
    return int(text)


def _check_days(days: int) -> None:
    """A validity period of at least one day: zero or less would issue a certificate that
    every peer refuses from the start."""
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise WorkspaceError(f"days={days!r}: a certificate's validity must be at least 1 day")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
