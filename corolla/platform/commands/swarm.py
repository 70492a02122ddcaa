"""`platform swarm bootstrap` (a bare DHT peer) and `platform swarm status` (who serves what)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from pydantic import ValidationError

from corolla.inference.client.routing import block_ranges
from corolla.inference.discovery import DhtNode, ServerRecord
from corolla.inference.errors import AccessDeniedError
from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.security import TlsConfig
from corolla.metrics import Readiness
from corolla.platform.commands._flags import add_renamed
from corolla.platform.identity_args import add_identity_options, check_port, tls_from_args
from corolla.platform.metrics_args import add_metrics_options, start_metrics
from corolla.platform.workspace import resolve_workspace
from corolla.verify.events import Subject
from corolla.verify.reputation import ReputationBook


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    swarm = sub.add_parser("swarm", help="the DHT: run a bootstrap peer, show servers")
    swarm_sub = swarm.add_subparsers(dest="swarm_command", required=True)
    boot = swarm_sub.add_parser("bootstrap", help="run a bare DHT peer that others can join through")
    boot.add_argument("--host", default="127.0.0.1", metavar="ADDR", help="libp2p listen address")
    add_renamed(
        boot,
        "--dht-port",
        "--port",
        type=int,
        default=0,
        metavar="N",
        help="libp2p port 1-65535 (default 0: any free port)",
    )
    add_renamed(
        boot,
        "--peers",
        "--bootstrap",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="DHT peer to join (repeatable); none = the first peer of a new swarm",
    )
    add_identity_options(boot, role_hint="server")
    add_metrics_options(boot)
    boot.set_defaults(run=run_bootstrap)
    status = swarm_sub.add_parser("status", help="servers of a model, their spans, and uncovered blocks")
    status.add_argument(
        "--peers", action="append", required=True, metavar="MULTIADDR", help="DHT peer to join (repeatable)"
    )
    which = status.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="DIR", help="checkpoint directory (gives the model id and block count)")
    which.add_argument("--model-id", metavar="ID", help="model id as announced (block count then from the records)")
    status.add_argument(
        "--ledger", metavar="URL", help="verification ledger for the reputation column (default: the workspace's)"
    )
    add_identity_options(status, role_hint="site")
    status.set_defaults(run=run_status)


def run_bootstrap(args: argparse.Namespace) -> int:
    check_port(args.dht_port, "--dht-port", listen=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    tls = tls_from_args(args, "swarm bootstrap")
    readiness = Readiness()
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
    endpoint = start_metrics(args, registry, readiness)
    with (
        contextlib.closing(endpoint) if endpoint is not None else contextlib.nullcontext(),
        DhtNode(host=args.host, port=args.dht_port, bootstrap=args.peers, **dht_security(tls)) as node,
    ):
        readiness.ready()
        print(f"READY dht={node.addrs[0]}", flush=True)
        print(
            f"bootstrap peer {node.peer_id} listening; join with --peers {node.addrs[0]}",
            file=sys.stderr,
            flush=True,
        )
        stopped.wait()
    return 0


def run_status(args: argparse.Namespace) -> int:
    if args.model:
        checkpoint = Checkpoint.open(Path(args.model))
        model_id, num_blocks = checkpoint.model_id, checkpoint.num_blocks
    else:
        model_id, num_blocks = args.model_id, None
    tls = tls_from_args(args, "swarm status")
    with DhtNode(bootstrap=args.peers, **dht_security(tls)) as node:
        records = node.find_servers(model_id)
    refused = tls_refusals(tls, records) if tls is not None else {}
    reputation = ledger_reputation(args.ledger, args.workspace)
    print(format_status(model_id, records, num_blocks, reputation=reputation, refused=refused))
    return 0


def tls_refusals(tls: TlsConfig, records: list[ServerRecord]) -> dict[str, str]:
    """endpoint -> why this node's TLS check refuses the server there (the handshake fails, or
    its certificate is expired, revoked, of another CA or not the one its record names): a
    client would never route through it, so it is no coverage."""
    refused: dict[str, str] = {}
    for r in records:
        try:
            tls.verify_server(r.endpoint, node_id=r.node_id, fingerprint=r.tls_fingerprint)
        except AccessDeniedError as exc:
            refused[r.endpoint] = str(exc).removeprefix(f"{r.endpoint}: ")
    return refused


def ledger_reputation(url: str | None, workspace: str | None) -> ReputationBook | None:
    """The ledger replayed through the reputation policy: `url`, else the workspace's ledger
    if there is one (None then: no column values)."""
    from corolla.platform.commands.audit import open_existing_ledger, reputation_book
    from corolla.verify.ledger_paths import default_ledger_path, default_ledger_url

    if url is None:
        ws = resolve_workspace(workspace)
        if not default_ledger_path(ws).is_file():
            return None
        url = default_ledger_url(ws)
    with open_existing_ledger(url) as ledger:
        return reputation_book(ledger)


def _reputation_cell(book: ReputationBook | None, model_id: str, r: ServerRecord, quarantined: frozenset[str]) -> str:
    """`score/audits` of the record's (node, model, span), flagged if routing leaves the node out."""
    if book is None:
        return "-"
    flag = " QUARANTINED" if r.node_id in quarantined else ""
    try:
        subject = Subject(node_id=r.node_id, model_id=model_id, start=r.start, end=r.end)
    except ValidationError:
        return "-" + flag
    state = book.state(subject)
    audits = state.audits_passed + state.audits_failed
    if audits + state.inconclusive == 0:
        return "no audits" + flag
    return f"{state.score:.3f}/{audits}" + flag


