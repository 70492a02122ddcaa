"""`platform keys`: the consortium CA and node certificates in a workspace."""

from __future__ import annotations

import argparse
import datetime as dt

from corolla.pki import ConsortiumCA, Role
from corolla.platform.commands._flags import add_renamed
from corolla.platform.workspace import resolve_workspace


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    keys = sub.add_parser("keys", help="consortium CA, node certificates, revocation")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)

    init = keys_sub.add_parser("init-ca", help="create the consortium CA in the workspace")
    init.add_argument("--consortium", default="corolla", help="consortium name, in every certificate")
    init.add_argument("--days", type=_days, default=3650, help="CA validity (default 10 years)")
    init.set_defaults(run=run_init_ca)

    issue = keys_sub.add_parser("issue", help="issue a node its keys and certificates")
    issue.add_argument("--role", required=True, choices=[r.value for r in Role])
    issue.add_argument("--name", required=True, help="node name, unique in the consortium")
    issue.add_argument("--days", type=_days, default=365, help="certificate validity (default 1 year)")
    add_renamed(
        issue,
        "--san",
        "--host",
        action="append",
        default=[],
        metavar="HOST",
        help="extra DNS name or IP address in the TLS certificate (repeatable)",
    )
    issue.set_defaults(run=run_issue)

    revoke = keys_sub.add_parser(
        "revoke", help="revoke a node: add it to the CA-signed revocation list and rotate the DHT swarm key"
    )
    revoke.add_argument("name")
    revoke.set_defaults(run=run_revoke)

    agreement = keys_sub.add_parser(
        "issue-agreement", help="certify a key-agreement key (secure aggregation) for a site issued without one"
    )
    agreement.add_argument("--name", required=True, help="the site's node name")
    agreement.add_argument("--days", type=_days, default=365, help="certificate validity (default 1 year)")
    agreement.set_defaults(run=run_issue_agreement)

    listing = keys_sub.add_parser("list", help="nodes issued by this CA")
    listing.set_defaults(run=run_list)
    for p in (init, issue, revoke, agreement, listing):
        p.add_argument("--workspace", help="state directory (default ~/.corolla or $COROLLA_WORKSPACE)")


def run_init_ca(args: argparse.Namespace) -> int:
    workspace = resolve_workspace(args.workspace)
    ConsortiumCA.init(workspace, consortium=args.consortium, days=args.days)
    print(f"created the {args.consortium} consortium CA in {workspace / 'ca'}")
    print("keep ca/ca.key and ca/consortium.secret offline; give nodes their nodes/<name>/ directory")
    return 0


def run_issue(args: argparse.Namespace) -> int:
    ca = ConsortiumCA.open(resolve_workspace(args.workspace))
    node = ca.issue(args.name, args.role, days=args.days, hosts=args.san)
    print(f"issued {node.name} ({node.role}) node id {node.node_id}")
    print(f"its files: {node.directory}  (copy the whole directory to the node)")
    return 0


def run_issue_agreement(args: argparse.Namespace) -> int:
    ca = ConsortiumCA.open(resolve_workspace(args.workspace))
    node = ca.issue_agreement(args.name, days=args.days)
    print(f"certified a key-agreement key for {node.name} ({node.role})")
    print(f"copy {node.directory}/agreement.key and agreement.pem to the site's node directory")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    ca = ConsortiumCA.open(resolve_workspace(args.workspace))
    node = ca.revoke(args.name)
    print(f"revoked {node.name} ({node.role}, node id {node.node_id})")
    print(f"distribute {ca.dir / 'crl.pem'} to every node's crl.pem; running nodes re-read it")
    print(
        f"rotated the DHT swarm key to epoch {ca.swarm_epoch}: copy nodes/<name>/swarm.key and swarm.epoch to every "
        f"remaining member and restart it; until then it cannot reach members that already use the new key"
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    ca = ConsortiumCA.open(resolve_workspace(args.workspace))
    nodes = ca.list()
    now = dt.datetime.now(dt.UTC)
    print(f"{'name':<20} {'role':<12} {'status':<8} {'expires':<26} node id")
    for node in nodes:
        status = _status(node.revoked_at, node.expires_at, now)
        print(f"{node.name:<20} {node.role:<12} {status:<8} {node.expires_at:<26} {node.node_id}")
    if not nodes:
        print("(no nodes issued yet: platform keys issue --role server --name NAME)")
    return 0


def _days(text: str) -> int:
    """A validity period in whole days, at least 1 (argparse type: anything else is a usage error)."""
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--days {text!r} is not a whole number of days") from None
    if days < 1:
        raise argparse.ArgumentTypeError(f"--days {days}: a certificate must be valid for at least 1 day")
    return days


def _status(revoked_at: str | None, expires_at: str, now: dt.datetime) -> str:
    """revoked, expired or valid: what a peer would make of the node's certificates now."""
    if revoked_at:
        return "revoked"
    expires = dt.datetime.fromisoformat(expires_at)
    if expires.tzinfo is None:  # written as UTC
        expires = expires.replace(tzinfo=dt.UTC)
    return "expired" if expires < now else "valid"
