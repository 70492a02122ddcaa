"""`platform serve`: load a span, measure it, serve it over gRPC, announce it in the DHT."""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
import torch

from corolla.inference.device import DeviceKind, check_dtype, resolve_device
from corolla.inference.discovery import DhtNode, ServerRecord
from corolla.inference.errors import BadRequestError, ModelLoadError
from corolla.inference.grpc_tuning import tune_for_latency
from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.security import TlsConfig
from corolla.inference.server.backend import SpanBackend
from corolla.inference.server.faults import FaultInjectingBackend, FaultKind, FaultSpec, other_weights_span
from corolla.inference.server.loading import load_served_span
from corolla.inference.server.metering import MeteringInterceptor
from corolla.inference.server.service import BlockServicer, NodeStats, ServiceLimits
from corolla.inference.server.span_choice import choose_span
from corolla.inference.server.throughput import measure
from corolla.inference.wire import blocks_pb2_grpc as pb_grpc
from corolla.inference.wire.channel import grpc_options
from corolla.inference.wire.tensors import DTYPES
from corolla.metrics import Readiness, ServerMetrics

log = logging.getLogger(__name__)

MiB = 1 << 20
_STOP_SLACK_S = 1.0  # stop() waits this long past its grace for streams to end
_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    model: Path  # local Hugging Face checkpoint directory
    blocks: tuple[int, int] | None = None  # span [start, end); None = choose by announced throughput
    num_blocks: int | None = None  # span length when choosing; None = half the model, rounded up
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype; float16 on cuda only
    quant: Literal["int8", "nf4"] | None = None  # bitsandbytes weight quantization
    device: DeviceKind = DeviceKind.AUTO  # where weights, KV caches and compute live; auto = cuda if available
    host: str = "127.0.0.1"  # gRPC listen address
    port: int = 0  # gRPC port; 0 = any free port
    announce_host: str | None = None  # address put in the DHT record; None = host
    dht: bool = True  # join the DHT; False serves by address only (tests, static setups)
    dht_port: int = 0  # libp2p port; 0 = any free port
    bootstrap: tuple[str, ...] = ()  # multiaddrs of DHT peers; empty = this node bootstraps others
    max_message_bytes: int = 64 * MiB  # largest gRPC message in or out
    max_sessions: int = 32  # open inference sessions at once
    cache_budget_bytes: int = 1024 * MiB  # KV cache memory for all sessions together
    max_length: int = 4096  # longest inference session, and longest sequence in a forward/backward, tokens
    max_calls_per_peer: int = 16  # calls one peer may have open at once; below max_sessions + 16 (the worker threads)
    open_timeout: float = 5.0  # seconds an inference stream may take to send its open message
    revocation_check_interval: float = 1.0  # seconds between CRL re-checks of a call's peer while the call runs
    announce_ttl: float = 30.0  # seconds a DHT record stays valid without a refresh
    model_id: str | None = None  # override the checkpoint's fingerprinted id
    tls: TlsConfig | None = None  # mutual TLS, signed records, private DHT; None = plaintext (dev only)
    announce_port: int | None = None  # port put in the DHT record; None = the gRPC port (e.g. behind a proxy)
    inject_fault: FaultSpec | None = None  # TESTS AND BENCHMARKS ONLY: corrupt a fraction of outputs (faults.py)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise BadRequestError(f"dtype={self.dtype!r} must be 'float32', 'bfloat16' or 'float16'")
        if not isinstance(self.device, DeviceKind):
            raise BadRequestError(
                f"device={self.device!r} must be a DeviceKind ({', '.join(k.value for k in DeviceKind)})"
            )
        if self.quant not in (None, "int8", "nf4"):
            raise BadRequestError(f"quant={self.quant!r} must be None, 'int8' or 'nf4'")
        if self.blocks is not None and not 0 <= self.blocks[0] < self.blocks[1]:
            raise BadRequestError(f"blocks={self.blocks} must be start:end with 0 <= start < end")
        for name in ("max_message_bytes", "max_sessions", "cache_budget_bytes", "max_length"):
            if getattr(self, name) < 1:
                raise BadRequestError(f"{name}={getattr(self, name)} must be at least 1")
        if not 1 <= self.max_calls_per_peer < self.max_sessions + 16:
            raise BadRequestError(
                f"max_calls_per_peer={self.max_calls_per_peer} must be at least 1 and below max_sessions + 16 "
                f"= {self.max_sessions + 16} (the worker threads), so one peer never holds them all"
            )
        for name in ("open_timeout", "revocation_check_interval"):
            if not 0 < getattr(self, name) <= 600:
                raise BadRequestError(f"{name}={getattr(self, name)} must be a number of seconds in (0, 600]")
        if self.announce_ttl <= 0:
            raise BadRequestError(f"announce_ttl={self.announce_ttl} must be positive")
        if self.inject_fault is not None and not isinstance(self.inject_fault, FaultSpec):
            raise BadRequestError(f"inject_fault={self.inject_fault!r} must be a FaultSpec or None")