def dht_security(tls: TlsConfig | None) -> dict[str, Any]:
    """DhtNode options for a node with this identity: its key, the swarm's pre-shared
    key, and the certificate check on every record."""
    if tls is None:
        return {}
    return {
        "key_pair": tls.identity.libp2p_key_pair(),
        "psk": tls.identity.swarm_key,
        "record_filter": tls.record_filter,
    }


def format_status(
    model_id: str,
    records: list[ServerRecord],
    num_blocks: int | None,
    *,
    reputation: ReputationBook | None = None,
    refused: Mapping[str, str] | None = None,
) -> str:
    """The status table; `reputation` (the ledger replayed) fills the reputation column:
    score/refereed audits of the server's (node, model, span), QUARANTINED when routing
    leaves the node out, "-" without a ledger. Servers in `refused` (endpoint -> why) are
    marked REFUSED and not counted as coverage."""
    refused = refused or {}
    now = time.time()
    n_refused = sum(1 for r in records if r.endpoint in refused)
    lines = [f"model {model_id}: {len(records)} server(s)" + (f", {n_refused} refused by TLS" if n_refused else "")]
    header = (
        f"{'endpoint':<22} {'blocks':>9} {'dtype':>9} {'quant':>5} {'tok/s/blk':>10} {'ms/step/blk':>11} "
        f"{'free cache':>11} {'expires':>8} {'reputation':>22}  node"
    )
    lines.append(header)
    quarantined = reputation.quarantined_nodes(model_id) if reputation is not None else frozenset()
    for r in sorted(records, key=lambda r: (r.start, r.end, r.endpoint)):
        rep = _reputation_cell(reputation, model_id, r, quarantined)
        lines.append(
            f"{r.endpoint:<22} {f'{r.start}:{r.end}':>9} {r.dtype:>9} {r.quant or '-':>5} {r.throughput:>10.0f} "
            f"{r.step_ms_per_block:>11.3f} {r.free_cache_bytes / 2**20:>9.0f}Mi {r.expires_at - now:>7.0f}s"
            f" {rep:>22}  {r.node_id}" + (f"  REFUSED: {refused[r.endpoint]}" if r.endpoint in refused else "")
        )
    total = num_blocks if num_blocks is not None else max((r.end for r in records), default=0)
    covered = [0] * total
    for r in records:
        if r.endpoint in refused:
            continue
        for i in range(r.start, min(r.end, total)):
            covered[i] += 1
    missing = [i for i, n in enumerate(covered) if n == 0]
    lines.append(f"blocks 0:{total}: " + ("all covered" if not missing else f"NOT covered: {block_ranges(missing)}"))
    lines.append("servers per block: " + " ".join(str(n) for n in covered))
    return "\n".join(lines)
