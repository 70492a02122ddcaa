"""The gRPC face of a block server: `BlockService` over a `SpanBackend`.

Every handler turns a Corolla error into its gRPC status with a message that names
the error class (the client maps it back to the same class), and any unexpected
exception into INTERNAL after logging it: a bad request never takes the server down.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch

from corolla.inference.errors import (
    BadRequestError,
    InferenceError,
    MaxLengthExceededError,
    MessageTooLargeError,
    SessionNotFoundError,
)
from corolla.inference.models.kv_cache import SpanCache
from corolla.inference.models.lora import SpanAdapter
from corolla.inference.server.adapters import AdapterStore, GradStore, check_adapter
from corolla.inference.server.backend import SpanBackend, clip_sum
from corolla.inference.server.sessions import SessionRegistry
from corolla.inference.wire import blocks_pb2 as pb
from corolla.inference.wire import blocks_pb2_grpc as pb_grpc
from corolla.inference.wire.adapters import named_tensors, parse_adapter
from corolla.inference.wire.backward import AdapterGrads
from corolla.inference.wire.tensors import DTYPE_NAMES, deserialize, serialize

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
    def __init__(self, backend: SpanBackend, *, limits: ServiceLimits, stats: NodeStats) -> None:
        self.backend = backend
        self.limits = limits
        self.stats = stats
        self.sessions = SessionRegistry(max_sessions=limits.max_sessions, cache_budget_bytes=limits.cache_budget_bytes)
        # adapters are refreshed every optimizer step; one left unused for an hour is gone
        self.adapters = AdapterStore(budget_bytes=limits.adapter_budget_bytes, ttl=3600.0)
        self.grads = GradStore(budget_bytes=limits.grad_budget_bytes, ttl=limits.grad_ttl)

    # -- unary -----------------------------------------------------------------------------

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
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
            hidden = self._hidden(request.hidden, "hidden")
            adapter = self._adapter(request.adapter)
            out = self.backend.forward(hidden, request.start, request.end, adapter=adapter)
            return pb.ForwardResponse(hidden=serialize(out))

        return _guard(run, context)

    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext) -> pb.BackwardResponse:
        def run() -> pb.BackwardResponse:
            self.backend.check_request(request.model_id, request.start, request.end)
            hidden = self._hidden(request.hidden, "hidden")
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

        return _guard(run, context)

    def PutAdapter(self, request: pb.PutAdapterRequest, context: grpc.ServicerContext) -> pb.PutAdapterResponse:
        def run() -> pb.PutAdapterResponse:
            b = self.backend
            b.check_request(request.model_id, b.start, b.end)
            digest, scaling, tensors = parse_adapter(request.adapter, max_elements=self.limits.max_message_bytes // 2)
            self.adapters.put(digest, check_adapter(b.span, scaling, tensors))
            return pb.PutAdapterResponse(hash=digest)

        return _guard(run, context)

    def ClipSum(self, request: pb.ClipSumRequest, context: grpc.ServicerContext) -> pb.ClipSumResponse:
        def run() -> pb.ClipSumResponse:
            batch, grads = self.grads.peek(request.step_id)  # a malformed request leaves them in place
            factors = deserialize(request.clip_factors, name="clip_factors", shape=(batch,))
            if factors.dtype != torch.float32 or not torch.isfinite(factors).all() or (factors < 0).any():
                raise BadRequestError("clip_factors must be finite, non-negative float32")
            self.grads.pop(request.step_id)
            return pb.ClipSumResponse(adapter_grads=named_tensors(clip_sum(grads, factors)))

        return _guard(run, context)

    # -- streaming ---------------------------------------------------------------------------

    def Inference(
        self, request_iterator: Iterator[pb.InferenceRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.InferenceResponse]:
        first = next(request_iterator, None)
        if first is None:
            return
        opened = _guard(lambda: self._check_open(first), context)
        nbytes = self.backend.cache_bytes(
            opened.start, opened.end, batch_size=opened.batch_size, max_length=opened.max_length
        )
        _guard(lambda: self.sessions.reserve(first.session_id, nbytes), context)
        try:  # from here on the reservation is ours: released however the stream ends
            session = _Session(
                session_id=first.session_id,
                start=opened.start,
                end=opened.end,
                cache=self.backend.new_cache(
                    opened.start, opened.end, batch_size=opened.batch_size, max_length=opened.max_length
                ),
                adapter=_guard(lambda: self._adapter(opened.adapter), context),
            )
            yield pb.InferenceResponse(session_id=session.session_id, length=0)
            for request in request_iterator:
                yield _guard(functools.partial(self._step, session, request), context)
        finally:
            self.sessions.release(first.session_id)

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
        return pb.InferenceResponse(session_id=session.session_id, hidden=serialize(out), length=session.length)

    # -- helpers -----------------------------------------------------------------------------

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

    def _hidden(self, message: pb.Tensor, name: str) -> torch.Tensor:
        max_elements = self.limits.max_message_bytes // 2
        return deserialize(message, name=name, shape=(None, None, self.backend.hidden_size), max_elements=max_elements)


def _guard(run: Callable[[], T], context: grpc.ServicerContext) -> T:
    """Run a handler body; a Corolla error aborts the call with its status, anything
    else is logged and reported as INTERNAL. `context.abort` raises, ending the call."""
    try:
        return run()
    except InferenceError as exc:
        context.abort(exc.grpc_code, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a bug, not the client's fault: keep serving others
        log.exception("unexpected error while serving a request")
        context.abort(grpc.StatusCode.INTERNAL, f"InternalError: {type(exc).__name__}: {exc}")
    raise AssertionError("unreachable: context.abort raises")