class BlockServer:
    """One `platform serve` process's worth of serving; `start()` returns once it serves."""

    def __init__(self, config: ServerConfig, *, metrics: ServerMetrics | None = None) -> None:
        """With `metrics`, every RPC, session and forward is recorded there, and `readiness`
        turns ready once the server serves (and is announced)."""
        self.config = config
        self.metrics = metrics
        self.readiness = Readiness()
        self.dht: DhtNode | None = None
        self.backend: SpanBackend | None = None
        self.device: torch.device | None = None  # resolved from config.device at start
        self.servicer: BlockServicer | None = None
        self._grpc: grpc.Server | None = None
        self._port = 0
        self._stop = threading.Event()
        self._announcer: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> BlockServer:
        tune_for_latency()
        cfg = self.config
        device = resolve_device(cfg.device)  # before anything starts: no cuda is one line (exit 15)
        dtype = DTYPES[cfg.dtype]
        check_dtype(device, dtype)
        self.device = device
        checkpoint = Checkpoint.open(cfg.model)
        model_id = cfg.model_id or checkpoint.model_id
        if cfg.dht:
            tls = cfg.tls
            self.dht = DhtNode(
                bootstrap=cfg.bootstrap,
                port=cfg.dht_port,
                host=cfg.host,
                key_pair=tls.identity.libp2p_key_pair() if tls else None,
                psk=tls.identity.swarm_key if tls else None,
                record_filter=tls.record_filter if tls else None,
            )
            self.dht.start()
            node_id = self.dht.peer_id
        elif cfg.tls is not None:
            node_id = cfg.tls.identity.node_id
        else:
            node_id = "Static" + "".join(secrets.choice(_BASE58) for _ in range(20))
        start, end = self._pick_span(checkpoint, model_id)
        span = load_served_span(checkpoint, start, end, dtype=dtype, device=device, quant=cfg.quant)
        self.backend = SpanBackend(
            span, model_id=model_id, hidden_size=checkpoint.hidden_size, dtype=dtype, quant=cfg.quant
        )
        throughput, step_ms = measure(self.backend)
        log.info(
            "serving %s blocks %d:%d (%s, %s%s): %.0f tok/s/block, %.3f ms/step/block",
            model_id,
            start,
            end,
            device,
            cfg.dtype,
            f", {cfg.quant}" if cfg.quant else "",
            throughput,
            step_ms,
        )
        if cfg.inject_fault is not None:
            self.backend = self._faulty(self.backend, cfg.inject_fault, checkpoint)
        limits = ServiceLimits(
            max_message_bytes=cfg.max_message_bytes,
            max_sessions=cfg.max_sessions,
            cache_budget_bytes=cfg.cache_budget_bytes,
            max_length=cfg.max_length,
            max_calls_per_peer=cfg.max_calls_per_peer,
            open_timeout=cfg.open_timeout,
            revocation_check_interval=cfg.revocation_check_interval,
        )
        self.servicer = BlockServicer(
            self.backend,
            limits=limits,
            stats=NodeStats(node_id=node_id, throughput=throughput, step_ms_per_block=step_ms),
            tls=cfg.tls,
            metrics=self.metrics,
        )
        interceptors: list[grpc.ServerInterceptor] = []
        if cfg.tls is not None:
            interceptors.append(cfg.tls.server_interceptor())
        if self.metrics is not None:
            self._meter(self.metrics, self.servicer)
            interceptors.append(MeteringInterceptor(self.metrics))
        # each open inference stream holds a worker thread for its lifetime
        workers = cfg.max_sessions + 16
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="corolla-rpc"),
            options=grpc_options(cfg.max_message_bytes),
            maximum_concurrent_rpcs=workers,
            interceptors=interceptors or None,
        )
        pb_grpc.add_BlockServiceServicer_to_server(self.servicer, self._grpc)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls is not None:
            self._port = self._grpc.add_secure_port(address, cfg.tls.server_credentials())
        else:
            self._port = self._grpc.add_insecure_port(address)
        if self._port == 0:
            raise ModelLoadError(f"cannot listen on {cfg.host}:{cfg.port}")
        self._grpc.start()
        if self.dht is not None:
            self.announce()
            self._announcer = threading.Thread(target=self._announce_loop, name="corolla-announce", daemon=True)
            self._announcer.start()
        self.readiness.ready()
        return self

    def _meter(self, metrics: ServerMetrics, servicer: BlockServicer) -> None:
        budget = float(self.config.cache_budget_bytes)
        metrics.kv_cache_capacity.set(budget)
        metrics.sessions_open.set_function(lambda: float(servicer.sessions.open_sessions))
        metrics.kv_cache_used.set_function(lambda: budget - float(servicer.sessions.free_bytes))

    def stop(self, grace: float = 0.5) -> None:
        """Stop promptly: refuse new calls at once, end open sessions after `grace` seconds,
        and leave the DHT meanwhile (its peers see the connection close; the record expires
        on its own). Idempotent."""
        self._stop.set()
        self.readiness.not_ready("stopping")
        leaving = None
        if self.dht is not None:  # leaving the DHT needs no gRPC: do both at once
            leaving = threading.Thread(target=self.dht.stop, name="corolla-dht-stop", daemon=True)
            leaving.start()
        if self._grpc is not None:
            self._grpc.stop(grace).wait(grace + _STOP_SLACK_S)
        if self.servicer is not None:
            # Cancelled streams release their sessions in their own worker threads.
            deadline = time.monotonic() + _STOP_SLACK_S
            while self.servicer.sessions.open_sessions and time.monotonic() < deadline:
                time.sleep(0.01)
        if leaving is not None:
            leaving.join(_STOP_SLACK_S)  # DhtNode.stop is bounded too; a daemon thread past this

    @property
    def open_sessions(self) -> int:
        """Inference sessions open now (each holds a KV cache reservation)."""
        return self.servicer.sessions.open_sessions if self.servicer is not None else 0

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            pass

    def __enter__(self) -> BlockServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- announcing --------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        host = self.config.announce_host or self.config.host
        return f"{host}:{self.config.announce_port or self._port}"

    @property
    def port(self) -> int:
        return self._port

    def record(self) -> ServerRecord:
        if self.backend is None or self.servicer is None:
            raise ModelLoadError("server is not started")
        now = time.time()
        record = ServerRecord(
            node_id=self.servicer.stats.node_id,
            endpoint=self.endpoint,
            model_id=self.backend.model_id,
            start=self.backend.start,
            end=self.backend.end,
            throughput=self.servicer.stats.throughput,
            step_ms_per_block=self.servicer.stats.step_ms_per_block,
            free_cache_bytes=self.servicer.sessions.free_bytes,
            dtype=self.config.dtype,
            quant=self.config.quant,
            updated_at=now,
            expires_at=now + self.config.announce_ttl,
        )
        return self.config.tls.record(record) if self.config.tls is not None else record

    def announce(self) -> None:
        if self.dht is not None:
            self.dht.announce(self.record())

    def _announce_loop(self) -> None:
        period = self.config.announce_ttl / 3
        while not self._stop.wait(period):
            try:
                self.announce()
            except Exception:  # keep serving; the next refresh may succeed
                log.exception("announcing to the DHT failed")

    def _faulty(self, backend: SpanBackend, spec: FaultSpec, checkpoint: Checkpoint) -> FaultInjectingBackend:
        other = None
        if spec.kind == FaultKind.OTHER_WEIGHTS:
            seed = secrets.randbits(63) if spec.seed is None else spec.seed
            other = other_weights_span(
                checkpoint,
                backend.start,
                backend.end,
                dtype=backend.dtype,
                quant=self.config.quant,
                seed=seed,
                device=backend.device,
            )
        log.warning(
            "FAULT INJECTION: this server corrupts a fraction %g of its outputs (%s); for tests and benchmarks "
            "only, never in a consortium",
            spec.fraction,
            spec,
        )
        return FaultInjectingBackend(backend, spec, other=other)

    def _pick_span(self, checkpoint: Checkpoint, model_id: str) -> tuple[int, int]:
        total = checkpoint.num_blocks
        if self.config.blocks is not None:
            start, end = self.config.blocks
            if end > total:
                raise ModelLoadError(f"--blocks {start}:{end} is past the model's {total} blocks")
            return start, end
        length = self.config.num_blocks or math.ceil(total / 2)
        records = self.dht.find_servers(model_id) if self.dht is not None else []
        return choose_span(records, num_blocks=total, length=length)
