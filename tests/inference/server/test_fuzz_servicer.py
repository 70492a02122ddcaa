"""Fuzzing the servicer: every request built from random and malformed fields gets a valid
response or a documented gRPC status whose message names the error class, and the server
goes on serving (an Info call succeeds, and no session stays reserved).

One in-process server (tiny Llama, blocks 1:3) takes every case over loopback gRPC on the
raw stub, as in `test_bad_input.py`. A few derandomized cases per handler run in the
default suite; many random ones run under `-m slow`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from corolla.inference import errors
from corolla.inference.server.app import BlockServer, ServerConfig
from corolla.inference.server.service import BlockServicer
from corolla.inference.wire import blocks_pb2 as pb
from corolla.inference.wire import blocks_pb2_grpc as pb_grpc
from corolla.inference.wire.adapters import adapter_message, tensor_name
from corolla.inference.wire.tensors import DTYPES, deserialize, serialize
from tests.inference.wire.test_fuzz_wire import tensor_messages, wire_adapters

HIDDEN = 64
START, END = 1, 3
MAX_LENGTH = 64
TIMEOUT = 30.0  # seconds per call: a hung handler fails the test instead of the suite

# no example database, no deadline and no speed check: CI machines are shared and slow
_common: dict[str, Any] = {"database": None, "deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
FAST = settings(max_examples=60, derandomize=True, **_common)  # the default suite: the same cases every run
SLOW = settings(max_examples=1000, **_common)  # `-m slow`: fresh random cases on every run

# the statuses docs/inference.md promises for a bad request, and the error class of each
CLASS_CODES = {
    name: cls.grpc_code
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, errors.InferenceError)
}
DOCUMENTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,  # AdapterNotFoundError: put the adapter again
}
R = TypeVar("R")


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[BlockServer]:
    config = ServerConfig(
        model=tiny_llama,
        blocks=(START, END),
        dht=False,
        max_message_bytes=1 << 20,
        max_length=MAX_LENGTH,
        max_sessions=2,
        cache_budget_bytes=1 << 20,
    )
    server = BlockServer(config).start()
    yield server
    server.stop(grace=0)


@pytest.fixture(scope="module")
def raw(server: BlockServer) -> Iterator[pb_grpc.BlockServiceStub]:
    # the client allows bigger messages than the server, so the server's limit is what is tested
    channel = grpc.insecure_channel(server.endpoint, options=[("grpc.max_send_message_length", 64 << 20)])
    yield pb_grpc.BlockServiceStub(channel)
    channel.close()


def _servicer(server: BlockServer) -> BlockServicer:
    assert server.servicer is not None, "the server is not started"
    return server.servicer


def _lora_shapes(server: BlockServer) -> dict[str, tuple[int, int]]:
    """(in, out) features of the modules the test adapters touch; the same in every block."""
    block = _servicer(server).backend.span.blocks[0]
    shapes = {}
    for module in ("self_attn.q_proj", "mlp.down_proj"):
        layer: Any = block.get_submodule(module)  # nn.Linear
        shapes[module] = (int(layer.in_features), int(layer.out_features))
    return shapes


def _good_adapter(server: BlockServer, rank: int = 2, seed: int = 0, scaling: float = 0.5) -> pb.Adapter:
    g = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for block in range(START, END):
        for module, (fan_in, fan_out) in _lora_shapes(server).items():
            weights[tensor_name(block, module, "lora_A")] = torch.randn(rank, fan_in, generator=g) * 0.1
            weights[tensor_name(block, module, "lora_B")] = torch.randn(fan_out, rank, generator=g) * 0.1
    return adapter_message(weights, scaling)


@pytest.fixture(scope="module")
def digest(server: BlockServer, raw: pb_grpc.BlockServiceStub) -> str:
    """A valid adapter put once, so that requests naming it reach the LoRA code paths."""
    message = _good_adapter(server)
    return raw.PutAdapter(pb.PutAdapterRequest(adapter=message), timeout=TIMEOUT).hash


# -- the contract --------------------------------------------------------------------------


def outcome(call: Callable[[], R]) -> R | None:
    """The response, or None after checking that the error is a documented, typed one."""
    try:
        response = call()
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        event(f"{code.name} {details.partition(':')[0]}")  # see --hypothesis-show-statistics
        assert code in DOCUMENTED, f"{code}: {details}"
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
            return None  # gRPC's own message-size limit, before the servicer runs
        name, _, text = details.partition(": ")
        assert CLASS_CODES.get(name) == code and text, f"{code}: {details!r}"
        return None
    event("OK")
    return response


def still_serving(server: BlockServer, raw: pb_grpc.BlockServiceStub) -> None:
    info = raw.Info(pb.InfoRequest(), timeout=TIMEOUT)
    assert (info.start, info.end, info.hidden_size) == (START, END, HIDDEN)
    # a session is released however its stream ended (the release runs as the stream closes)
    for _ in range(200):
        if _servicer(server).sessions.open_sessions == 0:
            break
        time.sleep(0.01)
    assert _servicer(server).sessions.open_sessions == 0


# -- strategies ----------------------------------------------------------------------------

UINT32 = (1 << 32) - 1


def mostly(good: st.SearchStrategy[R], bad: st.SearchStrategy[R]) -> st.SearchStrategy[R]:
    """`good` three times in four: one bad field at a time reaches the code behind the checks.
    (Not `st.one_of(good, good, good, bad)`: hypothesis merges the repeated branches.)"""
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: good if ok else bad)


any_block = st.one_of(st.integers(0, 5), st.sampled_from([UINT32, 1 << 31]))
spans = mostly(st.sampled_from([(1, 2), (1, 3), (2, 3)]), st.tuples(any_block, any_block))
step_ids = mostly(st.just("step-1"), st.one_of(st.sampled_from(["", "x" * 128, "x" * 129]), st.text(max_size=8)))


@st.composite
def hidden_tensors(draw: st.DrawFn, batch: int | None = None, tokens: int | None = None) -> pb.Tensor:
    """Mostly well-formed (B, T, H) tensors, some with NaN/inf or a wrong size, some garbage."""
    kind = draw(st.sampled_from(["good", "good", "good", "poisoned", "wrong", "garbage"]))
    if kind == "garbage":
        return draw(tensor_messages())
    b = batch if batch is not None else draw(st.integers(1, 3))
    t = tokens if tokens is not None else draw(st.integers(1, 6))
    h = HIDDEN if kind != "wrong" else draw(st.sampled_from([0, 1, 63, 65, 128]))
    if kind == "wrong":
        b, t = draw(st.sampled_from([(b, t), (0, t), (b, 0)]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    tensor = torch.randn(b, t, h, generator=g)
    if kind == "poisoned" and tensor.numel():
        index = draw(st.integers(0, tensor.numel() - 1))
        tensor.view(-1)[index] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return serialize(tensor.to(DTYPES[draw(st.sampled_from(sorted(DTYPES)))]))


def model_ids(server: BlockServer) -> st.SearchStrategy[str]:
    return mostly(st.sampled_from(["", _servicer(server).backend.model_id]), st.text(max_size=10))


def adapter_refs(digest: str) -> st.SearchStrategy[str]:
    return mostly(
        st.sampled_from(["", digest]),
        st.one_of(st.text(alphabet="0123456789abcdef", max_size=64), st.text(max_size=8)),
    )


# -- Forward -------------------------------------------------------------------------------


def check_forward(server: BlockServer, raw: pb_grpc.BlockServiceStub, digest: str, data: st.DataObject) -> None:
    start, end = data.draw(spans)
    req = pb.ForwardRequest(
        model_id=data.draw(model_ids(server)),
        start=start,
        end=end,
        hidden=data.draw(hidden_tensors()),
        adapter=data.draw(adapter_refs(digest)),
    )
    response = outcome(lambda: raw.Forward(req, timeout=TIMEOUT))
    if response is not None:
        assert (response.hidden.dtype, list(response.hidden.shape)) == (req.hidden.dtype, list(req.hidden.shape))
        assert len(response.hidden.data) == len(req.hidden.data)
    still_serving(server, raw)


@FAST
@given(data=st.data())
def test_forward_fuzz(server: BlockServer, raw: pb_grpc.BlockServiceStub, digest: str, data: st.DataObject) -> None:
    check_forward(server, raw, digest, data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_forward_fuzz_long(
    server: BlockServer, raw: pb_grpc.BlockServiceStub, digest: str, data: st.DataObject
) -> None:
    check_forward(server, raw, digest, data)


# -- Backward, then ClipSum ------------------------------------------------------------------


def clip_factors(batch: int) -> st.SearchStrategy[pb.Tensor]:
    """Mostly valid (B,) factors in [0, 2]; else NaN, inf, negative, or any tensor at all."""
    return mostly(
        st.lists(st.floats(0, 2, width=32), min_size=batch, max_size=batch).map(
            lambda xs: serialize(torch.tensor(xs, dtype=torch.float32))
        ),
        st.one_of(
            tensor_messages(),
            st.sampled_from([float("nan"), float("inf"), -1.0]).map(
                lambda x: serialize(torch.full((batch,), x, dtype=torch.float32))
            ),
        ),
    )


def _forget(raw: pb_grpc.BlockServiceStub, step_id: str, batch: int) -> None:
    """Take any gradients a NORMS backward left under `step_id`, so that cases stay independent."""
    clip = pb.ClipSumRequest(step_id=step_id, clip_factors=serialize(torch.ones(batch)))
    outcome(lambda: raw.ClipSum(clip, timeout=TIMEOUT))


def check_backward(server: BlockServer, raw: pb_grpc.BlockServiceStub, digest: str, data: st.DataObject) -> None:
    # everything is drawn before the first call: a draw may end the case, and the server keeps state
    hidden = data.draw(hidden_tensors())
    # the same (B, T) as hidden, when hidden has one small enough to build a tensor of
    small = len(hidden.shape) == 3 and all(1 <= d <= 8 for d in hidden.shape[:2])
    same = small and data.draw(mostly(st.just(True), st.just(False)))
    grad_output = data.draw(hidden_tensors(hidden.shape[0], hidden.shape[1]) if same else hidden_tensors())
    start, end = data.draw(spans)
    req = pb.BackwardRequest(
        model_id=data.draw(model_ids(server)),
        start=start,
        end=end,
        hidden=hidden,
        grad_output=grad_output,
        adapter=data.draw(adapter_refs(digest)),
        adapter_grads=data.draw(mostly(st.integers(0, 2), st.just(3))),  # type: ignore[arg-type]  # 3 is no mode
        step_id=data.draw(step_ids),
        skip_grad_input=data.draw(st.booleans()),
    )
    batch = hidden.shape[0] if small else 1
    clip = pb.ClipSumRequest(
        step_id=data.draw(mostly(st.just(req.step_id), st.just(req.step_id + "x"))),
        clip_factors=data.draw(clip_factors(batch)),
    )
    response = outcome(lambda: raw.Backward(req, timeout=TIMEOUT))
    try:
        if response is not None:
            if not req.skip_grad_input:
                assert list(response.grad_input.shape) == list(hidden.shape)
            if req.adapter_grads == pb.ADAPTER_GRADS_NORMS and req.adapter:
                assert list(response.squared_norms.shape) == [batch]
                event("ClipSum after a NORMS backward")
                summed = outcome(lambda: raw.ClipSum(clip, timeout=TIMEOUT))
                if summed is not None:
                    assert {item.name for item in summed.adapter_grads} == {
                        tensor_name(b, m, p)
                        for b in range(req.start, req.end)
                        for m in _lora_shapes(server)
                        for p in ("lora_A", "lora_B")
                    }
    finally:
        _forget(raw, req.step_id, batch)
    still_serving(server, raw)


@FAST
@given(data=st.data())
def test_backward_fuzz(server: BlockServer, raw: pb_grpc.BlockServiceStub, digest: str, data: st.DataObject) -> None:
    check_backward(server, raw, digest, data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_backward_fuzz_long(
    server: BlockServer, raw: pb_grpc.BlockServiceStub, digest: str, data: st.DataObject
) -> None:
    check_backward(server, raw, digest, data)


def check_clip_sum(server: BlockServer, raw: pb_grpc.BlockServiceStub, digest: str, data: st.DataObject) -> None:
    """A NORMS backward leaves per-sample gradients; a fuzzed ClipSum asks for their sum."""
    batch, step_id = data.draw(st.integers(1, 3)), data.draw(step_ids)
    backward = pb.BackwardRequest(
        start=START,
        end=END,
        hidden=serialize(torch.randn(batch, 2, HIDDEN)),
        grad_output=serialize(torch.randn(batch, 2, HIDDEN)),
        adapter=digest,
        adapter_grads=pb.ADAPTER_GRADS_NORMS,
        step_id=step_id,
        skip_grad_input=True,
    )
    clip = pb.ClipSumRequest(
        step_id=data.draw(mostly(st.just(step_id), step_ids)), clip_factors=data.draw(clip_factors(batch))
    )
    held = outcome(lambda: raw.Backward(backward, timeout=TIMEOUT)) is not None
    try:
        summed = outcome(lambda: raw.ClipSum(clip, timeout=TIMEOUT))
        if summed is not None:
            assert held and clip.step_id == step_id, "ClipSum summed gradients no backward left"
            shapes = _lora_shapes(server)
            names = {tensor_name(b, m, p) for b in range(START, END) for m in shapes for p in ("lora_A", "lora_B")}
            assert {item.name for item in summed.adapter_grads} == names
            assert outcome(lambda: raw.ClipSum(clip, timeout=TIMEOUT)) is None  # consumed
    finally:
        _forget(raw, step_id, batch)
    still_serving(server, raw)


@FAST
@given(data=st.data())
def test_clip_sum_fuzz(server: BlockServer, raw: pb_grpc.BlockServiceStub, digest: str, data: st.DataObject) -> None:
    check_clip_sum(server, raw, digest, data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_clip_sum_fuzz_long(
    server: BlockServer, raw: pb_grpc.BlockServiceStub, digest: str, data: st.DataObject
) -> None:
    check_clip_sum(server, raw, digest, data)


# -- PutAdapter ----------------------------------------------------------------------------


@st.composite
def server_adapters(draw: st.DrawFn, server: BlockServer) -> pb.Adapter:
    """Adapters near a valid one for this server: a wrong rank, block, module or half, a
    dropped tensor, a stale hash; and the fuzzer's arbitrary ones."""
    if draw(st.integers(0, 3)) == 0:
        return draw(wire_adapters())
    message = _good_adapter(server, rank=draw(st.integers(1, 3)), seed=draw(st.integers(0, 99)))
    change = draw(mostly(st.just("none"), st.sampled_from(["drop", "rename", "rank", "scaling", "hash"])))
    items = list(message.tensors)
    if change == "drop":
        del items[draw(st.integers(0, len(items) - 1))]
    elif change == "rename":
        index = draw(st.integers(0, len(items) - 1))
        block = draw(st.sampled_from([0, 1, 2, 3, 999]))
        module = draw(st.sampled_from(["self_attn.q_proj", "self_attn.rotary_emb", "input_layernorm", "mlp"]))
        items[index] = pb.NamedTensor(
            name=tensor_name(block, module, items[index].name.rsplit(".", 1)[1]), tensor=items[index].tensor
        )
    elif change == "rank":
        index = draw(st.integers(0, len(items) - 1))
        items[index] = pb.NamedTensor(
            name=items[index].name, tensor=serialize(torch.zeros(draw(st.integers(0, 5)), 64))
        )
    if change in ("drop", "rename", "rank"):
        weights = {item.name: deserialize(item.tensor, name=item.name) for item in items}
        message = adapter_message(weights, message.scaling) if weights else pb.Adapter(hash="", scaling=1.0)
    elif change == "scaling":
        message.scaling = draw(st.sampled_from([float("nan"), float("inf"), 1e6, -1e7, 0.0]))
    elif change == "hash":
        message.hash = draw(st.sampled_from(["", message.hash[:-1] + "0", message.hash.upper(), "é" * 64]))
    return message


