"""Calls to one block server: typed wrappers over the gRPC stub.

A failed call comes back as the same `InferenceError` subclass the server raised
(its status message starts with the class name), or as `ServerUnavailableError` when
the server could not be reached or vanished mid-call: the one a client retries
elsewhere.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import torch

from corolla.inference import errors
from corolla.inference.errors import AccessDeniedError, InferenceError, RemoteError, ServerUnavailableError
from corolla.inference.security import TlsConfig
from corolla.inference.wire import blocks_pb2 as pb
from corolla.inference.wire import blocks_pb2_grpc as pb_grpc
from corolla.inference.wire.adapters import adapter_message
from corolla.inference.wire.backward import AdapterGrads, BackwardResult
from corolla.inference.wire.channel import grpc_options
from corolla.inference.wire.tensors import deserialize, serialize

_BY_NAME: dict[str, type[InferenceError]] = {
    cls.__name__: cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, InferenceError)
}
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}


def error_from_rpc(exc: grpc.RpcError, endpoint: str) -> InferenceError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    name, _, message = details.partition(": ")
    cls = _BY_NAME.get(name)
    if cls is not None and cls is not RemoteError:
        return cls(f"{endpoint}: {message}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return errors.MessageTooLargeError(f"{endpoint}: {details}")
    if code in _UNREACHABLE:
        return ServerUnavailableError(f"{endpoint}: {code.name}: {details}")
    return RemoteError(f"{endpoint}: {code.name}: {details}")


class ServerStub:
    """A channel to one server. Thread-safe; cheap calls share one HTTP/2 connection."""

    def __init__(
        self,
        endpoint: str,
        *,
        max_message_bytes: int = 64 << 20,
        timeout: float = 60.0,
        tls: TlsConfig | None = None,
        node_id: str | None = None,
    ) -> None:
        """With `tls`, a mutual-TLS channel that accepts only the certificate of `node_id`
        (required then: the caller has checked who that is, see `TlsConfig.verify_server`)."""
        self.endpoint = endpoint
        self.timeout = timeout
        options: list[tuple[str, Any]] = list(grpc_options(max_message_bytes))
        if tls is None:
            self._channel = grpc.insecure_channel(endpoint, options=options)
        else:
            if node_id is None:
                raise AccessDeniedError(f"{endpoint}: a TLS channel needs the server's verified node id")
            options += tls.channel_options(node_id)
            self._channel = grpc.secure_channel(endpoint, tls.channel_credentials(), options=options)
        self._stub = pb_grpc.BlockServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def info(self, timeout: float | None = None) -> pb.InfoResponse:
        try:
            return self._stub.Info(pb.InfoRequest(), timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.endpoint) from None

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        model_id: str,
        start: int,
        end: int,
        wire_dtype: torch.dtype | None = None,
        adapter: str = "",
    ) -> torch.Tensor:
        request = pb.ForwardRequest(
            model_id=model_id,
            start=start,
            end=end,
            hidden=serialize(hidden, wire_dtype=wire_dtype),
            adapter=adapter,
        )
        try:
            response = self._stub.Forward(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.endpoint) from None
        return deserialize(response.hidden, name="hidden", shape=tuple(hidden.shape)).to(hidden.dtype)

    def backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        *,
        model_id: str,
        start: int,
        end: int,
        adapter: str = "",
        adapter_grads: AdapterGrads = AdapterGrads.NONE,
        step_id: str = "",
        grad_input: bool = True,
    ) -> BackwardResult:
        request = pb.BackwardRequest(
            model_id=model_id,
            start=start,
            end=end,
            hidden=serialize(hidden),
            grad_output=serialize(grad_output),
            adapter=adapter,
            adapter_grads=int(adapter_grads),  # type: ignore[arg-type]  # the stub types the enum by name
            step_id=step_id,
            skip_grad_input=not grad_input,
        )
        try:
            response = self._stub.Backward(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.endpoint) from None
        batch = hidden.shape[0]
        g_in = deserialize(response.grad_input, name="grad_input", shape=tuple(hidden.shape)) if grad_input else None
        per_sample = {
            item.name: deserialize(item.tensor, name=item.name, shape=None) for item in response.adapter_grads
        }
        if any(t.dim() < 1 or t.shape[0] != batch for t in per_sample.values()):
            raise errors.RemoteError(f"{self.endpoint}: per-sample gradients with a batch other than {batch}")
        norms = None
        if adapter_grads == AdapterGrads.NORMS:
            norms = deserialize(response.squared_norms, name="squared_norms", shape=(batch,))
            if norms.dtype != torch.float32 or not torch.isfinite(norms).all() or (norms < 0).any():
                raise errors.RemoteError(f"{self.endpoint}: squared norms that are not finite, non-negative float32")
        if any(not torch.isfinite(t).all() for t in per_sample.values()):
            raise errors.RemoteError(f"{self.endpoint}: per-sample gradients with NaN or infinite values")
        return BackwardResult(grad_input=g_in, per_sample=per_sample, squared_norms=norms)

    def put_adapter(self, tensors: dict[str, torch.Tensor], *, scaling: float, model_id: str, digest: str) -> None:
        request = pb.PutAdapterRequest(model_id=model_id, adapter=adapter_message(tensors, scaling, digest))
        try:
            response = self._stub.PutAdapter(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.endpoint) from None
        if response.hash != digest:
            raise errors.RemoteError(f"{self.endpoint}: stored the adapter under another hash")

    def clip_sum(self, step_id: str, clip_factors: torch.Tensor) -> dict[str, torch.Tensor]:
        request = pb.ClipSumRequest(step_id=step_id, clip_factors=serialize(clip_factors.float()))
        try:
            response = self._stub.ClipSum(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.endpoint) from None
        return {item.name: deserialize(item.tensor, name=item.name, shape=None) for item in response.adapter_grads}

    def open_session(
        self,
        *,
        session_id: str,
        model_id: str,
        start: int,
        end: int,
        max_length: int,
        batch_size: int,
        adapter: str = "",
    ) -> SessionStream:
        return SessionStream(
            self,
            session_id=session_id,
            model_id=model_id,
            start=start,
            end=end,
            max_length=max_length,
            batch_size=batch_size,
            adapter=adapter,
        )


_CLOSE = object()


class SessionStream:
    """One server-side inference session: a bidirectional stream, one reply per step."""

    def __init__(
        self,
        stub: ServerStub,
        *,
        session_id: str,
        model_id: str,
        start: int,
        end: int,
        max_length: int,
        batch_size: int,
        adapter: str = "",
    ) -> None:
        self.stub = stub
        self.session_id = session_id
        self.start = start
        self.end = end
        self.adapter = adapter  # the adapter hash the session applies ("" = none)
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._requests.put(
            pb.InferenceRequest(
                session_id=session_id,
                open=pb.OpenSession(
                    model_id=model_id,
                    start=start,
                    end=end,
                    max_length=max_length,
                    batch_size=batch_size,
                    adapter=adapter,
                ),
            )
        )
        self._call = stub._stub.Inference(self._request_iter())
        self._responses: Iterator[pb.InferenceResponse] = self._call
        self._next()  # the server's acknowledgement of `open`, or its refusal

    def _request_iter(self) -> Iterator[pb.InferenceRequest]:
        while True:
            item = self._requests.get()
            if item is _CLOSE:
                return
            yield item  # type: ignore[misc]

    def _next(self) -> pb.InferenceResponse:
        try:
            return next(self._responses)
        except StopIteration:
            raise ServerUnavailableError(f"{self.stub.endpoint}: the session stream ended") from None
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.stub.endpoint) from None

    def step(self, hidden: torch.Tensor, position: int, *, wire_dtype: torch.dtype | None = None) -> torch.Tensor:
        self._requests.put(
            pb.InferenceRequest(
                session_id=self.session_id,
                step=pb.Step(hidden=serialize(hidden, wire_dtype=wire_dtype), position=position),
            )
        )
        response = self._next()
        return deserialize(response.hidden, name="hidden", shape=tuple(hidden.shape)).to(hidden.dtype)

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._requests.put(_CLOSE)
            self._call.cancel()
