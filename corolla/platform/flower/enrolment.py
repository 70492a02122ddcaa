"""Enrolling consortium sites as Flower SuperNodes.

The consortium CA certifies each site's Flower node-auth key (its SHA-256 is in the
site's identity certificate), so the coordinator registers a key at the SuperLink only
after checking that certificate: consortium CA, unrevoked, role `site`, and this key.
A site that is not enrolled cannot take part in a round (Flower's node auth refuses it).
"""

from __future__ import annotations

from pathlib import Path

from corolla.pki import PeerCertificate, Verifier
from corolla.platform.flower.control import ControlClient


def enroll_site(control: ControlClient, verifier: Verifier, node_dir: Path) -> tuple[PeerCertificate, int]:
    """Check the site in `node_dir` (its `node.pem` and `flower-auth.pub`) and register its
    key; returns the site and the SuperLink's node id for it. Raises `CertificateError`
    (and registers nothing) when the site does not check."""
    public_key = node_dir / "flower-auth.pub"
    holder = verifier.check_flower_key((node_dir / "node.pem").read_bytes(), public_key.read_bytes())
    return holder, control.register_supernode(public_key)
