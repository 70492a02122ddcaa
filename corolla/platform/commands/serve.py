"""`platform serve`: serve a span of a model's blocks to the swarm."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from prometheus_client import ProcessCollector

from corolla.inference.device import DeviceKind, check_dtype, resolve_device
from corolla.inference.errors import BadRequestError
from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.server.app import BlockServer, MiB, ServerConfig
from corolla.inference.server.faults import FaultSpec
from corolla.inference.wire.tensors import DTYPES
from corolla.metrics import ServerMetrics
from corolla.pki import Role, WorkspaceError
from corolla.platform.commands._flags import add_renamed
from corolla.platform.identity_args import add_identity_options, check_port, tls_from_args
from corolla.platform.launch.servers import LaunchError
from corolla.platform.metrics_args import add_metrics_options, start_metrics

SHUTDOWN_GRACE_S = 0.5
"""On SIGTERM/SIGINT, open inference sessions get this long before they are cancelled."""


def parse_span(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(start), int(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks must look like START:END (e.g. 4:8), got {text!r}") from None


def parse_fault(text: str) -> FaultSpec:
    try:
        return FaultSpec.parse(text)
    except BadRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    p = sub.add_parser("serve", help="serve a span of transformer blocks")
    p.add_argument("--model", required=True, metavar="DIR", help="local Hugging Face checkpoint directory")
    p.add_argument(
        "--blocks", type=parse_span, metavar="START:END", help="span START:END; default: the least-served span"
    )
    p.add_argument("--num-blocks", type=int, help="span length when --blocks is not given (default: half)")
    p.add_argument(
        "--device",
        choices=[k.value for k in DeviceKind],
        default=DeviceKind.AUTO.value,
        help="where weights, KV caches and compute live (default auto: cuda if torch sees one, else cpu)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="compute dtype (default float32); float16 on cuda only",
    )
    p.add_argument(
        "--quant",
        choices=("int8", "nf4"),
        help="bitsandbytes weight quantization. int8: fit for use (SmolLM2-135M: perplexity within ~3%% of "
        "fp32, coherent text). nf4: NOT fit for use on small models (SmolLM2-135M: perplexity +20-50%%, "
        "greedy text departs from fp32's at once and can repeat itself); see docs/inference.md",
    )
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR", help="gRPC listen address")
    p.add_argument("--port", type=int, default=0, metavar="N", help="gRPC port 1-65535 (default 0: any free port)")
    p.add_argument("--announce-host", help="address to announce, if not --host")
    p.add_argument(
        "--dht-port", type=int, default=0, metavar="N", help="libp2p port 1-65535 (default 0: any free port)"
    )
    add_renamed(
        p,
        "--peers",
        "--bootstrap",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="DHT peer to join (repeatable); none = be a bootstrap peer",
    )
    p.add_argument("--no-dht", action="store_true", help="serve by address only, without the DHT")
    p.add_argument("--announce-port", type=int, help="port 1-65535 to announce, if not --port (e.g. behind a proxy)")
    add_identity_options(p, role_hint="server")
    add_metrics_options(p)
    p.add_argument("--max-sessions", type=int, default=32)
    p.add_argument("--cache-mb", type=int, default=1024, help="KV cache budget for all sessions, MiB")
    p.add_argument("--max-length", type=int, default=4096, metavar="N", help="longest inference session, tokens")
    p.add_argument("--max-message-mb", type=int, default=64, help="largest gRPC message, MiB")
    p.add_argument("--announce-ttl", type=float, default=30.0, help="seconds a DHT record lives unrefreshed")
    p.add_argument("--model-id", metavar="ID", help="override the model id (default: directory name + fingerprint)")
    # Tests and benchmarks only: corrupt a fraction of outputs (corolla/inference/server/faults.py).
    p.add_argument("--inject-fault", type=parse_fault, metavar="KIND:FRACTION[:SEED]", help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_port(args.port, "--port", listen=True)  # exit 2 before anything else
    check_port(args.dht_port, "--dht-port", listen=True)
    check_port(args.announce_port, "--announce-port", listen=False)
    tls = tls_from_args(args, "serve")  # an expired or revoked certificate of our own stops here (exit 8)
    if tls is not None and tls.identity.role != Role.SERVER:
        raise WorkspaceError(
            f"node {tls.identity.name!r} has role {tls.identity.role}; serving needs a certificate "
            "issued with --role server"
        )
    device = resolve_device(args.device)  # no CUDA for --device cuda: one line (exit 15) before anything loads
    check_dtype(device, DTYPES[args.dtype])
    Checkpoint.open(Path(args.model))  # a bad checkpoint is one line (exit 4) before anything listens
    _check_free(args.host, args.port, "--port")
    if not args.no_dht:
        _check_free(args.host, args.dht_port, "--dht-port")
    try:
        config = ServerConfig(
            model=Path(args.model),
            blocks=args.blocks,
            num_blocks=args.num_blocks,
            dtype=args.dtype,
            quant=args.quant,
            device=DeviceKind(args.device),
            host=args.host,
            port=args.port,
            announce_host=args.announce_host,
            dht=not args.no_dht,
            dht_port=args.dht_port,
            bootstrap=tuple(args.peers),
            max_message_bytes=args.max_message_mb * MiB,
            max_sessions=args.max_sessions,
            cache_budget_bytes=args.cache_mb * MiB,
            max_length=args.max_length,
            announce_ttl=args.announce_ttl,
            model_id=args.model_id,
            tls=tls,
            announce_port=args.announce_port,
            inject_fault=args.inject_fault,
        )
    except BadRequestError as exc:
        print(f"platform serve: {exc}", file=sys.stderr)
        return 2
    if config.inject_fault is not None:
        print(
            f"platform serve: WARNING: FAULT-INJECTING SERVER ({config.inject_fault}): it corrupts a fraction of its "
            "outputs on purpose; for tests and benchmarks only",
            file=sys.stderr,
            flush=True,
        )
    stopped = threading.Event()
    # Installed before loading, so a SIGTERM while starting also stops cleanly (below).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    metrics = ServerMetrics()
    ProcessCollector(registry=metrics.registry)  # resident memory, CPU seconds
    server = BlockServer(config, metrics=metrics)
    start_metrics(args, metrics.registry, server.readiness)  # /health answers 503 while the span loads
    try:
        server.start()
    except RuntimeError as exc:  # grpc's bind failure, should the port be taken between check and bind
        raise LaunchError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
    record = server.record()
    dht = server.dht.addrs[0] if server.dht is not None else "-"
    # One machine-readable line (launchers wait for it), then the human one.
    print(
        f"READY endpoint={server.endpoint} dht={dht} blocks={record.start}:{record.end} model_id={record.model_id} "
        f"device={server.device}",
        flush=True,
    )
    print(
        f"serving blocks {record.start}:{record.end} of {record.model_id} at {server.endpoint} on {server.device} "
        f"({record.dtype}{', ' + record.quant if record.quant else ''}); Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    stopped.wait()
    # Shutdown: refuse new calls, give open sessions a short grace, leave the DHT without
    # waiting for its timeouts; exit 0 (a signal is the normal way to stop a server).
    began, sessions = time.monotonic(), server.open_sessions
    server.stop(grace=SHUTDOWN_GRACE_S)
    print(
        f"stopped: closed {sessions} open session(s) ({server.open_sessions} left) in {time.monotonic() - began:.2f} s",
        file=sys.stderr,
        flush=True,
    )
    _exit_now(0)
    return 0  # not reached


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown: everything the server opened is closed by
    now, and unloading torch, grpc and libp2p takes 1.5-2 s on a busy machine, which
    service managers and launchers would wait for after SIGTERM."""
    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _check_free(host: str, port: int, flag: str) -> None:
    """A port that another process listens on is one clear line (exit 7), not a bind traceback
    from inside grpc or libp2p; 0 (any free port) needs no check."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LaunchError(f"--host {host!r}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LaunchError(f"{flag} {port}: {host}:{port} is already in use by another process") from None
            raise LaunchError(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror})") from None
