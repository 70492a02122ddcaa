"""`platform swarm bootstrap` (a bare DHT peer) and `platform swarm status` (who serves what)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from corolla.inference.client.routing import block_ranges
from corolla.inference.discovery import DhtNode, ServerRecord
from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.security import TlsConfig
from corolla.platform.identity_args import add_identity_options, tls_from_args


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    swarm = sub.add_parser("swarm", help="the DHT: run a bootstrap peer, show servers")
    swarm_sub = swarm.add_subparsers(dest="swarm_command", required=True)
    boot = swarm_sub.add_parser("bootstrap", help="run a bare DHT peer that others can join through")
    boot.add_argument("--host", default="127.0.0.1")
    boot.add_argument("--port", type=int, default=0, help="libp2p port (default: any free port)")
    boot.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR")
    add_identity_options(boot, role_hint="server")
    boot.set_defaults(run=run_bootstrap)
    status = swarm_sub.add_parser("status", help="servers of a model, their spans, and uncovered blocks")
    status.add_argument("--peers", action="append", required=True, metavar="MULTIADDR")
    which = status.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="checkpoint directory (gives the model id and block count)")
    which.add_argument("--model-id", help="model id as announced (block count then from the records)")
    add_identity_options(status, role_hint="site")
    status.set_defaults(run=run_status)


def run_bootstrap(args: argparse.Namespace) -> int:
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    tls = tls_from_args(args, "swarm bootstrap")
    with DhtNode(host=args.host, port=args.port, bootstrap=args.bootstrap, **dht_security(tls)) as node:
        print(f"READY dht={node.addrs[0]}", flush=True)
        print(
            f"bootstrap peer {node.peer_id} listening; join with --bootstrap {node.addrs[0]}",
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
    print(format_status(model_id, records, num_blocks))
    return 0


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


def format_status(model_id: str, records: list[ServerRecord], num_blocks: int | None) -> str:
    now = time.time()
    lines = [f"model {model_id}: {len(records)} server(s)"]
    header = (
        f"{'endpoint':<22} {'blocks':>9} {'dtype':>9} {'quant':>5} {'tok/s/blk':>10} {'ms/step/blk':>11} "
        f"{'free cache':>11} {'expires':>8}  node"
    )
    lines.append(header)
    for r in sorted(records, key=lambda r: (r.start, r.end, r.endpoint)):
        lines.append(
            f"{r.endpoint:<22} {f'{r.start}:{r.end}':>9} {r.dtype:>9} {r.quant or '-':>5} {r.throughput:>10.0f} "
            f"{r.step_ms_per_block:>11.3f} {r.free_cache_bytes / 2**20:>9.0f}Mi {r.expires_at - now:>7.0f}s"
            f"  {r.node_id}"
        )
    total = num_blocks if num_blocks is not None else max((r.end for r in records), default=0)
    covered = [0] * total
    for r in records:
        for i in range(r.start, min(r.end, total)):
            covered[i] += 1
    missing = [i for i, n in enumerate(covered) if n == 0]
    lines.append(f"blocks 0:{total}: " + ("all covered" if not missing else f"NOT covered: {block_ranges(missing)}"))
    lines.append("servers per block: " + " ".join(str(n) for n in covered))
    return "\n".join(lines)
