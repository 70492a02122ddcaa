"""Fuzzing the wire decoders: any message either decodes to what re-encodes to the same
bytes, or is refused with `BadRequestError`, never another exception, and nothing is
allocated beyond the bytes that came.

Each property runs twice: a few derandomized cases in the default suite (the same cases
on every run), and many random ones under `-m slow`. A failure prints the smallest
message hypothesis found, to paste into a known-answer test.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from corolla.inference.errors import BadRequestError
from corolla.inference.wire import blocks_pb2 as pb
from corolla.inference.wire.adapters import (
    adapter_hash,
    adapter_message,
    parse_adapter,
    parse_name,
    tensor_name,
)
from corolla.inference.wire.tensors import DTYPES, MAX_RANK, deserialize, serialize

# no example database, no deadline and no speed check: CI machines are shared and slow
_common: dict[str, Any] = {"database": None, "deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
FAST = settings(max_examples=200, derandomize=True, **_common)  # the default suite: the same cases every run
SLOW = settings(max_examples=5000, **_common)  # `-m slow`: fresh random cases on every run

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
INT64 = (-(1 << 63), (1 << 63) - 1)

# -- strategies ----------------------------------------------------------------------------

dtype_names = st.one_of(
    st.sampled_from(sorted(DTYPES)),
    st.sampled_from(["", "int64", "float64", "uint8", "bool", "Float32", "float32 ", "pickle", "bfloat16\x00"]),
    st.text(max_size=12),
)
# small sizes mostly, then the edges: zero, negative, products past int64
dims = st.one_of(
    st.integers(0, 6),
    st.integers(-3, -1),
    st.sampled_from([1 << 31, 1 << 32, 1 << 62, INT64[1], INT64[0]]),
    st.integers(*INT64),
)
shapes = st.lists(dims, max_size=MAX_RANK + 3)


@st.composite
def tensor_messages(draw: st.DrawFn, shape: st.SearchStrategy[list[int]] = shapes) -> pb.Tensor:
    """Any `Tensor` message: often with exactly the bytes its shape needs, else a few off."""
    dtype, got = draw(dtype_names), draw(shape)
    need = ITEMSIZE.get(dtype, 4) * math.prod(got) if all(0 <= d <= 64 for d in got) else None
    if need is not None and need <= 4096 and draw(st.booleans()):
        size = max(0, need + draw(st.sampled_from([0, 0, 0, -1, 1, -2, 2])))
    else:
        size = draw(st.integers(0, 64))
    return pb.Tensor(dtype=dtype, shape=got, data=draw(st.binary(min_size=size, max_size=size)))


expected_shapes = st.one_of(
    st.none(),
    st.lists(st.one_of(st.none(), st.integers(0, 4)), max_size=4).map(tuple),
)


@contextmanager
def allocations_bounded_by(nbytes: int) -> Iterator[None]:
    """Fail if `torch.empty` is asked for more than `nbytes` (what the decoder may allocate)."""
    real = torch.empty

    def empty(*size: Any, **kwargs: Any) -> torch.Tensor:
        sizes = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        itemsize = torch.tensor([], dtype=kwargs.get("dtype", torch.float32)).element_size()
        asked = itemsize * math.prod(int(d) for d in sizes)
        assert asked <= nbytes, f"torch.empty{tuple(sizes)} asks for {asked} bytes for {nbytes} bytes of data"
        return real(*size, **kwargs)

    with mock.patch.object(torch, "empty", empty):
        yield


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and serialize(a).data == serialize(b).data


# -- tensors -------------------------------------------------------------------------------


def check_deserialize(message: pb.Tensor, shape: tuple[int | None, ...] | None, max_elements: int | None) -> None:
    try:
        with allocations_bounded_by(len(message.data) + 8):
            tensor = deserialize(message, name="x", shape=shape, max_elements=max_elements)
    except BadRequestError as exc:
        assert str(exc).startswith("x: ") or "dtype" in str(exc)
        return
    # accepted: exactly what was sent, and it encodes back to the same message
    assert tensor.dtype == DTYPES[message.dtype]
    assert tuple(tensor.shape) == tuple(message.shape)
    assert shape is None or (
        len(shape) == tensor.dim() and all(w is None or w == g for w, g in zip(shape, tensor.shape, strict=True))
    )
    assert max_elements is None or tensor.numel() <= max_elements
    back = serialize(tensor)
    assert (back.dtype, list(back.shape), back.data) == (message.dtype, list(message.shape), message.data)
    tensor.float().sum()  # usable as a tensor: arithmetic does not raise


_tensor_args: dict[str, st.SearchStrategy[Any]] = {
    "message": tensor_messages(),
    "shape": expected_shapes,
    "max_elements": st.one_of(st.none(), st.integers(0, 64)),
}


@FAST
@given(**_tensor_args)
@example(message=pb.Tensor(dtype="float32", shape=[0, 1 << 62, 2], data=b""), shape=None, max_elements=None)
@example(message=pb.Tensor(dtype="float32", shape=[0, INT64[1], 1, 2], data=b""), shape=None, max_elements=None)
@example(message=pb.Tensor(dtype="float32", shape=[1] * 65, data=b"\0" * 4), shape=None, max_elements=None)
@example(message=pb.Tensor(dtype="float32", shape=[1 << 62, 1 << 62], data=b""), shape=None, max_elements=None)
@example(message=pb.Tensor(dtype="bfloat16", shape=[], data=b"\x80\x3f"), shape=None, max_elements=None)
def test_deserialize_decodes_or_refuses(
    message: pb.Tensor, shape: tuple[int | None, ...] | None, max_elements: int | None
) -> None:
    check_deserialize(message, shape, max_elements)


@pytest.mark.slow
@SLOW
@given(**_tensor_args)
def test_deserialize_decodes_or_refuses_long(
    message: pb.Tensor, shape: tuple[int | None, ...] | None, max_elements: int | None
) -> None:
    check_deserialize(message, shape, max_elements)


@pytest.mark.parametrize(
    "got",
    [[0, 1 << 62, 2], [0, INT64[1], 1, 2], [1] * (MAX_RANK + 1), [0] * 65],
    ids=["zero-size-stride-overflow", "zero-size-int64-max", "rank-over-limit", "rank-65-zero-size"],
)
def test_shapes_torch_cannot_hold_are_bad_requests(got: list[int]) -> None:
    """Found by the fuzzer: zero-size shapes past int64 raised torch's RuntimeError (INTERNAL
    on a server). Ranks past MAX_RANK decoded, into tensors torch cannot compute on past 64 dims."""
    with pytest.raises(BadRequestError, match=r"too large|rank"):
        deserialize(pb.Tensor(dtype="float32", shape=got, data=b""), name="x")


def check_protobuf_bytes(raw: bytes) -> None:
    """Bytes straight off the network: protobuf refuses them, or they decode or are refused."""
    try:
        message = pb.Tensor.FromString(raw)
    except DecodeError:
        return
    check_deserialize(message, None, None)


@FAST
@given(raw=st.binary(max_size=96))
def test_protobuf_bytes_decode_or_refuse(raw: bytes) -> None:
    check_protobuf_bytes(raw)


@pytest.mark.slow
@SLOW
@given(raw=st.binary(max_size=512))
def test_protobuf_bytes_decode_or_refuse_long(raw: bytes) -> None:
    check_protobuf_bytes(raw)


@st.composite
def real_tensors(draw: st.DrawFn, shape: st.SearchStrategy[list[int]] | None = None) -> torch.Tensor:
    """Any bit pattern in any wire dtype: NaN payloads, infinities, subnormals, -0."""
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    got = draw(shape if shape is not None else st.lists(st.integers(0, 4), max_size=4))
    size = ITEMSIZE[dtype] * math.prod(got)
    if size == 0:
        return torch.empty(got, dtype=DTYPES[dtype])
    raw = draw(st.binary(min_size=size, max_size=size))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(DTYPES[dtype]).reshape(got)


@FAST
@given(tensor=real_tensors())
def test_every_bit_pattern_round_trips(tensor: torch.Tensor) -> None:
    back = deserialize(serialize(tensor), name="x", shape=tuple(tensor.shape), max_elements=tensor.numel())
    assert _same_bytes(back, tensor)


# -- adapters ------------------------------------------------------------------------------

modules = st.sampled_from(["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "attn.c_attn", "q"])
parts = st.sampled_from(["lora_A", "lora_B"])
names = st.one_of(
    st.builds(tensor_name, st.integers(0, 9), modules, parts),
    st.builds(
        lambda b, m, p: f"{b}.{m}.{p}", st.sampled_from(["03", "٣", "+3", " 3", "3 ", "1234567", "-1"]), modules, parts
    ),
    st.sampled_from(["", ".", "3..lora_A", "3.q.lora_C", "3.q.lora_A\n", "3.1q.lora_A", "3.q.lora_a"]),
    st.text(max_size=24),
)
hashes = st.one_of(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), st.text(max_size=70))
scalings = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 2.0, 1e6, -1e6, 999_999.9, 5e-324]),
)
small_2d = st.lists(st.integers(0, 4), min_size=2, max_size=2)


@st.composite
def wire_adapters(draw: st.DrawFn) -> pb.Adapter:
    """Adapters as a careless or hostile client might send them; a correct hash half the time."""
    items = draw(
        st.lists(
            st.tuples(names, st.one_of(real_tensors().map(serialize), tensor_messages(small_2d), tensor_messages())),
            max_size=4,
        )
    )
    scaling = draw(scalings)
    message = pb.Adapter(
        hash=draw(hashes),
        scaling=scaling,
        tensors=[pb.NamedTensor(name=n, tensor=t) for n, t in items],
    )
    if draw(st.booleans()):
        try:  # the hash of what was sent, when it can be computed at all
            tensors = {n: deserialize(t, name=n) for n, t in items}
            message.hash = adapter_hash(tensors, scaling)
        except (BadRequestError, struct.error):
            pass
    return message


def check_parse_adapter(message: pb.Adapter, max_elements: int) -> None:
    try:
        with allocations_bounded_by(max((len(t.tensor.data) for t in message.tensors), default=0) + 8):
            digest, scaling, tensors = parse_adapter(message, max_elements=max_elements)
    except BadRequestError:
        return
    # accepted: canonical names, 2-D finite tensors within the budget, and the hash is theirs
    assert digest == message.hash == adapter_hash(tensors, scaling)
    assert math.isfinite(scaling) and abs(scaling) < 1e6
    keys = [parse_name(name) for name in tensors]
    assert [tensor_name(k.block, k.module, k.part) for k in keys] == list(tensors)
    assert len(set(keys)) == len(keys)
    assert sum(t.numel() for t in tensors.values()) <= max_elements
    for name, tensor in tensors.items():
        assert tensor.dim() == 2 and bool(torch.isfinite(tensor).all()), name
    again = parse_adapter(adapter_message(tensors, scaling), max_elements=max_elements)
    assert again[0] == digest and all(_same_bytes(again[2][n], tensors[n]) for n in tensors)


@FAST
@given(message=wire_adapters(), max_elements=st.integers(0, 64))
@example(
    message=pb.Adapter(
        hash="é" * 64,
        scaling=1.0,
        tensors=[pb.NamedTensor(name="1.q.lora_A", tensor=serialize(torch.ones(1, 1)))],
    ),
    max_elements=8,
)
def test_parse_adapter_decodes_or_refuses(message: pb.Adapter, max_elements: int) -> None:
    check_parse_adapter(message, max_elements)


@pytest.mark.slow
@SLOW
@given(message=wire_adapters(), max_elements=st.integers(0, 64))
def test_parse_adapter_decodes_or_refuses_long(message: pb.Adapter, max_elements: int) -> None:
    check_parse_adapter(message, max_elements)


def test_non_ascii_hash_is_a_bad_request() -> None:
    """Found by the fuzzer: `hmac.compare_digest` raised TypeError on a non-ASCII str."""
    tensors = {"1.q.lora_A": torch.ones(1, 1)}
    message = adapter_message(tensors, 1.0, digest="é" * 64)
    with pytest.raises(BadRequestError, match="hash does not match"):
        parse_adapter(message, max_elements=8)


@pytest.mark.parametrize("block", ["03", "٣", "۰", "00"])
def test_block_numbers_have_one_spelling(block: str) -> None:
    """Found by the fuzzer: "03" and "٣" (an Arabic-Indic 3) both parsed as block 3, so one
    adapter could carry two tensors for the same weight past the duplicate-name check."""
    with pytest.raises(BadRequestError, match="is not '<block>"):
        parse_name(f"{block}.self_attn.q_proj.lora_A")
    tensors = {"3.q.lora_A": torch.ones(1, 1), f"{block}.q.lora_A": torch.zeros(1, 1)}
    with pytest.raises(BadRequestError, match="is not '<block>"):
        parse_adapter(adapter_message(tensors, 1.0), max_elements=8)


def _valid_adapter_args() -> Callable[..., Any]:
    return given(
        weights=st.dictionaries(
            st.builds(tensor_name, st.integers(0, 999_999), modules, parts),
            real_tensors(small_2d).map(lambda t: torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=-1.0)),
            min_size=1,
            max_size=4,
        ),
        scaling=st.floats(-1e5, 1e5),
    )


@FAST
@_valid_adapter_args()
def test_valid_adapters_are_accepted(weights: dict[str, torch.Tensor], scaling: float) -> None:
    """What a client builds always gets through, so the fuzzer above reaches the end too."""
    digest, got_scaling, tensors = parse_adapter(adapter_message(weights, scaling), max_elements=1 << 20)
    assert digest == adapter_hash(weights, scaling) and got_scaling == scaling
    assert all(_same_bytes(tensors[n], weights[n]) for n in weights)
