"""A server ends calls it should no longer serve, and one peer cannot starve the others.

- a stream from a peer revoked mid-stream ends with PERMISSION_DENIED within seconds,
  whether it is stepping or idle (the CRL is re-checked during the call, not only when
  it starts);
- a stream that never sends its open message is ended after the open timeout;
- 60 idle streams from one member hold only that member's share of the worker threads:
  another member's Info, Forward and session steps are still served, promptly;
- a forward whose caller's deadline passes (or who cancels) stops within a block;
- non-finite `grad_output` is refused with the typed bad-request error.

Real servers, over mutual TLS where the peer's identity matters.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from corolla.inference.client.transport import ServerStub, SessionStream
from corolla.inference.errors import AccessDeniedError, MaxLengthExceededError
from corolla.inference.security import TlsConfig
from corolla.inference.server import BlockServer
from corolla.inference.wire import blocks_pb2 as pb
from corolla.inference.wire import blocks_pb2_grpc as pb_grpc
from corolla.inference.wire.tensors import serialize
from corolla.pki import ConsortiumCA, NodeIdentity
from tests.revocation import seconds_until_refused

HIDDEN = 64


@pytest.fixture
def consortium(tmp_path: Path) -> tuple[ConsortiumCA, dict[str, NodeIdentity]]:
    ca = ConsortiumCA.init(tmp_path / "ws", consortium="calls")
    roles = {"server": "server", "site-a": "site", "site-b": "site"}
    return ca, {name: ca.issue(name, role) for name, role in roles.items()}


def _serve_tls(
    start_server: Callable[..., BlockServer], model: Path, identity: NodeIdentity, **kwargs: object
) -> BlockServer:
    return start_server(model, (0, 4), tls=TlsConfig.for_node(identity), **kwargs)


def _stub(server: BlockServer, identity: NodeIdentity) -> ServerStub:
    node_id = server.config.tls.identity.node_id  # type: ignore[union-attr]
    return ServerStub(server.endpoint, tls=TlsConfig.for_node(identity), node_id=node_id, timeout=20.0)


def _raw_channel(server: BlockServer, identity: NodeIdentity) -> grpc.Channel:
    tls = TlsConfig.for_node(identity)
    node_id = server.config.tls.identity.node_id  # type: ignore[union-attr]
    return grpc.secure_channel(server.endpoint, tls.channel_credentials(), options=tls.channel_options(node_id))


def _open(stub: ServerStub, session_id: str = "s") -> SessionStream:
    return stub.open_session(session_id=session_id, model_id="", start=0, end=4, max_length=64, batch_size=1)


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _idle_requests(release: threading.Event) -> Iterator[pb.InferenceRequest]:
    """A request stream that sends nothing until `release` is set, then ends."""
    release.wait()
    yield from ()


# -- revocation of open streams --------------------------------------------------------------


def _site_a_stream(
    start_server: Callable[..., BlockServer], tiny_llama: Path, ids: dict[str, NodeIdentity]
) -> tuple[BlockServer, Any, Any]:
    """A TLS server re-checking its peers every 0.5 s, and an open session of site-a's on it."""
    server = _serve_tls(start_server, tiny_llama, ids["server"], revocation_check_interval=0.5)
    stub = _stub(server, ids["site-a"])
    return server, stub, _open(stub)


def test_revocation_ends_a_stepping_stream(
    consortium: tuple[ConsortiumCA, dict[str, NodeIdentity]],
    tiny_llama: Path,
    start_server: Callable[..., BlockServer],
) -> None:
    ca, ids = consortium
    server, stub, session = _site_a_stream(start_server, tiny_llama, ids)
    token = torch.randn(1, 1, HIDDEN)
    for _ in range(5):
        session.step(token, 0)  # position 0 again and again: rewinding is allowed
    ca.revoke("site-a")
    assert seconds_until_refused(session, token, limit=15, match="revoked during the call") < 4
    assert _wait_for(lambda: server.servicer.sessions.open_sessions == 0, 5)  # type: ignore[union-attr]
    # a new call from the revoked site is refused; another member is served
    with pytest.raises(AccessDeniedError, match="revoked"):
        stub.info(timeout=10)
    stub.close()
    other = _stub(server, ids["site-b"])
    assert other.info(timeout=10).end == 4
    other.close()


