"""Bad requests get a typed gRPC error with a clear message, and the server goes on.

Requests are built by hand on the raw stub (the client library would refuse to send
most of them), and every case is followed by a valid request to the same server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from corolla.inference.client.transport import ServerStub
from corolla.inference.errors import (
    BadRequestError,
    MaxLengthExceededError,
    MessageTooLargeError,
    SessionLimitError,
    SpanNotServedError,
)
from corolla.inference.server import BlockServer
from corolla.inference.wire import blocks_pb2 as pb
from corolla.inference.wire import blocks_pb2_grpc as pb_grpc
from corolla.inference.wire.tensors import serialize

HIDDEN = 64


@pytest.fixture
def server(tiny_llama: Path, start_server: Callable[..., BlockServer]) -> BlockServer:
    return start_server(
        tiny_llama,
        (1, 3),
        max_message_bytes=1 << 20,
        max_length=64,
        max_sessions=2,
        cache_budget_bytes=1 << 20,
    )


@pytest.fixture
def raw(server: BlockServer) -> Iterator[pb_grpc.BlockServiceStub]:
    # the client allows bigger messages than the server, so the server's limit is what is tested
    channel = grpc.insecure_channel(server.endpoint, options=[("grpc.max_send_message_length", 64 << 20)])
    yield pb_grpc.BlockServiceStub(channel)
    channel.close()


def _forward(hidden: pb.Tensor, start: int = 1, end: int = 3, model_id: str = "") -> pb.ForwardRequest:
    return pb.ForwardRequest(model_id=model_id, start=start, end=end, hidden=hidden)


def _valid_request_works(server: BlockServer) -> None:
    stub = ServerStub(server.endpoint)
    try:
        out = stub.forward(torch.randn(1, 4, HIDDEN), model_id="", start=1, end=3)
        assert out.shape == (1, 4, HIDDEN) and torch.isfinite(out).all()
    finally:
        stub.close()


def _expect(call: Callable[[], object], code: grpc.StatusCode, name: str, text: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code
    assert info.value.details().startswith(f"{name}: ")
    assert text in info.value.details()


@pytest.mark.parametrize(
    ("hidden", "code", "name", "text"),
    [
        (
            serialize(torch.zeros(1, 4, 32)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "BadRequestError",
            "does not match the expected (*, *, 64)",
        ),
        (
            pb.Tensor(dtype="int64", shape=[1, 4, 64], data=b"\0" * 2048),
            grpc.StatusCode.INVALID_ARGUMENT,
            "BadRequestError",
            "dtype 'int64' is not allowed",
        ),
        (
            pb.Tensor(dtype="float32", shape=[1, 4, 64], data=b"\0" * 1000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "BadRequestError",
            "truncated",
        ),
        (
            serialize(torch.full((1, 2, 64), float("nan"))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "BadRequestError",
            "NaN",
        ),
        (serialize(torch.zeros(1, 0, 64)), grpc.StatusCode.INVALID_ARGUMENT, "BadRequestError", "empty"),
    ],
    ids=["wrong-hidden-size", "wrong-dtype", "truncated", "nan", "empty"],
)
def test_bad_tensors(
    server: BlockServer,
    raw: pb_grpc.BlockServiceStub,
    hidden: pb.Tensor,
    code: grpc.StatusCode,
    name: str,
    text: str,
) -> None:
    _expect(lambda: raw.Forward(_forward(hidden)), code, name, text)
    _valid_request_works(server)


def test_oversize_message(server: BlockServer, raw: pb_grpc.BlockServiceStub) -> None:
    big = serialize(torch.zeros(1, 8192, HIDDEN))  # 2 MiB > the 1 MiB limit
    with pytest.raises(grpc.RpcError) as info:
        raw.Forward(_forward(big))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in info.value.details()
    _valid_request_works(server)


def test_oversize_through_client_is_typed(server: BlockServer) -> None:
    stub = ServerStub(server.endpoint, max_message_bytes=64 << 20)
    try:
        with pytest.raises(MessageTooLargeError) as info:
            stub.forward(torch.zeros(1, 8192, HIDDEN), model_id="", start=1, end=3)
        assert "larger than max" in str(info.value)
    finally:
        stub.close()


@pytest.mark.parametrize(("start", "end"), [(0, 2), (2, 4), (3, 3), (1, 9)])
def test_span_not_held(server: BlockServer, raw: pb_grpc.BlockServiceStub, start: int, end: int) -> None:
    _expect(
        lambda: raw.Forward(_forward(serialize(torch.zeros(1, 2, HIDDEN)), start, end)),
        grpc.StatusCode.OUT_OF_RANGE,
        "SpanNotServedError",
        "this server holds 1:3",
    )
    _valid_request_works(server)


def test_wrong_model(server: BlockServer, raw: pb_grpc.BlockServiceStub) -> None:
    _expect(
        lambda: raw.Forward(_forward(serialize(torch.zeros(1, 2, HIDDEN)), model_id="other-model")),
        grpc.StatusCode.OUT_OF_RANGE,
        "SpanNotServedError",
        "not 'other-model'",
    )


def test_backward_shape_mismatch(server: BlockServer, raw: pb_grpc.BlockServiceStub) -> None:
    request = pb.BackwardRequest(
        start=1,
        end=3,
        hidden=serialize(torch.zeros(1, 2, HIDDEN)),
        grad_output=serialize(torch.zeros(1, 3, HIDDEN)),
    )
    _expect(lambda: raw.Backward(request), grpc.StatusCode.INVALID_ARGUMENT, "BadRequestError", "differs")
    _valid_request_works(server)


def _stream(raw: pb_grpc.BlockServiceStub, *messages: pb.InferenceRequest) -> list[pb.InferenceResponse]:
    return list(raw.Inference(iter(messages)))


def _open(
    session_id: str = "s1", max_length: int = 16, batch: int = 1, start: int = 1, end: int = 3
) -> pb.InferenceRequest:
    return pb.InferenceRequest(
        session_id=session_id,
        open=pb.OpenSession(start=start, end=end, max_length=max_length, batch_size=batch),
    )


def _step(session_id: str, tokens: int, position: int, batch: int = 1) -> pb.InferenceRequest:
    return pb.InferenceRequest(
        session_id=session_id,
        step=pb.Step(hidden=serialize(torch.randn(batch, tokens, HIDDEN)), position=position),
    )


def test_unknown_session_id(server: BlockServer, raw: pb_grpc.BlockServiceStub) -> None:
    _expect(
        lambda: _stream(raw, _open("s1"), _step("s1", 2, 0), _step("nope", 1, 2)),
        grpc.StatusCode.NOT_FOUND,
        "SessionNotFoundError",
        "'nope' is not open",
    )
    _expect(
        lambda: _stream(raw, _step("never-opened", 1, 0)),
        grpc.StatusCode.NOT_FOUND,
        "SessionNotFoundError",
        "is not open",
    )
    assert len(_stream(raw, _open("s2"), _step("s2", 3, 0), _step("s2", 1, 3))) == 3


def test_max_length_exceeded(server: BlockServer, raw: pb_grpc.BlockServiceStub) -> None:
    _expect(
        lambda: _stream(raw, _open("s1", max_length=4), _step("s1", 3, 0), _step("s1", 2, 3)),
        grpc.StatusCode.OUT_OF_RANGE,
        "MaxLengthExceededError",
        "exceed the session's max_length 4",
    )
    _expect(
        lambda: _stream(raw, _open("s1", max_length=65)),
        grpc.StatusCode.OUT_OF_RANGE,
        "MaxLengthExceededError",
        "limit 64",
    )
    assert len(_stream(raw, _open("s3", max_length=4), _step("s3", 4, 0))) == 2


def test_session_span_and_batch_checked(server: BlockServer, raw: pb_grpc.BlockServiceStub) -> None:
    _expect(
        lambda: _stream(raw, _open("s1", start=0, end=2)),
        grpc.StatusCode.OUT_OF_RANGE,
        "SpanNotServedError",
        "holds 1:3",
    )
    _expect(
        lambda: _stream(raw, _open("s1", batch=2), _step("s1", 1, 0, batch=3)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BadRequestError",
        "batch 3 differs",
    )
    _expect(
        lambda: _stream(raw, _open("s1"), _step("s1", 1, 5)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BadRequestError",
        "past the session's length 0",
    )


def test_cache_budget_and_session_limit(server: BlockServer, raw: pb_grpc.BlockServiceStub) -> None:
    # 2 layers x 2 (k, v) x 2 kv heads x 16 head dim x 4 bytes = 512 B per token and sequence: 2 MiB > 1 MiB
    _expect(
        lambda: _stream(raw, _open("big", max_length=64, batch=64)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "SessionLimitError",
        "KV cache",
    )
    stub = ServerStub(server.endpoint)
    try:
        first = stub.open_session(session_id="a", model_id="", start=1, end=3, max_length=8, batch_size=1)
        second = stub.open_session(session_id="b", model_id="", start=1, end=3, max_length=8, batch_size=1)
        with pytest.raises(SessionLimitError, match="limit of 2 open sessions"):
            stub.open_session(session_id="c", model_id="", start=1, end=3, max_length=8, batch_size=1)
        first.close()
        second.close()
        # closed sessions are freed: a new one is admitted (the server frees on stream end)
        for _ in range(100):
            if server.servicer.sessions.open_sessions == 0:
                break
            time.sleep(0.05)
        assert server.servicer.sessions.open_sessions == 0
        third = stub.open_session(session_id="c", model_id="", start=1, end=3, max_length=8, batch_size=1)
        assert third.step(torch.randn(1, 2, HIDDEN), 0).shape == (1, 2, HIDDEN)
        third.close()
    finally:
        stub.close()


def test_client_maps_errors_back_to_types(server: BlockServer) -> None:
    stub = ServerStub(server.endpoint)
    try:
        with pytest.raises(SpanNotServedError):
            stub.forward(torch.zeros(1, 2, HIDDEN), model_id="", start=0, end=2)
        session = stub.open_session(session_id="t", model_id="", start=1, end=3, max_length=2, batch_size=1)
        with pytest.raises(MaxLengthExceededError):
            session.step(torch.zeros(1, 3, HIDDEN), 0)
        with pytest.raises(BadRequestError, match="session_id must be 1 to 128 characters"):
            stub.open_session(session_id="", model_id="", start=1, end=3, max_length=2, batch_size=1)
    finally:
        stub.close()
