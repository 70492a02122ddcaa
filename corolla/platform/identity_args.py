"""The `--workspace/--node/--insecure` options that every networked command shares."""

from __future__ import annotations

import argparse

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
            raise WorkspaceError(f"platform {command}: --node and --insecure exclude each other")
        return None
    if not args.node:
        raise WorkspaceError(
            f"platform {command}: give --node NAME (a node issued by `platform keys issue`) or --insecure"
        )
    workspace = resolve_workspace(args.workspace)
    return TlsConfig.for_node(NodeIdentity.load(workspace / "nodes" / args.node))