def check_put_adapter(server: BlockServer, raw: pb_grpc.BlockServiceStub, data: st.DataObject) -> None:
    req = pb.PutAdapterRequest(model_id=data.draw(model_ids(server)), adapter=data.draw(server_adapters(server)))
    response = outcome(lambda: raw.PutAdapter(req, timeout=TIMEOUT))
    if response is not None:
        assert response.hash == req.adapter.hash
        forward = pb.ForwardRequest(
            start=START, end=END, hidden=serialize(torch.randn(1, 2, HIDDEN)), adapter=response.hash
        )
        out = raw.Forward(forward, timeout=TIMEOUT)
        assert list(out.hidden.shape) == [1, 2, HIDDEN]
    still_serving(server, raw)


@FAST
@given(data=st.data())
def test_put_adapter_fuzz(server: BlockServer, raw: pb_grpc.BlockServiceStub, data: st.DataObject) -> None:
    check_put_adapter(server, raw, data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_put_adapter_fuzz_long(server: BlockServer, raw: pb_grpc.BlockServiceStub, data: st.DataObject) -> None:
    check_put_adapter(server, raw, data)


# -- Inference streams ---------------------------------------------------------------------

session_ids = mostly(
    st.sampled_from(["s1", "s2", "x" * 128]), st.one_of(st.sampled_from(["", "x" * 129]), st.text(max_size=6))
)


@st.composite
def opens(draw: st.DrawFn, server: BlockServer, digest: str) -> pb.InferenceRequest:
    start, end = draw(spans)
    return pb.InferenceRequest(
        session_id=draw(session_ids),
        open=pb.OpenSession(
            model_id=draw(model_ids(server)),
            start=start,
            end=end,
            max_length=draw(mostly(st.integers(1, 16), st.sampled_from([0, MAX_LENGTH, MAX_LENGTH + 1, UINT32]))),
            batch_size=draw(mostly(st.integers(1, 3), st.sampled_from([0, 64, UINT32]))),
            adapter=draw(adapter_refs(digest)),
        ),
    )


@st.composite
def steps(draw: st.DrawFn, session_id: str, batch: int, length: int) -> pb.InferenceRequest:
    """A step of the open session at its current `length`, or one with a bad field."""
    return pb.InferenceRequest(
        session_id=draw(mostly(st.just(session_id), session_ids)),
        step=pb.Step(
            hidden=draw(hidden_tensors(batch=draw(mostly(st.just(batch), st.sampled_from([1, 2]))))),
            position=draw(
                mostly(st.integers(max(0, length - 2), length), st.sampled_from([min(length + 1, UINT32), UINT32]))
            ),
        ),
    )


@st.composite
def streams(draw: st.DrawFn, server: BlockServer, digest: str) -> list[pb.InferenceRequest]:
    first = draw(mostly(opens(server, digest), st.one_of(steps("s1", 1, 0), st.just(pb.InferenceRequest()))))
    batch = min(first.open.batch_size, 4) if first.WhichOneof("kind") == "open" else 1
    messages, length = [first], 0
    for _ in range(draw(st.integers(0, 4))):
        message = draw(mostly(steps(first.session_id, batch, length), opens(server, digest)))
        if message.WhichOneof("kind") == "step" and len(message.step.hidden.shape) == 3:
            length = min(max(length, message.step.position + message.step.hidden.shape[1]), UINT32)  # if accepted
        messages.append(message)
    return messages


cancels = mostly(st.none(), st.integers(0, 2))


def check_inference(
    server: BlockServer, raw: pb_grpc.BlockServiceStub, messages: list[pb.InferenceRequest], cancel_after: int | None
) -> None:
    """One stream; the client hangs up after `cancel_after` + 1 answers when that is not None."""
    responses: list[pb.InferenceResponse] = []

    def run() -> list[pb.InferenceResponse]:
        call = raw.Inference(iter(messages), timeout=TIMEOUT)
        for response in call:
            responses.append(response)
            if cancel_after is not None and len(responses) > cancel_after:
                call.cancel()
                break
        return responses

    outcome(run)
    # every answer belongs to the session that was opened, and its length only grows by its step
    for index, response in enumerate(responses):
        assert response.session_id == messages[0].session_id
        if index == 0:
            assert response.length == 0 and not response.hidden.shape
        else:
            step = messages[index].step
            assert list(response.hidden.shape) == list(step.hidden.shape)
            assert response.length == step.position + step.hidden.shape[1] <= messages[0].open.max_length
    still_serving(server, raw)


@FAST
@given(data=st.data())
def test_inference_fuzz(server: BlockServer, raw: pb_grpc.BlockServiceStub, digest: str, data: st.DataObject) -> None:
    check_inference(server, raw, data.draw(streams(server, digest)), data.draw(cancels))


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_inference_fuzz_long(
    server: BlockServer, raw: pb_grpc.BlockServiceStub, digest: str, data: st.DataObject
) -> None:
    check_inference(server, raw, data.draw(streams(server, digest)), data.draw(cancels))


def test_still_serves_a_client_after_fuzzing(server: BlockServer, raw: pb_grpc.BlockServiceStub) -> None:
    out = raw.Forward(
        pb.ForwardRequest(start=START, end=END, hidden=serialize(torch.randn(2, 3, HIDDEN))), timeout=TIMEOUT
    )
    assert list(out.hidden.shape) == [2, 3, HIDDEN]
    still_serving(server, raw)
