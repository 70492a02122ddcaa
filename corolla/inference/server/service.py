"""The gRPC face of a block server: `BlockService` over a `SpanBackend`.

Every handler turns a Corolla error into its gRPC status with a message that names
the error class (the client maps it back to the same class), and any unexpected
exception into INTERNAL after logging it: a bad request never takes the server down.

Every call holds one of its peer's call slots (`PeerCalls`) while it runs, and its
computation is watched between blocks: it stops when the caller goes away or its
deadline passes, and a call (a long stream above all) from a peer revoked meanwhile
ends with PERMISSION_DENIED. An inference stream must send its open message within
`open_timeout` seconds.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar, cast

import grpc
import torch

from corolla.inference.errors import (
    BadRequestError,
    CallAbandonedError,
    InferenceError,
    MaxLengthExceededError,
    MessageTooLargeError,
    SessionNotFoundError,
    StreamTimeoutError,
)
from corolla.inference.models.kv_cache import SpanCache
from corolla.inference.models.lora import SpanAdapter
from corolla.inference.security import PeerWatch, TlsConfig, peer_key
from corolla.inference.server.adapters import AdapterStore, GradStore, check_adapter
from corolla.inference.server.backend import SpanBackend, clip_sum, watched
from corolla.inference.server.sessions import PeerCalls, SessionRegistry
from corolla.inference.wire import blocks_pb2 as pb
from corolla.inference.wire import blocks_pb2_grpc as pb_grpc
from corolla.inference.wire.adapters import named_tensors, parse_adapter
from corolla.inference.wire.backward import AdapterGrads
from corolla.inference.wire.tensors import DTYPE_NAMES, deserialize, serialize
from corolla.metrics import ServerMetrics

MiB = 1 << 20

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True, slots=True)
class ServiceLimits:
    max_message_bytes: int  # largest request or response, bytes
    max_sessions: int  # open inference sessions at once
    cache_budget_bytes: int  # KV cache memory for all sessions together
    max_length: int  # longest session a client may open, tokens
    adapter_budget_bytes: int = 256 * MiB  # LoRA adapters held for clients, all together
    grad_budget_bytes: int = 512 * MiB  # per-sample gradients waiting for ClipSum, all together
    grad_ttl: float = 120.0  # seconds per-sample gradients wait for ClipSum
    max_calls_per_peer: int = 16  # calls one peer may have open here at once (streams included)
    open_timeout: float = 5.0  # seconds an inference stream may take to send its open message
    revocation_check_interval: float = 1.0  # seconds between CRL checks of a call's peer while it runs


@dataclass(slots=True)
class NodeStats:
    """What the server measured about itself, reported by Info and in DHT records."""

    node_id: str
    throughput: float
    step_ms_per_block: float


@dataclass(slots=True)
class _Session:
    """An open inference session: its blocks, its cache, how many tokens it holds."""

    session_id: str
    start: int
    end: int
    cache: SpanCache
    adapter: SpanAdapter | None = None
    length: int = 0


class BlockServicer(pb_grpc.BlockServiceServicer):
    def __init__(
        self,
        backend: SpanBackend,
        *,
        limits: ServiceLimits,
        stats: NodeStats,
        tls: TlsConfig | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        """With `tls`, every call's client certificate is re-checked against the CRL while it runs;
        with `metrics`, rows and tokens of every forward are counted there."""
        self.backend = backend
        self.metrics = metrics
        self.limits = limits
        self.stats = stats
        self.tls = tls
        self.sessions = SessionRegistry(max_sessions=limits.max_sessions, cache_budget_bytes=limits.cache_budget_bytes)
        self.calls = PeerCalls(max_per_peer=limits.max_calls_per_peer)
        # adapters are refreshed every optimizer step; one left unused for an hour is gone
        self.adapters = AdapterStore(budget_bytes=limits.adapter_budget_bytes, ttl=3600.0)
        self.grads = GradStore(budget_bytes=limits.grad_budget_bytes, ttl=limits.grad_ttl)

    # -- unary -----------------------------------------------------------------------------

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        return self._serve(self._info, context)

    def _info(self) -> pb.InfoResponse:
        b = self.backend
        return pb.InfoResponse(
            node_id=self.stats.node_id,
            model_id=b.model_id,
            start=b.start,
            end=b.end,
            dtype=DTYPE_NAMES[b.dtype],
            quant=b.quant or "",
            throughput=self.stats.throughput,
            step_ms_per_block=self.stats.step_ms_per_block,
            free_cache_bytes=self.sessions.free_bytes,
            hidden_size=b.hidden_size,
            max_message_bytes=self.limits.max_message_bytes,
            max_sessions=self.limits.max_sessions,
        )

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        def run() -> pb.ForwardResponse:
            self.backend.check_request(request.model_id, request.start, request.end)
            hidden = self._hidden(request.hidden, "hidden", whole_sequence=True)
            adapter = self._adapter(request.adapter)
            out = self.backend.forward(hidden, request.start, request.end, adapter=adapter)
            self._count("Forward", hidden)
            return pb.ForwardResponse(hidden=serialize(out))

        return self._serve(run, context)

    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext) -> pb.BackwardResponse:
        def run() -> pb.BackwardResponse:
            self.backend.check_request(request.model_id, request.start, request.end)
            hidden = self._hidden(request.hidden, "hidden", whole_sequence=True)
            grad_output = self._hidden(request.grad_output, "grad_output")
            try:
                mode = AdapterGrads(request.adapter_grads)
            except ValueError:
                raise BadRequestError(f"adapter_grads={request.adapter_grads} is not a known mode") from None
            if mode == AdapterGrads.NORMS and not 1 <= len(request.step_id) <= 128:
                raise BadRequestError("a NORMS backward needs a step_id of 1 to 128 characters for its ClipSum")
            adapter = self._adapter(request.adapter)
            if adapter is not None and mode != AdapterGrads.NONE:
                # per-sample copies of every weight: bounded before anything is allocated
                need = hidden.shape[0] * 4 * adapter.numel(request.start, request.end)
                limit = self.limits.grad_budget_bytes if mode == AdapterGrads.NORMS else self.limits.max_message_bytes
                if need > limit:
                    raise MessageTooLargeError(
                        f"per-sample gradients of {hidden.shape[0]} records need {need} bytes here; the limit is "
                        f"{limit}: send smaller batches"
                    )
            result = self.backend.backward(
                hidden,
                grad_output,
                request.start,
                request.end,
                adapter=adapter,
                adapter_grads=mode,
                grad_input=not request.skip_grad_input,
            )
            response = pb.BackwardResponse()
            if result.grad_input is not None:
                response.grad_input.CopyFrom(serialize(result.grad_input))
            if mode == AdapterGrads.PER_SAMPLE:
                response.adapter_grads.extend(named_tensors(result.per_sample))
            elif mode == AdapterGrads.NORMS and result.squared_norms is not None:
                self.grads.put(request.step_id, hidden.shape[0], result.per_sample)
                response.squared_norms.CopyFrom(serialize(result.squared_norms))
            return response

        return self._serve(run, context)

    def PutAdapter(self, request: pb.PutAdapterRequest, context: grpc.ServicerContext) -> pb.PutAdapterResponse:
        def run() -> pb.PutAdapterResponse:
            b = self.backend
            b.check_request(request.model_id, b.start, b.end)
            digest, scaling, tensors = parse_adapter(request.adapter, max_elements=self.limits.max_message_bytes // 2)
            self.adapters.put(digest, check_adapter(b.span, scaling, tensors))
            return pb.PutAdapterResponse(hash=digest)

        return self._serve(run, context)

    def ClipSum(self, request: pb.ClipSumRequest, context: grpc.ServicerContext) -> pb.ClipSumResponse:
        def run() -> pb.ClipSumResponse:
            batch, grads = self.grads.peek(request.step_id)  # a malformed request leaves them in place
            factors = deserialize(request.clip_factors, name="clip_factors", shape=(batch,))
            if factors.dtype != torch.float32 or not torch.isfinite(factors).all() or (factors < 0).any():
                raise BadRequestError("clip_factors must be finite, non-negative float32")
            self.grads.pop(request.step_id)
            return pb.ClipSumResponse(adapter_grads=named_tensors(clip_sum(grads, factors)))

        return self._serve(run, context)

    # -- streaming ---------------------------------------------------------------------------

    def Inference(
        self, request_iterator: Iterator[pb.InferenceRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.InferenceResponse]:
        with _aborting(context), self._call(context) as check:
            requests = _Requests(request_iterator)
            try:
                yield from self._session(requests, check)
            finally:
                requests.close()

    def _session(self, requests: _Requests, check: Callable[[], None]) -> Iterator[pb.InferenceResponse]:
        try:
            first = requests.get(timeout=self.limits.open_timeout)
        except TimeoutError:
            raise StreamTimeoutError(
                f"the stream sent no open message within this server's open timeout of {self.limits.open_timeout:g} s"
            ) from None
        if first is None:
            return
        opened = self._check_open(first)
        nbytes = self.backend.cache_bytes(
            opened.start, opened.end, batch_size=opened.batch_size, max_length=opened.max_length
        )
        self.sessions.reserve(first.session_id, nbytes)
        try:  # from here on the reservation is ours: released however the stream ends
            session = _Session(
                session_id=first.session_id,
                start=opened.start,
                end=opened.end,
                cache=self.backend.new_cache(
                    opened.start, opened.end, batch_size=opened.batch_size, max_length=opened.max_length
                ),
                adapter=self._adapter(opened.adapter),
            )
            yield pb.InferenceResponse(session_id=session.session_id, length=0)
            while (request := self._next_step(requests, check)) is not None:
                with watched(check):  # no yield inside: the check is this thread's only while it computes
                    response = self._step(session, request)
                yield response
        finally:
            self.sessions.release(first.session_id)

    def _next_step(self, requests: _Requests, check: Callable[[], None]) -> pb.InferenceRequest | None:
        """The stream's next request (None at its end), re-checking the call while it idles."""
        while True:
            try:
                return requests.get(timeout=self.limits.revocation_check_interval)
            except TimeoutError:
                check()

    def _step(self, session: _Session, request: pb.InferenceRequest) -> pb.InferenceResponse:
        if request.session_id != session.session_id:
            raise SessionNotFoundError(
                f"session {request.session_id!r} is not open on this stream (open: {session.session_id!r})"
            )
        if request.WhichOneof("kind") != "step":
            raise BadRequestError("a session is opened once; later messages must be steps")
        step = request.step
        if step.position > session.length:
            raise BadRequestError(f"step position {step.position} is past the session's length {session.length}")
        hidden = self._hidden(step.hidden, "hidden")
        out = self.backend.step(
            hidden,
            cache=session.cache,
            position=step.position,
            start=session.start,
            end=session.end,
            adapter=session.adapter,
        )
        session.length = step.position + hidden.shape[1]
        self._count("Inference", hidden)
        return pb.InferenceResponse(session_id=session.session_id, hidden=serialize(out), length=session.length)

    # -- helpers -----------------------------------------------------------------------------

    def _count(self, rpc: str, hidden: torch.Tensor) -> None:
        """`hidden` (B, T, H): B rows through the span at once, B x T token positions."""
        if self.metrics is not None:
            self.metrics.batch_rows.observe(hidden.shape[0])
            self.metrics.tokens.labels(rpc=rpc).inc(hidden.shape[0] * hidden.shape[1])

    def _serve(self, run: Callable[[], T], context: grpc.ServicerContext) -> T:
        """A unary call: `run` in one of the peer's call slots, its blocks watched."""

        def scoped() -> T:
            with self._call(context) as check, watched(check):
                return run()

        return _guard(scoped, context)

    @contextmanager
    def _call(self, context: grpc.ServicerContext) -> Iterator[Callable[[], None]]:
        """Hold a call slot of the calling peer; yields the check that ends the call's
        work early (`CallAbandonedError`, or `AccessDeniedError` once the peer is revoked)."""
        peer: PeerWatch | None = None
        if self.tls is not None:
            peer = self.tls.watch_client(context, interval=self.limits.revocation_check_interval)

        def check() -> None:
            if not context.is_active():
                raise CallAbandonedError("the caller went away; the server stopped its work")
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise CallAbandonedError("the caller's deadline passed; the server stopped its work")
            if peer is not None:
                peer.check()

        with self.calls.slot(peer_key(context)):
            yield check

    def _check_open(self, request: pb.InferenceRequest) -> pb.OpenSession:
        if request.WhichOneof("kind") != "open":
            raise SessionNotFoundError(
                f"session {request.session_id!r} is not open: a stream must start with an open message"
            )
        if not request.session_id or len(request.session_id) > 128:
            raise BadRequestError("session_id must be 1 to 128 characters")
        msg = request.open
        self.backend.check_request(msg.model_id, msg.start, msg.end)
        if msg.batch_size < 1:
            raise BadRequestError(f"batch_size={msg.batch_size} must be at least 1")
        if not 1 <= msg.max_length <= self.limits.max_length:
            raise MaxLengthExceededError(
                f"max_length={msg.max_length} must be between 1 and this server's limit {self.limits.max_length}"
            )
        return msg

    def _adapter(self, digest: str) -> SpanAdapter | None:
        return self.adapters.get(digest) if digest else None

    def _hidden(self, message: pb.Tensor, name: str, *, whole_sequence: bool = False) -> torch.Tensor:
        """A `(B, T, H)` tensor; with `whole_sequence` (Forward, Backward), `T` is at most
        the server's `max_length`, so one request's attention work is bounded too."""
        max_elements = self.limits.max_message_bytes // 2
        hidden = deserialize(
            message, name=name, shape=(None, None, self.backend.hidden_size), max_elements=max_elements
        )
        if whole_sequence and hidden.shape[1] > self.limits.max_length:
            raise MaxLengthExceededError(
                f"{name}: {hidden.shape[1]} tokens exceed this server's max_length {self.limits.max_length}; "
                "send shorter sequences"
            )
        return hidden


