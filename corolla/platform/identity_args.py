"""The `--workspace/--node/--insecure` options that every networked command shares, and the
range check of its port flags."""

from __future__ import annotations

import argparse

from corolla.errors import CorollaError
from corolla.inference.security import TlsConfig
from corolla.pki import NodeIdentity
from corolla.pki.errors import WorkspaceError
from corolla.platform.workspace import resolve_workspace


def add_identity_options(parser: argparse.ArgumentParser, *, role_hint: str) -> None:
    parser.add_argument("--workspace", help="state directory (default ~/.corolla or $COROLLA_WORKSPACE)")
    parser.add_argument("--node", help=f"this node's name in the workspace (issued with --role {role_hint})")
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext gRPC and an open DHT: development and benchmarks only"
    )


def tls_from_args(args: argparse.Namespace, command: str) -> TlsConfig | None:
    """The node's TLS settings, None with `--insecure`; a clear error when neither."""
    if args.insecure:
        if args.node:
            raise WorkspaceError("--node and --insecure exclude each other")
        return None
    if not args.node:
        raise WorkspaceError("give --node NAME (a node issued by `platform keys issue`) or --insecure")
    workspace = resolve_workspace(args.workspace)
    identity = NodeIdentity.load(workspace / "nodes" / args.node)
    # Peers would refuse an expired or revoked certificate: say so here, before dialing or
    # listening, instead of failing later as "no servers" or an empty swarm (exit 8).
    identity.check_own_certificate()
    return TlsConfig.for_node(identity)


class PortError(CorollaError):
    """A port flag out of range: a usage error (exit 2), found before anything listens."""

    exit_code = 2


def check_port(port: int | None, flag: str, *, listen: bool) -> None:
    """`port` within 1-65535 (`listen`: 0 too, meaning any free port), else `PortError`
    naming the flag and the value: never a wrapped or random port."""
    if port is None:
        return
    low = 0 if listen else 1
    if not low <= port <= 65535:
        free = ", or 0 for any free port" if listen else ""
        raise PortError(f"{flag} {port} is out of range: give 1-65535{free}")