def test_revocation_ends_an_idle_stream(
    consortium: tuple[ConsortiumCA, dict[str, NodeIdentity]],
    tiny_llama: Path,
    start_server: Callable[..., BlockServer],
) -> None:
    ca, ids = consortium
    server, stub, session = _site_a_stream(start_server, tiny_llama, ids)
    session.step(torch.randn(1, 1, HIDDEN), 0)
    assert server.servicer.sessions.open_sessions == 1  # type: ignore[union-attr]
    ca.revoke("site-a")
    # the server ends the stream on its own, though the client sends nothing
    assert _wait_for(lambda: server.servicer.sessions.open_sessions == 0, 5)  # type: ignore[union-attr]
    with pytest.raises(AccessDeniedError, match="revoked"):
        session.step(torch.randn(1, 1, HIDDEN), 1)
    stub.close()


# -- idle streams, per-peer limits ----------------------------------------------------------


def _victim_rounds(victim: ServerStub, n: int) -> list[float]:
    """Seconds each of `n` rounds of another member's calls took: Info, a forward, a session step."""
    latencies: list[float] = []
    for i in range(n):
        began = time.monotonic()
        assert victim.info(timeout=10).end == 4
        out = victim.forward(torch.randn(1, 4, HIDDEN), model_id="", start=0, end=4)
        assert torch.isfinite(out).all()
        session = _open(victim, f"victim-{i}-{began}")
        session.step(torch.randn(1, 1, HIDDEN), 0)
        session.close()
        latencies.append(time.monotonic() - began)
    return latencies


def test_idle_streams_from_one_peer_leave_others_served(
    consortium: tuple[ConsortiumCA, dict[str, NodeIdentity]],
    tiny_llama: Path,
    start_server: Callable[..., BlockServer],
) -> None:
    _, ids = consortium
    # 4 sessions + 16 = 20 worker threads; a peer may hold 16 of them
    server = _serve_tls(start_server, tiny_llama, ids["server"], max_sessions=4, open_timeout=60.0)
    per_peer = server.config.max_calls_per_peer
    victim = _stub(server, ids["site-b"])
    normal = _victim_rounds(victim, 5)  # site-b's latency on the server before the attack
    release = threading.Event()
    channel = _raw_channel(server, ids["site-a"])
    attacker = pb_grpc.BlockServiceStub(channel)
    calls = [attacker.Inference(_idle_requests(release)) for _ in range(60)]
    try:
        assert _wait_for(lambda: sum(call.done() for call in calls) == 60 - per_peer, 15)
        refused = [call for call in calls if call.done()]
        assert {call.code() for call in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert any(call.details().startswith("CallLimitError: ") for call in refused)
        time.sleep(0.5)
        assert sum(not call.done() for call in calls) == per_peer  # held, idle, still open
        during = _victim_rounds(victim, 5)
        # served within its normal latency: the median round at most twice the one before (+ 50 ms of jitter)
        assert statistics.median(during) <= 2 * statistics.median(normal) + 0.05, (normal, during)
        victim.close()
    finally:
        release.set()
        for call in calls:
            call.cancel()
        channel.close()


def test_open_timeout_ends_a_stream_without_an_open_message(
    tiny_llama: Path, start_server: Callable[..., BlockServer]
) -> None:
    server = start_server(tiny_llama, (0, 4), open_timeout=1.0)
    release = threading.Event()
    channel = grpc.insecure_channel(server.endpoint)
    call = pb_grpc.BlockServiceStub(channel).Inference(_idle_requests(release))
    began = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as info:
            next(call)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.value.details().startswith("StreamTimeoutError: ")
        assert 0.8 < time.monotonic() - began < 4
    finally:
        release.set()
        channel.close()
    # the stream's reader thread ends with it
    assert _wait_for(lambda: not any(t.name == "corolla-stream-reader" for t in threading.enumerate()), 5)
    stub = ServerStub(server.endpoint)
    _open(stub).step(torch.randn(1, 1, HIDDEN), 0)
    stub.close()


# -- deadlines and cancellation stop the work ------------------------------------------------


@pytest.fixture
def slow_blocks(
    tiny_llama: Path, start_server: Callable[..., BlockServer]
) -> Iterator[tuple[BlockServer, list[float]]]:
    """A 4-block server whose blocks each take 0.4 s more; yields it and the start time of each block."""
    server = start_server(tiny_llama, (0, 4))
    started: list[float] = []

    def slow(module: torch.nn.Module, args: object) -> None:
        started.append(time.monotonic())
        time.sleep(0.4)

    handles = [block.register_forward_pre_hook(slow) for block in server.backend.span.blocks]  # type: ignore[union-attr]
    yield server, started
    for handle in handles:
        handle.remove()


def _forward_request() -> pb.ForwardRequest:
    return pb.ForwardRequest(start=0, end=4, hidden=serialize(torch.randn(1, 8, HIDDEN)))


def test_forward_stops_when_its_deadline_passes(slow_blocks: tuple[BlockServer, list[float]]) -> None:
    server, started = slow_blocks
    channel = grpc.insecure_channel(server.endpoint)
    before = server.backend.blocks_computed  # type: ignore[union-attr]
    sent = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.BlockServiceStub(channel).Forward(_forward_request(), timeout=0.6)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.5)  # long enough for the rest of the span, had it gone on
    channel.close()
    computed = server.backend.blocks_computed - before  # type: ignore[union-attr]
    # blocks start at 0 and 0.4 s; the check before the third (0.8 s) stops the work: never all 4
    assert computed <= 3, computed
    assert not started or started[-1] - sent < 0.6 + 0.4 + 0.3, "a block started more than one block past the deadline"