class _Requests:
    """A stream's requests, read on a thread of their own so that the handler can wait
    for the next one with a timeout (gRPC's request iterator waits without one). At
    most one request is read ahead: a client cannot queue work here faster than it is done."""

    _END = object()

    def __init__(self, iterator: Iterator[pb.InferenceRequest]) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(iterator,), name="corolla-stream-reader", daemon=True)
        self._thread.start()

    def get(self, *, timeout: float) -> pb.InferenceRequest | None:
        """The next request, or None once the client has ended the stream (or gone);
        `TimeoutError` if none came within `timeout` seconds."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None
        if item is self._END:
            self._queue.put(item)  # every later get sees the end too
            return None
        return cast(pb.InferenceRequest, item)

    def close(self) -> None:
        self._closed.set()

    def _read(self, iterator: Iterator[pb.InferenceRequest]) -> None:
        try:
            for request in iterator:
                if not self._put(request):
                    return
        except Exception:  # the call was cancelled or ended: the stream is over
            pass
        self._put(self._END)

    def _put(self, item: object) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False


@contextmanager
def _aborting(context: grpc.ServicerContext) -> Iterator[None]:
    """Abort the call with the status of a Corolla error raised in the body; anything
    else is logged and reported as INTERNAL. `context.abort` raises, ending the call."""
    try:
        yield
    except InferenceError as exc:
        context.abort(exc.grpc_code, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a bug, not the client's fault: keep serving others
        log.exception("unexpected error while serving a request")
        context.abort(grpc.StatusCode.INTERNAL, f"InternalError: {type(exc).__name__}: {exc}")


def _guard(run: Callable[[], T], context: grpc.ServicerContext) -> T:
    """Run a handler body under `_aborting`."""
    with _aborting(context):
        return run()
    raise AssertionError("unreachable: context.abort raises")