def test_forward_stops_when_the_caller_cancels(slow_blocks: tuple[BlockServer, list[float]]) -> None:
    server, _ = slow_blocks
    channel = grpc.insecure_channel(server.endpoint)
    before = server.backend.blocks_computed  # type: ignore[union-attr]
    future = pb_grpc.BlockServiceStub(channel).Forward.future(_forward_request())
    time.sleep(0.6)
    future.cancel()
    time.sleep(1.5)
    channel.close()
    computed = server.backend.blocks_computed - before  # type: ignore[union-attr]
    assert computed <= 3, computed


def test_forward_longer_than_max_length_is_refused(tiny_llama: Path, start_server: Callable[..., BlockServer]) -> None:
    server = start_server(tiny_llama, (0, 4), max_length=16)
    stub = ServerStub(server.endpoint)
    with pytest.raises(MaxLengthExceededError, match="max_length 16"):
        stub.forward(torch.randn(1, 17, HIDDEN), model_id="", start=0, end=4)
    assert stub.forward(torch.randn(1, 16, HIDDEN), model_id="", start=0, end=4).shape == (1, 16, HIDDEN)
    stub.close()


# -- non-finite inputs -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_backward_refuses_non_finite_grad_output(
    tiny_llama: Path, start_server: Callable[..., BlockServer], bad: float
) -> None:
    server = start_server(tiny_llama, (0, 4))
    channel = grpc.insecure_channel(server.endpoint)
    raw = pb_grpc.BlockServiceStub(channel)
    hidden = torch.randn(1, 4, HIDDEN)
    grad = torch.randn(1, 4, HIDDEN)
    grad[0, 2, 5] = bad
    with pytest.raises(grpc.RpcError) as info:
        raw.Backward(pb.BackwardRequest(start=0, end=4, hidden=serialize(hidden), grad_output=serialize(grad)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("BadRequestError: grad_output: ")
    assert "NaN or infinite" in info.value.details()
    # the server goes on serving
    ok = raw.Backward(
        pb.BackwardRequest(start=0, end=4, hidden=serialize(hidden), grad_output=serialize(torch.randn(1, 4, HIDDEN)))
    )
    assert ok.HasField("grad_input")
    channel.close()


@pytest.mark.slow
def test_long_forward_stops_soon_after_its_deadline(tiny_llama: Path, start_server: Callable[..., BlockServer]) -> None:
    """Real work, no injected sleeps: a 32,768-token forward with a 1 s deadline stops within
    about a block, and another client's small forward is then served promptly."""
    server = start_server(tiny_llama, (0, 4), max_length=32768)
    started: list[float] = []
    for block in server.backend.span.blocks:  # type: ignore[union-attr]
        block.register_forward_pre_hook(lambda module, args: started.append(time.monotonic()))
    channel = grpc.insecure_channel(server.endpoint, options=[("grpc.max_send_message_length", 64 << 20)])
    request = pb.ForwardRequest(start=0, end=4, hidden=serialize(torch.randn(1, 32768, HIDDEN)))
    sent = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.BlockServiceStub(channel).Forward(request, timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    before = server.backend.blocks_computed  # type: ignore[union-attr]
    stub = ServerStub(server.endpoint)
    began = time.monotonic()
    stub.forward(torch.randn(1, 4, HIDDEN), model_id="", start=0, end=4)
    small = time.monotonic() - began
    time.sleep(1.0)
    computed_after = server.backend.blocks_computed - before  # type: ignore[union-attr]
    channel.close()
    stub.close()
    long_blocks = [t for t in started if t < began]
    # each block checks the deadline before it starts: none of the long forward's began after it
    # (one block here takes about a second, so the work ends about a block past the deadline)
    assert long_blocks and long_blocks[-1] - sent < 1.0 + 0.3, [t - sent for t in long_blocks]
    assert computed_after == 4  # only the small forward's blocks: the long one had stopped
    assert small < 5.0
